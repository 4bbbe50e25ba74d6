"""Optional step of the data path (LoRA runs): right after a layer is solved, each LoRA target's realigned
delta at a LoRA rank, the rank-constrained optimum of the objective the solver used (`core.lowrank`).

H exists only inside the layer loop, so the factors are computed there, one layer at a time, and only they
(on CPU) and their objective gaps are kept: no layer's H outlives its layer. The step runs on every process
after the layer's solve (every rank then holds the same new weights and the same reduced H), so every rank
computes the same factors. `peft_utils` installs them in the PeftModel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import RealignSettings
from ..core.lowrank import LowRankFactors, rank_constrained_group
from ..core.realign import SafetyTerms, fine_tuned_totals
from ..targets import Target
from .hessians import GroupHessians
from .solve import fine_tuned_terms
from .streams import ALIGNED, CALIBRATION, CROSS, RETAIN, SAFETY


@dataclass
class AdapterFactors:
    """Collects `LowRankFactors` per LoRA target name (pass it to `realign(..., lowrank=...)`).

    The rank of each module: `rank` for every module if given (`IRRConfig.lora_refactor_rank`); else the
    smallest rank within `tolerance` if given (`IRRConfig.lora_adapter_tolerance`); else `multiple` × the
    rank the module was trained at (`IRRConfig.lora_rank_multiple`, default 1).
    """

    rank: int | None = None
    tolerance: float | None = None
    multiple: int = 1
    factors: dict[str, LowRankFactors] = field(default_factory=dict)
    _saved: dict[str, tuple] = field(default_factory=dict)

    def before(self, targets: list[Target]) -> None:
        """Before the solve overwrites them: each LoRA target's W_A (cloned on its device, one layer at a time),
        its adapter's factors (small) and its trained rank."""
        self._saved = {}
        for t in targets:
            if t.kind != "lora":
                continue
            module, adapter = t.module, t.adapter
            self._saved[t.name] = (
                t.weight.detach().clone(),
                module.lora_B[adapter].weight.detach().clone(),
                module.lora_A[adapter].weight.detach().clone(),
                float(module.scaling[adapter]),
                int(module.r[adapter]),
            )

    def after(self, groups: list[GroupHessians], settings: RealignSettings) -> None:
        """Per group, its LoRA targets at their ranks, under the group's H and the solver's `settings`."""
        for group, hessians in groups:
            lora = [t for t in group if t.name in self._saved]
            if not lora:
                continue
            hessian, _ = hessians[CALIBRATION]
            device = hessian.device
            dtype = torch.float64 if all(t.weight.dtype == torch.float64 for t in lora) else torch.float32
            bases, deltas, trained = [], [], []
            for t in lora:
                base, lora_b, lora_a, scaling, r = self._saved.pop(t.name)
                bases.append(t.to_out_in(base).to(device=device, dtype=dtype))
                # Δ = scaling · B A in the (out, in) layout, whatever the stored layout (plain LoRA only)
                deltas.append(
                    (lora_b.to(device=device, dtype=dtype) @ lora_a.to(device=device, dtype=dtype)) * scaling
                )
                trained.append(r)
            # with a removal mask the solver's Δ′ (= W′ − W_A) is truncated; without one it is not read
            solved = (
                [t.to_out_in(t.weight.detach()).to(device=device, dtype=dtype) - b for t, b in zip(lora, bases)]
                if settings.mode != "none"
                else deltas
            )
            found = rank_constrained_group(
                deltas,
                solved,
                hessian,
                settings=settings,
                names=[t.name for t in lora],
                ranks=[self._rank(r) for r in trained],
                tolerance=self.tolerance,
                safety=_safety_terms(hessians, settings, bases),
                trained_ranks=trained,
                retain_hessian=hessians[RETAIN][0] if settings.retain_weight and RETAIN in hessians else None,
            )
            for t, f in zip(lora, found):
                f.b, f.a = f.b.cpu(), f.a.cpu()
                self.factors[t.name] = f
        self._saved = {}

    def _rank(self, trained: int) -> int | None:
        if self.rank is not None:
            return self.rank
        return None if self.tolerance is not None else self.multiple * trained


def _safety_terms(hessians, settings: RealignSettings, bases: list[torch.Tensor]) -> SafetyTerms | None:
    """The safety stream's matrices as the group solver hands them to the solve (none when λ = 0)."""
    if not settings.safety_weight or SAFETY not in hessians:
        return None
    paired = (None, None)
    if CALIBRATION + CROSS in hessians:  # task_term="fine-tuned": summed as the solver sums them
        paired = fine_tuned_totals(fine_tuned_terms(hessians, settings), settings)
    if SAFETY + CROSS not in hessians:
        return SafetyTerms(hessians[SAFETY][0], bases if paired[0] is not None else None, None, None, *paired)
    return SafetyTerms(hessians[SAFETY][0], bases, hessians[SAFETY + CROSS][0], hessians[SAFETY + ALIGNED][0], *paired)
