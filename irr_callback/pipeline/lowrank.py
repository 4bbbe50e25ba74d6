"""Optional step of the data path (LoRA runs): right after a layer is solved, the H-weighted
low-rank factors of each LoRA target's realigned delta (`core.lowrank`).

H exists only inside the layer loop, so the factors are computed there, one layer at a time, and
only they (on CPU) and their errors are kept: no layer's H outlives its layer. The step runs on
every process after the layer's solve (every rank then holds the same new weights and the same
reduced H), so every rank computes the same factors. `peft_utils` applies them to the PeftModel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.lowrank import LowRankFactors, weighted_lowrank
from ..targets import Target
from .hessians import GroupHessians
from .streams import CALIBRATION


@dataclass
class AdapterFactors:
    """Collects `LowRankFactors` per LoRA target name (pass it to `realign(..., lowrank=...)`).

    Args:
        percdamp: the damping of H (as the solver's `IRRConfig.percdamp`).
        tolerance: the relative layer-output error each module's rank is chosen for.
        rank: a fixed rank for every module instead (`IRRConfig.lora_refactor_rank`).
    """

    percdamp: float
    tolerance: float | None = None
    rank: int | None = None
    factors: dict[str, LowRankFactors] = field(default_factory=dict)
    _bases: dict[str, torch.Tensor] = field(default_factory=dict)

    def before(self, targets: list[Target]) -> None:
        """W_A of the layer's LoRA targets, cloned on their device (one layer at a time), before the solve
        overwrites their frozen weights."""
        self._bases = {t.name: t.weight.detach().clone() for t in targets if t.kind == "lora"}

    def after(self, groups: list[GroupHessians]) -> None:
        """Δ′ = W′ − W_A as stored (what the merged model holds), factored under the group's H."""
        for group, hessians in groups:
            hessian, _ = hessians[CALIBRATION]
            for t in group:
                if t.name not in self._bases:
                    continue
                dtype = torch.float64 if t.weight.dtype == torch.float64 else torch.float32  # as the solver
                realigned = t.to_out_in(t.weight.detach()).to(device=hessian.device, dtype=dtype)
                base = t.to_out_in(self._bases.pop(t.name)).to(device=hessian.device, dtype=dtype)
                found = weighted_lowrank(
                    realigned - base,
                    hessian,
                    percdamp=self.percdamp,
                    tolerance=self.tolerance,
                    rank=self.rank,
                    weight=realigned,
                )
                found.b, found.a = found.b.cpu(), found.a.cpu()
                self.factors[t.name] = found
        self._bases = {}
