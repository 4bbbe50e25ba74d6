"""Find decoder layers and the weight matrices IRR realigns, for any decoder LM.

No architecture tables: decoder layers are the repeated blocks named in `_no_split_modules` (or,
failing that, the longest `ModuleList` of identical blocks); targets are the Linear / Conv1D
modules inside them, or the PEFT LoRA layers wrapping those.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .tensors import canonical_name


try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


class TargetError(ValueError):
    """The model's structure or `target_modules` does not allow realignment; names the problem."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/PEFT wrappers (names then match `named_parameters` keys)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = inner
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder layers."""
    model = unwrap(model)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        # FSDP2's fully_shard swaps a module's class for "FSDP<Name>": match the original name
        classes = {type(getattr(m, "_fsdp_wrapped_module", m)).__name__.removeprefix("FSDP") for m in module}
        if len(classes) != 1:
            continue
        if no_split and not classes & no_split:
            continue
        if not any(_is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise TargetError(
            f"{type(model).__name__}: no decoder layers found (no ModuleList of identical blocks "
            "with Linear layers); IRR needs a decoder-only transformer"
        )
    return canonical_name(best[0]), best[1]  # FSDP1 wraps each layer: its module names carry the wrapper


@dataclass
class Target:
    """One weight matrix to realign."""

    name: str  # canonical parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    module: nn.Module  # the module whose input defines H (the LoRA wrapper for LoRA targets)
    layer: int
    kind: str  # "linear", "conv1d" or "lora"
    adapter: str | None = None

    @property
    def weight(self) -> nn.Parameter:
        """The stored dense weight (for LoRA: the frozen base layer's)."""
        return self.module.base_layer.weight if self.kind == "lora" else self.module.weight

    @property
    def transposed(self) -> bool:
        """Conv1D stores (in, out); IRR works on (out, in)."""
        layer = self.module.base_layer if self.kind == "lora" else self.module
        return isinstance(layer, Conv1D) if Conv1D else False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The whole weight's shape as stored, also while sharded (ZeRO-3 and FSDP1 keep flat pieces)."""
        layer = self.module.base_layer if self.kind == "lora" else self.module
        if isinstance(layer, nn.Linear):
            return (layer.out_features, layer.in_features)
        if Conv1D and isinstance(layer, Conv1D):
            return (layer.nx, layer.nf)
        return tuple(getattr(self.weight, "ds_shape", self.weight.shape))

    @property
    def out_in_shape(self) -> tuple[int, int]:
        shape = self.stored_shape
        return (shape[1], shape[0]) if self.transposed else shape  # type: ignore[return-value]

    def to_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self.transposed else tensor

    def from_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self.transposed else tensor

    def lora_delta(self) -> torch.Tensor:
        """ΔW of the LoRA adapter in the stored weight's layout (scaling and fan_in_fan_out included)."""
        return self.module.get_delta_weight(self.adapter)


def targets_by_layer(targets: Sequence[Target]) -> dict[int, list[Target]]:
    """{decoder layer index: its targets, in order}: the layer loops' grouping."""
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    return by_layer


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def _matches(full_name: str, patterns: Sequence[str] | None) -> bool:
    if patterns is None:
        return True
    for p in patterns:
        if full_name == p or full_name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, full_name):
                return True
        except re.error:
            continue
    return False


def find_targets(
    model: nn.Module, target_modules: Sequence[str] | None = None
) -> tuple[str, nn.ModuleList, list[Target]]:
    """Decoder layers and the targets inside them, in forward order per layer.

    Default targets: every Linear/Conv1D in the decoder layers, or, for a PEFT LoRA model, every
    LoRA-wrapped layer (the only weights the fine-tune changed).
    """
    prefix, layers = find_decoder_layers(model)
    targets: list[Target] = []
    for index, layer in enumerate(layers):
        lora_children: set[int] = set()
        for rel, module in layer.named_modules():
            if id(module) in lora_children:
                continue
            full = f"{prefix}.{index}.{rel}"
            if _is_lora(module):
                lora_children.update(id(m) for m in module.modules())
                if not _matches(canonical_name(full), target_modules):
                    continue
                adapters = list(getattr(module, "active_adapters", None) or ["default"])
                if len(adapters) != 1:
                    raise TargetError(f"{full}: {len(adapters)} active LoRA adapters; activate exactly one")
                targets.append(Target(f"{canonical_name(full)}.weight", module, index, "lora", adapters[0]))
            elif _is_linear(module) and rel and _matches(canonical_name(full), target_modules):
                kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
                targets.append(Target(f"{canonical_name(full)}.weight", module, index, kind))
    if target_modules is None and any(t.kind == "lora" for t in targets):
        # a LoRA fine-tune only moved its adapters' weights: those are the default targets
        targets = [t for t in targets if t.kind == "lora"]
    if not targets:
        wanted = "every Linear/Conv1D" if target_modules is None else f"target_modules={list(target_modules)}"
        raise TargetError(
            f"{wanted} matched no module inside the decoder layers '{prefix}' "
            f"(example module names: {_examples(prefix, layers)})"
        )
    for t in targets:
        if not t.weight.is_floating_point():
            raise TargetError(
                f"{t.name}: weight dtype {t.weight.dtype} is quantized; IRR needs a floating-point "
                "weight (dequantize or merge into a bf16/fp16/fp32 model first)"
            )
    return prefix, layers, targets


def _examples(prefix: str, layers: nn.ModuleList) -> list[str]:
    names = [f"{prefix}.0.{n}" for n, m in layers[0].named_modules() if _is_linear(m) and n]
    return names[:4]
