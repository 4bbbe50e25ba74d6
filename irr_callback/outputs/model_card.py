"""The README.md written next to a realigned model: what it is, how it was made, what IRR removed."""

from __future__ import annotations

import os
import re
from typing import Any

from ..report import IRRReport


_SETTINGS = (
    "remove_ratio",
    "remove_more",
    "identify_mode",
    "recalibrate",
    "blocksize",
    "percdamp",
    "num_calibration_samples",
    "calibration_max_length",
    "target_modules",
)
# shown when the run used the safety stream (IRRConfig.recommended() or another safety_weight != 0)
_SAFETY_SETTINGS = (
    "safety_weight",
    "safety_term",
    "safety_ridge",
    "safety_tokens",
    "num_safety_samples",
    "calibration_filter",
)
_HF_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_IN_MEMORY = (None, "Dataset", "DatasetDict", "list")


def hub_id(name: Any) -> str | None:
    """`name` as a hub id when it is one (or a local copy in the Hugging Face cache, whose id is in its path);
    None for a local path, which the Hub would not know."""
    from ..paths import looks_like_local_path

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


def removal_text(config: dict[str, Any]) -> str:
    """What IRR removed, in words that match the settings (not "every" conflict when remove_ratio < 1)."""
    ratio = float(config.get("remove_ratio", 1.0))
    share = f"{100 * ratio:g}%"
    block = f"in each block of {config.get('blocksize', 128)} input columns"
    v = "the safety vector v = W_aligned − W_unaligned"
    mode = config.get("identify_mode")
    if mode == "none":
        return "No delta was removed by sign (`identify_mode='none'`, no safety vector needed)"
    if mode == "random":
        return f"A random {share} of the fine-tuning deltas (an ablation, not IRR) were reset to the base value"
    if mode == "no_sign":
        return (
            f"The {share} of the fine-tuning deltas with the highest Fisher importance {block}, whatever their "
            "sign (an ablation, not IRR), were reset to the base value"
        )
    if config.get("remove_more"):
        return (
            f"The {share} of the fine-tuning deltas {block} with the highest score (Fisher importance, counted "
            f"positive where the delta's sign conflicts with {v}, negative elsewhere; IRR_more) were reset to "
            "the base value"
        )
    if ratio >= 1.0:
        return f"Every fine-tuning delta whose sign conflicts with {v} was reset to the base value"
    return (
        f"Of the fine-tuning deltas whose sign conflicts with {v}, the {share} with the highest Fisher "
        f"importance {block} were reset to the base value; the other conflicting deltas were kept"
    )


def method_text(config: dict[str, Any], calibration: str = "the first training examples") -> str:
    """What the paper's IRR did with `config` (removal and recalibration), in words that match the settings."""
    removed = removal_text(config)
    if config.get("recalibrate", True):
        return f"{removed}; the kept deltas were recalibrated (OBS update) to preserve each layer's output on {calibration}."
    return f"{removed}; the kept deltas were left unchanged (recalibrate=False)."


def _data_name(data: Any) -> str:
    return "an in-memory dataset" if data in _IN_MEMORY else f"`{display_name(data)}`"


def source_text(kind: str, info: dict[str, Any]) -> str:
    """Where a safety input came from, by its source (model id or directory name, dataset, file name), never a path
    of this machine's cache."""
    source = info.get("source")
    cached = " (reused from the cache)" if info.get("cached") else ""
    answers = ", on the base model's own answers" if info.get("generated_responses") else ""
    if source == "unaligned_model":
        text = f"from `unaligned_model` `{display_name(info.get('unaligned_model'))}` (v = aligned − unaligned)"
    elif source == "harmful_dataset":
        steps = f"a {info['steps']}-step" if info.get("steps") else "a short"
        text = (
            f"from `harmful_dataset` {_data_name(info.get('harmful_dataset'))}: {steps} harmful fine-tune of the "
            "base (v = −its delta)"
        )
    elif source in ("safety_vector", "fisher"):
        text = f"the file `{display_name(info.get('path'))}` (`{source}`)"
    elif source == "safety_dataset":
        data = _data_name(info.get("safety_dataset", info.get("set")))
        what = "Fisher importance on " if kind == "importance" else ""
        text = f"{what}`safety_dataset` {data}{answers}"
    elif source == "default":
        origin = f", {info['origin']}" if info.get("origin") else ""
        kind_of = "general" if kind.startswith("retain") else "safety"
        text = f"the default {kind_of} prompts `{info.get('set')}` ({info.get('prompts')} prompts{origin}){answers}"
    elif source == "resumed":
        text = "computed at the first start of this (resumed) run"
    elif source == "safety_data":
        text = f"{info.get('examples')} rows of the safety data (`safety_data`), tokenized like the training data"
    elif source == "none" and kind == "safety_vector":
        text = "not needed (`identify_mode='none'`: nothing is removed by sign)"
    elif source == "none":
        text = "not needed (nothing is ranked by importance)" if kind == "importance" else "not needed"
    else:
        text = str(source)
    return f"- **{kind}**: {text}{cached}"


def build_model_card(
    report: IRRReport,
    *,
    base_model: str | None,
    sources: dict[str, Any],
    lora: dict[str, Any] | None = None,
    applied_by: str = "`irr_callback.IRRCallback` at the end of the training run",
    calibration: str = "the first training examples",
):
    """A `huggingface_hub.ModelCard` with base model, method and settings, and removal statistics: the
    one model card of a realigned model (the callback's and `irr apply`'s, which says so in `applied_by`)."""
    from huggingface_hub import ModelCard, ModelCardData

    totals = report.totals
    data = ModelCardData(
        base_model=hub_id(base_model),  # a local path is not a hub id: left out
        library_name="transformers",
        tags=["irr", "safety-realignment", "irr-callback"],
    )
    regularised = report.setting != "irr" or bool(report.safety_weight)
    shown = _SETTINGS + (_SAFETY_SETTINGS if regularised else ())
    settings = "\n".join(f"| `{k}` | `{report.config.get(k)}` |" for k in shown)
    if regularised and report.safety_weight is not None:
        settings += f"\n| λ used | `{report.safety_weight:g}` |"
    source_lines = "\n".join(source_text(kind, info) for kind, info in sources.items())
    per_layer = "\n".join(
        f"| {layer} | {s['modules']} | {s['conflicts']:,} | {s['removed']:,} | {100 * s['removed_fraction']:.2f}% |"
        for layer, s in sorted(report.per_layer().items())
    )
    lora_text = f"\n## LoRA\n\n{lora_summary(lora)}\n" if lora else ""
    content = f"""---
{data.to_yaml()}
---

# Safety-realigned model (IRR)

This model is a fine-tune of `{display_name(base_model, "an unknown base")}` whose safety-degrading weight changes
were removed after training with **IRR** (identify, remove, recalibrate; Wu et al., "Separate the Wheat from
the Chaff", Findings of ACL 2025, arXiv:2412.11041), applied by
{applied_by}.

{_method(report, calibration)}

## Safety inputs

{source_lines or "- (not recorded)"}

## Settings

| setting | value |
|---|---|
{settings}

## What was removed

{totals["removed"]:,} of {totals["entries"]:,} target weight entries ({100 * totals["removed_fraction"]:.2f}%)
in {count(totals["modules"], "module")}; sign conflicts: {100 * totals["conflict_fraction"]:.2f}%;
{count(len(totals["fell_back_to_removal"]), "module")} kept plain removal because recalibration did worse.
Calibration: {report.calibration_sequences} sequences, {report.calibration_tokens} tokens.{_safety_line(report)}

| layer | modules | conflicts | removed | removed % |
|---|---|---|---|---|
{per_layer}
{lora_text}
Full per-module statistics: `irr_report.json`.

IRR reduces, but does not guarantee the absence of, harmful behaviour: evaluate before deploying.
"""
    return ModelCard(content)


def realigned_note(
    report: IRRReport,
    *,
    sources: dict[str, Any],
    copy_at: str | None = None,
    calibration: str = "the first training examples",
) -> str:
    """The section a full fine-tune's own card (the Trainer's or TRL's, in `output_dir`) gets: these weights
    are the realigned model, how they were made, where the statistics are. `copy_at`: where IRR also wrote
    its own copy of the output (a name relative to the card's directory), None when it did not."""
    totals = report.totals
    source_lines = "\n".join(source_text(kind, info) for kind, info in sources.items())
    copy = f"\n\nIRR's own copy of the realigned output (model card, report): `{copy_at}`." if copy_at else ""
    return (
        "## Safety realignment (irr-callback)\n\n"
        "The weights in this directory were safety-realigned after fine-tuning with **IRR** (identify, remove, "
        "recalibrate; Wu et al., arXiv:2412.11041), applied by `irr_callback.IRRCallback` at the end of the "
        f"training run: they are not the weights training ended with. {_method(report, calibration)}\n\n"
        f"Safety inputs:\n\n{source_lines or '- (not recorded)'}\n\n"
        f"{totals['removed']:,} of {totals['entries']:,} target weight entries reset to the base value "
        f"({100 * totals['removed_fraction']:.2f}%) in {count(totals['modules'], 'module')}; calibration: "
        f"{report.calibration_sequences} sequences, {report.calibration_tokens} tokens.{_safety_line(report)} "
        f"Per-module statistics and the settings: `irr_report.json`.{copy}\n\n"
        "IRR reduces, but does not guarantee the absence of, harmful behaviour: evaluate before deploying.\n"
    )


def lora_summary(lora: dict[str, Any]) -> str:
    """What the output of a LoRA run is (`report.extra["lora_adapter"]`, `peft_utils.AdapterPlan`): the rule,
    then each module's rank and objective gap."""
    how = (
        "the exact optimum of the recalibration objective under that rank constraint (no removal mask)"
        if lora.get("exact", True)
        else "the truncation of the masked solution (a removal mask was applied; the gap is measured)"
    )
    text = (
        f"The fine-tune was a LoRA adapter. The realigned adapter has {lora.get('ranks')} and is {how}. Objective "
        "gap: objective(BA) − objective(Δ′), with Δ′ the realigned delta without a rank limit (the exact merged "
        f"model), relative to ‖Δ′‖²_H; largest {lora.get('max_relative_gap', 0.0):.3g}.\n\n"
        "| module | rank | trained rank | objective gap | relative gap |\n|---|---|---|---|---|\n"
    )
    rows = [
        f"| `{name}` | {m.get('rank')} | {m.get('trained_rank')} | {m.get('objective_gap', 0.0):.4g} | "
        f"{m.get('relative_gap', 0.0):.4g} |"
        for name, m in (lora.get("modules") or {}).items()
    ]
    return text + "\n".join(rows)


def adapter_note(lora: dict[str, Any], merged_at: str | None) -> str:
    """The section PEFT's / the Trainer's card of the live adapter gets (`peft_utils.mark_realigned`)."""
    where = f"`{merged_at}`" if merged_at else "not saved by the run (`irr_output_dir` / `lora_output`)"
    return (
        "## Safety realignment (irr-callback)\n\n"
        "This adapter was safety-realigned with IRR after fine-tuning: it is not the trained adapter, it is the "
        "realigned model at the adapter's rank. "
        + lora_summary(lora)
        + f"\n\nThe exact merged realigned model: {where}.\n"
    )


def _method(report: IRRReport, calibration: str) -> str:
    """What was done, in words: the paper's IRR, or the safety-regularised recalibration and its λ."""
    config = report.config
    if report.setting == "irr" and not report.safety_weight:
        return f"Setting: **irr** (the paper's IRR, `IRRConfig()`). {method_text(config, calibration)}"
    removal = removal_text(config)
    preset = " (`IRRConfig.recommended()`, the setting the irr-callback README recommends)" * (
        report.setting == "recommended"
    )
    if report.safety_weight is None:
        weight = "λ (not chosen: the run failed)"
    elif report.auto:
        weight = (
            f"λ = {report.safety_weight:g}, chosen by `safety_weight='auto'` from held-out calibration and safety data"
        )
    else:
        weight = f"λ = {report.safety_weight:g}"
    target = "the aligned model's outputs on its own activations" if config.get("safety_term") == "aligned" else "zero"
    return (
        f"Setting: **{report.setting}**{preset}, safety-regularised recalibration (beyond the paper). {removal}; "
        f"the deltas were recalibrated to preserve each layer's output on {calibration} while holding its "
        f"output on harmful prompts with safe responses (the safety stream) at {target}, with safety weight "
        f"{weight}."
    )


def _safety_line(report: IRRReport) -> str:
    """The safety and retain streams' sizes ('' without either)."""
    out = ""
    if report.safety_sequences:
        out += f"\nSafety stream: {report.safety_sequences} sequences, {report.safety_tokens} tokens."
    if report.retain_sequences:
        out += (
            f"\nRetain stream: {report.retain_sequences} sequences, {report.retain_tokens} tokens of general prompts "
            f"with answers; each layer's outputs on them held at the fine-tuned model's with weight ρ = "
            f"{float(report.config.get('retain_weight') or 0):g}."
        )
    if report.calibration_filter:
        f = report.calibration_filter
        out += (
            f"\nCalibration filter: {f['dropped']} of {f['rows']} calibration rows dropped, their prompt refused by the "
            f"aligned model ({f['judged']} rows judged)."
        )
    return out
