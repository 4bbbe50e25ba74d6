"""Step 2 of the data path: one H per distinct target input of a layer, per named input stream.

Every stream (calibration today, safety next) goes through the same code: its batches run through
the unmodified layer, pre-hooks on the targets accumulate Σxxᵀ over real tokens (padding masked
out), the raw sums are reduced over processes, then normalised. The result is, per group of targets
that read the same input, `{stream name: (H, tokens)}`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core import HessianAccumulator
from ..targets import Target, TargetError
from .capture import StopForward, run_layer
from .streams import Stream


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
) -> list[GroupHessians]:
    """Per group of `targets` (the ones fed the same input), H of every stream at decoder layer `index`."""
    merged: list[GroupHessians] = []
    for stream in streams:
        groups = collect_stream(
            layer,
            targets,
            stream.hidden,
            stream.args[index],
            stream.masks,
            device=device,
            reduce=reduce,
            stop_plan=stop_plan,
        )
        if not merged:
            merged = [(group, {stream.name: h}) for group, h in groups]
            continue
        for (group, by_stream), (other, h) in zip(merged, groups):
            if [t.name for t in group] != [t.name for t in other]:
                raise TargetError(
                    f"{stream.name}: the targets share inputs differently than in "
                    f"{next(iter(by_stream))} ({[t.name for t in other]})"
                )
            by_stream[stream.name] = h
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
    """Run one stream's batches through the unmodified layer; one (H, tokens) per distinct input.

    Pre-hooks on the targets accumulate H before each target runs. Targets fed the very same
    tensor object (q/k/v, gate/up) share one H; the first batch finds them through weak references,
    so no target input is kept alive beyond the model's own use of it. `stop_plan` (a dict shared
    across layers, None to disable) remembers which target a layer of this shape calls last; once
    it is reached and every target has been seen, the pass ends (the output of this pass is never
    used, so the last module and whatever follows it are skipped: for Llama, down_proj).
    `reduce` sums each raw accumulator over processes before it is normalised (no-op in one process).
    `device`: where H is accumulated (default: the first target's weight device)."""
    device = device if device is not None else targets[0].weight.device
    accumulators: dict[int, HessianAccumulator] = {}
    representative: dict[int, int] = {}  # target -> the target whose accumulator it shares
    seen: dict[int, weakref.ref] = {}
    relative = {id(m): n for n, m in layer.named_modules()}
    names = [relative.get(id(t.module)) for t in targets]
    key = tuple(sorted(str(n) for n in names))
    can_stop = stop_plan is not None and None not in names and not _has_offload_hooks(layer)
    state = {"batch": 0, "stop_at": stop_plan.get(key) if can_stop else None, "calls": [0] * len(targets), "order": []}

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
            if state["batch"] == 0:
                state["calls"][k] += 1
                state["order"].append(k)
                if k not in representative:
                    first_batch_group(k, x)
            if representative.get(k) == k:
                accumulators[k].add(x.detach().to(device), token_mask(target, x, masks[state["batch"]]))
            if names[k] == state["stop_at"] and (state["batch"] > 0 or len(representative) == len(targets)):
                raise StopForward

        return hook

    handles = [t.module.register_forward_pre_hook(make_hook(k, t)) for k, t in enumerate(targets)]
    try:
        for b, x in enumerate(hidden):
            state["batch"] = b
            try:
                run_layer(layer, x, *args[b])
            except StopForward:
                pass
            if b == 0:
                seen.clear()
                for k, t in enumerate(targets):
                    if k not in representative:
                        raise TargetError(f"{t.name}: the module was not called during the layer's forward pass")
                if can_stop:  # every target called once: stop later passes at the last one
                    once = all(c == 1 for c in state["calls"])
                    state["stop_at"] = names[state["order"][-1]] if once else None
                    stop_plan[key] = state["stop_at"]
    finally:
        for h in handles:
            h.remove()
    groups = [(k, [i for i in range(len(targets)) if representative[i] == k]) for k in sorted(accumulators)]
    for k, _ in groups:
        reduce(accumulators[k])
    return [
        ([targets[i] for i in members], (accumulators[k].finalize(), accumulators[k].tokens)) for k, members in groups
    ]


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
