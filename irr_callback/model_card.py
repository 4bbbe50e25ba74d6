"""The README.md written next to a realigned model: what it is, how it was made, what IRR removed."""

from __future__ import annotations

from typing import Any

from .report import IRRReport


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
_SAFETY_SETTINGS = ("safety_weight", "safety_term", "safety_ridge", "safety_tokens", "num_safety_samples")


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
        base_model=base_model if base_model and "/" in base_model else None,
        library_name="transformers",
        tags=["irr", "safety-realignment", "irr-callback"],
    )
    regularised = report.setting != "irr" or bool(report.safety_weight)
    shown = _SETTINGS + (_SAFETY_SETTINGS if regularised else ())
    settings = "\n".join(f"| `{k}` | `{report.config.get(k)}` |" for k in shown)
    if regularised and report.safety_weight is not None:
        settings += f"\n| λ used | `{report.safety_weight:g}` |"
    source_lines = "\n".join(
        f"- **{kind}**: {info.get('source')}"
        f"{' (from cache)' if info.get('cached') else ''}"
        f"{' — ' + str(info.get('path')) if info.get('path') else ''}"
        for kind, info in sources.items()
    )
    per_layer = "\n".join(
        f"| {layer} | {s['modules']} | {s['conflicts']:,} | {s['removed']:,} | {100 * s['removed_fraction']:.2f}% |"
        for layer, s in sorted(report.per_layer().items())
    )
    lora_text = ""
    if lora:
        lora_text = (
            f"\n## LoRA\n\nThe fine-tune was a LoRA adapter. The realigned delta is dense, so the merged "
            f"model is exact; the re-factored adapter (truncated SVD, rank {lora.get('rank')}) has a "
            f"maximum relative Frobenius error of {lora.get('max_relative_error', 0.0):.4g}.\n"
        )
    content = f"""---
{data.to_yaml()}
---

# Safety-realigned model (IRR)

This model is a fine-tune of `{base_model or "unknown base"}` whose safety-degrading weight changes were
removed after training with **IRR** (identify, remove, recalibrate; Wu et al., "Separate the Wheat from
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
in {totals["modules"]} modules; sign conflicts: {100 * totals["conflict_fraction"]:.2f}%;
{len(totals["fell_back_to_removal"])} modules kept plain removal because recalibration did worse.
Calibration: {report.calibration_sequences} sequences, {report.calibration_tokens} tokens.{_safety_line(report)}

| layer | modules | conflicts | removed | removed % |
|---|---|---|---|---|
{per_layer}
{lora_text}
Full per-module statistics: `irr_report.json`.

IRR reduces, but does not guarantee the absence of, harmful behaviour: evaluate before deploying.
"""
    return ModelCard(content)


def _method(report: IRRReport, calibration: str) -> str:
    """What was done, in words: the paper's IRR, or the safety-regularised recalibration and its λ."""
    config = report.config
    ranked = ", ranked by Fisher importance" if config.get("remove_ratio", 1.0) < 1 else ""
    removal = (
        "No delta was removed by sign (`identify_mode='none'`, no safety vector needed)"
        if config.get("identify_mode") == "none"
        else "Every fine-tuning delta whose sign conflicts with the safety vector v = W_aligned − W_unaligned was "
        f"reset to the base value{ranked}"
    )
    if report.setting == "irr" and not report.safety_weight:
        return (
            f"Setting: **irr** (the paper's IRR, `IRRConfig()`). {removal}; the kept deltas were recalibrated "
            f"(OBS update) to preserve each layer's output on {calibration}."
        )
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
    if not report.safety_sequences:
        return ""
    return f"\nSafety stream: {report.safety_sequences} sequences, {report.safety_tokens} tokens."
