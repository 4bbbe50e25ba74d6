"""The distributed test cases, shared by the torchrun worker and the single-process references.

Each case builds its inputs deterministically from seeds, so every rank and the reference process
see the same models and data.
"""

from __future__ import annotations

import contextlib
import copy

import torch

import irr_callback as irr
from irr_callback import IRRConfig, realign
from irr_callback.distributed import context_for, is_fsdp1
from irr_callback.distributed.shards import full_weight
from irr_callback.pipeline.calibration import calibration_batches
from irr_callback.pipeline.capture import capture_layer_inputs
from irr_callback.pipeline.hessians import collect_stream
from irr_callback.targets import find_targets
from tests.helpers import VOCAB, calibration, refused_calibration, triple


CALIBRATION = dict(n=10, length=8, seed=3)  # batch size 2 -> 5 batches: 3 + 2 (+1 padding) on 2 ranks
CONFIG = dict(calibration_batch_size=2, fallback_to_removal=True)


def safety_batches(n: int = 5, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (2, 7), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # loss on the "response" only
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def fisher_case() -> dict[str, torch.Tensor]:
    base, _, _ = triple("llama")
    names = [n for n, _ in base.named_parameters() if "layers.0" in n]
    return irr.fisher(base, safety_batches(), names=names, progress=False)


def hessian_case() -> dict[str, torch.Tensor]:
    """Σxxᵀ-based H and token counts of layer 0's inputs (q/k/v, o, gate/up, down)."""
    _, ft, _ = triple("llama")
    _, layers, targets = find_targets(ft)
    batches = calibration_batches(calibration(**CALIBRATION), max_samples=128, max_length=512, batch_size=2)
    ctx = context_for(ft, targets)
    batches = ctx.shard_calibration(batches)
    masks = [b.get("irr_token_mask", b["attention_mask"]) for b in batches]
    with torch.no_grad():
        hidden, args = capture_layer_inputs(ft, layers, batches)
        groups = collect_stream(
            layers[0], [t for t in targets if t.layer == 0], hidden, args[0], masks, reduce=ctx.reduce_hessian
        )
    out = {}
    for group, (h, tokens) in groups:
        out[group[0].name] = h
        out[group[0].name + ".tokens"] = torch.tensor([tokens])
    return out


def realign_case(remove_ratio: float = 1.0, model_fn=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Realigned target weights and the report's totals."""
    base, ft, unaligned = triple("llama")
    v = irr.safety_vector(base, unaligned)
    importance = {k: t.abs() + 0.01 for k, t in v.items()} if remove_ratio < 1 else None
    model = model_fn(ft) if model_fn else ft
    report = realign(
        model,
        base=base,
        safety_vector=v,
        importance=importance,
        calibration=calibration(**CALIBRATION),
        config=IRRConfig(remove_ratio=remove_ratio, **CONFIG),
        progress=False,
    )
    _, _, targets = find_targets(model)
    weights = {t.name: _full(t.weight, model).detach().clone() for t in targets}
    totals = {
        "removed": sum(m.removed for m in report.modules),
        "entries": sum(m.entries for m in report.modules),
        "modules": len(report.modules),
        "tokens": report.calibration_tokens,
    }
    return weights, totals


#: the safety cases: 12 calibration and 6 safety batches, so that with 'auto' the held-out parts (3 and 2 batches)
#: split unevenly over 2 ranks and the shorter share is padded (padding must score nothing)
SAFETY_CALIBRATION = dict(n=24, length=8, seed=3)
SAFETY_BATCHES = 6


def safety_case(
    weight,
    retain: bool = False,
    model_fn=None,
    put_back: bool = False,
    task_term: str = "delta",
    sequential: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The recommended setting (aligned twin, no sign mask) at λ = `weight` (or 'auto'); `retain`: with a retain
    stream (retain_weight 1); `model_fn`: the fine-tuned model sharded (FSDP2, FSDP1, ZeRO-3) or left as it is
    (one process, DDP); `put_back`: no candidate passes, so the smallest one, written as the run, is put back
    through the backend and the search goes on (`AUTO_KEEP_FIRST`); `task_term`: "fine-tuned" adds the calibration
    and retain streams' fine-tuned twins; `sequential`: a pass of each layer per group (`true_sequential`)."""
    from unittest import mock

    from irr_callback.pipeline import auto_weight

    base, ft, _ = triple("llama")
    model = model_fn(ft) if model_fn else ft
    rule = dict(AUTO_TOLERANCE=-1.0, AUTO_MIN_GAP=float("-inf")) if put_back else {}
    with mock.patch.multiple(auto_weight, **rule) if rule else contextlib.nullcontext():
        report = realign(
            model,
            base=base,
            calibration=calibration(**SAFETY_CALIBRATION),
            safety_calibration=safety_batches(n=SAFETY_BATCHES),
            retain_calibration=safety_batches(n=SAFETY_BATCHES, seed=19) if retain else None,
            config=IRRConfig.recommended(
                safety_weight=weight,
                retain_weight=1.0 if retain else 0.0,
                task_term=task_term,
                true_sequential=sequential,
                **CONFIG,
            ),
            progress=False,
        )
    _, _, targets = find_targets(model)
    weights = {t.name: _full(t.weight, model).detach().clone() for t in targets}
    totals = {
        "modules": len(report.modules),
        "tokens": report.calibration_tokens,
        "safety_tokens": report.safety_tokens,
        "safety_weight": report.safety_weight,
        "candidates": [c["safety_weight"] for c in (report.auto or {}).get("candidates", [])],
        "losses": [
            [c["task_loss"], c["safety_loss"], c["retain_loss"]] for c in (report.auto or {}).get("candidates", [])
        ],
        "references": (report.auto or {}).get("references"),
        "kept": (report.auto or {}).get("kept_written_weights"),
        **({"retain_tokens": report.retain_tokens} if retain else {}),
    }
    return weights, totals


def filter_case(model_fn=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The recommended setting (auto λ) with `calibration_filter="refused"`: 12 calibration rows of which the base
    refuses 2 (`refused_calibration`); every rank judges every row through the aligned weights and drops the same."""
    base, ft, _ = triple("llama")
    rows, safety = refused_calibration(base, n_rows=12, refused=(2, 9), safety_copies=4)
    model = model_fn(ft) if model_fn else ft
    report = realign(
        model,
        base=base,
        calibration=rows,
        safety_calibration=safety,
        config=IRRConfig.recommended(calibration_filter="refused", retain_weight=0.0, **CONFIG),
        progress=False,
    )
    _, _, targets = find_targets(model)
    weights = {t.name: _full(t.weight, model).detach().clone() for t in targets}
    return weights, {"dropped_rows": report.calibration_filter["dropped_rows"], "safety_weight": report.safety_weight}


def lora_case(save_to: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A PeftModel realigned with its adapter at a rank collected (`AdapterFactors`): the
    realigned frozen weights, each module's B·A and rank; `save_to`: also the merged output written
    by `save_realigned(..., rename=merged_state_dict)` (gathered under a process group)."""
    from peft import LoraConfig, get_peft_model

    from irr_callback.outputs.realigned_model import save_realigned
    from irr_callback.peft_utils import merged_state_dict
    from irr_callback.pipeline.lowrank import AdapterFactors

    _, ft, _ = triple("llama")
    torch.manual_seed(11)  # lora_A's init: the same on every rank
    model = get_peft_model(ft, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    factors = AdapterFactors(tolerance=0.2)
    realign(
        model,
        calibration=calibration(**CALIBRATION),
        config=IRRConfig(identify_mode="none", **CONFIG),
        progress=False,
        lowrank=factors,
    )
    _, _, targets = find_targets(model)
    out = {t.name: t.weight.detach().clone() for t in targets}
    out.update({name + ".ba": f.b @ f.a for name, f in factors.factors.items()})
    if save_to is not None:
        save_realigned(model, save_to, rename=merged_state_dict)
    return out, {"ranks": {name: f.rank for name, f in sorted(factors.factors.items())}}


def _full(weight: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
    if hasattr(weight, "ds_id"):
        return zero3_full(weight)
    if model is not None and is_fsdp1(model):
        return full_weight(model, weight)
    return weight.full_tensor() if type(weight).__name__ == "DTensor" else weight


def fsdp2_shard(model: torch.nn.Module) -> torch.nn.Module:
    """Raw FSDP2 on a CPU device mesh: each decoder layer and the root are `fully_shard` units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp1_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP1 on CPU (gloo): each decoder layer and the root are `FullyShardedDataParallel` units
    (`use_orig_params=True`, as accelerate's FSDP1 configs set it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_class = type(model.model.layers[0])
    return FSDP(
        copy.deepcopy(model),
        auto_wrap_policy=ModuleWrapPolicy({layer_class}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )


# ---- ZeRO-3 (DeepSpeed on CPU) ----------------------------------------------------------------
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every weight partitioned
}


def zero3_engine(model: torch.nn.Module):
    """`deepspeed.initialize` with a minimal ZeRO-3 config (no optimizer: IRR needs no training state)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=copy.deepcopy(model), config=ZERO3_CONFIG)
    return engine


def zero3_full(weight: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()
