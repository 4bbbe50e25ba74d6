"""Step 5 of the data path: the one layer loop, shared by `realign` (model in memory) and
`realign_checkpoint` (one layer loaded from the checkpoint at a time).

Per decoder layer: [load it] → H of every stream from one pass of the unmodified layer → solve and
write every group of targets (`true_sequential`: a pass and a solve per group, in call order) → propagate
every stream through the realigned layer (NaN/Inf check on real tokens) → [write it back and drop it]. Loading and writing back are options of the loop, not a
second loop; so is a rider (`safety_weight="auto"`: held-out copies that score the weights being written).
Only one layer's Hessians live on the compute device at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..core.obs import NumericalError
from ..distributed import SingleProcess, raise_if_any_failed
from ..targets import Target, targets_by_layer
from .hessians import collect_hessians
from .lowrank import AdapterFactors
from .memory import release_free_memory
from .solve import GroupSolver
from .streams import Stream


LayerHook = Callable[[int, nn.Module], None]


class LayerRider(Protocol):
    """Work that rides along the loop, one layer at a time (`auto_weight.HeldOutJudge`: held-out copies that score
    the weights being written): `before` sees the layer as it entered the loop, `after` the realigned layer."""

    def before(self, index: int, layer: nn.Module) -> None: ...

    def after(self, index: int, layer: nn.Module) -> None: ...


def run_layers(
    prefix: str,
    layers: nn.ModuleList,
    targets: Sequence[Target],
    streams: Sequence[Stream],
    solver: GroupSolver,
    dist_ctx: SingleProcess,
    *,
    device: torch.device | None = None,
    load_layer: LayerHook | None = None,
    store_layer: LayerHook | None = None,
    progress: bool = True,
    desc: str = "IRR layers",
    lowrank: AdapterFactors | None = None,
    rider: LayerRider | None = None,
    sequential: bool = False,
) -> None:
    """Realign `layers` in order, from the captured `streams` (their `hidden` enter layer 0).

    Args:
        prefix: the layers' module path (for messages), e.g. "model.layers".
        layers: the decoder layers.
        targets: every target, of any layer.
        streams: the named input streams, captured; the first is the calibration stream.
        solver: solves and writes one group of targets (handed to `dist_ctx`).
        dist_ctx: the process-group context (`SingleProcess()` without one).
        device: where H is accumulated (None: each layer's first target's device).
        load_layer: `load_layer(index, layer)` before the layer is used (the offline path materialises it).
        store_layer: `store_layer(index, layer)` once it is realigned and propagated (the offline path
            writes it to a shard and drops it).
        lowrank: LoRA runs: factors each LoRA target's Δ′ under its H right after the layer's solve.
        rider: called with every layer (the last included) before its solve and after it.
    """
    by_layer = targets_by_layer(targets)
    for stream in with_twins(streams):
        check_finite(stream, f"the input of decoder layer '{prefix}.0' (the embedding output)", dist_ctx)
    stop_plan: dict | None = {} if dist_ctx.stop_capture_early else None  # which target each layer calls last
    for index in logging.tqdm(range(len(layers)), desc=desc, disable=not progress):
        layer = layers[index]
        if load_layer is not None:
            load_layer(index, layer)
        layer_targets = by_layer.get(index, [])
        if rider is not None:
            rider.before(index, layer)
        more = index + 1 < len(layers)
        if layer_targets:
            solve_layer(
                layer, layer_targets, streams, index, solver, dist_ctx, device=device, stop_plan=stop_plan,
                lowrank=lowrank, sequential=sequential, entry_twins=more,
            )  # fmt: skip
        elif more:
            for stream in streams:
                stream.propagate_entry_twin(layer, index)
        if rider is not None:
            rider.after(index, layer)
        if index + 1 < len(layers):
            for stream in streams:
                stream.propagate(layer, index)  # and its aligned twin, through the aligned weights
            for stream in with_twins(streams):
                check_finite(
                    stream,
                    f"the output of decoder layer '{prefix}.{index}'"
                    + (" after realignment" if layer_targets else ""),
                    dist_ctx,
                )
        if store_layer is not None:
            store_layer(index, layer)
        release_free_memory()


def solve_layer(
    layer: nn.Module,
    layer_targets: list[Target],
    streams: Sequence[Stream],
    index: int,
    solver: GroupSolver,
    dist_ctx: SingleProcess,
    *,
    device: torch.device | None = None,
    stop_plan: dict | None = None,
    lowrank: AdapterFactors | None = None,
    sequential: bool = False,
    entry_twins: bool = False,
) -> None:
    """Solve and write every group of one layer's targets. One pass of the unmodified layer gives every group's H;
    `sequential` (`IRRConfig.true_sequential`): a pass per group instead, in the order the layer calls them, so that
    each group's inputs come from the layer with the groups before it already realigned (o_proj then sees the
    realigned q/k/v's attention, down_proj the realigned gate/up). `entry_twins`: the streams' fine-tuned twins go
    through the layer after its first pass, before anything is written."""
    remaining = list(layer_targets)
    while remaining:
        groups = collect_hessians(
            layer,
            remaining,
            streams,
            index,
            device=device,
            reduce=dist_ctx.reduce_hessian,
            stop_plan=None if sequential else stop_plan,
            first_group=sequential,
            stop_early=dist_ctx.stop_capture_early,
        )
        release_free_memory()  # the pass's activations: the solves below start from a trimmed heap
        if entry_twins:
            for stream in streams:  # fine-tuned twins: through the layer before the first solve writes
                stream.propagate_entry_twin(layer, index)
            entry_twins = False
        solved = [t for group, _ in groups for t in group]
        if lowrank is not None:
            lowrank.before(solved)
        dist_ctx.solve_layer(groups, solver)
        if lowrank is not None:
            lowrank.after(groups, solver.settings)
        del groups
        release_free_memory()  # the solver's buffers
        names = {t.name for t in solved}
        remaining = [t for t in remaining if t.name not in names]


def with_twins(streams: Sequence[Stream]) -> list[Stream]:
    """Every stream followed by its aligned twin, if it has one."""
    return [s for stream in streams for s in (stream, stream.twin) if s is not None]


def check_finite(stream: Stream, what: str, dist_ctx: SingleProcess) -> None:
    """Stop at the layer where NaN/Inf first appears on real tokens, instead of failing later with a
    NaN Hessian blamed on the next layer's modules (or, worse, writing weights computed from it).
    Under a process group every rank agrees (one flag reduction) so no rank is left waiting."""
    error = None
    for b, (x, mask) in enumerate(zip(stream.hidden, stream.masks)):
        real = x[mask.to(x.device).bool()] if mask.shape == x.shape[:-1] else x
        if not torch.isfinite(real).all():
            error = NumericalError(
                f"{what} contains NaN or Inf on {stream.name} batch {b}; every weight was "
                "restored. Check the model in float32, or exclude the layer's modules via "
                "target_modules"
            )
            break
    if dist_ctx.kind != "single":
        raise_if_any_failed(error)
    elif error is not None:
        raise error


def compute_device(config: IRRConfig) -> torch.device | None:
    """`IRRConfig.device` as a device (None: each layer's own device)."""
    return torch.device(config.device) if config.device else None
