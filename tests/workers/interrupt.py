"""Run `irr apply` or a Trainer with IRRCallback, and freeze at a chosen point of writing the output so
the parent test can SIGKILL this process there.

    python tests/workers/interrupt.py SIGNAL_FILE apply-save     -- apply <irr apply arguments>
    python tests/workers/interrupt.py SIGNAL_FILE apply-rename   -- apply <irr apply arguments>
    python tests/workers/interrupt.py SIGNAL_FILE callback-save  -- OUTPUT_DIR SAFETY_VECTOR IRR_OUTPUT_DIR

`*-save`: after the model weights are written into the temporary directory (tokenizer, report and
card not yet). `apply-rename`: after the previous output was moved aside, before the new one is
renamed into place. At that point SIGNAL_FILE is created and the process sleeps until killed.
"""

from __future__ import annotations

import os
import sys
import time


def freeze(signal_file: str) -> None:
    with open(signal_file, "w", encoding="utf-8") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)
    raise SystemExit("not killed")


def freeze_after_save_pretrained(signal_file: str) -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_then_freeze(self, save_directory, *args, **kwargs):
        original(self, save_directory, *args, **kwargs)
        if ".tmp-" in os.path.basename(os.fspath(save_directory)):
            freeze(signal_file)

    PreTrainedModel.save_pretrained = save_then_freeze


def freeze_before_final_rename(signal_file: str, target: str) -> None:
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.abspath(dst) == os.path.abspath(target) and ".tmp-" in os.path.basename(os.fspath(src)):
            freeze(signal_file)
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def tiny_train_dataset(n: int = 8, length: int = 10):
    import datasets
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (n, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


def train_with_irr(output_dir: str, safety_vector: str, irr_output_dir: str, **config):
    """Two steps of a Trainer on the tiny Llama of tests.helpers, IRR at the end; returns the callback."""
    from transformers import Trainer, TrainingArguments

    from irr_callback import IRRCallback, IRRConfig
    from tests.helpers import tiny_model, tiny_tokenizer

    callback = IRRCallback(
        IRRConfig(safety_vector=safety_vector, irr_output_dir=irr_output_dir, num_calibration_samples=4, **config)
    )
    args = TrainingArguments(
        output_dir,
        report_to=[],
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    trainer = Trainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=tiny_train_dataset(),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )
    callback.bind(trainer)
    trainer.train()
    return callback


def main(argv: list[str]) -> int:
    signal_file, mode, sep, *rest = argv
    assert sep == "--", argv
    import torch

    torch.set_num_threads(1)
    if mode in ("apply-save", "callback-save"):
        freeze_after_save_pretrained(signal_file)
    elif mode == "apply-rename":
        freeze_before_final_rename(signal_file, rest[rest.index("--output") + 1])
    else:
        raise SystemExit(f"unknown mode {mode}")
    if mode.startswith("apply"):
        from irr_callback.cli import main as irr_main

        return irr_main(rest)
    train_with_irr(*rest)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(sys.argv[1:]))
