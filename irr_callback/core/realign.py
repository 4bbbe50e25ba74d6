"""IRR on one weight matrix, or on several that read the same input (q/k/v, gate/up).

Modules that share an input share H, so they share one factorisation, and because the OBS
update is independent per output row they can be swept together as one stacked matrix. The
identification (ranking by importance) is still done per module, exactly as for one matrix.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from .identify import removal_mask, sign_conflicts
from .obs import (
    HessianFactor,
    NumericalError,
    SelectFn,
    all_finite,
    factor_hessian,
    obs_sweep,
    output_error,
    removal_mask_plain,
)
from .regularise import regularised_hessian, regularised_objective, regularised_start
from .settings import RealignSettings
from .stats import ModuleStats


def realign_matrix(
    delta: torch.Tensor,
    safety: torch.Tensor,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    *,
    settings: RealignSettings | None = None,
    name: str = "weight",
    safety_hessian: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    safety_cross: torch.Tensor | None = None,
    aligned_hessian: torch.Tensor | None = None,
    retain_hessian: torch.Tensor | None = None,
    fine_tuned: FineTunedTerms | None = None,
    **overrides: Any,
) -> tuple[torch.Tensor, ModuleStats]:
    """Identify, remove and recalibrate one delta matrix (rows = outputs, columns = inputs).

    Computes in float64 when `delta` is float64, otherwise in float32; returns the new delta in
    that dtype, stored column-major after a recalibration (the sweep's layout; call `.contiguous()`
    if you need row-major). `hessian=None` is allowed only with `recalibrate=False`. `settings`
    (default `RealignSettings()`) with `overrides`: fields of `RealignSettings` given by keyword.
    The safety- and retain-stream matrices are those of `realign_group` (`base`: this matrix's W_A).
    """
    [(new_delta, stats)] = realign_group(
        [delta],
        [safety],
        [importance],
        hessian,
        names=[name],
        settings=settings,
        safety_hessian=safety_hessian,
        bases=None if base is None else [base],
        safety_cross=safety_cross,
        aligned_hessian=aligned_hessian,
        retain_hessian=retain_hessian,
        fine_tuned=fine_tuned,
        **overrides,
    )
    return new_delta, stats


def realign_group(
    deltas: Sequence[torch.Tensor],
    safeties: Sequence[torch.Tensor],
    importances: Sequence[torch.Tensor | None],
    hessian: torch.Tensor | None,
    *,
    names: Sequence[str],
    settings: RealignSettings | None = None,
    safety_hessian: torch.Tensor | None = None,
    bases: Sequence[torch.Tensor] | None = None,
    safety_cross: torch.Tensor | None = None,
    aligned_hessian: torch.Tensor | None = None,
    retain_hessian: torch.Tensor | None = None,
    fine_tuned: FineTunedTerms | None = None,
    **overrides: Any,
) -> list[tuple[torch.Tensor, ModuleStats]]:
    """`realign_matrix` for matrices with the same input dimension and the same H.

    `settings.safety_weight` λ > 0 with `safety_hessian` (H_s) switches on the safety-regularised
    objective of `regularise.py`, with a ridge of `settings.ridge` · mean(diag H) toward the fine-tuned
    delta; λ = 0 is IRR exactly. `safety_cross` (C = 2·Σ x_A x_rᵀ/n), `aligned_hessian` (H_A of the
    aligned model's own inputs) and `bases` (W_A per module) make the safety term ‖W′X_r − W_A X_A‖².
    Mode "none" removes nothing (`safeties` may then hold None): with λ > 0, the closed-form merge.
    `settings.retain_weight` ρ > 0 with `retain_hessian` (H_r of general prompts with answers) adds the
    retain term ρ‖(Δ′ − Δ)X_r‖²: H_d + ρH_r takes H_d's place in every step (factor, ridge, start point,
    sweep, errors). ρ = 0 (or no retain Hessian with ρ = 0) leaves every step bit for bit as without it.
    `fine_tuned` (`FineTunedTerms`: each task-side token's input in the fine-tuned model paired with its input in the
    model being realigned) with `bases` makes the task term ‖W′X_d − W_F X_F‖² (and the retain term
    ρ‖W′X_r − W_F X_F‖²): the fine-tuned model's outputs on its own activations. With λ > 0 only.
    """
    settings = replace(settings or RealignSettings(), **overrides) if overrides else settings or RealignSettings()
    remove_ratio, remove_more, recalibrate = settings.remove_ratio, settings.remove_more, settings.recalibrate
    blocksize, percdamp, mode, seed = settings.blocksize, settings.percdamp, settings.mode, settings.seed
    max_damping_retries, fallback_to_removal = settings.max_damping_retries, settings.fallback_to_removal
    removal_error = settings.removal_error
    start = time.perf_counter()
    _validate(deltas, safeties, importances, hessian, names, recalibrate, remove_ratio, mode)
    weight = settings.safety_weight
    if weight != 0:  # a negative or NaN weight is refused here
        _validate_safety_hessian(safety_hessian, weight, settings.ridge, deltas[0].shape[1], names, recalibrate)
        _validate_cross(safety_cross, aligned_hessian, bases, deltas, names, fine_tuned)
    retain_weight = settings.retain_weight
    if retain_weight != 0:  # a negative or NaN weight is refused here
        _validate_retain(retain_hessian, retain_weight, deltas[0].shape[1], names, recalibrate)
    dtype = torch.float64 if all(d.dtype == torch.float64 for d in deltas) else torch.float32
    device = deltas[0].device
    original = one_matrix(deltas, dtype, device)  # never written
    if mode == "none":
        signs = torch.zeros_like(original, dtype=torch.int8)
    else:
        signs = torch.cat([torch.sign(s.to(device=device)).to(torch.int8) for s in safeties], dim=0)
    uses_importance = settings.uses_importance
    scores = torch.cat([f.to(device=device, dtype=dtype) for f in importances], dim=0) if uses_importance else None
    bounds = _row_bounds(deltas)

    def make_select(column_major: bool = False) -> SelectFn:
        """Per-module identification of one column block; `column_major` matches the sweep's layout."""
        generators = [torch.Generator().manual_seed(seed) for _ in deltas]
        sign_cols = signs.t().contiguous() if column_major else None

        def select(i1: int, i2: int, block: torch.Tensor) -> torch.Tensor:
            block_signs = sign_cols[i1:i2].t() if column_major else signs[:, i1:i2]
            out = torch.empty_like(block, dtype=torch.bool)  # same layout as the block
            for k, (r0, r1) in enumerate(bounds):
                out[r0:r1] = removal_mask(
                    block[r0:r1],
                    block_signs[r0:r1],
                    None if scores is None else scores[r0:r1, i1:i2],
                    remove_ratio=remove_ratio,
                    remove_more=remove_more,
                    mode=mode,
                    generator=generators[k],
                )
            return out

        return select

    h = hessian.to(device=device, dtype=dtype) if hessian is not None else None
    h_r = None
    if retain_weight != 0:  # the task metric H_d + ρH_r, in a new buffer (the caller's H is never written)
        h_r = retain_hessian.to(device=device, dtype=dtype)
        h = torch.add(h, h_r, alpha=retain_weight)
    # mode "none" removes nothing: its "plain removal" would be the fine-tuned delta itself, which the
    # regularised optimum never loses to (its objective includes Δ′ = Δ): no plain mask, error or fallback
    removes = mode != "none"
    wants_error = h is not None and removal_error and removes
    needs_plain = wants_error or (fallback_to_removal and removes) or not recalibrate
    plain_mask = removal_mask_plain(original, make_select(), blocksize=blocksize) if needs_plain else None
    err_plain = _removal_error(original, plain_mask, h) if wants_error else None
    safety_term = None

    damping, retries, dead = None, 0, torch.zeros(original.shape[1], dtype=torch.bool, device=device)
    if recalibrate and weight != 0:
        paired = fine_tuned_totals(fine_tuned, settings)
        terms = SafetyTerms(safety_hessian, bases, safety_cross, aligned_hessian, *paired)
        solved = _regularised(original, h, terms, make_select(column_major=True), settings, names, plain_mask)
        new, mask, err_recal, safety_term, damping, retries, dead = solved[:7]
        if wants_error:  # plain removal is judged on the same objective: task + λ · safety
            plain_task = err_plain if fine_tuned is None else solved.plain_task  # the fine-tuned target's own task
            err_plain = plain_task + weight * solved.plain_safety
        del h
    elif recalibrate:
        factor = factor_hessian(h, percdamp=percdamp, max_retries=max_damping_retries, name=_group_name(names))
        damping, retries, dead = factor.damping, factor.retries, factor.dead
        del h
        new, err_sq, change_sq, mask = obs_sweep(
            original, factor.root, make_select(column_major=True), dead=dead, blocksize=blocksize
        )
        del factor
        # Σe² is the error under H + λI (dead columns neither change nor contribute): subtract λ‖Δ′ − Δ₀‖².
        err_recal = (err_sq - damping * change_sq).clamp_min(0.0)
    else:
        new, err_recal, mask = original.masked_fill(plain_mask, 0.0), None, plain_mask
    err_retain = output_error(new - original, h_r) if h_r is not None and removal_error else None
    del h_r

    # with every conflict removed and nothing else, the plain removal mask IS the conflict mask
    conflicts_are_plain = plain_mask is not None and mode == "sign" and not remove_more and remove_ratio >= 1.0
    results = []
    for k, (r0, r1) in enumerate(bounds):
        name = names[k]
        module_new = new[r0:r1]
        e_recal = None if err_recal is None else float(err_recal[r0:r1].sum())
        e_safety = None if safety_term is None else float(safety_term[r0:r1].sum())
        e_plain = None if err_plain is None else float(err_plain[r0:r1].sum())
        e_retain = None if err_retain is None else float(err_retain[r0:r1].sum())
        objective = None if e_recal is None else e_recal + weight * (e_safety or 0.0)
        fell_back = bool(
            recalibrate
            and fallback_to_removal
            and e_plain is not None
            and objective is not None
            and e_plain < objective
        )
        if fell_back:
            module_new = original[r0:r1].masked_fill(plain_mask[r0:r1], 0.0)
        if not all_finite(module_new):
            raise NumericalError(f"{name}: the realigned delta contains NaN or Inf")
        removed_count = _count((plain_mask if fell_back else mask)[r0:r1])
        stats = ModuleStats(
            name=name,
            shape=tuple(deltas[k].shape),
            entries=deltas[k].numel(),
            conflicts=(
                0
                if mode == "none"
                else _count(plain_mask[r0:r1])
                if conflicts_are_plain
                else _count(sign_conflicts(original[r0:r1], signs[r0:r1]))
            ),
            removed=removed_count,
            dead_columns=_count(dead),
            error_recalibrated=e_recal,
            error_removal=e_plain,
            damping=damping,
            damping_retries=retries,
            recalibrated=recalibrate and not fell_back,
            fell_back_to_removal=fell_back,
            safety_weight=weight,
            error_safety=None if fell_back else e_safety,
            retain_weight=retain_weight,
            error_retain=None if fell_back else e_retain,
        )
        results.append((module_new, stats))  # a contiguous row slice of the stacked result
    elapsed = time.perf_counter() - start
    for _, stats in results:
        stats.seconds = elapsed / len(results)
    return results


class SafetyTerms(NamedTuple):
    """The safety stream's matrices of one group: H_s, and for the aligned target W_A, C and H_A; for the
    fine-tuned-target task term, C_F = C_d + ρC_r and H_F = H_Fd + ρH_Fr (`FineTunedTerms`, summed)."""

    hessian: torch.Tensor
    bases: Sequence[torch.Tensor] | None = None
    cross: torch.Tensor | None = None
    aligned_hessian: torch.Tensor | None = None
    fine_tuned_cross: torch.Tensor | None = None
    fine_tuned_hessian: torch.Tensor | None = None


class FineTunedTerms(NamedTuple):
    """`task_term="fine-tuned"`: the calibration stream's cross Gram C_d = 2·Σ x_F x_dᵀ/n (each token's input in the
    fine-tuned model, x_F, paired with its input in the model being realigned) and H_Fd = 2·Σ x_F x_Fᵀ/n; the same
    for the retain stream when there is a retain term."""

    cross: torch.Tensor
    hessian: torch.Tensor
    retain_cross: torch.Tensor | None = None
    retain_hessian: torch.Tensor | None = None


def fine_tuned_totals(
    terms: FineTunedTerms | None, settings: RealignSettings
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(C_d + ρC_r, H_Fd + ρH_Fr): the task metric's pair, as H_d + ρH_r is (ρ = 0 or no retain pair: C_d, H_Fd)."""
    if terms is None:
        return None, None
    if settings.retain_weight == 0 or terms.retain_cross is None:
        return terms.cross, terms.hessian
    rho = settings.retain_weight
    return torch.add(terms.cross, terms.retain_cross, alpha=rho), torch.add(
        terms.hessian, terms.retain_hessian, alpha=rho
    )


class _Regularised(NamedTuple):
    new: torch.Tensor
    mask: torch.Tensor
    task: torch.Tensor | None
    safety: torch.Tensor | None
    damping: float
    retries: int
    dead: torch.Tensor
    plain_safety: torch.Tensor | None
    plain_task: torch.Tensor | None


def _regularised(
    original, h, terms: SafetyTerms, select: SelectFn, settings: RealignSettings, names, plain_mask
) -> _Regularised:
    """The safety-regularised solve of one group: factor H = H_d + εI + λH_s, start from Δ̃, then the
    sweep (skipped when nothing is removed), and both terms of the objective for the report."""
    weight = settings.safety_weight
    factor, start, h_s, extra = _regularised_problem(original, h, terms, settings, names)
    if settings.mode == "none":  # nothing to remove: the unconstrained optimum is the answer (no sweep)
        new, mask = start, torch.zeros_like(original, dtype=torch.bool)
        new[:, factor.dead] = 0.0
    else:
        new, _, _, mask = obs_sweep(start, factor.root, select, dead=factor.dead, blocksize=settings.blocksize)
    task = safety = plain_safety = plain_task = None
    if settings.removal_error:  # the objective's two terms for the report (and the fallback below)
        task, safety = regularised_objective(new, original, h, h_s, weight=weight, **extra)
    if plain_mask is not None and settings.removal_error:
        plain = original.masked_fill(plain_mask, 0.0)
        plain_task, plain_safety = regularised_objective(plain, original, h, h_s, weight=weight, **extra)
    return _Regularised(new, mask, task, safety, factor.damping, factor.retries, factor.dead, plain_safety, plain_task)


def _regularised_problem(original, h, terms: SafetyTerms, settings: RealignSettings, names):
    """The safety-regularised objective of one group as ‖Δ′ − Δ̃‖²_H + const: the damped factor of
    H = H_d + εI + λH_s, the start point Δ̃, and H_s and the aligned-target matrices (for the report)."""
    dtype, device, weight = original.dtype, original.device, settings.safety_weight
    h_s = terms.hessian.to(device=device, dtype=dtype)
    extra = {}
    if terms.cross is not None:
        extra = dict(
            base=one_matrix(terms.bases, dtype, device),
            cross=terms.cross.to(device=device, dtype=dtype),
            aligned_hessian=terms.aligned_hessian.to(device=device, dtype=dtype),
        )
    drift = None
    if terms.fine_tuned_cross is not None:  # W_F = W_A + Δ, and the drift D = (H_d + ρH_r) − C_F
        fine_tuned_cross = terms.fine_tuned_cross.to(device=device, dtype=dtype)
        extra.update(
            fine_tuned=one_matrix(terms.bases, dtype, device) + original,
            fine_tuned_cross=fine_tuned_cross,
            fine_tuned_hessian=terms.fine_tuned_hessian.to(device=device, dtype=dtype),
        )
        drift = h - fine_tuned_cross
    combined = regularised_hessian(h, h_s, weight=weight, ridge=settings.ridge)
    factor = factor_hessian(
        combined, percdamp=settings.percdamp, max_retries=settings.max_damping_retries, name=_group_name(names)
    )
    del combined
    start = regularised_start(
        original,
        h_s,
        factor,
        weight=weight,
        base=extra.get("base"),
        cross=extra.get("cross"),
        fine_tuned=extra.get("fine_tuned"),
        drift=drift,
    )
    del drift
    return factor, start, h_s, extra


def objective_optimum(
    original: torch.Tensor,
    hessian: torch.Tensor,
    safety: SafetyTerms | None,
    settings: RealignSettings,
    names: Sequence[str],
    retain_hessian: torch.Tensor | None = None,
) -> tuple[HessianFactor, torch.Tensor]:
    """The recalibration objective of one group (the stacked Δ `original`) as ‖Δ′ − Δ̃‖²_H + const, as the
    solve above sets it up: H's damped factor (H = V Vᵀ, `factor.root` = V) and the unconstrained optimum Δ̃
    (Δ itself when λ = 0), dead input columns zeroed as the solver leaves them. The task metric is
    H_d + ρH_r with a retain weight ρ and `retain_hessian`. For `lowrank.py`."""
    h = hessian.to(device=original.device, dtype=original.dtype)
    if settings.retain_weight != 0 and retain_hessian is not None:
        h = torch.add(h, retain_hessian.to(device=h.device, dtype=h.dtype), alpha=settings.retain_weight)
    if settings.safety_weight != 0 and safety is not None:
        factor, start, _, _ = _regularised_problem(original, h, safety, settings, names)
    else:
        factor = factor_hessian(
            h, percdamp=settings.percdamp, max_retries=settings.max_damping_retries, name=_group_name(names)
        )
        start = original.clone()
    start[:, factor.dead] = 0.0
    return factor, start


def one_matrix(deltas: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """The group as one (rows, cols) matrix: the deltas themselves when they already are consecutive
    row blocks of one contiguous buffer (the pipeline's group solver builds them so), else a concatenated copy."""
    first = deltas[0]
    if len(deltas) == 1:
        return first.to(device=device, dtype=dtype)
    whole = first._base
    if (
        whole is not None
        and whole.dim() == 2
        and whole.is_contiguous()
        and whole.dtype == dtype
        and whole.device == torch.device(device)
        and whole.shape[1] == first.shape[1]
        and whole.shape[0] == sum(d.shape[0] for d in deltas)
        and all(
            d._base is whole and d.is_contiguous() and d.data_ptr() == whole[r0:r1].data_ptr()
            for d, (r0, r1) in zip(deltas, _row_bounds(deltas))
        )
    ):
        return whole
    return torch.cat([d.to(device=device, dtype=dtype) for d in deltas], dim=0)


def _removal_error(
    original: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Per-row layer-output error of plain removal, in row chunks (no full-size temporaries)."""
    out = torch.empty(original.shape[0], dtype=original.dtype, device=original.device)
    for r0 in range(0, original.shape[0], chunk):
        r1 = min(r0 + chunk, original.shape[0])
        out[r0:r1] = output_error(original[r0:r1].masked_fill(~mask[r0:r1], 0.0), hessian)
    return out


def _count(mask: torch.Tensor) -> int:
    """True entries of a boolean mask. `mask.sum()` would first widen a strided view (a row block of
    the column-major sweep mask) to an int64 copy: 8 bytes per entry at the solve's memory peak."""
    return int(torch.count_nonzero(mask))


def row_spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[(r0, r1)] of consecutive row blocks of the given sizes: where each module sits in its group."""
    spans, r = [], 0
    for n in sizes:
        spans.append((r, r + n))
        r += n
    return spans


def _row_bounds(deltas: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    return row_spans([d.shape[0] for d in deltas])


def _group_name(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else "+".join(names)


def _validate_safety_hessian(safety_hessian, weight, ridge, cols, names, recalibrate) -> None:
    _validate_term("safety", safety_hessian, weight, cols, names, recalibrate)
    if not (isinstance(ridge, (int, float)) and 0 <= ridge < float("inf")):
        raise ValueError(f"{_group_name(names)}: ridge must be a finite number >= 0, got {ridge!r}")


def _validate_retain(retain_hessian, weight, cols, names, recalibrate) -> None:
    _validate_term("retain", retain_hessian, weight, cols, names, recalibrate)


def _validate_term(what: str, hessian, weight, cols, names, recalibrate) -> None:
    """The weight and Hessian of one extra term of the objective ('safety' or 'retain')."""
    group = _group_name(names)
    if not (isinstance(weight, (int, float)) and 0 <= weight < float("inf")):
        raise ValueError(f"{group}: {what}_weight must be a finite number >= 0, got {weight!r}")
    if not recalibrate:
        raise ValueError(f"{group}: {what}_weight > 0 is a recalibration objective; it needs recalibrate=True")
    if hessian is None:
        raise ValueError(f"{group}: {what}_weight={weight} > 0 needs the {what} stream's Hessian (got None)")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{group}: {what} Hessian shape {tuple(hessian.shape)} != ({cols}, {cols})")
    if not all_finite(hessian):
        raise ValueError(f"{group}: the {what} Hessian contains NaN or Inf")


def _validate_cross(cross, aligned_hessian, bases, deltas, names, fine_tuned=None) -> None:
    group, cols = _group_name(names), deltas[0].shape[1]
    given = [cross is not None, aligned_hessian is not None, bases is not None]
    if (any(given[:2]) and not all(given)) or (bases is not None and cross is None and fine_tuned is None):
        raise ValueError(
            f"{group}: safety_cross, aligned_hessian and bases go together (the aligned-target safety term); "
            "got only some of them"
        )
    if fine_tuned is not None and bases is None:
        raise ValueError(f"{group}: fine_tuned needs bases (the fine-tuned-target task term: W_F = W_A + Δ)")
    if cross is None and fine_tuned is None:
        return
    checked = (("safety_cross", cross), ("aligned_hessian", aligned_hessian))
    if fine_tuned is not None:
        checked += tuple((f"fine_tuned.{k}", v) for k, v in fine_tuned._asdict().items())
    for label, t in ((label, t) for label, t in checked if t is not None):
        if tuple(t.shape) != (cols, cols):
            raise ValueError(f"{group}: {label} shape {tuple(t.shape)} != ({cols}, {cols})")
        if not all_finite(t):
            raise ValueError(f"{group}: {label} contains NaN or Inf")
    if len(bases) != len(deltas) or any(tuple(b.shape) != tuple(d.shape) for b, d in zip(bases, deltas)):
        raise ValueError(f"{group}: bases must match the deltas' shapes")


def _validate(deltas, safeties, importances, hessian, names, recalibrate, remove_ratio, mode) -> None:
    if mode == "none":
        safeties = list(deltas)  # no removal: the safety vector is not read
    if not (len(deltas) == len(safeties) == len(importances) == len(names)) or not deltas:
        raise ValueError("realign_group needs one safety, importance and name per delta")
    if not 0.0 <= remove_ratio <= 1.0:
        raise ValueError(f"remove_ratio must be in [0, 1], got {remove_ratio}")
    cols = deltas[0].shape[-1]
    for d, s, f, n in zip(deltas, safeties, importances, names):
        if d.dim() != 2:
            raise ValueError(f"{n}: delta must be 2-D (out, in), got shape {tuple(d.shape)}")
        if d.shape[1] != cols:
            raise ValueError(f"{n}: input dimension {d.shape[1]} differs from the group's {cols}")
        if tuple(s.shape) != tuple(d.shape):
            raise ValueError(f"{n}: safety vector shape {tuple(s.shape)} != delta shape {tuple(d.shape)}")
        if f is not None and tuple(f.shape) != tuple(d.shape):
            raise ValueError(f"{n}: importance shape {tuple(f.shape)} != delta shape {tuple(d.shape)}")
        needs_f = remove_ratio < 1.0 and mode in ("sign", "no_sign")
        if needs_f and f is None:
            raise ValueError(
                f"{n}: remove_ratio={remove_ratio} < 1 ranks by importance (Fisher), but no importance was given"
            )
        for label, t in (("delta", d), ("safety vector", s), ("importance", f)):
            if t is not None and t.is_floating_point() and not all_finite(t):
                raise ValueError(f"{n}: the {label} contains NaN or Inf")
    if hessian is None:
        if recalibrate:
            raise ValueError(f"{_group_name(names)}: recalibrate=True needs a Hessian (got hessian=None)")
    else:
        if tuple(hessian.shape) != (cols, cols):
            raise ValueError(f"{_group_name(names)}: Hessian shape {tuple(hessian.shape)} != ({cols}, {cols})")
        if not all_finite(hessian):
            raise ValueError(f"{_group_name(names)}: the Hessian contains NaN or Inf")
