"""Recalibrate: the OBS / SparseGPT sweep applied to a fine-tuning delta.

Pure tensor code. Given the calibration Hessian H of a layer input, removing entries of the delta
is compensated on the not-yet-processed columns so that Δ'X stays close to ΔX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class NumericalError(RuntimeError):
    """The math failed for one module (Cholesky, NaN/Inf); the message names the module."""


@dataclass
class InverseFactor:
    """Upper Cholesky factor U of the damped inverse Hessian (H + λI)⁻¹ = UᵀU."""

    upper: torch.Tensor
    damping: float
    retries: int
    dead: torch.Tensor  # bool, input columns never active on calibration data


def upper_cholesky_of_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """U with H⁻¹ = UᵀU, U upper triangular, from ONE Cholesky and ONE triangular inverse.

    Reversing the index order P turns it into a lower factorisation: if P H P = L Lᵀ then
    H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and P L⁻¹ P is upper triangular with a positive diagonal, hence the
    Cholesky factor. Half the work of cholesky → cholesky_inverse → cholesky. Raises
    `torch.linalg.LinAlgError` when H is not positive definite.
    """
    lower, info = torch.linalg.cholesky_ex(hessian.flip(0, 1))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky failed at order {int(info)}")
    lower_inv = triangular_inverse(lower)
    upper = lower_inv.flip(0, 1)
    if not torch.isfinite(upper).all():
        raise torch.linalg.LinAlgError("non-finite inverse factor")
    return upper


def triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower-triangular matrix (a triangular solve against the identity).

    Measured and rejected: LAPACK trtri through SciPy does a third of the flops and is 2x faster
    single-threaded, but its OpenBLAS thread pool fights torch's OpenMP pool on a busy machine
    (30x slower at n = 512 under load); see benchmarks/README.md.
    """
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False)


def inverse_hessian_factor(
    hessian: torch.Tensor, *, percdamp: float, max_retries: int = 6, name: str = "module"
) -> InverseFactor:
    """Damp H (λ = percdamp · mean diag H), handle dead inputs, factorise; retry with 10x damping.

    Never falls back to an identity inverse: after `max_retries` failures it raises
    `NumericalError` naming the module.
    """
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = float(diag.mean())
    damping = percdamp * mean_diag
    for attempt in range(max_retries + 1):
        damped = h.clone()
        damped.diagonal().add_(damping)
        try:
            return InverseFactor(upper_cholesky_of_inverse(damped), damping, attempt, dead)
        except torch.linalg.LinAlgError:
            damping = max(damping * 10.0, 1e-6 * mean_diag)
    raise NumericalError(
        f"{name}: the Hessian is not positive definite even with damping {damping / 10:.3g} after "
        f"{max_retries} retries; use more calibration data or a larger IRRConfig.percdamp"
    )


SelectFn = Callable[[int, int, torch.Tensor], torch.Tensor]


def obs_sweep(
    delta: torch.Tensor, upper: torch.Tensor, select: SelectFn, *, blocksize: int = 128, subblock: int = 16,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove entries column by column and push each removal's error onto later columns.

    `select(i1, i2, block)` returns the removal mask of columns [i1, i2) given their current
    (already compensated) values: the mask is fixed per block (the adaptive mask). Updates are
    lazy at two levels, within `subblock` columns and after each block, which is exact
    re-association of the per-column update, done as few large matrix products.

    Returns the new delta (removed entries exactly 0), the per-row sum of squared scaled errors
    Σ e² (the output error measured with the damped Hessian) and the removal mask. `inplace`
    sweeps `delta` itself (saves one copy of the matrix).
    """
    w = delta if inplace else delta.clone()
    rows, cols = w.shape
    removed_all = torch.zeros_like(w, dtype=torch.bool)
    err_sq = torch.zeros(rows, dtype=w.dtype, device=w.device)
    inv_diag = 1.0 / upper.diagonal()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2]  # a view: updates land in w
        removed = select(i1, i2, block)
        removed_all[:, i1:i2] = removed
        mask = removed.to(block.dtype)
        u_block = upper[i1:i2, i1:i2]
        errors = torch.empty_like(block)
        count = i2 - i1
        for j1 in range(0, count, subblock):
            j2 = min(j1 + subblock, count)
            for c in range(j1, j2):
                e = block[:, c] * mask[:, c] * inv_diag[i1 + c]
                errors[:, c] = e
                if c + 1 < j2:  # rank-1 update as addmm_: torch's CPU addr_ is ~75x slower here
                    block[:, c + 1:j2].addmm_(e.unsqueeze(1), u_block[c:c + 1, c + 1:j2], alpha=-1.0)
            if j2 < count:
                block[:, j2:].addmm_(errors[:, j1:j2], u_block[j1:j2, j2:], alpha=-1.0)
        block.masked_fill_(removed, 0.0)
        if i2 < cols:
            w[:, i2:].addmm_(errors, upper[i1:i2, i2:], alpha=-1.0)
        err_sq.add_(errors.square().sum(dim=1))
    return w, err_sq, removed_all


def masked_removal(delta: torch.Tensor, select: SelectFn, *, blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain removal (no compensation): returns (new delta, removal mask) block by block."""
    mask = removal_mask_plain(delta, select, blocksize=blocksize)
    return delta.masked_fill(mask, 0.0), mask


def removal_mask_plain(delta: torch.Tensor, select: SelectFn, *, blocksize: int = 128) -> torch.Tensor:
    """The removal mask of plain removal (blocks selected on the unmodified delta), without the copy."""
    mask = torch.zeros_like(delta, dtype=torch.bool)
    for i1 in range(0, delta.shape[1], blocksize):
        i2 = min(i1 + blocksize, delta.shape[1])
        mask[:, i1:i2] = select(i1, i2, delta[:, i1:i2])
    return mask


def output_error(change: torch.Tensor, hessian: torch.Tensor, *, blocksize: int = 512) -> torch.Tensor:
    """Per-row xᵀHx for a change X of the delta: the layer-output error it causes.

    H is symmetric, so only its upper block triangle is multiplied (off-diagonal blocks counted
    twice): half the flops of the plain (X H) ⊙ X.
    """
    rows, cols = change.shape
    out = torch.zeros(rows, dtype=change.dtype, device=change.device)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        x = change[:, b0:b1]
        y = x @ hessian[b0:b1, b0:]
        out += torch.linalg.vecdot(y[:, :b1 - b0], x, dim=1)
        if b1 < cols:
            out += 2.0 * torch.linalg.vecdot(y[:, b1 - b0:], change[:, b1:], dim=1)
    return out
