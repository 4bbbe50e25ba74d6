"""FSDP2 (`fully_shard`): parameters are DTensors sharded on dim 0, each rank holds whole output rows.

Why no weight gather: given H, the OBS update and the sign test are independent per output row, so
each rank recalibrates its own rows on `p.to_local()` in place. Three things span rows and get a
collective here instead: H (all-reduced raw sums, as everywhere), the per-module "recalibration vs
plain removal" choice (the two errors summed over ranks, then decided identically everywhere), and
the report's counts. Configurations whose per-block ranking spans all rows (0 < remove_ratio < 1,
identify_mode 'random') and GPT-2 style Conv1D (sharded on input columns) take the gather path:
the group's full weights are gathered (`full_tensor()`), one owner solves, the result is broadcast
and each rank keeps its rows. Peak extra memory there: one group's full weights on every rank.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import distributed as d
from ..core import realign_group
from ..core.identify import removal_mask


def is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor"


def local_rows(weight: Any) -> tuple[torch.Tensor, slice]:
    """The local shard (a plain tensor aliasing the parameter's storage) and the global rows it holds."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(weight.placements)
    if any(not isinstance(p, Shard) or p.dim != 0 for p in placements if not p.is_replicate()):
        raise ValueError(f"FSDP2 weight with placements {placements}: only Shard(0) is supported")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
    return weight.to_local(), slice(offset[0], offset[0] + shape[0])


class _View:
    """A target seen through another weight tensor (the gathered full weight)."""

    def __init__(self, target: Any, weight: torch.Tensor) -> None:
        self._target, self.weight = target, weight

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class RowSharded(d.Replicated):
    kind = "fsdp2"
    stop_capture_early = False  # its forward hooks gather/release parameters: let every pass complete

    def __init__(self) -> None:
        super().__init__()
        self._row_local: set[str] = set()

    def solve_layer(self, groups, solve, backup) -> None:
        kw = solve.keywords
        config = kw["config"]
        for group, _ in groups:
            for t in group:
                if t.kind == "lora":
                    raise ValueError(f"{t.name}: LoRA layers under FSDP2 are not supported by IRR; merge the "
                                     "adapter or run IRR on the saved model")
        row_local = config.identify_mode != "random" and config.remove_ratio in (0.0, 1.0)
        error: Optional[BaseException] = None
        gathered = []
        for group, (hessian, tokens) in groups:
            if row_local and all(t.kind == "linear" for t in group):
                if error is None:
                    try:
                        self._solve_rows(group, hessian, tokens, **kw)
                    except Exception as exc:
                        error = exc
                # the error agreement is a collective: keep every rank in step even after a failure
                self._agree_fallback(group, kw)
            else:
                gathered.append((group, hessian, tokens))
        d.raise_if_any_failed(error)
        if gathered:
            self._solve_gathered(gathered, solve, backup)

    # -- row-local path ---------------------------------------------------------------------------
    def _solve_rows(self, group, hessian, tokens, *, base, safety, importance, config, backup, report) -> None:
        device = hessian.device
        dtype = torch.float64 if all(t.weight.dtype == torch.float64 for t in group) else torch.float32
        shards, bases, deltas, safeties, scores = [], [], [], [], []
        for t in group:
            shard, rows = local_rows(t.weight)
            shards.append(shard)
            w_a = base[t.name][rows].to(device=device, dtype=dtype)
            bases.append(w_a)
            deltas.append(shard.detach().to(device=device, dtype=dtype) - w_a)
            safeties.append(safety[t.name][rows].to(device))
            scores.append(importance[t.name][rows].to(device) if config.needs_importance else None)
        results = realign_group(
            deltas, safeties, scores, hessian, names=[t.name for t in group],
            remove_ratio=config.remove_ratio, remove_more=config.remove_more, recalibrate=config.recalibrate,
            blocksize=config.blocksize, percdamp=config.percdamp, mode=config.identify_mode, seed=config.irr_seed,
            max_damping_retries=config.max_damping_retries, fallback_to_removal=False,
            removal_error=config.fallback_to_removal,
        )
        self._pending = (group, shards, bases, deltas, safeties, results, backup, report, tokens)

    def _agree_fallback(self, group, kw) -> None:
        """Sum both errors over ranks, choose recalibration or plain removal per module like one process."""
        pending = getattr(self, "_pending", None)
        self._pending = None
        config = kw["config"]
        errors = torch.zeros(2 * len(group), dtype=torch.float64)
        if pending is not None:
            for k, (_, stats) in enumerate(pending[5]):
                errors[2 * k] = stats.error_recalibrated or 0.0
                errors[2 * k + 1] = stats.error_removal or 0.0
        d.all_reduce_sum_(errors)
        if pending is None:
            return
        group, shards, bases, deltas, safeties, results, backup, report, tokens = pending
        for k, (t, shard, w_a, delta, signs, (new_delta, stats)) in enumerate(
                zip(group, shards, bases, deltas, safeties, results)):
            e_recal, e_plain = float(errors[2 * k]), float(errors[2 * k + 1])
            if config.recalibrate and config.fallback_to_removal and e_plain < e_recal:
                mask = removal_mask(delta, signs, remove_ratio=config.remove_ratio,
                                    remove_more=config.remove_more, mode=config.identify_mode)
                new_delta = delta.masked_fill(mask, 0.0)
                stats.removed, stats.recalibrated, stats.fell_back_to_removal = int(mask.sum()), False, True
            backup.save(shard)
            shard.copy_((w_a + new_delta).to(dtype=shard.dtype, device=shard.device))
            stats.layer, stats.hessian_tokens = t.layer, tokens
            stats.shape = tuple(t.weight.shape)
            report.modules.append(stats)
            self._row_local.add(t.name)

    # -- gather path ------------------------------------------------------------------------------
    def _solve_gathered(self, items, solve, backup) -> None:
        owners = d.assign_owners([sum(t.weight.numel() for t in g) for g, _, _ in items], self.world_size)
        fulls = [[t.weight.full_tensor() for t in group] for group, _, _ in items]
        error: Optional[BaseException] = None
        for (group, hessian, tokens), full, owner in zip(items, fulls, owners):
            if owner == self.rank and error is None:
                try:
                    solve([_View(t, w) for t, w in zip(group, full)], hessian, tokens)
                except Exception as exc:
                    error = exc
        d.raise_if_any_failed(error)
        for (group, _, _), full, owner in zip(items, fulls, owners):
            for t, w in zip(group, full):
                d.broadcast_(w, owner)
                shard, rows = local_rows(t.weight)
                backup.save(shard)
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
                    m.seconds = max(m.seconds, s.seconds)
        return [merged[name] for name in order if name in merged]


def _add(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)
