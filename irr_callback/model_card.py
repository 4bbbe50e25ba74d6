"""The README.md written next to a realigned model: what it is, how it was made, what IRR removed."""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from .report import IRRReport

_SETTINGS = ("remove_ratio", "remove_more", "identify_mode", "recalibrate", "blocksize", "percdamp",
             "num_calibration_samples", "calibration_max_length", "target_modules")
_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_id(name: Any) -> Optional[str]:
    """`name` as a hub id when it is one (or a local copy in the Hugging Face cache, whose id is in its path);
    None for a local path, which the Hub would not know."""
    from .data import looks_like_local_path

    if not isinstance(name, str) or not name:
        return None
    cached = _HF_CACHE.search(name.replace(os.sep, "/"))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if os.path.exists(name) or looks_like_local_path(name) or not _HUB_ID.fullmatch(name):
        return None
    return name


def display_name(name: Any, default: str = "unknown") -> str:
    """A hub id as is; a local path by its last component (no one else's filesystem in a card)."""
    if not isinstance(name, str) or not name:
        return default
    return hub_id(name) or os.path.basename(os.path.normpath(name)) or name


def count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def method_text(config: dict[str, Any]) -> str:
    """What IRR did, in words that match the settings (not "every" conflict when remove_ratio < 1)."""
    ratio = float(config.get("remove_ratio", 1.0))
    share = f"{100 * ratio:g}%"
    block = f"in each block of {config.get('blocksize', 128)} input columns"
    v = "the safety vector v = W_aligned − W_unaligned"
    if config.get("identify_mode") == "random":
        removed = f"A random {share} of the fine-tuning deltas (an ablation, not IRR) were reset to the base value"
    elif config.get("identify_mode") == "no_sign":
        removed = (f"The {share} of the fine-tuning deltas with the highest Fisher importance {block}, whatever their "
                   "sign (an ablation, not IRR), were reset to the base value")
    elif config.get("remove_more"):
        removed = (f"The {share} of the fine-tuning deltas {block} with the highest score (Fisher importance, counted "
                   f"positive where the delta's sign conflicts with {v}, negative elsewhere; IRR_more) were reset to "
                   "the base value")
    elif ratio >= 1.0:
        removed = f"Every fine-tuning delta whose sign conflicts with {v} was reset to the base value"
    else:
        removed = (f"Of the fine-tuning deltas whose sign conflicts with {v}, the {share} with the highest Fisher "
                   f"importance {block} were reset to the base value; the other conflicting deltas were kept")
    if config.get("recalibrate", True):
        return (removed + "; the kept deltas were recalibrated (OBS update) to preserve each layer's output on the "
                "first training examples.")
    return removed + "; the kept deltas were left unchanged (recalibrate=False)."


def source_text(kind: str, info: dict[str, Any]) -> str:
    """Where a safety input came from, by its source (model id or directory name, dataset, file name), never a path
    of this machine's cache."""
    source = info.get("source")
    cached = " (reused from the cache)" if info.get("cached") else ""
    if source == "unaligned_model":
        text = f"from `unaligned_model` `{display_name(info.get('unaligned_model'))}` (v = aligned − unaligned)"
    elif source == "harmful_dataset":
        data = info.get("harmful_dataset")
        data = "an in-memory dataset" if data in (None, "Dataset", "DatasetDict", "list") else f"`{display_name(data)}`"
        steps = f"a {info['steps']}-step" if info.get("steps") else "a short"
        text = f"from `harmful_dataset` {data}: {steps} harmful fine-tune of the base (v = −its delta)"
    elif source in ("safety_vector", "fisher"):
        text = f"the file `{display_name(info.get('path'))}` (`{source}`)"
    elif source == "safety_dataset":
        data = info.get("safety_dataset")
        data = "an in-memory dataset" if data in (None, "Dataset", "DatasetDict", "list") else f"`{display_name(data)}`"
        answers = ", on the base model's own answers" if info.get("generated_responses") else ""
        text = f"Fisher importance on `safety_dataset` {data}{answers}"
    elif source == "resumed":
        text = "computed at the first start of this (resumed) run"
    elif source == "none":
        text = "not needed (remove_ratio = 1 removes every conflict)"
    else:
        text = str(source)
    return f"- **{kind.replace('_', ' ')}**: {text}{cached}"


def build_model_card(report: IRRReport, *, base_model: Optional[str], sources: dict[str, Any],
                     lora: Optional[dict[str, Any]] = None):
    """A `huggingface_hub.ModelCard` with base model, method and settings, and removal statistics."""
    from huggingface_hub import ModelCard, ModelCardData

    totals = report.totals
    data = ModelCardData(base_model=hub_id(base_model),  # a local path is not a hub id: left out
                         library_name="transformers", tags=["irr", "safety-realignment", "irr-callback"])
    settings = "\n".join(f"| `{k}` | `{report.config.get(k)}` |" for k in _SETTINGS)
    source_lines = "\n".join(source_text(kind, info) for kind, info in sources.items())
    per_layer = "\n".join(f"| {layer} | {s['modules']} | {s['conflicts']:,} | {s['removed']:,} | "
                          f"{100 * s['removed_fraction']:.2f}% |" for layer, s in sorted(report.per_layer().items()))
    lora_text = ""
    if lora:
        lora_text = (f"\n## LoRA\n\nThe fine-tune was a LoRA adapter. The realigned delta is dense, so the merged "
                     f"model is exact; the re-factored adapter (truncated SVD, rank {lora.get('rank')}) has a "
                     f"maximum relative Frobenius error of {lora.get('max_relative_error', 0.0):.4g}.\n")
    content = f"""---
{data.to_yaml()}
---

# Safety-realigned model (IRR)

This model is a fine-tune of `{display_name(base_model, 'an unknown base')}` whose safety-degrading weight changes
were removed after training with **IRR** (identify, remove, recalibrate; Wu et al., "Separate the Wheat from
the Chaff", Findings of ACL 2025, arXiv:2412.11041), applied by
`irr_callback.IRRCallback` at the end of the training run.

{method_text(report.config)}

## Safety inputs

{source_lines or '- (not recorded)'}

## Settings

| setting | value |
|---|---|
{settings}

## What was removed

{totals['removed']:,} of {totals['entries']:,} target weight entries ({100 * totals['removed_fraction']:.2f}%)
in {count(totals['modules'], 'module')}; sign conflicts: {100 * totals['conflict_fraction']:.2f}%;
{count(len(totals['fell_back_to_removal']), 'module')} kept plain removal because recalibration did worse.
Calibration: {report.calibration_sequences} sequences, {report.calibration_tokens} tokens.

| layer | modules | conflicts | removed | removed % |
|---|---|---|---|---|
{per_layer}
{lora_text}
Full per-module statistics: `irr_report.json`.

IRR reduces, but does not guarantee the absence of, harmful behaviour: evaluate before deploying.
"""
    return ModelCard(content)
