"""Step 2 of the data path: one H per distinct target input of a layer, per named input stream.

Every stream (calibration, safety) goes through the same code: its batches run through the
unmodified layer, pre-hooks on the targets accumulate Σxxᵀ over real tokens (padding masked out),
the raw sums are reduced over processes, then normalised. The result is, per group of targets that
read the same input, `{stream name: (H, tokens)}`. A stream with an aligned twin runs each twin
batch (aligned weights) right before its own, so that each token's two inputs meet: the twin's H
and the cross Gram come back as `{name}_aligned` and `{name}_cross`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core import HessianAccumulator
from ..core.hessian import CrossAccumulator
from ..targets import Target, TargetError
from .capture import StopForward, run_layer
from .streams import ALIGNED, CROSS, Stream


#: (targets sharing one input, {stream name: (H, token count)})
GroupHessians = tuple[list[Target], dict[str, tuple[torch.Tensor, int]]]


def collect_hessians(
    layer: nn.Module,
    targets: list[Target],
    streams: Sequence[Stream],
    index: int,
    device: torch.device | None = None,
    reduce: Callable[[HessianAccumulator], None] = lambda acc: None,
    stop_plan: dict | None = None,
    first_group: bool = False,
    stop_early: bool = False,
) -> list[GroupHessians]:
    """Per group of `targets` (the ones fed the same input), H of every stream at decoder layer `index`.
    `first_group`: only the group the layer calls first (`stop_early`: each run stops at the first target fed
    another input; see `collect_paired`)."""
    merged: list[GroupHessians] = []
    for stream in streams:
        twin = stream.twin
        groups = collect_paired(
            layer,
            targets,
            stream.hidden,
            stream.args[index],
            stream.masks,
            device=device,
            reduce=reduce,
            stop_plan=stop_plan,
            twin=None
            if twin is None
            else (twin.hidden, twin.args[index], functools.partial(twin.layer_context, index)),
            first_group=first_group,
            stop_early=stop_early,
        )
        labelled = [
            (group, {stream.name: h, **{stream.name + k: v for k, v in extra.items()}}) for group, h, extra in groups
        ]
        if not merged:
            merged = labelled
            continue
        for (group, by_stream), (other, h) in zip(merged, labelled):
            if [t.name for t in group] != [t.name for t in other]:
                raise TargetError(
                    f"{stream.name}: the targets share inputs differently than in "
                    f"{next(iter(by_stream))} ({[t.name for t in other]})"
                )
            by_stream.update(h)
    return merged


def collect_stream(
    layer,
    targets,
    hidden,
    args,
    masks,
    *,
    device: torch.device | None = None,
    reduce=lambda accumulator: None,
    stop_plan: dict | None = None,
) -> list[tuple[list[Target], tuple[torch.Tensor, int]]]:
    """Run one stream's batches through the unmodified layer; one (H, tokens) per distinct input
    (see `collect_paired`, which this is without a twin)."""
    groups = collect_paired(
        layer, targets, hidden, args, masks, device=device, reduce=reduce, stop_plan=stop_plan, twin=None
    )
    return [(group, h) for group, h, _ in groups]


def collect_paired(
    layer,
    targets,
    hidden,
    args,
    masks,
    *,
    device: torch.device | None = None,
    reduce=lambda accumulator: None,
    stop_plan: dict | None = None,
    twin: tuple | None = None,
    first_group: bool = False,
    stop_early: bool = False,
) -> list[tuple[list[Target], tuple[torch.Tensor, int], dict[str, tuple[torch.Tensor, int]]]]:
    """Run one stream's batches through the unmodified layer; one (H, tokens) per distinct input.

    Pre-hooks on the targets accumulate H before each target runs. Targets fed the very same
    tensor object (q/k/v, gate/up) share one H; the first batch finds them through weak references,
    so no target input is kept alive beyond the model's own use of it. `stop_plan` (a dict shared
    across layers, None to disable) remembers which target a layer of this shape calls last; once
    it is reached and every target has been seen, the pass ends (the output of this pass is never
    used, so the last module and whatever follows it are skipped: for Llama, down_proj).
    `reduce` sums each raw accumulator over processes before it is normalised (no-op in one process).
    `device`: where H is accumulated (default: the first target's weight device).
    `twin` = (hidden, args, weights context factory): the aligned copy of the stream; each of its batches runs
    (in the context) right before the stream's own, its target inputs x_A are held until the stream's
    x_r of the same tokens arrive, and the third element of each result holds H_A ("_aligned") and
    C = 2·Σ x_A x_rᵀ / n ("_cross"). Without a twin it is empty.
    `first_group` (`IRRConfig.true_sequential`): only the targets fed the same input as the first one the layer
    calls; with `stop_early` (one process or DDP: no sharded forward to leave half done) every run of a batch stops
    at the first call of a target fed another input, else it runs on without recording it."""
    device = device if device is not None else targets[0].weight.device
    accumulators: dict[int, HessianAccumulator] = {}
    representative: dict[int, int] = {}  # target -> the target whose accumulator it shares
    seen: dict[int, weakref.ref] = {}
    relative = {id(m): n for n, m in layer.named_modules()}
    names = [relative.get(id(t.module)) for t in targets]
    key = tuple(sorted(str(n) for n in names))
    can_stop = stop_plan is not None and None not in names and not _has_offload_hooks(layer)
    may_stop = stop_early and not _has_offload_hooks(layer)
    state = {
        "batch": 0,
        "stop_at": stop_plan.get(key) if can_stop else None,
        "calls": [0] * len(targets),
        "order": [],
        "aligned": False,
        "anchor": None,  # first_group: the input of the first target called in this run
    }
    aligned_acc: dict[int, HessianAccumulator] = {}
    crosses: dict[int, CrossAccumulator] = {}
    pending: dict[int, torch.Tensor] = {}  # the twin batch's input of each group, until the stream's comes

    def first_batch_group(k: int, x: torch.Tensor) -> None:
        for j, ref in seen.items():
            if ref() is x:
                representative[k] = representative[j]
                break
        else:
            representative[k] = k
            accumulators[k] = HessianAccumulator(targets[k].out_in_shape[1], device=device)
        seen[k] = weakref.ref(x)

    def make_hook(k: int, target: Target):
        def hook(module, inputs):
            x = inputs[0]
            if first_group:  # the group ends at the first target fed another input
                if state["anchor"] is None:
                    state["anchor"] = weakref.ref(x)
                elif state["anchor"]() is not x:
                    if may_stop:
                        raise StopForward
                    return  # sharded or offloaded weights: the forward runs to its end, unrecorded
            if state["aligned"]:  # the twin's run: hold the input until the stream's run of the batch
                pending[k] = x.detach()
                if names[k] == state["stop_at"] and state["batch"] > 0:
                    raise StopForward
                return
            if state["batch"] == 0:
                state["calls"][k] += 1
                state["order"].append(k)
                if k not in representative:
                    first_batch_group(k, x)
            if representative.get(k) == k:
                mask = token_mask(target, x, masks[state["batch"]])
                accumulators[k].add(x.detach().to(device), mask)
                if k in pending:  # x_A of the same tokens, from the twin's run of this batch
                    x_a, columns = pending[k].to(device), targets[k].out_in_shape[1]
                    aligned_acc.setdefault(k, HessianAccumulator(columns, device=device)).add(x_a, mask)
                    crosses.setdefault(k, CrossAccumulator(columns, device=device)).add(
                        x_a, x.detach().to(device), mask
                    )
            if names[k] == state["stop_at"] and (state["batch"] > 0 or len(representative) == len(targets)):
                raise StopForward

        return hook

    handles = [t.module.register_forward_pre_hook(make_hook(k, t)) for k, t in enumerate(targets)]
    try:
        for b, x in enumerate(hidden):
            state["batch"] = b
            if twin is not None:
                _run_twin(layer, twin, b, state)
            state["anchor"] = None
            try:
                run_layer(layer, x, *args[b])
            except StopForward:
                pass
            pending.clear()
            if b == 0:
                seen.clear()
                for k, t in enumerate(targets):
                    if k not in representative and not (first_group and representative):
                        raise TargetError(f"{t.name}: the module was not called during the layer's forward pass")
                if can_stop:  # every target called once: stop later passes at the last one
                    once = all(c == 1 for c in state["calls"])
                    state["stop_at"] = names[state["order"][-1]] if once else None
                    stop_plan[key] = state["stop_at"]
    finally:
        for h in handles:
            h.remove()
    groups = [(k, [i for i in range(len(targets)) if representative.get(i) == k]) for k in sorted(accumulators)]
    for k, _ in groups:
        reduce(accumulators[k])
    extras: dict[int, dict[str, tuple[torch.Tensor, int]]] = {k: {} for k, _ in groups}
    if twin is not None:
        for k, _ in groups:
            columns = targets[k].out_in_shape[1]
            pairs = (
                (ALIGNED, aligned_acc.get(k) or HessianAccumulator(columns, device=device)),
                (CROSS, crosses.get(k) or CrossAccumulator(columns, device=device)),
            )
            for label, acc in pairs:  # every rank reduces both, in the same order
                reduce(acc)
                extras[k][label] = (acc.finalize(), acc.tokens)
    return [
        ([targets[i] for i in members], (accumulators[k].finalize(), accumulators[k].tokens), extras[k])
        for k, members in groups
    ]


def _run_twin(layer: nn.Module, twin: tuple, b: int, state: dict) -> None:
    """Run the twin's batch `b` with its weights (the hooks hold its inputs for the stream's batch b)."""
    hidden, args, context = twin
    state["aligned"], state["anchor"] = True, None
    try:
        with context():
            run_layer(layer, hidden[b], *args[b])
    except StopForward:
        pass
    finally:
        state["aligned"] = False


def token_mask(target: Target, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch's real-token mask in the shape of the target's input (padding excluded from H)."""
    if x.shape[:-1].numel() != mask.numel():
        raise TargetError(
            f"{target.name}: its input has {x.shape[:-1].numel()} token positions but the batch has "
            f"{mask.numel()}; cannot exclude padding (exclude this module via target_modules)"
        )
    return mask.reshape(x.shape[:-1])


def _has_offload_hooks(layer: nn.Module) -> bool:
    """accelerate's offload hooks move weights in and out around each forward: never interrupt one."""
    return any(hasattr(m, "_hf_hook") for m in layer.modules())
