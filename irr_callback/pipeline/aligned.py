"""The aligned twin of the safety stream: the aligned model's weights swapped into one decoder layer.

The aligned-target safety term (`IRRConfig.safety_term="aligned"`) needs each safety token's input
to every target in the aligned model, X_A, beside its input in the model being realigned. A second
copy of the safety stream therefore runs through every layer with W_A in place: each target gets its
base weight (a LoRA target's adapter is switched off), every other parameter of the layer that the
base mapping holds (norms) gets its base value, and layer -1 stands for the input embedding. The
layer's own tensors are put back when the context ends; nothing is copied but the one layer's W_A.
Under sharded weights the process-group context swaps instead (`dist_ctx.swapped`): each rank copies its
part of W_A in and out (FSDP2: its rows; ZeRO-3 and FSDP1: through a gather of the layer), so every
forward inside is the collective it always is.
A LoRA target's W_A is its frozen weight, which the layer's solve overwrites with W_A + Δ′: the
first use of a layer (its H pass, before any write) keeps a copy of those weights for that layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import SingleProcess
from ..distributed.shards import ShardedSnapshot
from ..targets import Target, targets_by_layer
from ..tensors import canonical_name


class AlignedWeights:
    """`aligned(index)`: a context with layer `index` holding the aligned weights (-1: the embedding);
    `aligned.head()`: the same for everything after the layers.

    Args:
        model: the model being realigned (for its input embedding).
        layers: its decoder layers; `prefix` their module path, e.g. "model.layers".
        targets: every target of the run.
        base: name → tensor mapping of the aligned weights (may hold the targets only; a `ShardedSnapshot`
            under sharded weights).
        dist_ctx: the process-group context, whose `swapped` puts the values in (default: one process).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.ModuleList,
        prefix: str,
        targets: list[Target],
        base: Mapping | None,
        dist_ctx: Any = None,
    ) -> None:
        self.model, self.layers, self.prefix, self.base = model, layers, prefix, base
        self.dist_ctx = dist_ctx if dist_ctx is not None else SingleProcess()
        self._lora_bases: tuple[int, dict[str, torch.Tensor]] = (-1, {})  # (layer, W_A of its LoRA targets)
        self.by_layer = targets_by_layer(targets)

    def __call__(self, index: int) -> contextlib.AbstractContextManager:
        self.dist_ctx.settle()  # the parameters looked up below are the ones a write must change
        return self.dist_ctx.swapped(self._swaps(index))

    def head(self) -> contextlib.AbstractContextManager:
        """A context with every tensor outside the decoder layers that the base holds (final norm, LM head,
        embeddings) at its base value: next-token predictions judged as the aligned model makes them (the
        calibration filter). A base holding the targets only (the callback's snapshot) swaps nothing."""
        return self(len(self.layers))

    def _value(self, name: str) -> torch.Tensor:
        """W_A of one tensor: whole, or this rank's rows of a row-sharded snapshot; a snapshot held in flat
        chunks (ZeRO-3, FSDP1) is gathered (collective: every rank swaps the same tensors in the same order)."""
        base = self.base
        if isinstance(base, ShardedSnapshot) and base.layout == "flat":
            return base.full(name)
        return base[name]

    def _swaps(self, index: int) -> list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]:
        base = self.base if self.base is not None else {}
        if index >= len(self.layers):  # the head: everything outside the decoder layers
            inside = canonical_name(self.prefix) + "."
            named = [
                (canonical_name(name), param) for name, param in self.model.named_parameters() if "lora_" not in name
            ]
            return [
                (param, lambda n=key: self._value(n))
                for key, param in named
                if not key.startswith(inside) and key in base
            ]
        if index < 0:
            embedding = self.model.get_input_embeddings().weight
            name = next((canonical_name(n) for n, p in self.model.named_parameters() if p is embedding), None)
            return [(embedding, lambda: self._value(name))] if name in base else []
        swaps, own = [], set()
        for t in self.by_layer.get(index, []):
            own.add(id(t.weight))
            if t.kind == "lora":
                lora_b = t.module.lora_B[t.adapter].weight
                swaps.append((lora_b, lambda p=lora_b: torch.zeros_like(p)))
                frozen = self._lora_base(index, t)
                swaps.append((t.weight, lambda w=frozen: w))
            else:
                swaps.append((t.weight, lambda n=t.name: self._value(n)))
        for name, param in self.layers[index].named_parameters():  # norms and other untargeted weights
            full = f"{self.prefix}.{index}.{canonical_name(name)}"
            if id(param) not in own and "lora_" not in name and full in base:
                swaps.append((param, lambda n=full: self._value(n)))
        return swaps

    def _lora_base(self, index: int, target: Target) -> torch.Tensor:
        """The LoRA target's frozen weight as it was when layer `index` was first used (before its solve)."""
        layer, kept = self._lora_bases
        if layer != index:
            self._lora_bases = layer, kept = index, {}
        if target.name not in kept:
            kept[target.name] = target.weight.detach().clone()
        return kept[target.name]
