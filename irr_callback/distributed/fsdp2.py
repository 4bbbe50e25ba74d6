"""FSDP2 (`fully_shard`): parameters are DTensors sharded on dim 0, each rank holds whole output rows.

Why no weight gather: given H, the OBS update and the sign test are independent per output row, so
each rank recalibrates its own rows on `p.to_local()` in place. Three things span rows and get a
collective here instead: H (all-reduced raw sums, as everywhere), the per-module "recalibration vs
plain removal" choice (the two errors summed over ranks, then decided identically everywhere), and
the report's counts. Configurations whose per-block ranking spans all rows (0 < remove_ratio < 1,
identify_mode 'random') and GPT-2 style Conv1D (sharded on input columns) take the gather path:
the group's full weights are gathered (`full_tensor()`), one owner solves, the result is broadcast
and each rank keeps its rows. Peak extra memory there: one group's full weights on every rank.

Both paths call the pipeline's group solver (`solver.solve` / `solver.write` on the local rows, or
`solver(...)` on the gathered weights): the delta → core → write step exists once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.identify import removal_mask
from .base import Replicated, Swap, WriteView, swap_by_copy
from .collectives import all_reduce_sum_, assign_owners, broadcast_, raise_if_any_failed
from .shards import global_shape, is_dtensor, local_rows


class _View:
    """A target seen through another weight tensor (the gathered full weight)."""

    def __init__(self, target: Any, weight: torch.Tensor) -> None:
        self._target, self.weight = target, weight

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class RowSharded(Replicated):
    kind = "fsdp2"
    stop_capture_early = False  # its forward hooks gather/release parameters: let every pass complete

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self._row_local: set[str] = set()

    def solve_layer(self, groups, solver) -> None:
        settings = solver.settings
        for group, _ in groups:
            for t in group:
                if t.kind == "lora":
                    raise ValueError(
                        f"{t.name}: LoRA layers under FSDP2 are not supported by IRR; merge the "
                        "adapter or run IRR on the saved model"
                    )
        row_local = settings.mode != "random" and settings.remove_ratio in (0.0, 1.0)
        error: BaseException | None = None
        gathered = []
        for group, hessians in groups:
            if row_local and all(t.kind == "linear" for t in group):
                local = [local_rows(t.weight) for t in group]
                results = None
                if error is None:
                    try:
                        results = solver.solve(group, hessians, local=local, settings=solver.without_fallback())
                    except Exception as exc:
                        error = exc
                # the error agreement is a collective: keep every rank in step even after a failure
                self._agree_fallback(group, local, results, hessians, solver)
            else:
                gathered.append((group, hessians))
        raise_if_any_failed(error)
        if gathered:
            self._solve_gathered(gathered, solver)

    # -- temporary weights: each rank copies its rows in and out (no gather) --------------------------
    def swapped(self, swaps: Sequence[Swap]) -> contextlib.AbstractContextManager:
        return swap_by_copy(swaps, self.write_scope, _rows_of)

    def settle(self) -> None:
        """Reshard every FSDP2 unit: the root keeps its gathered parameters after a forward (no reshard after
        forward at the root), so a write to its shards (the embedding's W_A) would not reach the next forward and
        a write to the gathered copy would be lost at the next reshard."""
        if self.model is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextlib.contextmanager
    def write_scope(self, params: Sequence[torch.Tensor]) -> Iterator[WriteView]:
        self.settle()  # the shards are the weights: the next forward gathers what is written here
        yield lambda param: local_rows(param) if is_dtensor(param) else (param, None)

    # -- row-local path ---------------------------------------------------------------------------
    def _agree_fallback(self, group, local, results, hessians, solver) -> None:
        """Sum both errors over ranks, choose recalibration or plain removal per module like one process,
        then write this rank's rows."""
        settings = solver.settings
        # per module: the recalibration's task and safety errors, plain removal's error, and whether it has one
        # (nothing is removed with identify_mode='none': no plain removal to fall back to, as in one process)
        errors = torch.zeros(4 * len(group), dtype=torch.float64)
        if results is not None:
            for k, (_, stats) in enumerate(results):
                errors[4 * k] = stats.error_recalibrated or 0.0
                errors[4 * k + 1] = stats.error_safety or 0.0
                errors[4 * k + 2] = stats.error_removal or 0.0
                errors[4 * k + 3] = stats.error_removal is not None and stats.error_recalibrated is not None
        all_reduce_sum_(errors)
        if results is None:
            return
        for k, (t, (shard, rows), (new_delta, stats)) in enumerate(zip(group, local, results)):
            e_recal, e_safety, e_plain = (float(e) for e in errors[4 * k : 4 * k + 3])
            comparable = float(errors[4 * k + 3]) == self.world_size
            objective = e_recal + (stats.safety_weight or 0.0) * e_safety
            if settings.recalibrate and settings.fallback_to_removal and comparable and e_plain < objective:
                delta = solver.inputs.delta_into(t, torch.empty_like(new_delta), weight=shard, rows=rows)
                signs = solver.inputs.signs(t, delta.device, rows=rows)
                mask = removal_mask(
                    delta,
                    signs,
                    remove_ratio=settings.remove_ratio,
                    remove_more=settings.remove_more,
                    mode=settings.mode,
                )
                results[k] = (delta.masked_fill(mask, 0.0), stats)
                stats.removed, stats.recalibrated, stats.fell_back_to_removal = int(mask.sum()), False, True
                stats.error_safety = None
            self._row_local.add(t.name)
        solver.write(group, results, hessians, local=local)

    # -- gather path ------------------------------------------------------------------------------
    def _solve_gathered(self, items, solver) -> None:
        owners = assign_owners([sum(t.weight.numel() for t in g) for g, _ in items], self.world_size)
        fulls = [[t.weight.full_tensor() for t in group] for group, _ in items]
        error: BaseException | None = None
        with self.whole_base(items, solver):  # a base held as rows (the callback's snapshot): gathered
            for (group, hessians), full, owner in zip(items, fulls, owners):
                if owner == self.rank and error is None:
                    try:
                        solver([_View(t, w) for t, w in zip(group, full)], hessians)
                    except Exception as exc:
                        error = exc
        raise_if_any_failed(error)
        for (group, _), full, owner in zip(items, fulls, owners):
            for t, w in zip(group, full):
                broadcast_(w, owner)
                shard, rows = local_rows(t.weight)
                solver.backup.save(shard)
                shard.copy_(w[rows].to(shard.dtype))

    def merge_stats(self, modules, order):
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, modules)
        merged: dict[str, Any] = {}
        for part in gathered:
            for s in part:
                if s.name not in merged:
                    merged[s.name] = s
                elif s.name in self._row_local:  # row shards of one module: add the counts
                    m = merged[s.name]
                    m.entries += s.entries
                    m.conflicts += s.conflicts
                    m.removed += s.removed
                    m.error_recalibrated = _add(m.error_recalibrated, s.error_recalibrated)
                    m.error_removal = _add(m.error_removal, s.error_removal)
                    m.error_safety = _add(m.error_safety, s.error_safety)
                    m.seconds = max(m.seconds, s.seconds)
        return [merged[name] for name in order if name in merged]


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


def _rows_of(value: torch.Tensor, tensor: torch.Tensor, rows: slice | None, param: Any) -> torch.Tensor:
    """The rows of `value` a rank's shard takes: `value` is the whole weight, or already this rank's rows
    (a `ShardedSnapshot` entry, a DTensor)."""
    if is_dtensor(value):
        return value.to_local()
    if rows is None or tuple(value.shape) != global_shape(param):
        return value
    return value[rows]
