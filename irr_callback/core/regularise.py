"""Safety-regularised recalibration: keep the task on task inputs, the aligned layer on harmful ones.

Pure tensor code. Per target matrix (rows = outputs, columns = inputs), with Δ the fine-tuning
delta, H_d the Hessian of the downstream calibration stream and H_s that of the safety stream
(harmful prompts with safe responses), the new delta solves

    minimise  ‖Δ′ − Δ‖²_{H_d + εI} + λ‖Δ′‖²_{H_s}     subject to  Δ′ = 0 on the removal mask,

where ‖A‖²_H = tr(A H Aᵀ) and ε is the ridge toward the fine-tuned value (directions neither
stream excites keep the fine-tuned delta). Expanding the squares, the objective equals
‖Δ′ − Δ̃‖²_H + const with

    H = H_d + εI + λH_s,     Δ̃ = Δ (H_d + εI) H⁻¹ = Δ − λ Δ H_s H⁻¹,

so it is IRR's masked OBS problem with H in place of H_d and the unconstrained optimum Δ̃ in
place of Δ: one extra pair of triangular solves against the Cholesky factor the sweep uses anyway.
λ = 0 is IRR itself (the caller then skips this module: bit-for-bit today's path). With an empty
mask Δ′ = Δ̃, a closed-form least-squares merge of the fine-tuned and the aligned layer (cf.
RegMean, Jin et al., ICLR 2023).
"""

from __future__ import annotations

import torch

from .obs import HessianFactor, output_error


def regularised_hessian(
    hessian: torch.Tensor, safety_hessian: torch.Tensor, *, weight: float, ridge: float
) -> torch.Tensor:
    """H = H_d + εI + λH_s in a new buffer, ε = `ridge` · mean(diag H_d) over live inputs.

    The ridge is relative to the calibration Hessian so that it means the same at every layer
    and model size, like `percdamp`. Inputs neither stream ever saw stay exactly zero (the
    factorisation treats them as dead columns).
    """
    diag = hessian.diagonal()
    live = diag != 0
    mean_diag = float(diag[live].mean()) if bool(live.any()) else 1.0
    out = torch.add(hessian, safety_hessian, alpha=weight)
    if ridge > 0:
        out.diagonal().add_(torch.where(live | (safety_hessian.diagonal() != 0), ridge * mean_diag, 0.0))
    return out


def regularised_start(
    delta: torch.Tensor,
    safety_hessian: torch.Tensor,
    factor: HessianFactor,
    *,
    weight: float,
    base: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
    fine_tuned: torch.Tensor | None = None,
    drift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Δ̃ = Δ − λ (Δ H_s) H⁻¹: the unconstrained optimum, with H = V Vᵀ from `factor`.

    With `cross` = C = 2·Σ x_A x_rᵀ / n (the aligned model's own input x_A paired with the realigned
    model's input x_r at each safety token) and `base` = W_A, the safety term is
    ‖W′X_r − W_A X_A‖²: the layer is asked to give the aligned model's outputs on the aligned model's
    own activations, which also undoes drift that earlier layers and non-target weights left in
    X_r. Then Δ̃ = Δ − λ (Δ H_s + W_A (H_s − C)) H⁻¹; with X_A = X_r, C = H_s and it is the formula above.

    With `fine_tuned` = W_F and `drift` = D = H_d − C_d (+ ρ(H_r − C_r)), C_d = 2·Σ x_F x_dᵀ/n pairing each
    calibration token's input in the fine-tuned model with its input here, the task term is ‖W′X_d − W_F X_F‖²:
    the fine-tuned model's outputs on its own activations. Then W_F D joins the right-hand side:
    Δ̃ = Δ − (λ (Δ H_s + W_A (H_s − C)) + W_F D) H⁻¹.

    Uses the same damped factor the sweep uses, so the damping counts as part of the ridge toward
    Δ and sweep and start point solve one and the same objective. Two triangular solves
    (X V Vᵀ = B as Y Vᵀ = B, then X V = Y); no n×n inverse is formed.
    """
    rhs = delta @ safety_hessian
    if cross is not None:
        rhs.addmm_(base, safety_hessian - cross)
    rhs.mul_(weight)
    if drift is not None:
        rhs.addmm_(fine_tuned, drift)
    root = factor.root
    rhs = torch.linalg.solve_triangular(root.t(), rhs, upper=False, left=False)
    rhs = torch.linalg.solve_triangular(root, rhs, upper=True, left=False)
    return torch.sub(delta, rhs, out=rhs)


def regularised_objective(
    new_delta: torch.Tensor,
    delta: torch.Tensor,
    hessian: torch.Tensor,
    safety_hessian: torch.Tensor,
    *,
    weight: float,
    base: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
    aligned_hessian: torch.Tensor | None = None,
    fine_tuned: torch.Tensor | None = None,
    fine_tuned_cross: torch.Tensor | None = None,
    fine_tuned_hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (task term ‖Δ′ − Δ‖²_{H_d}, safety term) without the ridge: what the report shows and
    what a plain-removal fallback is compared on (task + λ · safety). The safety term is ‖Δ′‖²_{H_s},
    or with `cross` ‖W′X_r − W_A X_A‖² = y H_s yᵀ − 2 y Cᵀ aᵀ + a H_A aᵀ per row (y = W′, a = W_A).
    With `fine_tuned` (W_F) the task term is ‖W′X_d − W_F X_F‖² = y H_d yᵀ − 2 y C_Fᵀ fᵀ + f H_F fᵀ (f = W_F)."""
    if fine_tuned is not None:
        new_weight = fine_tuned - delta + new_delta  # W_A + Δ′
        task = _paired_term(new_weight, hessian, fine_tuned_cross, fine_tuned, fine_tuned_hessian)
    else:
        task = output_error(new_delta - delta, hessian)
    if weight <= 0:
        return task, torch.zeros_like(task)
    if cross is None:
        return task, output_error(new_delta, safety_hessian)
    return task, _paired_term(base + new_delta, safety_hessian, cross, base, aligned_hessian)


def _paired_term(
    new_weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, target: torch.Tensor, own: torch.Tensor
) -> torch.Tensor:
    """Per row ‖W′X − W_t X_t‖² = y H yᵀ − 2 y Cᵀ tᵀ + t H_t tᵀ (C = 2·Σ x_t xᵀ / n), floored at 0 (rounding)."""
    term = torch.linalg.vecdot(new_weight @ hessian, new_weight, dim=1)
    term -= 2.0 * torch.linalg.vecdot(new_weight @ cross.t(), target, dim=1)
    term += torch.linalg.vecdot(target @ own, target, dim=1)
    return term.clamp_min_(0.0)
