"""Step 0 of the data path when `safety_weight="auto"`: choose λ from held-out calibration, safety and
(when given) retain data, never evaluation prompts (docs/safety-weight.md).

A candidate λ is judged by what the whole realigned model does on held-out data. One layer-by-layer
pass serves every candidate of a round (the smallest runs alone first: `search_weight`): each carries its
own copies of the streams (a share of the calibration batches, the safety batches and their aligned twin,
the retain batches), so its Hessians come from its own realigned layers, as in the real run. Per layer
and candidate, its solves are written into the layer for a moment, its streams and the held-out batches
run through it, and the layer's weights are restored. With `AUTO_KEEP_FIRST` the smallest candidate is no
trial: it is the real run (every batch not held out), and the held-out copies ride along it (`HeldOutJudge`);
when it is chosen its weights stay, so the common case costs one realignment plus the held-out copies.
Two references need no solve: λ = 0 (the fine-tuned model, F) and λ = ∞ (every target at W_A, A).
From the held-out response tokens' next-token loss L, token accuracy a (argmax = the scored token) and
row exact match e (every scored token of the row the argmax: the greedy answer is the recorded one),

    s(λ) = (L_safety(λ) − L_safety(A)) / (L_safety(F) − L_safety(A))   the safety damage left,
    t(λ) = a_task(F) − a_task(λ)                                         the task accuracy lost,
    x(λ) = 1 − e_task(λ) / e_task(F)                                     the task answers lost,
    r(λ) = min(a_retain(F), a_retain(A)) − a_retain(λ)                   the old abilities lost that both
                                                                         references keep,

a candidate passes when s(λ) <= `AUTO_TOLERANCE`, r(λ) <= `AUTO_RETAIN_TOLERANCE`, t(λ) <=
`AUTO_TASK_TOLERANCE` and x(λ) <= `AUTO_TASK_EXACT_TOLERANCE` (chosen on the suite's dev worlds,
docs/safety-weight.md); λ* is the smallest passing candidate that no other candidate beats on every loss,
then the geometric midpoint below it (one significant digit) is tried; when nothing passes, `AUTO_FALLBACK`
above the candidates or `AUTO_FALLBACK_DOWN` below them is (`search_weight`). If fine-tuning left the safety
loss within `AUTO_MIN_GAP` of A's, there is nothing to restore and the smallest candidate is taken. If nothing
passes, a warning says so and λ* is the undominated candidate with the least safety loss among those
within the retain and task tolerances (the smallest undominated one when none is). A candidate that
another beats on every loss is never chosen (issue 23).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..report import IRRReport
from ..targets import Target, targets_by_layer
from .capture import propagate
from .head import scored_logits
from .inputs import SafetyInputs
from .loop import LayerHook, solve_layer
from .solve import GroupSolver
from .streams import CALIBRATION, RETAIN, SAFETY, Stream
from .writing import make_backup, write_weight


logger = logging.get_logger(__name__)

AUTO_CANDIDATES = (0.1, 0.3, 1.0)
#: run the smallest candidate first and stop there when it passes (`search_weight`); False: the whole coarse grid in
#: one pass (the rule of issue 19's rounds 1–6, the same λ in every recorded dev world)
AUTO_SMALLEST_FIRST = True
#: with AUTO_SMALLEST_FIRST: the smallest candidate is not a trial but the real run, from every batch that is not
#: held out, judged by held-out copies riding along (`HeldOutJudge`); when it is chosen its weights stay and no
#: second pass runs. Otherwise its weights are put back and the search goes on as without it (issue 19, round 8)
AUTO_KEEP_FIRST = True
AUTO_FALLBACK = 3.0  # tried when no coarse candidate restores the safety loss
#: tried when no coarse candidate passes and even the smallest breaks the retain or task tolerances (None: never).
#: Issue 19's sixth round measured it, its seventh adopted it with the recommended preset's retain term
#: (docs/safety-weight.md, "Round 7"); benchmarks/suite_rule_sweep.py replays it
AUTO_FALLBACK_DOWN: float | None = 0.05
AUTO_TOLERANCE = 0.005  # of the gap between F's and A's held-out safety loss
AUTO_RETAIN_TOLERANCE = 0.01  # held-out retain token accuracy lost below both references'
AUTO_TASK_TOLERANCE = 0.15  # held-out task token accuracy lost below the fine-tuned model's
#: held-out task rows whose greedy answer is exact, share lost relative to the fine-tuned model's
AUTO_TASK_EXACT_TOLERANCE = 0.2
AUTO_MIN_GAP = 0.05  # nats per response token: below it fine-tuning did not damage safety
#: share of each stream's (non held-out) batches that feeds the candidates' Hessians
AUTO_SHARES = {CALIBRATION: 0.25, SAFETY: 0.5, RETAIN: 0.5}
AUTO_CALIBRATION_SHARE, AUTO_SAFETY_SHARE = AUTO_SHARES[CALIBRATION], AUTO_SHARES[SAFETY]
HELD_OUT_SHARE = 0.25  # of each stream's batches, held out to judge the candidates

#: {λ: ((task, safety[, retain]) held-out losses, the same streams' token accuracies[, their row exact
#: matches])}, with the references at λ = 0 (F) and λ = inf (A)
Measures = dict[float, tuple[tuple[float, ...], ...]]


def split_held_out(batches: list[dict[str, torch.Tensor]], what: str) -> tuple[list, list]:
    """(used for H, held out): the last quarter of the batches (at least one) is held out."""
    if len(batches) < 2:
        raise ValueError(
            f"safety_weight='auto' holds out part of the {what} data to choose λ, but it made only "
            f"{len(batches)} batch: give at least 2 × calibration_batch_size sequences"
        )
    held = max(1, round(len(batches) * HELD_OUT_SHARE))
    return batches[:-held], batches[-held:]


def search_weight(run_candidates: Callable[[Sequence[float], bool], Measures]) -> tuple[float, dict[str, Any]]:
    """Coarse-to-fine, four candidates at most: `AUTO_CANDIDATES` with the references, then one more:
    the geometric midpoint (to one significant digit) between the chosen λ and the candidate below it,
    or `AUTO_FALLBACK` when none passed (fine-tuning did damage safety, and the largest candidate is
    still within the retain and task tolerances: a larger λ can only lose more), or `AUTO_FALLBACK_DOWN` when
    none passed and even the smallest is outside them (a smaller λ may lose less).

    With `AUTO_SMALLEST_FIRST` the smallest candidate runs first, with the references. When it passes (or
    fine-tuning left nothing to restore) it is the choice and the rest of the grid is not run: the full grid
    would only displace it by a larger candidate that beats it on every held-out loss, which happened in none of
    the recorded dev worlds (docs/safety-weight.md, "Round 7"). A candidate's measures do not depend on which
    others share its pass, so otherwise the result is the full grid's."""
    if AUTO_SMALLEST_FIRST:
        measures = dict(run_candidates(AUTO_CANDIDATES[:1], True))
        weight, table = choose_weight(measures, warn=False)
        if table["passing"] or table["candidates"][0]["safety_left"] is None:
            return weight, table  # neither case warns: the table is the one choose_weight would log for
        measures.update(run_candidates(AUTO_CANDIDATES[1:], False))
    else:
        measures = dict(run_candidates(AUTO_CANDIDATES, True))
    weight, table = choose_weight(measures, warn=False)
    extra = None
    if table["passing"] and weight > AUTO_CANDIDATES[0]:
        lower = max(c for c in AUTO_CANDIDATES if c < weight)
        extra = float(f"{math.sqrt(lower * weight):.1g}")  # 0.1..0.3 -> 0.2
    elif not table["passing"] and table["candidates"][0]["safety_left"] is not None:
        if _within_tolerances(table["candidates"][-1]):
            extra = AUTO_FALLBACK
        elif AUTO_FALLBACK_DOWN is not None and not _within_tolerances(table["candidates"][0]):
            extra = AUTO_FALLBACK_DOWN
    if extra is not None:
        measures.update(run_candidates((extra,), False))
    return choose_weight(measures)


def dominated(losses: Mapping[float, Sequence[float]]) -> set[float]:
    """The candidates another candidate beats on every loss (<= on all, < on one)."""
    out = set()
    for c, mine in losses.items():
        for o, theirs in losses.items():
            if o != c and all(t <= m for t, m in zip(theirs, mine)) and any(t < m for t, m in zip(theirs, mine)):
                out.add(c)
                break
    return out


def _within_tolerances(row: dict[str, Any]) -> bool:
    """Within the retain and task tolerances (a measure that could not be taken does not count against)."""
    tests = (
        (row["retain_accuracy_lost"], AUTO_RETAIN_TOLERANCE),
        (row["task_accuracy_lost"], AUTO_TASK_TOLERANCE),
        (row["task_exact_lost"], AUTO_TASK_EXACT_TOLERANCE),
    )
    return all(value is None or value <= limit for value, limit in tests)


def _share_lost(value: float, reference: float) -> float | None:
    """1 - value / reference: the relative loss, None where the reference answers no row exactly."""
    return 1.0 - value / reference if reference > 0 else None


def choose_weight(
    measures: Mapping[float, tuple[Sequence[float], Sequence[float]]], *, warn: bool = True
) -> tuple[float, dict[str, Any]]:
    """(λ*, the search table) from {λ: (losses, accuracies[, exact matches])} holding the references 0 (F)
    and inf (A); each is (task, safety[, retain]) on the held-out batches (measures without exact matches, as
    recorded before they were, skip the task answers test). `warn`: log a warning when no candidate passes
    (the search's last round only)."""
    (task_f, safe_f, *retain_f), (acc_task_f, _, *acc_retain_f), *exact_f = measures[0.0]
    (task_a, safe_a, *retain_a), (_, _, *acc_retain_a), *_ = measures[math.inf]
    gap_s, gap_d = safe_f - safe_a, task_a - task_f
    has_retain = bool(retain_f)
    retain_floor = min(acc_retain_f[0], acc_retain_a[0]) if has_retain else None
    candidates = sorted(c for c in measures if 0 < c < math.inf)
    beaten = dominated({c: tuple(measures[c][0]) for c in candidates})
    rows = []
    for c in candidates:
        (task, safe, *retain), (acc_task, acc_safe, *acc_retain), *exact = measures[c]
        rows.append(
            {
                "safety_weight": c,
                "task_loss": task,
                "safety_loss": safe,
                "retain_loss": retain[0] if retain else None,
                "task_accuracy": acc_task,
                "safety_accuracy": acc_safe,
                "retain_accuracy": acc_retain[0] if acc_retain else None,
                "safety_left": (safe - safe_a) / gap_s if gap_s > AUTO_MIN_GAP else None,
                "task_lost": (task - task_f) / gap_d if gap_d > 0 else None,
                "task_accuracy_lost": acc_task_f - acc_task,
                "retain_accuracy_lost": retain_floor - acc_retain[0] if has_retain else None,
                "task_exact": exact[0][0] if exact else None,
                "task_exact_lost": _share_lost(exact[0][0], exact_f[0][0]) if exact and exact_f else None,
                "dominated": c in beaten,
            }
        )
    undominated = [r for r in rows if not r["dominated"]]
    passing = [
        r["safety_weight"]
        for r in undominated
        if r["safety_left"] is not None and r["safety_left"] <= AUTO_TOLERANCE and _within_tolerances(r)
    ]
    limits = f"task accuracy lost <= {AUTO_TASK_TOLERANCE}, task answers lost <= {AUTO_TASK_EXACT_TOLERANCE}" + (
        f", retain accuracy lost <= {AUTO_RETAIN_TOLERANCE}" if has_retain else ""
    )
    if gap_s <= AUTO_MIN_GAP:
        chosen = undominated[0]["safety_weight"]
        reason = f"fine-tuning left the safety loss within {AUTO_MIN_GAP} of the aligned one"
    elif passing:
        chosen = passing[0]
        reason = f"the smallest undominated λ with safety damage left <= {AUTO_TOLERANCE}, {limits}"
    else:
        kept = [r for r in undominated if _within_tolerances(r)]
        if kept:
            chosen = min(kept, key=lambda r: (r["safety_loss"], r["safety_weight"]))["safety_weight"]
            why = f"the undominated λ with the least safety damage left within {limits}"
        else:
            chosen = undominated[0]["safety_weight"]
            why = f"no undominated λ kept {limits}: the smallest one"
        reason = f"no candidate passed (safety damage left <= {AUTO_TOLERANCE}): {why}"
        if warn:
            left = ", ".join(
                f"λ={r['safety_weight']:g}: {_fmt(r['safety_left'])} left, task accuracy lost "
                f"{_fmt(r['task_accuracy_lost'])}, task answers lost {_fmt(r['task_exact_lost'])}"
                + (f", retain accuracy lost {_fmt(r['retain_accuracy_lost'])}" if has_retain else "")
                for r in rows
            )
            logger.warning(
                f"IRR safety_weight='auto': no candidate restored the held-out safety loss to within "
                f"{AUTO_TOLERANCE} of the aligned model's while keeping {limits} ({left}); took λ={chosen:g}, "
                f"{why}. Refusals may not be fully restored: give more varied safety data, or set "
                "safety_weight to a number (a larger λ restores more and keeps less of the task)."
            )
    table = {
        "criterion": (
            f"smallest undominated λ with (L_safety(λ) - L_safety(A)) / (L_safety(F) - L_safety(A)) <= "
            f"{AUTO_TOLERANCE}, a_task(F) - a_task(λ) <= {AUTO_TASK_TOLERANCE}, 1 - e_task(λ) / e_task(F) <= "
            f"{AUTO_TASK_EXACT_TOLERANCE}"
            + (f" and min(a_retain(F), a_retain(A)) - a_retain(λ) <= {AUTO_RETAIN_TOLERANCE}" if has_retain else "")
            + " (L: held-out next-token loss, a: token accuracy, e: rows answered exactly)"
        ),
        "reason": reason,
        "chosen": chosen,
        "passing": bool(passing),
        "candidates": rows,
        "references": {
            "finetuned": _reference(measures[0.0]),
            "aligned_targets": _reference(measures[math.inf]),
        },
    }
    return chosen, table


def _reference(measured: tuple[Sequence[float], ...]) -> dict[str, float]:
    names = ("task", "safety", "retain")
    losses, accuracies, *exact = measured
    return {
        **{f"{n}_loss": v for n, v in zip(names, losses)},
        **{f"{n}_accuracy": v for n, v in zip(names, accuracies)},
        **{f"{n}_exact": v for n, v in zip(names, exact[0] if exact else ())},
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
) -> Measures:
    """{λ: ((held-out task loss, safety loss[, retain loss]), (their token accuracies))} for every
    candidate (and with `references` for λ = 0 and λ = ∞). `train`: the streams the candidates' H come from; `held`: the "calibration",
    "safety" (and "retain") held-out streams, in that order (their batches carry `irr_loss_mask`).
    Every weight is restored.
    The aligned twin's states do not depend on λ: one twin serves every candidate, propagated once.
    `load_layer` / `drop_layer`: as `run_layers`' options, for the offline path (a layer is loaded from the
    checkpoint before its pass and dropped after it; nothing is written: every trial weight is restored)."""
    levels = ([0.0] if references else []) + list(candidates) + ([math.inf] if references else [])
    held_state = {c: [stream.copy() for stream in held.values()] for c in levels}
    train_state = {c: [s.copy(share_twin=True) for s in train] for c in candidates}
    twins = {s.name: s.twin.copy() for s in train if s.twin is not None}
    for c in candidates:  # the copies share one twin per stream
        for stream in train_state[c]:
            if stream.twin is not None:
                stream.twin = twins[stream.name]
    by_layer = targets_by_layer(targets)
    settings = config.realign_settings()
    for index in logging.tqdm(range(len(layers)), desc="IRR auto λ", disable=not progress):
        layer, layer_targets = layers[index], by_layer.get(index, [])
        if load_layer is not None:
            load_layer(index, layer)
        for c in levels:
            if c == math.inf:
                with aligned_targets(layer_targets, inputs, dist_ctx):
                    for stream in held_state[c]:
                        stream.propagate(layer, index, twin=False)
                continue
            backup = make_backup("cpu")
            try:
                if layer_targets and c > 0:
                    trial = replace(settings, safety_weight=c, removal_error=False, fallback_to_removal=False)
                    solver = GroupSolver(inputs, trial, backup, IRRReport())  # no report errors: weights only
                    solve_layer(  # each backend's own solve and write, as in the real run
                        layer, layer_targets, train_state[c], index, solver, dist_ctx,
                        device=device, sequential=config.true_sequential,
                    )  # fmt: skip
                for stream in held_state[c] + train_state.get(c, []):
                    stream.propagate(layer, index, twin=False)
            finally:
                dist_ctx.restore(backup)  # sharded weights: through each backend's gather
        for twin in twins.values():  # the aligned (or fine-tuned) weights: the same for every candidate
            with twin.layer_context(index):
                twin.hidden = propagate(layer, twin.hidden, twin.args[index])
        if drop_layer is not None:
            drop_layer(index, layer)
    return {c: _measure(model, layers, held_state[c], dist_ctx) for c in levels}


def _measure(model: nn.Module, layers: nn.ModuleList, streams: Sequence[Stream], dist_ctx: Any) -> tuple:
    """One level's (losses, token accuracies, exact matches), each over the held-out `streams` in order."""
    scores = [_scores(model, layers, stream, dist_ctx) for stream in streams]
    return tuple(tuple(column) for column in zip(*scores))


class HeldOutJudge:
    """The held-out copies that ride along the real layer loop (`run_layers(rider=...)`) when the smallest candidate
    runs as the real run (`AUTO_KEEP_FIRST`): the reference F through each layer as it enters the loop, A through
    the layer with every target at W_A for a moment (restored), and the candidate through the realigned layer.
    Its `measures` are then those of the weights the run wrote, not of a trial re-solved from a share of the data."""

    def __init__(
        self, held: Mapping[str, Stream], targets: Sequence[Target], inputs: SafetyInputs, dist_ctx: Any, weight: float
    ) -> None:
        self.inputs, self.dist_ctx, self.weight = inputs, dist_ctx, weight
        self.levels = {c: [stream.copy() for stream in held.values()] for c in (0.0, weight, math.inf)}
        self.by_layer = targets_by_layer(targets)

    def before(self, index: int, layer: nn.Module) -> None:
        for stream in self.levels[0.0]:
            stream.propagate(layer, index, twin=False)
        with aligned_targets(self.by_layer.get(index, []), self.inputs, self.dist_ctx):
            for stream in self.levels[math.inf]:
                stream.propagate(layer, index, twin=False)

    def after(self, index: int, layer: nn.Module) -> None:
        for stream in self.levels[self.weight]:
            stream.propagate(layer, index, twin=False)

    def measures(self, model: nn.Module, layers: nn.ModuleList) -> Measures:
        return {c: _measure(model, layers, streams, self.dist_ctx) for c, streams in self.levels.items()}


def aligned_targets(targets: Sequence[Target], inputs: SafetyInputs, dist_ctx: Any) -> AbstractContextManager:
    """λ = ∞ (the reference A) inside: every target of one layer at W_A, a LoRA target's adapter off. One process
    or replicated weights: W_A swapped in by reference (`dist_ctx.swapped`), nothing copied; sharded weights:
    written through the backend and restored (`write_aligned`)."""
    if dist_ctx.kind not in ("single", "replicated"):
        return _written_aligned(targets, inputs, dist_ctx)
    swaps = []
    for t in targets:
        swaps.append((t.weight, lambda t=t: t.from_out_in(inputs.base_weight(t, t.weight.device, torch.float32))))
        if t.kind == "lora":
            lora_b = t.module.lora_B[t.adapter].weight
            swaps.append((lora_b, lambda p=lora_b: torch.zeros_like(p)))
    return dist_ctx.swapped(swaps)


@contextlib.contextmanager
def _written_aligned(targets: Sequence[Target], inputs: SafetyInputs, dist_ctx: Any) -> Iterator[None]:
    backup = make_backup("cpu")
    try:
        if targets:
            write_aligned(targets, inputs, backup, dist_ctx)
        yield
    finally:
        dist_ctx.restore(backup)  # through each backend's gather


def write_aligned(targets: Sequence[Target], inputs: SafetyInputs, backup: Any, dist_ctx: Any) -> None:
    """λ = ∞: every target of a layer at W_A (backed up first). Sharded weights: inside the backend's write
    scope (FSDP2: each rank's rows; ZeRO-3, FSDP1: gathered, the base gathered with them when held in shards)."""
    if dist_ctx.kind in ("single", "replicated"):
        for t in targets:
            write_weight(t, inputs.base_weight(t, t.weight.device, torch.float32), backup)
        return
    groups = [([t], {}) for t in targets]
    reader = _BaseReader(inputs)
    with dist_ctx.whole_base(groups, reader), dist_ctx.write_scope([t.weight for t in targets]) as view:
        for t in targets:
            tensor, rows = view(t.weight)
            backup.save(tensor)
            tensor.copy_(reader.inputs.base_weight(t, tensor.device, tensor.dtype, rows=rows).view_as(tensor))


class _BaseReader:
    """What `dist_ctx.whole_base` reads and replaces: the run's safety inputs."""

    def __init__(self, inputs: SafetyInputs) -> None:
        self.inputs = inputs


def _scores(model: nn.Module, layers: nn.ModuleList, stream: Stream, dist_ctx: Any) -> tuple[float, float, float]:
    """(mean next-token loss, token accuracy, row exact match) on the scored (response) tokens of `stream`,
    from its last layer's outputs through the model's own head (`head.scored_logits`). Token accuracy: the
    share of scored tokens that are the argmax (what greedy decoding would say there; the loss is a poor proxy
    for it where the references' losses are near zero). Row exact match: the share of rows whose every scored
    token is the argmax, i.e. whose greedy answer is exactly the recorded one (the suite's accuracy metric)."""
    total = torch.zeros(5, dtype=torch.float64)  # loss sum, argmax hits, scored tokens, exact rows, scored rows
    for scored, logits, targets in scored_logits(model, layers, stream):
        picked, wanted = logits[scored], targets[scored]
        nll = torch.nn.functional.cross_entropy(picked, wanted, reduction="sum")
        hit = logits.argmax(dim=-1) == targets
        rows = scored.any(dim=1)
        exact = (hit | ~scored).all(dim=1) & rows
        total += torch.tensor(
            [float(nll), float(hit[scored].sum()), float(scored.sum()), float(exact.sum()), float(rows.sum())],
            dtype=torch.float64,
        )
    if dist_ctx.kind != "single":
        from ..distributed import all_reduce_sum_

        all_reduce_sum_(total)
    count, rows = total[2].clamp_min(1.0), total[4].clamp_min(1.0)
    return float(total[0] / count), float(total[1] / count), float(total[3] / rows)


def resolve_auto_weight(
    model: nn.Module,
    layers: nn.ModuleList,
    targets: Sequence[Target],
    streams: Sequence[Stream],
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
    first_run: Callable[[float, Sequence[Stream], HeldOutJudge], None] | None = None,
    undo_first: Callable[[], None] | None = None,
) -> tuple[IRRConfig, bool]:
    """Choose λ for `config` (safety_weight='auto') on the captured `streams` (calibration, safety[,
    retain]) whose last `held_out[name]` batches are held out and whose first `held_out[f"{name}_share"]`
    batches feed the candidates' Hessians; record the search in `report`; return the config with λ* in
    place of 'auto', and whether the run's weights are already written.

    `first_run(λ, streams, judge)` (with `AUTO_KEEP_FIRST` and `AUTO_SMALLEST_FIRST`): runs the real layer loop at the
    smallest candidate on `streams` (every batch that is not held out) with `judge` riding along; `streams` give up
    their captured states first (`Stream.release`). When that λ is chosen its weights are the run's (True is
    returned), otherwise `undo_first()` puts the fine-tuned weights back and captures `streams` again before any
    other candidate runs. `load_layer` / `drop_layer`: see `held_out_losses` (the offline path also
    materialises everything outside the decoder layers: the losses run the model's head)."""
    import time

    started = time.perf_counter()

    def split() -> tuple[list[Stream], dict[str, Stream]]:
        """(the trial candidates' shares, the held-out parts) of the streams' captured states."""
        train = [s.subset(list(range(held_out[f"{s.name}_share"]))) for s in streams]
        held = {}
        for s in streams:
            n = len(s.batches)
            held[s.name] = s.subset(list(range(n - held_out[s.name], n)))
            held[s.name].twin = None  # the held-out batches are scored, not paired
        return train, held

    train, held = split()
    keep_first = first_run is not None and AUTO_KEEP_FIRST and AUTO_SMALLEST_FIRST
    written = False

    def run_candidates(candidates: Sequence[float], references: bool) -> Measures:
        nonlocal written, train, held
        if keep_first and references and not written:
            judge = HeldOutJudge(held, targets, inputs, dist_ctx, candidates[0])
            not_held = [s.subset(list(range(len(s.batches) - held_out[s.name]))) for s in streams]
            for s in streams:  # the run frees each layer's inputs as it goes: no other reference holds them
                s.release()
            train, held = [], {}
            first_run(candidates[0], not_held, judge)
            written = True
            return judge.measures(model, layers)
        if written:
            undo_first()  # the fine-tuned weights back, the streams captured again
            train, held = split()
            written = False
        return held_out_losses(
            model, layers, targets, train, held, inputs, config, candidates, dist_ctx,
            references=references, device=device, progress=progress, load_layer=load_layer, drop_layer=drop_layer,
        )  # fmt: skip

    weight, table = search_weight(run_candidates)
    kept = written  # still written only when the search stopped at that candidate: it is the choice
    table["seconds"] = time.perf_counter() - started
    table["held_out_batches"] = dict(held_out)
    table["kept_written_weights"] = kept
    report.auto, report.safety_weight = table, weight
    logger.info(
        f"IRR safety_weight='auto': λ={weight:g} ({table['reason']}), search {table['seconds']:.1f}s"
        + (" (the realignment it judged is the run's: no second pass)" if kept else "")
    )
    return replace(config, safety_weight=weight), kept
