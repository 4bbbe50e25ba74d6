"""Step 3 of the data path: the group solve. Per group of targets that read the same input: build
the stacked Δ from the safety inputs, call `core.realign_group`, write W_A + Δ′.

Every backend calls this solver: one process and the replicated backends on whole weights, FSDP2 on
the rows a process holds (`local`), ZeRO-3 inside its gather. Only this file writes realigned weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..core import ModuleStats, RealignSettings, realign_group
from ..core.realign import FineTunedTerms, row_spans
from ..report import IRRReport
from ..targets import Target
from .inputs import SafetyInputs
from .memory import release_free_memory
from .streams import ALIGNED, CALIBRATION, CROSS, RETAIN, SAFETY
from .writing import Backup, write_weight


#: {stream name: (H, token count)} of one group's input
StreamHessians = Mapping[str, tuple[torch.Tensor, int]]
#: per target of a group: (the local rows it holds as a plain tensor, which global rows they are)
LocalRows = Sequence[tuple[torch.Tensor, slice]]


@dataclass
class GroupSolver:
    """Solves and writes groups of one run: the explicit contract every backend is handed.

    Args:
        inputs: base, safety vector and importance.
        settings: the solver settings (`IRRConfig.realign_settings()`).
        backup: where every written tensor's original goes first (all-or-nothing).
        report: where each module's statistics are appended.
    """

    inputs: SafetyInputs
    settings: RealignSettings
    backup: Backup
    report: IRRReport

    def __call__(self, group: list[Target], hessians: StreamHessians) -> None:
        """Solve one group on whole weights and write the result."""
        results = self.solve(group, hessians)
        self.write(group, results, hessians)
        results = None  # the last view keeps the whole solver output alive
        release_free_memory()  # this group's solver buffers, before the next group allocates its own

    def solve(
        self,
        group: list[Target],
        hessians: StreamHessians,
        *,
        local: LocalRows | None = None,
        settings: RealignSettings | None = None,
    ) -> list[tuple[torch.Tensor, ModuleStats]]:
        """The new deltas (out, in) and statistics of `group`, nothing written. `local`: only these rows.

        With a safety weight, the safety stream's H_s (and, for the aligned target, its twin's H_A, the
        cross Gram and W_A) go to the solver beside the calibration H; with a retain weight, the retain
        stream's H_r."""
        hessian, _ = hessians[CALIBRATION]
        device = hessian.device
        dtype = group_dtype(group)
        rows = [self._num_rows(t, local, k) for k, t in enumerate(group)]
        stacked = torch.empty(sum(rows), group[0].out_in_shape[1], dtype=dtype, device=device)  # the group's Δ
        deltas, safeties, scores = [], [], []
        for k, (t, (r0, r1)) in enumerate(zip(group, row_spans(rows))):
            weight, span = local[k] if local is not None else (None, None)
            deltas.append(self.inputs.delta_into(t, stacked[r0:r1], weight=weight, rows=span))
            safeties.append(self.inputs.signs(t, device, rows=span))
            scores.append(self.inputs.scores(t, device, rows=span))
        settings = settings or self.settings
        return realign_group(
            deltas,
            safeties,
            scores,
            hessian,
            names=[t.name for t in group],
            settings=settings,
            **self._safety_terms(group, hessians, settings, local, device, dtype),
        )

    def _safety_terms(self, group, hessians: StreamHessians, settings, local, device, dtype) -> dict:
        """The safety and retain streams' matrices for `realign_group` (none when λ = 0 and ρ = 0)."""
        terms = {}
        if settings.retain_weight and RETAIN in hessians:
            terms["retain_hessian"] = hessians[RETAIN][0]
        if not settings.safety_weight or SAFETY not in hessians:
            return terms
        terms["safety_hessian"] = hessians[SAFETY][0]
        spans = [local[k][1] if local is not None else None for k in range(len(group))]
        if SAFETY + CROSS in hessians or CALIBRATION + CROSS in hessians:
            terms["bases"] = [self.inputs.base_weight(t, device, dtype, rows=r) for t, r in zip(group, spans)]
        if SAFETY + CROSS in hessians:
            terms.update(safety_cross=hessians[SAFETY + CROSS][0], aligned_hessian=hessians[SAFETY + ALIGNED][0])
        if CALIBRATION + CROSS in hessians:  # task_term="fine-tuned": the fine-tuned twins' pairs
            terms["fine_tuned"] = fine_tuned_terms(hessians, settings)
        return terms

    def write(self, group: list[Target], results, hessians: StreamHessians, *, local: LocalRows | None = None) -> None:
        """W′ = W_A + Δ′ (W_A read again, lazily, rather than held through the solve); stats to the report."""
        _, tokens = hessians[CALIBRATION]
        for k, (t, (new_delta, stats)) in enumerate(zip(group, results)):
            weight, span = local[k] if local is not None else (None, None)
            new = self.inputs.base_weight(t, new_delta.device, new_delta.dtype, rows=span) + new_delta
            if weight is None:
                write_weight(t, new, self.backup)
            else:
                self.backup.save(weight)
                weight.copy_(new.to(dtype=weight.dtype, device=weight.device))
                stats.shape = t.stored_shape
            stats.layer, stats.hessian_tokens = t.layer, tokens
            self.report.modules.append(stats)

    def without_fallback(self) -> RealignSettings:
        """The settings with the removal fallback left to the caller (FSDP2 decides it over all rows)."""
        return replace(self.settings, fallback_to_removal=False)

    @staticmethod
    def _num_rows(t: Target, local: LocalRows | None, k: int) -> int:
        return t.out_in_shape[0] if local is None else local[k][0].shape[0]


def fine_tuned_terms(hessians: StreamHessians, settings: RealignSettings) -> FineTunedTerms:
    """The calibration (and, with a retain term, the retain) stream's pairs with its fine-tuned twin."""
    retain = settings.retain_weight != 0 and RETAIN + CROSS in hessians
    return FineTunedTerms(
        hessians[CALIBRATION + CROSS][0],
        hessians[CALIBRATION + ALIGNED][0],
        hessians[RETAIN + CROSS][0] if retain else None,
        hessians[RETAIN + ALIGNED][0] if retain else None,
    )


def group_dtype(group: list[Target]) -> torch.dtype:
    """float64 when every weight is float64, else float32 (the solver's precision)."""
    return torch.float64 if all(t.weight.dtype == torch.float64 for t in group) else torch.float32
