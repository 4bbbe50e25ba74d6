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

AUTO_CANDIDATES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
AUTO_TOLERANCE = 0.1
AUTO_MIN_GAP = 0.05  # nats per response token
HELD_OUT_SHARE = 0.25


def split_held_out(batches: list[dict[str, torch.Tensor]], what: str) -> tuple[list, list]:
    """(used for H, held out): the last quarter of the batches (at least one) is held out."""
    if len(batches) < 2:
        raise ValueError(f"safety_weight='auto' holds out part of the {what} data to choose λ, but it made only "
                         f"{len(batches)} batch: give at least 2 × calibration_batch_size sequences")
    held = max(1, int(round(len(batches) * HELD_OUT_SHARE)))
    return batches[:-held], batches[-held:]


def choose_weight(losses: Mapping[float, tuple[float, float]]) -> tuple[float, dict[str, Any]]:
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
    if gap_s <= AUTO_MIN_GAP:
        chosen, reason = candidates[0], f"fine-tuning left the safety loss within {AUTO_MIN_GAP} of the aligned model's"
    else:
        ok = [r["safety_weight"] for r in rows if r["safety_left"] <= AUTO_TOLERANCE]
        if ok:
            chosen, reason = ok[0], f"smallest λ with safety damage left <= {AUTO_TOLERANCE}"
        else:
            chosen, reason = candidates[-1], f"no candidate brought the safety damage below {AUTO_TOLERANCE}: largest λ"
    table = {"criterion": f"smallest λ with (L_s(λ)-L_s(A))/(L_s(F)-L_s(A)) <= {AUTO_TOLERANCE}",
             "reason": reason, "chosen": chosen, "candidates": rows,
             "references": {"finetuned": {"task_loss": task_f, "safety_loss": safe_f},
                            "aligned_targets": {"task_loss": task_a, "safety_loss": safe_a}}}
    return chosen, table


@torch.no_grad()
def held_out_losses(
    model: nn.Module, layers: nn.ModuleList, by_layer: Mapping[int, list], hidden: list[torch.Tensor],
    layer_args: list[list], masks: list[torch.Tensor], streams: list[str], held: Mapping[str, list[int]],
    loss_batches: Mapping[str, list[dict[str, torch.Tensor]]], base: Optional[Mapping], safety: Optional[Mapping],
    importance: Optional[Mapping], config: IRRConfig, candidates: tuple[float, ...], dist_ctx: Any,
    collect_hessians, propagate, write, make_backup, progress: bool = True,
) -> dict[float, tuple[float, float]]:
    """{λ: (held-out task loss, held-out safety loss)} for every candidate and the references 0 and ∞.

    `hidden` holds the inputs of layer 0 for every batch; `streams` names each batch's stream,
    `held` the indices of the held-out calibration and safety batches (`loss_batches` the same
    batches with their `labels`). Every weight written is restored before the next candidate."""
    train = [i for i, s in enumerate(streams) if s in ("calibration", "safety")]
    held_all = list(held["calibration"]) + list(held["safety"])
    levels = [0.0, *candidates, math.inf]
    states = {c: [hidden[i] for i in held_all] for c in levels}
    train_hidden = [hidden[i] for i in train]
    train_streams = [streams[i] for i in train]
    train_masks = [masks[i] for i in train]
    for index in logging.tqdm(range(len(layers)), desc="IRR auto λ", disable=not progress):
        layer, targets = layers[index], by_layer.get(index, [])
        args_train = [layer_args[index][i] for i in train]
        args_held = [layer_args[index][i] for i in held_all]
        if targets:
            by_stream = collect_hessians(layer, targets, train_hidden, args_train, train_masks, config,
                                         reduce=dist_ctx.reduce_hessian, streams=train_streams)
            groups = [(g, h, by_stream["safety"][k][1][0]) for k, (g, (h, _)) in enumerate(by_stream["calibration"])]
            del by_stream
            for c in levels:
                backup = make_backup("cpu")
                try:
                    if c > 0:
                        for group, h_d, h_s in groups:
                            _write_candidate(group, h_d, h_s, c, base, safety, importance, config, write, backup)
                    states[c] = propagate(layer, states[c], args_held)
                finally:
                    backup.restore()
            del groups
        else:
            for c in levels:
                states[c] = propagate(layer, states[c], args_held)
        train_hidden = propagate(layer, train_hidden, args_train)
    n_cal = len(held["calibration"])
    out = {}
    for c in levels:
        task = _loss(model, layers, states[c][:n_cal], loss_batches["calibration"], dist_ctx)
        safe = _loss(model, layers, states[c][n_cal:], loss_batches["safety"], dist_ctx)
        out[c] = (task, safe)
    return out


def _write_candidate(group, h_d, h_s, weight, base, safety, importance, config, write, backup) -> None:
    """W_A + Δ′(λ) into the group's weights (λ = ∞: W_A itself); originals go to `backup`."""
    device = h_d.device
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
        results = realign_group(
            deltas, safeties, scores, h_d, names=[t.name for t in group], remove_ratio=config.remove_ratio,
            remove_more=config.remove_more, recalibrate=True, blocksize=config.blocksize, percdamp=config.percdamp,
            mode=config.identify_mode, seed=config.irr_seed, max_damping_retries=config.max_damping_retries,
            fallback_to_removal=config.fallback_to_removal, removal_error=config.fallback_to_removal,
            safety_hessian=h_s, safety_weight=weight, ridge=config.safety_ridge,
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


__all__ = ["AUTO_CANDIDATES", "choose_weight", "held_out_losses", "resolved", "split_held_out"]
