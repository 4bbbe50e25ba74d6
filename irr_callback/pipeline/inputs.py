"""The safety inputs of a run as one object: the base (aligned) weights, the safety vector and the
importance, answering per target what the group solver needs, in the (out, in) layout.

Conv1D (GPT-2, stored (in, out)) and LoRA (delta = the adapter's, base = the frozen weight) are
handled here once; `rows` selects output rows (FSDP2 keeps whole rows per process).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import IRRConfig
from ..core.obs import all_finite
from ..targets import Target, TargetError
from ..tensors import as_tensor_mapping, tensor_shape


class SafetyInputs:
    """Base, safety vector and (when the identification ranks) importance, keyed like
    `model.named_parameters()`; entries for non-targets are ignored.

    Args:
        base: name → tensor mapping of the aligned weights (None: every target is a LoRA layer).
        safety: name → tensor mapping of the safety vector (None when nothing is removed by sign).
        importance: name → tensor mapping of the importance (Fisher); None when not ranked.
    """

    def __init__(self, base: Mapping | None, safety: Mapping | None, importance: Mapping | None) -> None:
        self.base, self.safety, self.importance = base, safety, importance

    @classmethod
    def resolve(cls, config: IRRConfig, base: Any, safety_vector: Any, importance: Any) -> SafetyInputs:
        """From models, mappings or safetensors paths; importance required when `config` ranks deltas,
        the safety vector unless nothing is removed by sign (`identify_mode="none"`: then it is ignored)."""
        base_map = as_tensor_mapping(base, what="base") if base is not None else None
        if config.needs_safety_vector and safety_vector is None:
            raise ValueError(
                f"IRRConfig.identify_mode={config.identify_mode!r} removes deltas by the safety vector's signs, "
                "but no safety_vector was given (without one, use IRRConfig.recommended(): identify_mode='none' "
                "with a safety weight and safety_calibration)"
            )
        safety_map = as_tensor_mapping(safety_vector, what="safety_vector") if config.needs_safety_vector else None
        importance_map = as_tensor_mapping(importance, what="importance") if importance is not None else None
        if config.needs_importance and importance_map is None:
            raise ValueError(
                f"IRRConfig.remove_ratio={config.remove_ratio} < 1 ranks deltas by importance, "
                "but no importance (Fisher) was given"
            )
        return cls(base_map, safety_map, importance_map if config.needs_importance else None)

    # ---- per target, (out, in) layout ----------------------------------------------------------
    def delta_into(
        self, t: Target, out: torch.Tensor, *, weight: torch.Tensor | None = None, rows: slice | None = None
    ) -> torch.Tensor:
        """Δ = W_F − W_A written into `out` (no per-module copy of Δ or W_A is kept).

        `weight`: the fine-tuned rows to use instead of the target's own weight (FSDP2's local shard)."""
        if t.kind == "lora":
            return out.copy_(t.to_out_in(t.lora_delta().detach()))
        current = t.to_out_in(t.weight.detach() if weight is None else weight.detach())
        return torch.sub(
            current.to(device=out.device, dtype=out.dtype),
            self.base_weight(t, out.device, out.dtype, rows=rows),
            out=out,
        )

    def base_weight(
        self, t: Target, device: torch.device, dtype: torch.dtype, rows: slice | None = None
    ) -> torch.Tensor:
        """W_A (a LoRA layer's frozen weight), read again from the mapping each time it is needed."""
        if t.kind == "lora":
            source = t.weight.detach()
        elif rows is not None and hasattr(self.base, "local_rows"):  # a row-sharded snapshot: this rank's rows
            return t.to_out_in(self.base.local_rows(t.name, rows)).to(device=device, dtype=dtype)
        else:
            source = self.base[t.name]
        return _rows(t.to_out_in(source), rows).to(device=device, dtype=dtype)

    def signs(self, t: Target, device: torch.device, rows: slice | None = None) -> torch.Tensor | None:
        """The safety vector (its signs decide the conflicts); None when nothing is removed by sign."""
        if self.safety is None:
            return None
        return _rows(t.to_out_in(self.safety[t.name]), rows).to(device)

    def scores(self, t: Target, device: torch.device, rows: slice | None = None) -> torch.Tensor | None:
        """The importance, or None when the identification does not rank."""
        if self.importance is None:
            return None
        return _rows(t.to_out_in(self.importance[t.name]), rows).to(device)

    # ---- checks before anything is computed ------------------------------------------------------
    def validate(self, targets: list[Target]) -> None:
        """Every target has a base, a safety vector and (when needed) an importance of its shape, all finite."""
        for t in targets:
            shape = t.stored_shape  # ZeRO-3 and FSDP1 keep flat pieces
            if t.kind == "lora":
                check_lora_supported(t)
            elif self.base is None:
                raise ValueError(f"base is required: '{t.name}' is a fully fine-tuned weight (no LoRA)")
            if not all_finite(t.weight.detach()):
                raise ValueError(f"the model's '{t.name}' contains NaN or Inf")
            for label, mapping in self.sources(lora=t.kind == "lora"):
                check_entry(label, mapping, t.name, shape)
                tensor = mapping[t.name]
                if tensor.is_floating_point() and not all_finite(tensor):
                    raise ValueError(f"{label}['{t.name}'] contains NaN or Inf")

    def check_shapes(self, targets: list[Target]) -> None:
        """Every target has an entry of its shape in every source (shapes only: no tensor is read)."""
        for t in targets:
            for label, mapping in self.sources(lora=False):
                check_entry(label, mapping, t.name, t.stored_shape)

    def sources(self, *, lora: bool) -> list[tuple[str, Mapping]]:
        """(label, mapping) of every input a target of this kind reads, in the order they are checked."""
        out = [] if lora or self.base is None else [("base", self.base)]
        if self.safety is not None:
            out.append(("safety_vector", self.safety))
        if self.importance is not None:
            out.append(("importance", self.importance))
        return out


def check_entry(label: str, mapping: Mapping, name: str, shape: tuple[int, ...]) -> None:
    """`mapping` (base, safety vector or importance) has `name` with the weight's shape."""
    if name not in mapping:
        raise KeyError(
            f"{label} has no entry for target '{name}' (it has {len(mapping)} entries, e.g. {list(mapping)[:3]})"
        )
    got = tensor_shape(mapping, name)
    if got != shape:
        raise ValueError(f"{label}['{name}'] has shape {got}, the model's weight has shape {shape}")


def check_lora_supported(t: Target) -> None:
    """DoRA and LoRA with a bias change more than W_A + BA: refuse them."""
    module = t.module
    if getattr(module, "use_dora", {}).get(t.adapter, False):
        raise TargetError(
            f"{t.name}: DoRA adapters are not supported; merge the adapter "
            "(model.merge_and_unload()) and realign the merged model with `base`"
        )
    if getattr(module, "lora_bias", {}).get(t.adapter, False):
        raise TargetError(f"{t.name}: LoRA with lora_bias=True is not supported; merge the adapter first")


def _rows(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows]
