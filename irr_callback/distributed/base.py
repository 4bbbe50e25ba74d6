"""The realign contexts' base: the hook points the layer loop calls, for one process and for
replicated weights (DDP, ZeRO-1/2). The sharded backends (`zero3`, `fsdp2`, `fsdp1`) subclass `Replicated`.

Each context receives the pipeline's `GroupSolver` (`solver(group, hessians)` solves and writes one
group; `solver.solve` / `solver.write` separately, on a process's rows) and calls it on what it holds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
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
from .shards import Overlay, ShardedSnapshot, whole_base


#: a parameter and a function giving the value it takes for a while (called on every rank, in order)
Swap = tuple[torch.Tensor, Callable[[], torch.Tensor]]
#: inside a write scope: parameter -> (the tensor to write in place, the global rows it holds or None)
WriteView = Callable[[torch.Tensor], tuple[torch.Tensor, slice | None]]


def calibration_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a calibration batch whose tokens all carry zero weight in H (`irr_token_mask`) and, when the
    batch is scored (`irr_loss_mask`, safety_weight='auto'), in the held-out losses."""
    padding = {**batch, "irr_token_mask": torch.zeros_like(batch["attention_mask"])}
    if "irr_loss_mask" in batch:
        padding["irr_loss_mask"] = torch.zeros_like(batch["irr_loss_mask"])
    return padding


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

    # -- temporary weights: the aligned twin's W_A, auto's trial weights ------------------------------
    def settle(self) -> None:
        """Before the parameters to swap are looked up: every module's parameters are the ones a write must
        change (FSDP2: sharded again, the root keeps its gathered weights after a forward)."""

    @contextlib.contextmanager
    def swapped(self, swaps: Sequence[Swap]) -> Iterator[None]:
        """The parameters hold the given values inside (the aligned twin's layer): whole weights are swapped
        by reference, nothing copied. The sharded backends copy each rank's part in and out instead."""
        saved = []
        try:
            for param, value in swaps:
                saved.append((param, param.data))
                param.data = value().to(device=param.device, dtype=param.dtype)
            yield
        finally:
            for param, data in saved:
                param.data = data

    @contextlib.contextmanager
    def write_scope(self, params: Sequence[torch.Tensor]) -> Iterator[WriteView]:
        """Inside: `view(param)` is what to write in place; what rank 0 writes is every rank's on exit (every rank
        writes the same values). Whole weights here; the sharded backends gather or give each rank's rows."""
        yield lambda param: (param, None)

    @contextlib.contextmanager
    def whole_base(self, groups: list, solver: Any) -> Iterator[None]:
        """The solver reads whole base weights of `groups` inside: a base held in shards (the callback's
        snapshot under ZeRO-3 / FSDP1) is gathered one group at a time (collective), else nothing changes."""
        base = solver.inputs.base
        if not isinstance(base, ShardedSnapshot):
            yield
            return
        whole = whole_base(base, [t.name for group, _ in groups for t in group if t.kind != "lora"])
        solver.inputs.base = Overlay(whole, base)
        try:
            yield
        finally:
            solver.inputs.base = base


def swap_by_copy(swaps: Sequence[Swap], scope: Callable, select: Callable) -> contextlib.AbstractContextManager:
    """`SingleProcess.swapped` for sharded weights: each rank copies its part of every value in (keeping what
    was there), and back on exit, inside `scope(params)` (a write scope). `select(value, tensor, rows, param)`:
    the part of `value` that `tensor` (holding the global `rows` of `param`) takes."""

    @contextlib.contextmanager
    def run() -> Iterator[None]:
        if not swaps:  # e.g. the embedding when the base holds the targets only
            yield
            return
        params = [p for p, _ in swaps]
        values = [value() for _, value in swaps]  # every rank, in order: may gather (collective)
        saved = []
        try:
            with torch.no_grad(), scope(params) as view:
                for param, value in zip(params, values):
                    tensor, rows = view(param)
                    saved.append(tensor.detach().to("cpu", copy=True))
                    tensor.copy_(select(value, tensor, rows, param).to(device=tensor.device, dtype=tensor.dtype))
            del values
            yield
        finally:
            if saved:
                with torch.no_grad(), scope(params) as view:
                    for param, original in zip(params, saved):
                        tensor, _ = view(param)
                        tensor.copy_(original.to(tensor.device))

    return run()


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
        sizes = [sum(math.prod(t.stored_shape) for t in group) for group, _ in groups]
        return assign_owners(sizes, self.world_size)

    def solve_layer(self, groups, solver) -> None:
        owners = self.owners(groups)
        error: BaseException | None = None
        with self.whole_base(groups, solver):
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
