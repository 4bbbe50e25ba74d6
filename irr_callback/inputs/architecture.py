"""One architecture check for every place that pairs two checkpoints (`irr apply`, `irr safety-vector`, the
callback's `unaligned_model`): IRR compares weights entry by entry, so both must be the same family and size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


# Fields of config.json that decide every target's name and shape; vocab_size is left out on purpose
# (fine-tunes often add tokens, and embeddings are not IRR targets).
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_inner",
    "n_layer",
    "n_head",
)


def architecture_differences(reference: dict, other: dict) -> list[str]:
    """'field other-value vs reference-value' for every architecture field that differs."""
    return [
        f"{k} {other.get(k)!r} vs {reference.get(k)!r}"
        for k in ARCHITECTURE_FIELDS
        if other.get(k) != reference.get(k)
    ]


def model_config_dict(model: Any) -> dict | None:
    """The config of a (PEFT- or DDP-wrapped) transformers model as a dict; None for a model without one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)
    config = getattr(inner, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def check_same_architecture(
    reference: tuple[str, dict], other: tuple[str, dict], error: Callable[[str], Exception] = ValueError
) -> None:
    """Raise `error` naming both sides (labels such as "--base 'dir'") and the differing fields."""
    (ref_label, ref_cfg), (label, cfg) = reference, other
    diffs = architecture_differences(ref_cfg, cfg)
    if diffs:
        raise error(
            f"{label} is not the same architecture as {ref_label} ({'; '.join(diffs)}): IRR compares "
            "weights entry by entry, so both must be the same model family and size"
        )
