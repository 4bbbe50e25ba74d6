"""The low-rank approximation of a realigned delta that is best for the layer's outputs.

IRR's Δ′ is dense, a LoRA adapter stores B·A. What matters is the layer's output on real inputs,
so the error is measured in the calibration H-norm: ‖(Δ′ − BA)X‖² ∝ tr((Δ′ − BA) H (Δ′ − BA)ᵀ).
With the damped H + λI = L Lᵀ (λ as the solver damps, `percdamp` · mean diag H) and the SVD
Δ′L = U S Vᵀ, the best rank-k factors in that norm are B = U_k S_k^½, A = S_k^½ V_kᵀ L⁻¹ and
the error is Σ_{i>k} s_i² exactly (Eckart-Young in the weighted space), so the rank a tolerance
needs is read off the singular values. The relative error is reported against ‖Δ′X‖ (the
realigned delta's own output): the base part W_A of the layer is stored exactly, so this is the
share of the realignment's output change that the adapter loses, independent of how large the
fine-tune is next to the base weights. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankFactors:
    """B (out × k) and A (k × in) with BA ≈ Δ′, and what the approximation loses."""

    b: torch.Tensor
    a: torch.Tensor
    error: float  # ‖(Δ′ − BA)L‖ / ‖Δ′L‖: relative to the delta's output, under the damped H
    output_error: float  # ‖(Δ′ − BA)L‖ / ‖W′L‖: relative to the realigned layer's output (W′ given)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def damped_cholesky(hessian: torch.Tensor, percdamp: float, max_retries: int = 6) -> torch.Tensor:
    """Lower L with L Lᵀ = H + λI, λ = percdamp · mean diag H (dead inputs count as 1, like the
    solver); the damping grows 10x until H + λI factorises."""
    diag = hessian.diagonal()
    mean_diag = float(torch.where(diag == 0, torch.ones_like(diag), diag).mean())
    damping = max(percdamp * mean_diag, 1e-6 * mean_diag)
    for _ in range(max_retries + 1):
        work = hessian.clone()
        work.diagonal().add_(damping)
        lower, info = torch.linalg.cholesky_ex(work)
        del work
        if int(info) == 0:
            return lower
        damping *= 10.0
    raise torch.linalg.LinAlgError(f"H + λI is not positive definite even with λ = {damping / 10:.3g}")


def rank_for_tolerance(singular_values: torch.Tensor, tolerance: float) -> int:
    """The smallest k with sqrt(Σ_{i>k} s_i² / Σ s_i²) <= tolerance (0 for a zero delta)."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i>=k} s_i²: the error of rank k
    within = torch.nonzero(tail <= (tolerance**2) * total).flatten()
    return int(within[0]) if within.numel() else int(singular_values.numel())


def weighted_lowrank(
    delta: torch.Tensor,
    hessian: torch.Tensor,
    *,
    percdamp: float,
    tolerance: float | None = None,
    rank: int | None = None,
    weight: torch.Tensor | None = None,
) -> LowRankFactors:
    """Best factors of `delta` (out × in) under the damped `hessian` (in × in): at the smallest rank
    whose relative error is within `tolerance`, or at the given `rank` (capped at min(out, in)).

    `weight`: the realigned W′ (out × in) for `output_error`; without it that field is nan.
    Computed in the precision of `delta` (float32 at least)."""
    if (tolerance is None) == (rank is None):
        raise ValueError("give exactly one of tolerance and rank")
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    delta = delta.to(dtype)
    lower = damped_cholesky(hessian.to(device=delta.device, dtype=dtype), percdamp)
    u, s, vh = torch.linalg.svd(delta @ lower, full_matrices=False)
    k = rank_for_tolerance(s, tolerance) if rank is None else min(int(rank), s.numel())
    energy = s.double().square()
    total = float(energy.sum())
    lost = float(energy[k:].sum()) ** 0.5
    root = s[:k].sqrt()
    b = u[:, :k] * root
    # A = S_k^½ V_kᵀ L⁻¹, i.e. Aᵀ = L⁻ᵀ V_k S_k^½: one triangular solve with Lᵀ
    a = torch.linalg.solve_triangular(lower.mT, vh[:k].mT * root, upper=True).mT
    output_error = float("nan")
    if weight is not None:
        scale = float(torch.linalg.norm(weight.to(dtype) @ lower))
        output_error = lost / scale if scale > 0 else 0.0
    return LowRankFactors(b.contiguous(), a.contiguous(), lost / total**0.5 if total > 0 else 0.0, output_error)
