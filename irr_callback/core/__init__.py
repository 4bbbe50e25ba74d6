"""Pure math of IRR: identify, remove, recalibrate, Hessian accumulation. No Trainer, no distributed code."""

from .hessian import HessianAccumulator
from .identify import removal_mask, sign_conflicts
from .obs import NumericalError, factor_hessian, obs_sweep, output_error, upper_cholesky_of_inverse
from .realign import realign_group, realign_matrix
from .settings import RealignSettings
from .stats import ModuleStats


__all__ = [
    "HessianAccumulator",
    "ModuleStats",
    "NumericalError",
    "RealignSettings",
    "factor_hessian",
    "obs_sweep",
    "output_error",
    "realign_group",
    "realign_matrix",
    "removal_mask",
    "sign_conflicts",
    "upper_cholesky_of_inverse",
]
