"""`safety_weight="auto"`: choose λ from held-out calibration and safety data, never evaluation prompts.

Why this shape: a candidate λ is judged by what the whole realigned model does on held-out data,
and a realignment per candidate would cost a full layer-by-layer run each. Instead one
layer-by-layer pass serves every candidate: per layer, the Hessians of both streams are collected
once (on the fine-tuned model's own activations), each candidate's solve is written into the layer
for a moment, and a small held-out batch per candidate (downstream and safety) is run through
it. Two references travel along: λ = 0 (the fine-tuned model, F) and λ = ∞ (every target back to
the aligned weights, A). At the end each candidate's held-out losses give

    s(λ) = (L_safety(λ) − L_safety(A)) / (L_safety(F) − L_safety(A))   the safety damage left,
    d(λ) = (L_task(λ) − L_task(F)) / (L_task(A) − L_task(F))           the task knowledge lost,

and λ* is the smallest candidate with s(λ) ≤ `AUTO_TOLERANCE` (safety back within 10% of the way
to the aligned model's loss). When fine-tuning did not damage safety at all (L_safety(F) within
`AUTO_MIN_GAP` nats of L_safety(A)), the smallest candidate is taken: there is nothing to restore.
The criterion is documented in docs/safety-weight.md with the toy-world evidence behind it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers.utils import logging

from .config import IRRConfig
from .core import realign_group

logger = logging.get_logger(__name__)

AUTO_CANDIDATES = (0.1, 0.3, 1.0, 3.0)
AUTO_TOLERANCE = 0.01
AUTO_CALIBRATION_SHARE = 0.25  # of the calibration batches used for the candidates' H_d
AUTO_MIN_GAP = 0.05  # nats per response token
HELD_OUT_SHARE = 0.25


def split_held_out(batches: list[dict[str, torch.Tensor]], what: str) -> tuple[list, list]:
    """(used for H, held out): the last quarter of the batches (at least one) is held out."""
    if len(batches) < 2:
        raise ValueError(f"safety_weight='auto' holds out part of the {what} data to choose λ, but it made only "
                         f"{len(batches)} batch: give at least 2 × calibration_batch_size sequences")
    held = max(1, int(round(len(batches) * HELD_OUT_SHARE)))
    return batches[:-held], batches[-held:]


def choose_weight(losses: Mapping[float, tuple[float, float]],
                  tolerance: float = AUTO_TOLERANCE) -> tuple[float, dict[str, Any]]:
    """λ* from {λ: (task loss, safety loss)} including the references 0 (F) and inf (A)."""
    task_f, safe_f = losses[0.0]
    task_a, safe_a = losses[math.inf]
    gap_s, gap_d = safe_f - safe_a, task_a - task_f
    candidates = sorted(c for c in losses if 0 < c < math.inf)
    rows = []
    for c in candidates:
        task, safe = losses[c]
        rows.append({"safety_weight": c, "task_loss": task, "safety_loss": safe,
                     "safety_left": (safe - safe_a) / gap_s if gap_s > AUTO_MIN_GAP else None,
                     "task_lost": (task - task_f) / gap_d if gap_d > 0 else None})
    ok: list = []
    if gap_s <= AUTO_MIN_GAP:
        chosen, reason = candidates[0], f"fine-tuning left the safety loss within {AUTO_MIN_GAP} of the aligned model's"
    else:
        ok = [r["safety_weight"] for r in rows if r["safety_left"] <= tolerance]
        if ok:
            chosen, reason = ok[0], f"smallest λ with safety damage left <= {tolerance}"
        else:
            chosen, reason = candidates[-1], f"no candidate brought the safety damage below {tolerance}: largest λ"
    table = {"criterion": f"smallest λ with (L_s(λ)-L_s(A))/(L_s(F)-L_s(A)) <= {tolerance}",
             "reason": reason, "chosen": chosen, "passing": bool(ok),
             "candidates": rows,
             "references": {"finetuned": {"task_loss": task_f, "safety_loss": safe_f},
                            "aligned_targets": {"task_loss": task_a, "safety_loss": safe_a}}}
    return chosen, table


@torch.no_grad()
def held_out_losses(
    model: nn.Module, layers: nn.ModuleList, by_layer: Mapping[int, list], hidden: list[torch.Tensor],
    layer_args: list[list], masks: list[torch.Tensor], streams: list[str], held: Mapping[str, list[int]],
    loss_batches: Mapping[str, list[dict[str, torch.Tensor]]], base: Optional[Mapping], safety: Optional[Mapping],
    importance: Optional[Mapping], config: IRRConfig, candidates: tuple[float, ...], dist_ctx: Any,
    collect_hessians, propagate, propagate_streams, write, make_backup, progress: bool = True,
    aligned_of: Optional[Mapping[int, Any]] = None, references: bool = True,
) -> dict[float, tuple[float, float]]:
    """{λ: (held-out task loss, held-out safety loss)} for every candidate (and, with `references`, for
    λ = 0, the fine-tuned model, and λ = ∞, every target at its aligned weight).

    One layer-by-layer pass: per layer and candidate, the candidate's own copies of the streams
    (a share of the calibration batches, the safety batches, their aligned twins) feed its H's
    (sequential, as in `realign`), its solve is written into the layer for the moment, and its
    streams and held-out batches run through it; every weight written is restored before the next
    candidate. `held` gives the indices of the held-out batches (`loss_batches`: the same batches)."""
    aligned_of = aligned_of or {}
    cal = [i for i, s in enumerate(streams) if s == "calibration"]
    keep_cal = set(cal[:max(2, int(math.ceil(len(cal) * AUTO_CALIBRATION_SHARE)))])
    train = [i for i, s in enumerate(streams) if s in ("safety", "safety_aligned") or i in keep_cal]
    held_all = list(held["calibration"]) + list(held["safety"])
    levels = ([0.0] if references else []) + list(candidates) + ([math.inf] if references else [])
    held_state = {c: [hidden[i] for i in held_all] for c in levels}
    train_state = {c: [hidden[i] for i in train] for c in candidates}
    train_streams = [streams[i] for i in train]
    train_masks = [masks[i] for i in train]
    for index in logging.tqdm(range(len(layers)), desc="IRR auto λ", disable=not progress):
        layer, targets = layers[index], by_layer.get(index, [])
        args_train = [layer_args[index][i] for i in train]
        args_held = [layer_args[index][i] for i in held_all]
        for c in levels:
            backup = make_backup("cpu")
            try:
                if targets and c > 0:
                    groups = [] if c == math.inf else _candidate_hessians(
                        collect_hessians, layer, targets, train_state[c], args_train, train_masks, config,
                        dist_ctx, train_streams, aligned_of.get(index))
                    for group, h_d, extra in groups or [(g, None, None) for g in _groups_of(targets)]:
                        _write_candidate(group, h_d, extra, c, base, safety, importance, config, write, backup)
                held_state[c] = propagate(layer, held_state[c], args_held)
                if c in train_state:
                    train_state[c] = propagate_streams(layer, train_state[c], args_train, train_streams,
                                                       aligned_of.get(index))
            finally:
                backup.restore()
    n_cal = len(held["calibration"])
    return {c: (_loss(model, layers, held_state[c][:n_cal], loss_batches["calibration"], dist_ctx),
                _loss(model, layers, held_state[c][n_cal:], loss_batches["safety"], dist_ctx)) for c in levels}


def _candidate_hessians(collect_hessians, layer, targets, hidden, args, masks, config, dist_ctx, streams, aligned):
    """[(group, H_d, {stream: matrix})] from one candidate's own streams."""
    by_stream = collect_hessians(layer, targets, hidden, args, masks, config, reduce=dist_ctx.reduce_hessian,
                                 streams=streams, aligned=aligned)
    return [(g, h, {name: by_stream[name][k][1][0] for name in by_stream if name != "calibration"})
            for k, (g, (h, _)) in enumerate(by_stream["calibration"])]


def _groups_of(targets: list) -> list[list]:
    """One group per target: enough for λ = ∞, which needs no Hessian (every target back to W_A)."""
    return [[t] for t in targets]


def search_weight(run_candidates, tolerance: float = AUTO_TOLERANCE) -> tuple[float, dict[str, Any]]:
    """Coarse-to-fine: the grid `AUTO_CANDIDATES` with the references, then the geometric midpoint
    (to one significant digit) below the smallest passing λ. `run_candidates(levels, references)` →
    {λ: (task, safety)}."""
    losses = dict(run_candidates(AUTO_CANDIDATES, True))
    weight, table = choose_weight(losses, tolerance)
    if table["passing"] and weight > AUTO_CANDIDATES[0]:
        lower = max(c for c in AUTO_CANDIDATES if c < weight)
        middle = float(f"{math.sqrt(lower * weight):.1g}")  # one significant digit: 0.1..0.3 -> 0.2
        losses.update(run_candidates((middle,), False))
        weight, table = choose_weight(losses, tolerance)
    return weight, table


def _write_candidate(group, h_d, extra, weight, base, safety, importance, config, write, backup) -> None:
    """W_A + Δ′(λ) into the group's weights (λ = ∞: W_A itself); originals go to `backup`."""
    device = h_d.device if h_d is not None else group[0].weight.device
    dtype = torch.float64 if all(t.weight.dtype == torch.float64 for t in group) else torch.float32
    deltas, safeties, scores, bases = [], [], [], []
    for t in group:
        w_a = (t.to_out_in(t.weight.detach()) if t.kind == "lora" else t.to_out_in(base[t.name])).to(device, dtype)
        current = t.to_out_in(t.lora_delta().detach()) if t.kind == "lora" else t.to_out_in(t.weight.detach())
        deltas.append(current.to(device, dtype) - (0 if t.kind == "lora" else w_a))
        bases.append(w_a)
        safeties.append(t.to_out_in(safety[t.name]).to(device) if config.needs_safety_vector else None)
        scores.append(t.to_out_in(importance[t.name]).to(device) if config.needs_importance else None)
    if weight == math.inf:
        news = [torch.zeros_like(d) for d in deltas]
    else:
        cross = {}
        if "safety_cross" in extra:
            cross = dict(safety_cross=extra["safety_cross"], aligned_hessian=extra["safety_aligned"], bases=bases)
        results = realign_group(
            deltas, safeties, scores, h_d, names=[t.name for t in group], remove_ratio=config.remove_ratio,
            remove_more=config.remove_more, recalibrate=True, blocksize=config.blocksize, percdamp=config.percdamp,
            mode=config.identify_mode, seed=config.irr_seed, max_damping_retries=config.max_damping_retries,
            fallback_to_removal=config.fallback_to_removal, removal_error=config.fallback_to_removal,
            safety_hessian=extra["safety"], safety_weight=weight, ridge=config.safety_ridge, **cross,
        )
        news = [r[0] for r in results]
    for t, w_a, new in zip(group, bases, news):
        write(t, w_a + new, backup)


def _loss(model: nn.Module, layers: nn.ModuleList, finals: list[torch.Tensor],
          batches: list[dict[str, torch.Tensor]], dist_ctx: Any) -> float:
    """Mean next-token loss on the selected (response) tokens, from the last layer's outputs: the model
    runs with every decoder layer stubbed out and the last one returning the given hidden states, so
    whatever follows the layer loop (final norm, LM head, soft-capping) is the model's own."""
    total = torch.zeros(2, dtype=torch.float64)
    originals = list(layers)
    device = next(model.parameters()).device
    try:
        for final, batch in zip(finals, batches):
            for i, layer in enumerate(originals):
                layers[i] = _Replay(layer, final if i == len(originals) - 1 else None)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits.float()
            targets = batch["input_ids"][:, 1:].to(logits.device)
            selected = batch["irr_loss_mask"][:, 1:].to(logits.device).bool()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][selected], targets[selected], reduction="sum")
            total += torch.tensor([float(nll), float(selected.sum())], dtype=torch.float64)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if dist_ctx.kind != "single":
        from .distributed import all_reduce_sum_

        all_reduce_sum_(total)
    return float(total[0] / total[1].clamp_min(1.0))


class _Replay(nn.Module):
    """A decoder layer stand-in: identity, or (the last layer) the recorded output of a candidate."""

    def __init__(self, layer: nn.Module, output: Optional[torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_output", output)

    def forward(self, hidden_states, *args, **kwargs):
        out = object.__getattribute__(self, "_output")
        return hidden_states if out is None else out.to(hidden_states.device, hidden_states.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


def resolved(config: IRRConfig, weight: float) -> IRRConfig:
    """The config with the chosen λ in place of 'auto'."""
    return replace(config, safety_weight=weight)


__all__ = ["AUTO_CANDIDATES", "choose_weight", "held_out_losses", "resolved", "search_weight", "split_held_out"]
