"""The Trainer + IRRCallback case, run both by a 2-process torchrun and by the single-process reference.

Both runs see the same global batches: `GLOBAL_BATCH` sequences per step, split into
`GLOBAL_BATCH // world_size` per process (accelerate hands consecutive per-device batches of the
one seeded sampler order to consecutive ranks, so the two runs draw the same sequences per step).
SGD (no Adam: its g/|g| step amplifies summation-order noise into visible weight differences) keeps
the fine-tuned weights of the two runs equal up to float summation order.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import datasets
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from irr_callback import IRRCallback, IRRConfig
from tests import callback_world as world


GLOBAL_BATCH = 8
STEPS = 3


def save_models(directory: str) -> dict[str, str]:
    """An untrained tiny Llama ("aligned") and a perturbed copy ("unaligned") saved from a config."""
    torch.manual_seed(0)
    tok = world.tokenizer()
    aligned = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    unaligned = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unaligned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    paths = {"aligned": os.path.join(directory, "aligned"), "unaligned": os.path.join(directory, "unaligned")}
    aligned.save_pretrained(paths["aligned"])
    unaligned.save_pretrained(paths["unaligned"])
    tok.save_pretrained(paths["aligned"])
    return paths


def safety_dataset() -> datasets.Dataset:
    prompts = world.harmful_prompts()[:8]
    return datasets.Dataset.from_dict({"prompt": prompts, "response": [world.REFUSAL] * len(prompts)})


class Probe(TrainerCallback):
    """The fine-tuned weights just before IRR (registered before the IRRCallback)."""

    state: dict[str, torch.Tensor] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(paths: dict[str, str], out_dir: str, world_size: int) -> dict[str, Any]:
    """Fine-tune + IRR (remove_ratio 0.5: the Fisher is computed in the run too); returns what to compare.

    Counts the callback's directory writes on this process (`irr_callback.outputs.realigned_model.atomic_directory`, the
    one writer the callback saves through) and the realigned checkpoint copies it writes
    (`realign_checkpoints=True`, checkpoints 2 and 3: `irr_callback.pipeline.checkpoint.atomic_directory`).
    """
    import irr_callback.outputs.realigned_model as output_module
    import irr_callback.pipeline.checkpoint as checkpoint_module

    writes, checkpoint_writes = [], []
    original = output_module.atomic_directory

    def counting(target, into=writes):
        into.append(target)
        return original(target)

    output_module.atomic_directory = counting
    checkpoint_module.atomic_directory = lambda target: counting(target, checkpoint_writes)
    try:
        model = LlamaForCausalLM.from_pretrained(paths["aligned"])
        config = IRRConfig(
            unaligned_model=paths["unaligned"],
            remove_ratio=0.5,
            fisher_batch_size=2,
            cache_dir=os.path.join(out_dir, "cache"),
            num_calibration_samples=10,
            calibration_batch_size=2,
            irr_output_dir=os.path.join(out_dir, "irr"),
            realign_checkpoints=True,
        )
        callback = IRRCallback(config, safety_dataset=safety_dataset())
        probe = Probe()
        args = TrainingArguments(
            os.path.join(out_dir, "run"),
            report_to=[],
            use_cpu=True,
            max_steps=STEPS,
            per_device_train_batch_size=GLOBAL_BATCH // world_size,
            optim="sgd",
            learning_rate=0.5,
            save_strategy="steps",
            save_steps=2,
            disable_tqdm=True,
            logging_strategy="no",
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=world.attack_dataset(),
            processing_class=world.tokenizer(),
            data_collator=DataCollatorForSeq2Seq(world.tokenizer()),
            callbacks=[probe, callback],
        )
        callback.bind(trainer)
        trainer.train()
    finally:
        output_module.atomic_directory = checkpoint_module.atomic_directory = original
    live = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    report = callback.report
    return {
        "finetuned": probe.state,
        "live": live,
        "writes": writes,
        "checkpoint_writes": checkpoint_writes,
        "status": report.status,
        "removed": sum(m.removed for m in report.modules),
        "modules": len(report.modules),
        "tokens": report.calibration_tokens,
        "sources": json.loads(json.dumps(callback.sources)),
    }
