"""`IRRCallback()` with no arguments, end to end, under every multi-process backend (run by `worker.py`).

DDP and ZeRO-3 run as a `Trainer` under torchrun. The Trainer enables FSDP on GPUs only, so FSDP2 and FSDP1
drive the callback's hooks the way the Trainer calls them (`on_train_begin` on the wrapped model before the
first step, a few optimizer steps, `on_train_end` with the train dataloader) on a `fully_shard` /
`FullyShardedDataParallel` model in the process group. The safety data is the shipped harmful prompts
answered by the base at train begin (the cache under $IRR_CACHE). The callback realigns the live model and writes
`irr_report.json` into output_dir; the realigned model is then saved the way each user saves it:
`trainer.save_model(...)` (DDP, ZeRO-3), `irr_callback.outputs.save_realigned` (a hand-written FSDP loop).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerControl, TrainerState, TrainingArguments

from irr_callback import IRRCallback
from irr_callback.outputs.realigned_model import save_realigned
from tests import callback_world as world


STEPS = 3
BATCH = 8  # per process

ZERO3 = {
    "train_micro_batch_size_per_gpu": BATCH,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,  # accelerate's zero3_save_16bit_model (the recipe's)
    },
}


def arguments(out_dir: str, **extra: Any) -> TrainingArguments:
    return TrainingArguments(
        out_dir,
        report_to=[],
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=2e-3,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        **extra,
    )


def trainer_run(out_dir: str, deepspeed: dict | None = None) -> tuple[IRRCallback, torch.nn.Module]:
    """`Trainer(..., callbacks=[IRRCallback()])`: DDP (the torchrun process group), or ZeRO-3 (`deepspeed=`)."""
    callback = IRRCallback()
    args = arguments(out_dir, **({"deepspeed": deepspeed} if deepspeed else {}))
    trainer = Trainer(
        model=world.aligned_model(),
        args=args,
        train_dataset=world.attack_dataset(),
        processing_class=world.tokenizer(),
        data_collator=DataCollatorForSeq2Seq(world.tokenizer()),
        callbacks=[callback],
    )
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "model"))
    return callback, trainer.model


def hooks_run(out_dir: str, wrap) -> tuple[IRRCallback, torch.nn.Module]:
    """The Trainer's calls into the callback around a hand-written loop on a sharded model."""
    model = wrap(world.aligned_model())
    tokenizer = world.tokenizer()
    data = world.attack_dataset()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, sampler=sampler, collate_fn=DataCollatorForSeq2Seq(tokenizer)
    )
    args, state, control = arguments(out_dir), TrainerState(max_steps=STEPS), TrainerControl()
    callback = IRRCallback()
    hooks = {"model": model, "processing_class": tokenizer, "train_dataloader": loader}
    callback.on_train_begin(args, state, control, **hooks)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    model.train()
    batches = iter(loader)
    for step in range(STEPS):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step + 1
        callback.on_step_end(args, state, control, **hooks)
    callback.on_train_end(args, state, control, **hooks)
    save_realigned(model, os.path.join(out_dir, "model"), processing_class=tokenizer)  # every rank (collective)
    return callback, model


def fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp1(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({type(model.model.layers[0])})
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def run(backend: str, out_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One no-argument run; returns the realigned model's full state (main process) and what to check."""
    from irr_callback.distributed import full_state_dict

    out = os.path.join(out_dir, f"noarg_{backend}")
    os.environ["IRR_CACHE"] = os.path.join(out_dir, f"cache_{backend}")  # each backend's base answers once itself
    if backend == "ddp":
        callback, model = trainer_run(out)
    elif backend == "zero3":
        callback, model = trainer_run(out, deepspeed=ZERO3)
    else:
        callback, model = hooks_run(out, fsdp2 if backend == "fsdp2" else fsdp1)
    state = full_state_dict(model)  # collective: the live realigned model, gathered on the main process
    report = callback.report
    info = {
        "status": report.status,
        "error": report.error,
        "setting": report.setting,
        "safety_weight": report.safety_weight,
        "auto": report.auto is not None,
        "output_path": callback.output_path,
        "sharding": _sharding(model),
        "safety_data": json.loads(json.dumps(callback.sources.get("safety_data"))),
        "world_size": torch.distributed.get_world_size(),
    }
    return (state or {}), info


def _sharding(model: torch.nn.Module) -> str | None:
    from irr_callback.distributed import sharding_kind
    from irr_callback.targets import find_targets

    _, _, targets = find_targets(model)
    return sharding_kind(model, targets)
