"""Recalibrate: the OBS / SparseGPT sweep applied to a fine-tuning delta.

Pure tensor code. Given the calibration Hessian H of a layer input, removing entries of the delta
is compensated on the not-yet-processed columns so that Δ'X stays close to ΔX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


class NumericalError(RuntimeError):
    """The math failed for one module (Cholesky, NaN/Inf); the message names the module."""


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: max and min propagate NaN and reach ±Inf; 15x faster than isfinite().all()."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.amax()) and torch.isfinite(tensor.amin()))


@dataclass
class HessianFactor:
    """V, upper triangular, with H + λI = V Vᵀ: the Cholesky factor in reversed index order.

    U = V⁻¹ is the upper Cholesky factor of (H + λI)⁻¹ (H⁻¹ = UᵀU) that the OBS sweep is written
    with; the sweep only ever needs U's 128×128 diagonal blocks (inverted from V's on the fly) and
    products with V, so the n×n inverse is never formed.
    """

    root: torch.Tensor
    damping: float
    retries: int
    dead: torch.Tensor  # bool, input columns never active on calibration data


def reversed_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """V upper triangular with H = V Vᵀ: if P H P = L Lᵀ (P reverses the index order) then
    V = P L P. Raises `torch.linalg.LinAlgError` when H is not positive definite."""
    return _reversed_cholesky_in_place(_flipped_copy(hessian))


def _flipped_copy(hessian: torch.Tensor) -> torch.Tensor:
    """P H P in a new column-major buffer (LAPACK's layout, so the Cholesky below needs no second
    n×n buffer), built without a flipped temporary: H is symmetric, so copying it into the
    transposed view stores H, and reversing the storage in place gives P H P (only the lower
    triangle is read from here on)."""
    work = torch.empty_like(hessian, memory_format=torch.contiguous_format).t()
    work.t().copy_(hessian)
    return reverse_flat_(work)


def _reversed_cholesky_in_place(work: torch.Tensor) -> torch.Tensor:
    """P H P (column-major, owned) → V = P L P in the same buffer."""
    info = torch.empty((), dtype=torch.int32, device=work.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky failed at order {int(info)}")
    reverse_flat_(work)
    if not all_finite(work):
        raise torch.linalg.LinAlgError("non-finite Cholesky factor")
    return work


def upper_cholesky_of_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """U with H⁻¹ = UᵀU, U upper triangular: U = V⁻¹ for the reversed Cholesky factor V.

    One Cholesky and one triangular inverse, a third of the flops of the reference's
    cholesky → cholesky_inverse → cholesky. Not used by the sweep (which never forms U); kept as
    the documented link between the two formulations.
    """
    root = reversed_cholesky(hessian)
    return invert_lower_triangular_(root.t()).t()  # V upper ⇔ Vᵀ lower; (Vᵀ)⁻¹ = (V⁻¹)ᵀ


def invert_lower_triangular_(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ in place, by 2×2 blocks: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]].

    Two triangular solves per level give n³/3 flops in all (a solve against the identity does n³;
    measured 3x faster at n = 2048–8192). LAPACK trtri does the same but is not exposed by torch, and
    SciPy's copy runs an OpenBLAS thread pool that fights torch's on a busy machine.
    """
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return lower
    half = (n // 2 + 63) // 64 * 64
    a, c, d = lower[:half, :half], lower[half:, :half], lower[half:, half:]
    torch.linalg.solve_triangular(a, c, upper=False, left=False, out=c)  # C A⁻¹ (uses A before it is inverted)
    torch.linalg.solve_triangular(d, c, upper=False, out=c)  # D⁻¹ C A⁻¹
    c.neg_()
    invert_lower_triangular_(a, leaf)
    invert_lower_triangular_(d, leaf)
    return lower


def reverse_flat_(matrix: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """`matrix.flip(0, 1)` in place, in chunks (no full-size temporary): for a square matrix stored
    densely in either row- or column-major order, the flip reverses the storage."""
    flat = matrix.view(-1) if matrix.is_contiguous() else matrix.t().view(-1)
    total = flat.numel()
    for s in range(0, total // 2, chunk):
        e = min(s + chunk, total // 2)
        head = flat[s:e].clone()
        flat[s:e] = flat[total - e : total - s].flip(0)
        flat[total - e : total - s] = head.flip(0)
    return matrix


def factor_hessian(
    hessian: torch.Tensor, *, percdamp: float, max_retries: int = 6, name: str = "module"
) -> HessianFactor:
    """Damp H (λ = percdamp · mean diag H), handle dead inputs, factorise; retry with 10x damping.

    H itself is not modified; its one n×n working copy is damped, factorised and flipped in place
    (peak: one n×n buffer besides H; the reference's chain needs two to three). Never falls
    back to an identity inverse: after `max_retries` failures it raises `NumericalError` naming the
    module.
    """
    diag = hessian.diagonal()
    dead = diag == 0
    mean_diag = float(torch.where(dead, torch.ones_like(diag), diag).mean())
    damping = percdamp * mean_diag
    for attempt in range(max_retries + 1):
        work = _flipped_copy(hessian)
        flipped_diag = work.diagonal()  # diag of P H P = reversed diag of H
        flipped_diag.masked_fill_(dead.flip(0), 1.0)
        flipped_diag.add_(damping)
        try:
            return HessianFactor(_reversed_cholesky_in_place(work), damping, attempt, dead)
        except torch.linalg.LinAlgError:
            del work
            damping = max(damping * 10.0, 1e-6 * mean_diag)
    raise NumericalError(
        f"{name}: the Hessian is not positive definite even with damping {damping / 10:.3g} after "
        f"{max_retries} retries; use more calibration data or a larger IRRConfig.percdamp"
    )


SelectFn = Callable[[int, int, torch.Tensor], torch.Tensor]


class SweepResult(NamedTuple):
    """What `obs_sweep` returns; per-row sums are over all columns."""

    delta: torch.Tensor  # Δ′ (column-major storage); removed entries exactly 0
    error_sq: torch.Tensor  # Σ e²: the layer-output error under the damped Hessian H + λI
    change_sq: torch.Tensor  # Σ (Δ′ − Δ₀)²: converts error_sq to the error under H (minus λ · change_sq)
    removed: torch.Tensor  # bool mask of removed entries


def obs_sweep(
    delta: torch.Tensor,
    root: torch.Tensor,
    select: SelectFn,
    *,
    dead: torch.Tensor | None = None,
    blocksize: int = 128,
    subblock: int = 16,
    superblock: int = 4,
) -> SweepResult:
    """Remove entries column by column and push each removal's error onto later columns.

    The OBS recursion with U = V⁻¹ (`root` = V, see `HessianFactor`): for column j,
    e_j = removed_j · z_j / U_jj and later columns get z_k −= e_j U_jk. `select(i1, i2, block)`
    returns the removal mask of columns [i1, i2) from their compensated values (the adaptive mask,
    fixed per block). Within a block the updates are applied per column (lazily per `subblock`).
    Across blocks it is left-looking: Σ_{j<i1} e_j U_jk over all earlier columns equals
    −(Δ₀ − Δ′)_{<i1} V_{<i1,b} U_bb, because E U = Δ₀ − Δ′ on finished columns. So one matrix
    product with V per block replaces the n×n inverse (exact re-association; same flops). The part
    from columns before each group of `superblock` blocks is gathered for the whole group at once
    (a 4x taller matrix product, ~20% faster on CPU).

    Runs on column-major storage (each per-column step is one contiguous vector). `delta` is not
    modified; `dead` columns start at zero (and stay zero: H + λI has no coupling to them).
    """
    work = delta.t().clone(
        memory_format=torch.contiguous_format
    )  # (cols, rows): Δ₀ on unfinished columns, Δ₀ − Δ′ on finished ones
    has_dead = dead is not None and bool(dead.any())
    if has_dead:
        work[dead] = 0.0
    cols, rows = work.shape
    removed_t = torch.zeros_like(work, dtype=torch.bool)
    err_sq = torch.zeros(rows, dtype=work.dtype, device=work.device)
    change_sq = torch.zeros_like(err_sq)
    errors = torch.empty(min(blocksize, cols), rows, dtype=work.dtype, device=work.device)
    group_width = blocksize * max(1, superblock)
    gathered = torch.empty(min(group_width, cols), rows, dtype=work.dtype, device=work.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        block = work[i1:i2]  # (count, rows): block[c] is column i1 + c of Δ
        eye = torch.eye(count, dtype=root.dtype, device=root.device)
        u_block = torch.linalg.solve_triangular(root[i1:i2, i1:i2], eye, upper=True)  # U_bb = V_bb⁻¹
        start = block.clone()  # Δ₀ of this block (dead columns zeroed)
        g0 = i1 - i1 % group_width  # first column of this block's group
        if i1 == g0 and g0 > 0:  # the whole group's share from columns before it, in one product
            g1 = min(g0 + group_width, cols)
            torch.mm(root[:g0, g0:g1].t(), work[:g0], out=gathered[: g1 - g0])
        if i1 > 0:  # z_b = Δ₀_b + (Δ₀ − Δ′)_{<b} V_{<b,b} U_bb
            g = gathered[i1 - g0 : i2 - g0] if g0 > 0 else torch.zeros_like(block)
            if i1 > g0:  # earlier blocks of the same group
                g = g.addmm(root[g0:i1, i1:i2].t(), work[g0:i1])
            block.addmm_(u_block.t(), g)
        removed = select(i1, i2, block.t()).t()
        removed_t[i1:i2] = removed
        scale = removed.to(work.dtype).mul_(u_block.diagonal().reciprocal()[:, None])  # removed / U_cc
        err = errors[:count]
        for j1 in range(0, count, subblock):
            j2 = min(j1 + subblock, count)
            for c in range(j1, j2):
                torch.mul(block[c], scale[c], out=err[c])
                if c + 1 < j2:  # rank-1 update of the rest of the sub-block (addmm_: CPU addr_ is slow)
                    block[c + 1 : j2].addmm_(u_block[c, c + 1 : j2, None], err[c : c + 1], alpha=-1.0)
            if j2 < count:
                block[j2:].addmm_(u_block[j1:j2, j2:].t(), err[j1:j2], alpha=-1.0)
        block.masked_fill_(removed, 0.0)
        torch.sub(start, block, out=block)  # finished: store Δ₀ − Δ′
        err_sq.add_(err.square().sum(dim=0))
        change_sq.add_(block.square().sum(dim=0))
    torch.sub(delta.t(), work, out=work)  # Δ′ = Δ₀ − (Δ₀ − Δ′); removed: Δ₀ − Δ₀, exactly 0
    if has_dead:
        work[dead] = 0.0
    return SweepResult(work.t(), err_sq, change_sq, removed_t.t())


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
        out += torch.linalg.vecdot(y[:, : b1 - b0], x, dim=1)
        if b1 < cols:
            out += 2.0 * torch.linalg.vecdot(y[:, b1 - b0 :], change[:, b1:], dim=1)
    return out
