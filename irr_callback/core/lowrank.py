"""The realigned delta at a LoRA rank: the rank-constrained optimum of the recalibration's own objective.

Per target the objective the solver minimises is ‖Δ′ − Δ̃‖²_H + const (`regularise.py`), with
H = H_d + εI + λH_s + damping (H_d + damping when λ = 0) and Δ̃ its unconstrained optimum (Δ̃ = Δ
when λ = 0). Over matrices of rank ≤ r the minimiser is the H-weighted truncation of Δ̃: with
H = V Vᵀ and the SVD Δ̃V = U S Wᵀ, BA = U_r S_r W_rᵀ V⁻¹ (B = U_r S_r^½, A = S_r^½ W_rᵀ V⁻¹) and the
objective rises by exactly Σ_{i>r} s_i² (Eckart-Young in the whitened space). So with no removal
mask a rank-r adapter is not an approximation of the result: it is the exact optimum of the same
problem with the LoRA rank as a constraint. With a removal mask (the paper's setting) the masked
optimum Δ′ is truncated instead; that is an approximation, and its objective gap is measured.

Only the top r singular triplets are needed: a randomized SVD (`torch.svd_lowrank`, oversampled,
with power iterations) of the whitened matrix, a full SVD only when r is a large share of the
smaller dimension. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .realign import SafetyTerms, objective_optimum, one_matrix
from .settings import RealignSettings


#: extra random directions of the randomized SVD, and its power iterations (Halko et al. 2011)
OVERSAMPLE, POWER_ITERATIONS = 10, 4


@dataclass
class LowRankFactors:
    """B (out × r) and A (r × in) of one module's realigned delta, and what the rank limit costs.

    `objective_gap`: objective(BA) − objective(Δ′), Δ′ the solver's result without the rank limit, in
    the units of the report's errors (summed over rows, the damped H of the objective). `relative_gap`:
    that gap over ‖Δ′‖²_H, the realigned delta's own output energy. `exact`: BA is the rank-constrained
    optimum (no removal mask); else it is the truncation of the masked optimum."""

    b: torch.Tensor
    a: torch.Tensor
    objective_gap: float
    relative_gap: float
    exact: bool
    trained_rank: int | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def top_triplets(
    matrix: torch.Tensor, k: int, *, oversample: int = OVERSAMPLE, niter: int = POWER_ITERATIONS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, s_k, W_k) with matrix ≈ U_k diag(s_k) W_kᵀ, the k largest singular triplets.

    Randomized (`torch.svd_lowrank`) when k + `oversample` is a small share of the smaller dimension,
    else the full SVD. The random test matrix comes from a forked RNG seeded with `seed`: the result is
    reproducible and the caller's RNG stream (training's) is left as it was."""
    small = min(matrix.shape)
    k = min(k, small)
    if k == 0:
        return matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(0), matrix.new_zeros(matrix.shape[1], 0)
    q = k + oversample
    if 3 * q >= small:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].mT
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u[:, :k], s[:k], v[:, :k]


def rank_constrained(
    target: torch.Tensor,
    root: torch.Tensor,
    *,
    rank: int | None = None,
    tolerance: float | None = None,
    optimum: torch.Tensor | None = None,
    trained_rank: int | None = None,
) -> LowRankFactors:
    """The best factors of `target` (out × in) under H = `root` rootᵀ (`root` upper triangular:
    `HessianFactor.root`): rank `rank` (capped at min(out, in)), or the smallest rank whose truncation loses
    at most `tolerance` of ‖target‖_H (relative, sqrt of the energy share).

    `optimum`: the unconstrained optimum Δ̃ when `target` is a masked solution Δ′ ≠ Δ̃; the gap is then
    measured as ‖BA − Δ̃‖²_H − ‖Δ′ − Δ̃‖²_H (one more product with `root`). Without it `target` is Δ̃ and
    the gap is the discarded energy Σ_{i>r} s_i². Computed in float64 for float64 inputs, else float32."""
    if (tolerance is None) == (rank is None):
        raise ValueError("give exactly one of tolerance and rank")
    dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    root = root.to(device=target.device, dtype=dtype)
    whitened = target.to(dtype) @ root
    total = float(whitened.double().square().sum())
    if rank is None:
        u, s, w = _within_tolerance(whitened, total, tolerance, start=max(1, trained_rank or 8))
    else:
        u, s, w = top_triplets(whitened, int(rank))
    if total == 0.0:  # a zero delta: nothing to keep (stored by PEFT at rank 1 with zero factors)
        u, s, w = u[:, :0], s[:0], w[:, :0]
    kept = float(s.double().square().sum())
    discarded = max(total - kept, 0.0)
    gap = discarded
    if optimum is not None:  # ‖(M_r − M) + D‖² − ‖D‖² = ‖M − M_r‖² − 2⟨M − M_r, D⟩, D = (Δ′ − Δ̃)V
        off = whitened - optimum.to(dtype) @ root
        inner_m = float((whitened.double() * off.double()).sum())
        inner_r = float(((u.mT @ off) * w.mT).sum(dim=1).double() @ s.double()) if s.numel() else 0.0
        gap = discarded - 2.0 * (inner_m - inner_r)
        del off
    del whitened
    half = s.sqrt()
    b = u * half
    # A = S_r^½ Wᵀ V⁻¹, i.e. Vᵀ Aᵀ = W S_r^½: one triangular solve (Vᵀ is lower triangular)
    a = torch.linalg.solve_triangular(root.mT, w * half, upper=False).mT
    relative = gap / total if total > 0 else 0.0
    return LowRankFactors(b.contiguous(), a.contiguous(), gap, relative, optimum is None, trained_rank)


def _within_tolerance(whitened: torch.Tensor, total: float, tolerance: float, *, start: int):
    """Top triplets, k doubled from `start` until the truncation at some rank ≤ k is within `tolerance`;
    then the smallest such rank."""
    small = min(whitened.shape)
    if total == 0.0 or tolerance >= 1.0:
        return top_triplets(whitened, 0)
    k = min(start, small)
    while True:
        u, s, w = top_triplets(whitened, k)
        tail = total - s.double().square().cumsum(0)  # tail[j]: the energy lost at rank j + 1
        within = torch.nonzero(tail <= tolerance**2 * total).flatten()
        if within.numel():
            r = int(within[0]) + 1
            return u[:, :r], s[:r], w[:, :r]
        if k >= small:
            return u, s, w
        k = min(2 * k, small)


def rank_constrained_group(
    deltas: Sequence[torch.Tensor],
    solved: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    *,
    settings: RealignSettings,
    names: Sequence[str],
    ranks: Sequence[int | None],
    tolerance: float | None = None,
    safety: SafetyTerms | None = None,
    trained_ranks: Sequence[int | None] | None = None,
    retain_hessian: torch.Tensor | None = None,
) -> list[LowRankFactors]:
    """Per module of one group (the solver's group: one H), the realigned delta at a LoRA rank under the
    objective the solver used (`settings`, the calibration `hessian`, `safety`'s matrices when λ > 0,
    `retain_hessian` when ρ > 0).

    `deltas`: the fine-tuning deltas Δ (out × in); `solved`: the solver's Δ′, read only with a removal
    mask (`settings.mode` != "none"), where the truncation of Δ′ replaces the exact optimum. `ranks[k]`:
    module k's rank, or None with a `tolerance` (then the smallest rank within it)."""
    dtype = torch.float64 if all(d.dtype == torch.float64 for d in deltas) else torch.float32
    original = one_matrix(deltas, dtype, deltas[0].device)
    factor, optimum = objective_optimum(original, hessian, safety, settings, names, retain_hessian)
    del original
    masked = settings.mode != "none"
    out, r0 = [], 0
    for k, delta in enumerate(deltas):
        r1 = r0 + delta.shape[0]
        exact = optimum[r0:r1]
        trained = trained_ranks[k] if trained_ranks is not None else None
        out.append(
            rank_constrained(
                solved[k].to(exact.dtype) if masked else exact,
                factor.root,
                rank=ranks[k],
                tolerance=tolerance if ranks[k] is None else None,
                optimum=exact if masked else None,
                trained_rank=trained,
            )
        )
        r0 = r1
    return out
