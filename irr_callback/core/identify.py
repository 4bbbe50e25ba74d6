"""Identify: which fine-tuning deltas of one column block are removed.

Pure tensor code. A block is a (rows, columns) slice of one weight matrix; the sweep calls this
once per block with the delta *as already recalibrated by earlier blocks* (the adaptive mask).
"""

from __future__ import annotations

import math

import torch


def sign_conflicts(delta: torch.Tensor, safety: torch.Tensor) -> torch.Tensor:
    """Entries the fine-tune moved away from the safe direction: sign(Δ) != sign(v).

    `torch.sign(0) == 0`, so a zero on one side counts as a conflict (removing a zero delta is a
    no-op). `safety` may be int8 signs: only its sign is ever used.
    """
    return torch.sign(delta) != torch.sign(safety)  # compared across dtypes: no float copy of int8 signs


def kept_count(n: int, remove_ratio: float) -> int:
    """floor(n * (1 - remove_ratio)), robust to float noise such as 10 * (1 - 0.9) = 0.999..."""
    return int(math.floor(round(n * (1.0 - remove_ratio), 6)))


def _remove_highest(eligible: torch.Tensor, scores: torch.Tensor, remove_ratio: float) -> torch.Tensor:
    """Among `eligible` entries keep the floor(n·(1-r)) lowest scores (stable order), remove the rest."""
    n = int(eligible.sum())
    keep = kept_count(n, remove_ratio)
    if keep <= 0:
        return eligible.clone()
    if keep >= n:
        return torch.zeros_like(eligible)
    flat_scores = torch.where(eligible, scores, torch.full_like(scores, math.inf)).flatten()
    order = torch.sort(flat_scores, stable=True).indices
    removed = eligible.flatten().clone()
    removed[order[:keep]] = False
    return removed.view_as(eligible)


def removal_mask(
    delta: torch.Tensor,
    safety: torch.Tensor,
    importance: torch.Tensor | None = None,
    *,
    remove_ratio: float = 1.0,
    remove_more: bool = False,
    mode: str = "sign",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask of the entries of one block to reset to the base value.

    - mode "sign" (IRR): candidates are sign conflicts; remove the `remove_ratio` share with the
      highest importance (all of them when remove_ratio == 1, importance unused).
    - remove_more (IRR_more): every entry is eligible, scored +F if conflicting, -F otherwise.
    - mode "no_sign" (ablation): every entry eligible, scored by F alone.
    - mode "random" (ablation): every entry eligible, scored uniformly at random (`generator`).
    - mode "none": nothing is removed (the safety-regularised objective alone).
    """
    if mode == "none":  # safety-regularised recalibration alone: nothing is reset
        return torch.zeros_like(delta, dtype=torch.bool)
    if mode == "random":
        scores = torch.rand(delta.shape, generator=generator, dtype=torch.float64).to(delta.device)
        return _remove_highest(torch.ones_like(delta, dtype=torch.bool), scores, remove_ratio)
    if mode == "no_sign":
        if remove_ratio >= 1.0:
            return torch.ones_like(delta, dtype=torch.bool)
        return _remove_highest(torch.ones_like(delta, dtype=torch.bool), _need(importance, delta), remove_ratio)
    if mode != "sign":
        raise ValueError(f"Unknown identify mode {mode!r}; expected 'sign', 'no_sign', 'random' or 'none'")

    conflicts = sign_conflicts(delta, safety)
    if remove_more:
        if remove_ratio >= 1.0:
            return torch.ones_like(conflicts)
        f = _need(importance, delta)
        scores = torch.where(conflicts, f, -f)
        return _remove_highest(torch.ones_like(conflicts), scores, remove_ratio)
    if remove_ratio >= 1.0:
        return conflicts
    return _remove_highest(conflicts, _need(importance, delta), remove_ratio)


def _need(importance: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if importance is None:
        raise ValueError("remove_ratio < 1 ranks entries by importance, but no importance was given")
    return importance.to(device=like.device, dtype=torch.float32 if like.dtype != torch.float64 else like.dtype)
