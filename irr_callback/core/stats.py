"""What `realign_group` reports per weight matrix: plain data, serialised by the package's report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ModuleStats:
    """Statistics of one realigned weight matrix.

    Errors are tr((Δ'−Δ) H (Δ'−Δ)ᵀ) with the undamped calibration Hessian H = 2XXᵀ/n, i.e. the
    mean squared change of the layer output on calibration tokens (times 2). With a safety weight
    λ > 0, `error_safety` is the safety term (‖Δ'‖²_{H_s}, or ‖W'X_r − W_A X_A‖² with the aligned
    target) and `error_removal` is plain removal's task + λ · safety objective. With a retain weight
    ρ > 0 the task term is under H_d + ρH_r (calibration and retain streams), and `error_retain` is its
    retain part ‖(Δ'−Δ)X_r‖² = tr((Δ'−Δ) H_r (Δ'−Δ)ᵀ) alone.
    """

    name: str
    shape: tuple[int, ...]
    entries: int
    conflicts: int
    removed: int
    dead_columns: int = 0
    error_recalibrated: float | None = None
    error_removal: float | None = None
    damping: float | None = None
    damping_retries: int = 0
    recalibrated: bool = False
    fell_back_to_removal: bool = False
    safety_weight: float = 0.0
    error_safety: float | None = None
    retain_weight: float = 0.0
    error_retain: float | None = None
    layer: int | None = None
    hessian_tokens: int | None = None
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        return self.removed / self.entries if self.entries else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["removed_fraction"] = self.removed_fraction
        return out
