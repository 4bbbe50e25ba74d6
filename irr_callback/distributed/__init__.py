"""Process-group helpers for IRR inside multi-process jobs (DDP, ZeRO-1/2, FSDP2, ZeRO-3).

Why: users fine-tune on several GPUs and IRR must run in the same job, dividing the work and
giving the single-process result. The rules, followed everywhere here:

- every rank gets the SAME full data and splits it itself (`PartialState.split_between_processes`,
  contiguous shares, no duplicated sample); shorter shares are padded with zero-weight copies so
  every rank runs the same number of forward passes (under FSDP / ZeRO-3 a forward is a collective);
- statistics are raw sums (Σxxᵀ, Σ grad², token and batch counts) reduced ONCE per module with an
  in-place `all_reduce(SUM)`, then normalised;
- no collective is ever behind a rank check; an error on one rank is agreed on by all ranks (one
  flag reduction per layer) so every rank restores its weights instead of hanging.

Without an initialised process group (or with one process) `context_for` returns `SingleProcess`,
whose hooks are no-ops: the single-process path runs no collective.

Files: `collectives` (reductions, broadcast, sharding of batches, error agreement), `base` (the
single-process and replicated contexts), one file per sharded backend (`zero3`, `fsdp2`, `fsdp1`,
imported only when detected), `fisher` (Fisher under a process group), `save` (the full state dict under any backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Replicated, SingleProcess, calibration_padding
from .collectives import (
    all_reduce_count,
    all_reduce_max,
    all_reduce_sum_,
    assign_owners,
    broadcast_,
    device_of_group,
    gather_stats,
    is_distributed,
    is_fsdp1,
    raise_if_any_failed,
    rank_and_world,
    shard_batches,
    split_for_this_rank,
)
from .fisher import check_local_gradients, fisher_padding, reduce_fisher_, shard_fisher_batches
from .save import full_state_dict
from .shards import GatheredWeights, ShardedSnapshot, generation_scope


__all__ = [
    "Replicated",
    "SingleProcess",
    "all_reduce_count",
    "all_reduce_max",
    "all_reduce_sum_",
    "assign_owners",
    "broadcast_",
    "calibration_padding",
    "check_local_gradients",
    "context_for",
    "device_of_group",
    "GatheredWeights",
    "ShardedSnapshot",
    "fisher_padding",
    "full_state_dict",
    "generation_scope",
    "gather_stats",
    "is_distributed",
    "is_fsdp1",
    "raise_if_any_failed",
    "rank_and_world",
    "reduce_fisher_",
    "shard_batches",
    "shard_fisher_batches",
    "sharding_kind",
    "split_for_this_rank",
]

#: backend class name -> the module that defines it (imported on first use: DeepSpeed is optional)
_BACKENDS = {"Zero3": "zero3", "RowSharded": "fsdp2", "FSDP1": "fsdp1"}


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        import importlib

        return getattr(importlib.import_module(f".{_BACKENDS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sharding_kind(model: torch.nn.Module, targets: Sequence[Any]) -> str | None:
    """'zero3', 'fsdp2' or 'fsdp1' when the target weights are sharded over processes; None when every
    process holds them whole (one process, DDP). Cheap, no collectives: callers may check settings early."""
    if not is_distributed():
        return None
    weights = [t.weight for t in targets]
    if any(hasattr(w, "ds_id") for w in weights):
        return "zero3"
    if any(type(w).__name__ == "DTensor" or type(getattr(w, "data", None)).__name__ == "DTensor" for w in weights):
        return "fsdp2"
    return "fsdp1" if is_fsdp1(model) else None


def context_for(model: torch.nn.Module, targets: Sequence[Any]) -> SingleProcess:
    """The realign context matching how `model` is distributed (detected from its target weights)."""
    if not is_distributed():
        return SingleProcess()
    kind = sharding_kind(model, targets)
    if kind == "zero3":
        from .zero3 import Zero3

        return Zero3()
    if kind == "fsdp2":
        from .fsdp2 import RowSharded

        return RowSharded(model)
    if kind == "fsdp1":
        from .fsdp1 import FSDP1

        return FSDP1(model)
    return Replicated()
