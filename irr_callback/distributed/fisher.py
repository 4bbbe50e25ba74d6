"""Fisher importance under a process group: each rank's share of the safety batches, padded with
zero-weight batches, and Σ grad² summed over ranks once."""

from __future__ import annotations

from typing import Any

import torch

from .collectives import all_reduce_count, all_reduce_sum_, is_fsdp1, shard_batches


def fisher_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """A copy of a safety batch whose loss is multiplied by zero (`irr_weight`)."""
    return {**batch, "irr_weight": 0.0}


def shard_fisher_batches(batches: Any, max_batches: int | None) -> list[dict[str, Any]]:
    """The first `max_batches` safety batches (the same on every rank), this rank's share, padded."""
    full = []
    for batch in batches:
        if max_batches is not None and len(full) >= max_batches:
            break
        full.append(batch)
    if not full:
        raise ValueError("fisher: no batch was given")
    for index, batch in enumerate(full):  # checked on every rank, before any collective
        if "labels" not in batch:
            raise ValueError("fisher: every batch needs 'labels' (-100 on prompt and padding tokens)")
        if int((torch.as_tensor(batch["labels"]) != -100).sum()) == 0:
            raise ValueError(f"fisher: batch #{index} has no labelled token")
    return shard_batches(full, fisher_padding)


def reduce_fisher_(sums: dict[str, torch.Tensor], count: int) -> int:
    """Σ grad² per parameter and the batch count summed over ranks (in place; one reduction per tensor)."""
    for tensor in sums.values():
        all_reduce_sum_(tensor)
    return all_reduce_count(count)


def check_local_gradients(model: torch.nn.Module) -> None:
    """Σ grad² is exact only with per-rank, unsynchronised gradients: refuse wrapped/sharded models."""
    if type(model).__name__ == "DistributedDataParallel":
        raise ValueError(
            "fisher: pass the unwrapped model (ddp_model.module): DDP averages gradients across "
            "ranks, which would make the squared gradients wrong"
        )
    for p in model.parameters():
        if type(p).__name__ == "DTensor" or hasattr(p, "ds_id") or is_fsdp1(model):
            raise ValueError(
                "fisher: sharded parameters (FSDP / ZeRO-3) reduce-scatter gradients, so per-batch "
                "squared gradients cannot be formed; compute the Fisher once per base model "
                "with DDP or one GPU (`irr fisher`) and pass the file (IRRConfig.fisher)"
            )
        break
