"""The realign contexts' base: the hook points the layer loop calls, for one process and for
replicated weights (DDP, ZeRO-1/2). The sharded backends (`zero3`, `fsdp2`, `fsdp1`) subclass `Replicated`.

Each context receives the pipeline's `GroupSolver` (`solver(group, hessians)` solves and writes one
group; `solver.solve` / `solver.write` separately, on a process's rows) and calls it on what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .collectives import (
    all_reduce_count,
    all_reduce_sum_,
    assign_owners,
    broadcast_,
    gather_stats,
    raise_if_any_failed,
    rank_and_world,
    shard_batches,
)


def calibration_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a calibration batch whose tokens all carry zero weight in H (`irr_token_mask`)."""
    return {**batch, "irr_token_mask": torch.zeros_like(batch["attention_mask"])}


class SingleProcess:
    """No process group: every hook is the identity (the single-process path runs no collective)."""

    kind = "single"
    rank, world_size = 0, 1
    stop_capture_early = True  # the input capture may end each forward at the last layer (pipeline.capture)

    def shard_calibration(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return batches

    def reduce_hessian(self, accumulator: Any) -> None:
        """Raw Σxxᵀ and token count of one input, summed over ranks before `finalize`."""

    def solve_layer(self, groups: list, solver: Any) -> None:
        """Realign every group of one layer; on return every rank holds the same new weights.

        `groups`: [(targets, {stream name: (H, tokens)})]. `solver`: the pipeline's `GroupSolver`
        (`solver(group, hessians)` solves and writes a group; its `inputs`, `settings`, `backup` and
        `report` are what backends that solve differently use).
        """
        for group, hessians in groups:
            solver(group, hessians)

    def merge_stats(self, modules: list, order: Sequence[str]) -> list:
        return modules

    def restore(self, backup: Any) -> None:
        backup.restore()


class Replicated(SingleProcess):
    """DDP and ZeRO-1/2: every rank holds the full weights. H is all-reduced; each group is solved
    by one owner (balanced by size) and the new weights are broadcast from it."""

    kind = "replicated"

    def __init__(self) -> None:
        self.rank, self.world_size = rank_and_world()

    def shard_calibration(self, batches):
        return shard_batches(batches, calibration_padding)

    def reduce_hessian(self, accumulator) -> None:
        all_reduce_sum_(accumulator.sum)
        accumulator.tokens = all_reduce_count(accumulator.tokens)

    def owners(self, groups: list) -> list[int]:
        return assign_owners([sum(t.weight.numel() for t in group) for group, _ in groups], self.world_size)

    def solve_layer(self, groups, solver) -> None:
        owners = self.owners(groups)
        error: BaseException | None = None
        for (group, hessians), owner in zip(groups, owners):
            if owner == self.rank and error is None:
                try:
                    solver(group, hessians)
                except Exception as exc:  # agreed on below, then re-raised on every rank
                    error = exc
        raise_if_any_failed(error)
        for (group, _), owner in zip(groups, owners):
            for t in group:
                self._receive(t, owner, solver.backup)

    def _receive(self, target: Any, owner: int, backup: Any) -> None:
        if self.rank != owner:
            backup.save(target.weight)
        broadcast_(target.weight.data, owner)
        if target.kind == "lora" and self.rank != owner:
            lora_b = target.module.lora_B[target.adapter].weight
            backup.save(lora_b)
            lora_b.data.zero_()

    def merge_stats(self, modules, order):
        return gather_stats(modules, order)
