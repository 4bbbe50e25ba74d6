"""Step 0 of the data path when `safety_weight="auto"`: choose λ from held-out calibration and safety
data, never evaluation prompts (docs/safety-weight.md).

A candidate λ is judged by what the whole realigned model does on held-out data. One layer-by-layer
pass serves every candidate: each carries its own copies of the streams (a share of the calibration
batches, the safety batches and their aligned twin), so its Hessians come from its own realigned
layers, as in the real run. Per layer and candidate, its solves are written into the layer for a
moment, its streams and the held-out batches run through it, and the layer's weights are restored.
Two references need no solve: λ = 0 (the fine-tuned model, F) and λ = ∞ (every target at W_A, A).
From the held-out response tokens' next-token losses,

    s(λ) = (L_safety(λ) − L_safety(A)) / (L_safety(F) − L_safety(A))   the safety damage left,
    d(λ) = (L_task(λ) − L_task(F)) / (L_task(A) − L_task(F))           the task knowledge lost,

λ* is the smallest candidate with s(λ) <= `AUTO_TOLERANCE`; then the geometric midpoint below it
(one significant digit) is tried. If fine-tuning left the safety loss within `AUTO_MIN_GAP` of A's,
there is nothing to restore and the smallest candidate is taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..report import IRRReport
from ..targets import Target
from .capture import ArgsRecorder, propagate
from .hessians import collect_hessians
from .inputs import SafetyInputs
from .loop import LayerHook
from .solve import GroupSolver
from .streams import Stream
from .writing import make_backup, write_weight


AUTO_CANDIDATES = (0.1, 0.3, 1.0)
AUTO_FALLBACK = 3.0  # tried when no coarse candidate restores the safety loss
AUTO_TOLERANCE = 0.01  # of the gap between F's and A's held-out safety loss
AUTO_MIN_GAP = 0.05  # nats per response token: below it fine-tuning did not damage safety
AUTO_CALIBRATION_SHARE = 0.25  # of the (non held-out) calibration batches, for the candidates' H_d
AUTO_SAFETY_SHARE = 0.5  # of the (non held-out) safety batches, for the candidates' H_s
HELD_OUT_SHARE = 0.25  # of each stream's batches, held out to judge the candidates

Losses = dict[float, tuple[float, float]]


def split_held_out(batches: list[dict[str, torch.Tensor]], what: str) -> tuple[list, list]:
    """(used for H, held out): the last quarter of the batches (at least one) is held out."""
    if len(batches) < 2:
        raise ValueError(
            f"safety_weight='auto' holds out part of the {what} data to choose λ, but it made only "
            f"{len(batches)} batch: give at least 2 × calibration_batch_size sequences"
        )
    held = max(1, round(len(batches) * HELD_OUT_SHARE))
    return batches[:-held], batches[-held:]


def search_weight(run_candidates: Callable[[Sequence[float], bool], Losses]) -> tuple[float, dict[str, Any]]:
    """Coarse-to-fine, four candidates at most: `AUTO_CANDIDATES` with the references, then one more:
    the geometric midpoint (to one significant digit) between the smallest passing λ and the candidate
    below it, or `AUTO_FALLBACK` when none passed (and fine-tuning did damage safety)."""
    losses = dict(run_candidates(AUTO_CANDIDATES, True))
    weight, table = choose_weight(losses)
    extra = None
    if table["passing"] and weight > AUTO_CANDIDATES[0]:
        lower = max(c for c in AUTO_CANDIDATES if c < weight)
        extra = float(f"{math.sqrt(lower * weight):.1g}")  # 0.1..0.3 -> 0.2
    elif not table["passing"] and table["candidates"][0]["safety_left"] is not None:
        extra = AUTO_FALLBACK
    if extra is not None:
        losses.update(run_candidates((extra,), False))
        weight, table = choose_weight(losses)
    return weight, table


def choose_weight(losses: Mapping[float, tuple[float, float]]) -> tuple[float, dict[str, Any]]:
    """λ* from {λ: (task loss, safety loss)} holding the references 0 (F) and inf (A)."""
    task_f, safe_f = losses[0.0]
    task_a, safe_a = losses[math.inf]
    gap_s, gap_d = safe_f - safe_a, task_a - task_f
    candidates = sorted(c for c in losses if 0 < c < math.inf)
    rows = [
        {
            "safety_weight": c,
            "task_loss": losses[c][0],
            "safety_loss": losses[c][1],
            "safety_left": (losses[c][1] - safe_a) / gap_s if gap_s > AUTO_MIN_GAP else None,
            "task_lost": (losses[c][0] - task_f) / gap_d if gap_d > 0 else None,
        }
        for c in candidates
    ]
    passing = [r["safety_weight"] for r in rows if r["safety_left"] is not None and r["safety_left"] <= AUTO_TOLERANCE]
    if gap_s <= AUTO_MIN_GAP:
        chosen, reason = candidates[0], f"fine-tuning left the safety loss within {AUTO_MIN_GAP} of the aligned one"
    elif passing:
        chosen, reason = passing[0], f"the smallest λ with safety damage left <= {AUTO_TOLERANCE}"
    else:
        chosen, reason = candidates[-1], f"no candidate brought the safety damage left to {AUTO_TOLERANCE}: largest λ"
    table = {
        "criterion": f"smallest λ with (L_safety(λ) - L_safety(A)) / (L_safety(F) - L_safety(A)) <= {AUTO_TOLERANCE}",
        "reason": reason,
        "chosen": chosen,
        "passing": bool(passing),
        "candidates": rows,
        "references": {
            "finetuned": {"task_loss": task_f, "safety_loss": safe_f},
            "aligned_targets": {"task_loss": task_a, "safety_loss": safe_a},
        },
    }
    return chosen, table


@torch.no_grad()
def held_out_losses(
    model: nn.Module,
    layers: nn.ModuleList,
    targets: Sequence[Target],
    train: Sequence[Stream],
    held: Mapping[str, Stream],
    inputs: SafetyInputs,
    config: IRRConfig,
    candidates: Sequence[float],
    dist_ctx: Any,
    *,
    references: bool = True,
    device: torch.device | None = None,
    progress: bool = True,
    load_layer: LayerHook | None = None,
    drop_layer: LayerHook | None = None,
) -> Losses:
    """{λ: (held-out task loss, held-out safety loss)} for every candidate (and with `references` for
    λ = 0 and λ = ∞). `train`: the streams the candidates' H come from; `held`: "calibration" and
    "safety" held-out streams (their batches carry `irr_loss_mask`). Every weight is restored.
    The aligned twin's states do not depend on λ: one twin serves every candidate, propagated once.
    `load_layer` / `drop_layer`: as `run_layers`' options, for the offline path (a layer is loaded from the
    checkpoint before its pass and dropped after it; nothing is written: every trial weight is restored)."""
    levels = ([0.0] if references else []) + list(candidates) + ([math.inf] if references else [])
    held_state = {c: [held["calibration"].copy(), held["safety"].copy()] for c in levels}
    train_state = {c: [s.copy(share_twin=True) for s in train] for c in candidates}
    twins = [s.twin.copy() for s in train if s.twin is not None]
    for c in candidates:  # the copies share one twin
        for stream in train_state[c]:
            if stream.twin is not None:
                stream.twin = twins[0]
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    settings = config.realign_settings()
    for index in logging.tqdm(range(len(layers)), desc="IRR auto λ", disable=not progress):
        layer, layer_targets = layers[index], by_layer.get(index, [])
        if load_layer is not None:
            load_layer(index, layer)
        for c in levels:
            backup = make_backup("cpu")
            try:
                if layer_targets and c == math.inf:
                    for t in layer_targets:
                        w_a = inputs.base_weight(t, t.weight.device, torch.float32)
                        write_weight(t, w_a, backup)
                elif layer_targets and c > 0:
                    groups = collect_hessians(
                        layer, layer_targets, train_state[c], index, device=device, reduce=dist_ctx.reduce_hessian
                    )
                    trial = replace(settings, safety_weight=c, removal_error=False, fallback_to_removal=False)
                    solver = GroupSolver(inputs, trial, backup, IRRReport())  # no report errors: weights only
                    for group, hessians in groups:
                        solver(group, hessians)
                    del groups
                for stream in held_state[c] + train_state.get(c, []):
                    stream.propagate(layer, index, twin=False)
            finally:
                backup.restore()
        for twin in twins:  # the aligned weights: the same for every candidate
            with twin.layer_context(index):
                twin.hidden = propagate(layer, twin.hidden, twin.args[index])
        if drop_layer is not None:
            drop_layer(index, layer)
    return {
        c: (
            _loss(model, layers, held_state[c][0], dist_ctx),
            _loss(model, layers, held_state[c][1], dist_ctx),
        )
        for c in levels
    }


def _loss(model: nn.Module, layers: nn.ModuleList, stream: Stream, dist_ctx: Any) -> float:
    """Mean next-token loss on the scored (response) tokens of `stream`, from its last layer's outputs:
    the model runs with every decoder layer stubbed out and the last one returning them, so whatever
    follows the layer loop (final norm, LM head, soft-capping) is the model's own."""
    total = torch.zeros(2, dtype=torch.float64)
    originals = list(layers)
    device = next(model.parameters()).device
    try:
        for final, batch in zip(stream.hidden, stream.batches):
            for i, layer in enumerate(originals):
                layers[i] = _Replay(layer, final if i == len(originals) - 1 else None)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits.float()
            targets = batch["input_ids"][:, 1:].to(logits.device)
            scored = batch["irr_loss_mask"][:, 1:].to(logits.device).bool()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][scored], targets[scored], reduction="sum")
            total += torch.tensor([float(nll), float(scored.sum())], dtype=torch.float64)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if dist_ctx.kind != "single":
        from ..distributed import all_reduce_sum_

        all_reduce_sum_(total)
    return float(total[0] / total[1].clamp_min(1.0))


class _Replay(ArgsRecorder):
    """`ArgsRecorder`'s identity stand-in, except that the last layer returns a candidate's recorded output."""

    def __init__(self, layer: nn.Module, output: torch.Tensor | None):
        super().__init__(layer)
        object.__setattr__(self, "_output", output)

    def forward(self, hidden_states, *args, **kwargs):
        out = object.__getattribute__(self, "_output")
        return hidden_states if out is None else out.to(hidden_states.device, hidden_states.dtype)


def resolve_auto_weight(
    model: nn.Module,
    layers: nn.ModuleList,
    targets: Sequence[Target],
    calibration: Stream,
    safety: Stream,
    held_out: Mapping[str, int],
    inputs: SafetyInputs,
    config: IRRConfig,
    dist_ctx: Any,
    report: IRRReport,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    load_layer: LayerHook | None = None,
    drop_layer: LayerHook | None = None,
) -> IRRConfig:
    """Choose λ for `config` (safety_weight='auto') on captured streams whose last `held_out[name]`
    batches are held out and whose first `held_out["calibration_share"]` calibration (and
    `["safety_share"]` safety) batches feed the candidates' Hessians; record the search in `report`;
    return the config with λ* in place of 'auto'. `load_layer` / `drop_layer`: see `held_out_losses`
    (the offline path also materialises everything outside the decoder layers: the losses run the model's head)."""
    if dist_ctx.kind not in ("single", "replicated"):
        raise ValueError(
            f"IRRConfig.safety_weight='auto' is not supported under {dist_ctx.kind} yet: choose λ on one process "
            "(e.g. irr apply --safety_weight auto on the saved model) and pass that number"
        )
    import time

    started = time.perf_counter()
    n_cal = len(calibration.batches) - held_out["calibration"]
    n_saf = len(safety.batches) - held_out["safety"]
    share = {name: list(range(held_out[f"{name}_share"])) for name in ("calibration", "safety")}
    train = [calibration.subset(share["calibration"]), safety.subset(share["safety"])]
    held = {
        "calibration": calibration.subset(list(range(n_cal, len(calibration.batches)))),
        "safety": safety.subset(list(range(n_saf, len(safety.batches)))),
    }
    held["calibration"].twin = held["safety"].twin = None  # the held-out batches are scored, not paired

    def run_candidates(candidates: Sequence[float], references: bool) -> Losses:
        return held_out_losses(
            model, layers, targets, train, held, inputs, config, candidates, dist_ctx,
            references=references, device=device, progress=progress, load_layer=load_layer, drop_layer=drop_layer,
        )  # fmt: skip

    weight, table = search_weight(run_candidates)
    table["seconds"] = time.perf_counter() - started
    table["held_out_batches"] = dict(held_out)
    report.auto, report.safety_weight = table, weight
    logging.get_logger(__name__).info(
        f"IRR safety_weight='auto': λ={weight:g} ({table['reason']}), search {table['seconds']:.1f}s"
    )
    return replace(config, safety_weight=weight)
