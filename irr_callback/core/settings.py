"""The settings of one IRR solve, as one frozen object: what `realign_group` reads, and nothing else.

The package builds it from `IRRConfig` in one place (`irr_callback.config.IRRConfig.realign_settings`);
`core/` never sees the config, so its functions stay callable with plain arguments.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RealignSettings:
    """Identification, removal and recalibration settings of `realign_group` / `realign_matrix`.

    Args:
        remove_ratio: fraction of the sign conflicts (ranked by importance) removed per block.
        remove_more: also remove deltas that agree in sign with the safety vector (ranked by importance).
        recalibrate: run the OBS sweep after removal (False: plain removal).
        blocksize: columns per block of the sweep.
        percdamp: damping added to H's diagonal, relative to its mean.
        mode: identification mode ('sign', 'no_sign', 'random', 'none').
        seed: seed of the 'random' identification.
        max_damping_retries: times the damping is increased tenfold when H is not positive definite.
        fallback_to_removal: keep plain removal for a module where it has the lower output error.
        removal_error: compute the output errors for the report and the fallback (plain removal's; with λ > 0
            also both terms of the objective). Off in `safety_weight="auto"`'s trial solves.
        safety_weight: λ of the safety-regularised recalibration (0: the paper's IRR).
        ridge: with λ > 0, the ridge toward the fine-tuned delta, relative to mean(diag H_d).
        retain_weight: ρ of the retain term ρ‖(Δ′ − Δ)X_r‖² (general prompts kept at the fine-tuned layer's
            outputs): the task metric becomes H_d + ρH_r everywhere H_d is used. 0: no retain term.
    """

    remove_ratio: float = 1.0
    remove_more: bool = False
    recalibrate: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    mode: str = "sign"
    seed: int = 0
    max_damping_retries: int = 6
    fallback_to_removal: bool = False
    removal_error: bool = True
    safety_weight: float = 0.0
    ridge: float = 0.1
    retain_weight: float = 0.0

    @property
    def uses_importance(self) -> bool:
        """Importance (Fisher) decides what is removed only when a ranking does."""
        return self.mode in ("sign", "no_sign") and self.remove_ratio < 1.0
