"""What a TRL user's output directory holds after `train()`, `save_model()` and `push_to_hub()` (issue 23).

  python benchmarks/trl_outputs.py          # writes benchmarks/results/trl_outputs.{md,json}

Three `SFTTrainer` flows on a tiny chat model (ChatML-style template, `messages` data, built in-process,
no hub) with `callbacks=[IRRCallback()]` (the recommended setting: the base answers the default harmful
prompts at train begin): full fine-tuning with `assistant_only_loss`; LoRA through `peft_config` with
`packing=True`; full fine-tuning on prompt/completion data (completion-only loss) with IRR's own copy
asked for (`irr_output_dir=<output_dir>/_irr`). For each: `ls -R output_dir`, what `push_to_hub` would
upload (the Trainer's own ignore patterns, read from its call to `upload_folder`, which is replaced by a
recorder), the IRR section of the root model card, and the seconds the base took to answer the prompts.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time

import _common  # noqa: F401  (puts the repository root on sys.path)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 96
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + ' <|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' <|im_end|>' }}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)
HUB_ID = "irr-test/tiny-chat-irr"


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w6"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="w6"
    )
    out.chat_template = CHATML
    return out


def model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def data(kind: str, n: int = 48):
    import datasets
    import torch

    g = torch.Generator().manual_seed(0)

    def words(k: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(len(SPECIAL), VOCAB, (k,), generator=g))

    if kind == "prompt-completion":
        rows = [
            {
                "prompt": [{"role": "user", "content": words(3 + k % 5)}],
                "completion": [{"role": "assistant", "content": words(2 + k % 4)}],
            }
            for k in range(n)
        ]
    else:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": words(3 + k % 5)},
                    {"role": "assistant", "content": words(2 + k % 4)},
                ]
            }
            for k in range(n)
        ]
    return datasets.Dataset.from_list(rows)


def upload_list(trainer) -> list[str]:
    """`trainer.push_to_hub()` up to the upload; the files `upload_folder` would send."""
    import transformers.trainer
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    calls = []

    class Recorder:
        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    real = transformers.trainer.hf_api
    transformers.trainer.hf_api = lambda: Recorder()
    try:
        trainer.hub_model_id = HUB_ID
        trainer.push_to_hub()
    finally:
        transformers.trainer.hf_api = real
    [call] = calls
    folder = call["folder_path"]
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )
    return list(filter_repo_objects(files, ignore_patterns=list(call["ignore_patterns"]) + DEFAULT_IGNORE_PATTERNS))


def ls_r(root: str) -> str:
    lines = []
    for path, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        rel = os.path.relpath(path, os.path.dirname(root))
        lines.append(f"{rel}:")
        lines.extend(f"  {name}" for name in sorted(dirs + files))
    return "\n".join(lines)


def irr_section(readme: str) -> str:
    text = open(readme, encoding="utf-8").read()
    start, end = "<!-- irr-callback: realigned -->", "<!-- /irr-callback -->"
    if start in text:
        return start + text.split(start, 1)[1].split(end, 1)[0] + end
    return text  # IRR's own card (no Trainer card was written)


def flow(name: str, work: str, sft: dict, irr: dict, kind: str = "messages", lora: bool = False) -> str:
    import json

    import trl
    from peft import LoraConfig

    from irr_callback import IRRCallback, IRRConfig

    out = os.path.join(work, name)
    callback = IRRCallback(IRRConfig.recommended(cache_dir=os.path.join(work, "cache"), **irr))
    args = trl.SFTConfig(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_length=64,
        seed=0,
        **sft,
    )
    trainer = trl.SFTTrainer(
        model=model(),
        args=args,
        train_dataset=data(kind),
        processing_class=tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
        callbacks=[callback],
    )
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.train()
        trainer.save_model()
        files = upload_list(trainer)
    seconds = time.perf_counter() - start
    report = json.load(open(os.path.join(out, "irr_report.json"), encoding="utf-8"))
    data_info = report["extra"]["safety_inputs"].get("safety_data", {})
    setting = ", ".join(f"{k}={v}" for k, v in {**sft, **irr}.items()).replace(work, "<work>")
    return (
        f"## {name}: `SFTConfig({setting})`{' + peft_config (LoRA r=4, q/v)' if lora else ''}\n\n"
        f"status `{report['status']}`, calibration {report['calibration_sequences']} sequences / "
        f"{report['calibration_tokens']} tokens, λ = {report['safety_weight']}, the base's answers to "
        f"{data_info.get('prompts')} default prompts: {data_info.get('generation_seconds')} s "
        f"(cached: {data_info.get('cached')}); whole flow {seconds:.0f} s\n\n"
        f"`ls -R {name}` (after train, save_model, push_to_hub):\n\n```\n{ls_r(out)}\n```\n\n"
        f"What push_to_hub uploads:\n\n```\n" + "\n".join(files) + "\n```\n\n"
        f"The root README.md's IRR section:\n\n```markdown\n{irr_section(os.path.join(out, 'README.md'))}\n```\n"
    )


def main() -> int:
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory() as work:
        sections.append(flow("full", work, {"assistant_only_loss": True}, {"num_calibration_samples": 32}))
        sections.append(flow("lora-packed", work, {"packing": True}, {"num_calibration_samples": 32}, lora=True))
        sections.append(
            flow(
                "full-completion-copy",
                work,
                {"completion_only_loss": True},
                {"num_calibration_samples": 32, "irr_output_dir": os.path.join(work, "full-completion-copy", "_irr")},
                kind="prompt-completion",
            )
        )
    seconds = round(time.perf_counter() - started)
    body = (
        "TRL flows: what output_dir holds and what push_to_hub uploads (issue 23); torch on 1 thread, "
        f"{seconds} s in all. The tiny model is not aligned (random weights), so the log warns that its answers "
        "do not look like refusals; the outputs are what this transcript is about.\n\n" + "\n".join(sections)
    )
    _, path = _common.write_results("trl_outputs", {"seconds": seconds, "load_average": os.getloadavg()}, body)
    print(open(path, encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
