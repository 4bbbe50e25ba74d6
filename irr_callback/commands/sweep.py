"""IRR at several --remove-ratios and/or --safety-weights on saved checkpoints, each realigned model evaluated.

  irr sweep --base ALIGNED --finetuned FT --unaligned UNALIGNED --safety-data safety.jsonl \\
            --calibration-data train.jsonl --remove-ratios 0.1 0.25 0.5 0.75 1.0 \\
            --harmful harmful.jsonl --benign xstest.jsonl --downstream test.jsonl --output-dir sweep/

  irr sweep --base D/aligned --finetuned D/finetuned --safety-vector D/safety_vector.safetensors \\
            --safety-data D/data/safety_data.jsonl --calibration-data D/data/downstream_train.jsonl \\
            --toy --toy-size demo --threads 1 --output-dir sweep/      # D = an `irr demo` output

  irr sweep --base ALIGNED --finetuned FT --safety-data refusals.jsonl --calibration-data train.jsonl \\
            --safety-weights 0 0.1 0.3 1 auto --toy --output-dir sweep/        # λ as the swept axis

The safety weight λ (safety-regularised recalibration, beyond the paper) is a second axis:
--safety-weights takes numbers >= 0 and 'auto' (each row of 'auto' reports the λ it chose). With only
--safety-data (no --unaligned / --safety-vector) the preset is the recommended one, as in `irr apply`:
identify_mode none, so only λ is swept (its default axis is the preset's: auto). The grid is every
ratio with every weight.

The models, the safety vector, the Fisher importance (needed for ratios < 1), the calibration data
and the safety stream are loaded once; each point realigns a fresh copy of the fine-tuned model.
--output-dir gets sweep.md (the table), sweep.json (metrics, IRR totals, responses) and pareto.png
(safety vs utility, the fine-tuned and aligned models included); --save-models also keeps every
realigned model in ratio-<r>/ (λ axis: lambda-<λ>/, both axes: ratio-<r>-lambda-<λ>/). Prompt
sets, judges and metrics are those of `irr eval`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from transformers.utils import logging

from ..config import IRRConfig, IRRConfigError
from ._common import CLIError, add_config_arguments, check_output, load_causal_lm
from .apply import add_input_arguments, check_args, load_inputs, make_config, realign_inputs
from .eval import (
    _threads,
    add_eval_arguments,
    check_judge,
    evaluate_model,
    load_prompt_sets,
    make_judge,
    metric_columns,
)


logger = logging.get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument(
        "--remove-ratios",
        "--remove_ratios",
        nargs="+",
        type=float,
        default=None,
        help="IRR remove_ratio values to try (each in (0, 1]). Default: 0.1 0.25 0.5 0.75 1.0; only 1.0 when "
        "--safety-weights is given or identify_mode is none.",
    )
    p.add_argument(
        "--safety-weights",
        "--safety_weights",
        nargs="+",
        default=None,
        help="Safety weights λ to try: numbers >= 0 and/or 'auto' (0 is the paper's IRR). Default: the preset's "
        "(paper: 0, recommended: auto). Any λ != 0 reads --safety-data (with no safety input at all: the "
        "default harmful prompts answered by --base, as `irr apply`).",
    )
    p.add_argument("--output-dir", required=True, help="Where the table, JSON and plot are written (atomically).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output-dir if it exists.")
    p.add_argument("--save-models", action="store_true", help="Also save every realigned model (ratio-<r>/).")
    p.add_argument("--no-base", action="store_true", help="Do not evaluate the aligned --base model as a reference.")
    add_eval_arguments(p)
    add_config_arguments(p, exclude=("remove_ratio", "safety_weight"))


DEFAULT_RATIOS = (0.1, 0.25, 0.5, 0.75, 1.0)


def grid(args: argparse.Namespace) -> list[tuple[float, Any, IRRConfig]]:
    """(remove_ratio, safety weight as given, config) for every point of the sweep, checked."""
    base = make_config(args, remove_ratio=1.0)  # validates every other IRR setting
    weights = [base.safety_weight]
    if args.safety_weights:
        weights = []
        for w in args.safety_weights:
            try:
                weights.append(IRRConfig(safety_weight=w).safety_weight)
            except IRRConfigError as exc:
                raise CLIError(f"--safety-weights: {exc}") from None
    weights = list(dict.fromkeys(weights))
    no_ratio = args.safety_weights is not None or base.identify_mode == "none"
    ratios = list(dict.fromkeys(args.remove_ratios or ([1.0] if no_ratio else DEFAULT_RATIOS)))
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise CLIError(f"--remove-ratios must lie in (0, 1], got {bad}")
    if base.identify_mode == "none" and len(ratios) > 1:
        raise CLIError("--remove-ratios: identify_mode 'none' removes nothing by sign, so the ratio has no effect")
    return [(r, w, make_config(args, remove_ratio=r, safety_weight=w)) for r in ratios for w in weights]


def _point_names(r: float, w: Any, ratio_axis: bool, weight_axis: bool) -> tuple[str, str]:
    """(row label, --save-models directory) of one point; a plain ratio sweep keeps 'IRR r=<r>' / ratio-<r>."""
    lam = "auto" if w == "auto" else f"{w:g}"
    label = " ".join(([f"r={r:g}"] if ratio_axis or not weight_axis else []) + ([f"λ={lam}"] if weight_axis else []))
    directory = "-".join(
        ([f"ratio-{r:g}"] if ratio_axis or not weight_axis else []) + ([f"lambda-{lam}"] if weight_axis else [])
    )
    return f"IRR {label}", directory


def _safety_utility(row: dict[str, Any], columns: list[str]) -> tuple[float | None, float | None]:
    """Mean refusal over the harmful sets (1 - harmful rate with a classifier) and mean task accuracy."""
    harmful = [c for c in columns if c.startswith("harmful_")]
    safety = [1 - row[c] for c in harmful] or [row[c] for c in columns if c.startswith("refusal_")]
    utility = [row[c] for c in columns if c.endswith("_accuracy")]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return mean(safety), mean(utility)


def run(args: argparse.Namespace) -> int:
    from ..outputs.plotting import markdown_table, pareto_plot
    from ..saving import atomic_directory, write_output

    points = grid(args)
    configs = [c for _, _, c in points]
    config = configs[0]
    ratio_axis = len({r for r, _, _ in points}) > 1
    weight_axis = args.safety_weights is not None or any(w != 0 for _, w, _ in points)
    check_output(args.output_dir, "--output-dir", args.overwrite)
    calibration_data = check_args(args, config, variants=configs[1:])
    check_judge(args)
    sets = load_prompt_sets(args)
    judge = make_judge(args)
    columns = metric_columns(sets, judge)
    gen = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    rows: list[dict[str, Any]] = []
    responses: dict[str, Any] = {}
    with _threads(args.threads):
        inputs = load_inputs(args, config, calibration_data, variants=configs[1:])

        def evaluate(label: str, model, **extra: Any) -> None:
            t0 = time.perf_counter()
            metrics, responses[label] = evaluate_model(model, inputs.tokenizer, sets, judge, **gen)
            row = {"model": label, **extra, **metrics}
            row["safety"], row["utility"] = _safety_utility(row, columns)
            rows.append(row)
            print(
                f"  {label}: "
                + ", ".join(f"{c} {row[c]:.3f}" for c in columns)
                + f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )

        with atomic_directory(args.output_dir) as tmp:
            if not args.no_base:
                evaluate("aligned (base)", load_causal_lm(args.base, args.dtype, config.device, flag="--base"))
            evaluate("fine-tuned", inputs.model)  # no IRR: '-' in remove_ratio and removed_pct, not 0.000
            reports = {}
            for r, w, cfg in points:
                label, directory = _point_names(r, w, ratio_axis, weight_axis)
                model, report = realign_inputs(inputs, cfg, copy_model=True, progress=False)
                totals = report.totals
                reports[label[len("IRR ") :] if weight_axis else str(r)] = {
                    **totals,
                    "setting": report.setting,
                    "safety_weight": report.safety_weight,
                    **({"auto": report.auto} if report.auto else {}),
                }
                extra = {"remove_ratio": r, "removed_pct": 100 * totals["removed_fraction"]}
                if weight_axis:
                    extra.update(
                        {"safety_weight": w, "lambda": report.safety_weight or 0.0, "setting": report.setting}
                    )
                evaluate(label, model, **extra)
                if args.save_models:
                    path = os.path.join(tmp, directory)
                    write_output(path, model=model, processing_class=inputs.tokenizer, report=report)
                del model
            shown = ["model", "remove_ratio", "removed_pct"] + (["safety_weight", "lambda"] if weight_axis else [])
            table = markdown_table(rows, [*shown, *columns])
            with open(os.path.join(tmp, "sweep.md"), "w", encoding="utf-8") as fh:
                fh.write(
                    f"# irr sweep\n\n- base: `{args.base}`\n- fine-tuned: `{args.finetuned}`\n"
                    f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{table}\n"
                )
            with open(os.path.join(tmp, "sweep.json"), "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "base": args.base,
                        "finetuned": args.finetuned,
                        "columns": columns,
                        "rows": rows,
                        "irr_totals": reports,
                        "config": config.to_dict(),
                        "responses": responses,
                    },
                    fh,
                    indent=2,
                )
            try:
                pareto_plot(
                    rows,
                    os.path.join(tmp, "pareto.png"),
                    x="utility",
                    y="safety",
                    label="model",
                    xlabel="utility (mean task accuracy)"
                    if any(c.endswith("_accuracy") for c in columns)
                    else "utility",
                    ylabel="safety (mean refusal / 1 - harmful rate)",
                    title=f"IRR {'safety weight' if weight_axis and not ratio_axis else 'remove_ratio'} sweep on "
                    f"{os.path.basename(os.path.normpath(args.finetuned))}",
                )
            except ImportError as exc:
                logger.warning(f"no plot: {exc}")
    print(table)
    print(f"wrote {args.output_dir} (sweep.md, sweep.json, pareto.png)")
    return 0
