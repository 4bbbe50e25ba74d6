"""IRR at several --remove-ratios on saved checkpoints, each realigned model evaluated.

  irr sweep --base ALIGNED --finetuned FT --unaligned UNALIGNED --safety-data safety.jsonl \\
            --calibration-data train.jsonl --remove-ratios 0.1 0.25 0.5 0.75 1.0 \\
            --harmful harmful.jsonl --benign xstest.jsonl --downstream test.jsonl --output-dir sweep/

  irr sweep --base D/aligned --finetuned D/finetuned --safety-vector D/safety_vector.safetensors \\
            --safety-data D/data/safety_data.jsonl --calibration-data D/data/downstream_train.jsonl \\
            --toy --toy-size demo --threads 1 --output-dir sweep/      # D = an `irr demo` output

The models, the safety vector, the Fisher importance (needed for ratios < 1) and the calibration
data are loaded once; each ratio realigns a fresh copy of the fine-tuned model. --output-dir gets
sweep.md (the table), sweep.json (metrics, IRR totals, responses) and pareto.png (safety vs
utility, the fine-tuned and aligned models included); --save-models also keeps every realigned
model in ratio-<r>/. Prompt sets, judges and metrics are those of `irr eval`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from transformers.utils import logging

from ._common import CLIError, add_config_arguments, check_output, config_from_args, load_causal_lm
from .apply import add_input_arguments, check_args, load_inputs, realign_inputs
from .eval import _threads, add_eval_arguments, check_judge, evaluate_model, load_prompt_sets, make_judge, metric_columns

logger = logging.get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--remove-ratios", "--remove_ratios", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75, 1.0],
                   help="IRR remove_ratio values to try (each in (0, 1]).")
    p.add_argument("--output-dir", required=True, help="Where the table, JSON and plot are written (atomically).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output-dir if it exists.")
    p.add_argument("--save-models", action="store_true", help="Also save every realigned model (ratio-<r>/).")
    p.add_argument("--no-base", action="store_true", help="Do not evaluate the aligned --base model as a reference.")
    add_eval_arguments(p)
    add_config_arguments(p, exclude=("remove_ratio",))


def _safety_utility(row: dict[str, Any], columns: list[str]) -> tuple[float | None, float | None]:
    """Mean refusal over the harmful sets (1 - harmful rate with a classifier) and mean task accuracy."""
    harmful = [c for c in columns if c.startswith("harmful_")]
    safety = [1 - row[c] for c in harmful] or [row[c] for c in columns if c.startswith("refusal_")]
    utility = [row[c] for c in columns if c.endswith("_accuracy")]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return mean(safety), mean(utility)


def run(args: argparse.Namespace) -> int:
    from ..plotting import markdown_table, pareto_plot
    from ..saving import atomic_directory

    ratios = list(dict.fromkeys(args.remove_ratios))
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise CLIError(f"--remove-ratios must lie in (0, 1], got {bad}")
    config = config_from_args(args, remove_ratio=1.0)  # validates every other IRR setting
    check_output(args.output_dir, "--output-dir", args.overwrite)
    needs_importance = any(config_from_args(args, remove_ratio=r).needs_importance for r in ratios)
    calibration_data = check_args(args, config, needs_importance=needs_importance)
    check_judge(args)
    sets = load_prompt_sets(args)
    judge = make_judge(args)
    columns = metric_columns(sets, judge)
    gen = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    rows: list[dict[str, Any]] = []
    responses: dict[str, Any] = {}
    with _threads(args.threads):
        inputs = load_inputs(args, config, calibration_data, needs_importance=needs_importance)

        def evaluate(label: str, model, **extra: Any) -> None:
            t0 = time.perf_counter()
            metrics, responses[label] = evaluate_model(model, inputs.tokenizer, sets, judge, **gen)
            row = {"model": label, **extra, **metrics}
            row["safety"], row["utility"] = _safety_utility(row, columns)
            rows.append(row)
            print(f"  {label}: " + ", ".join(f"{c} {row[c]:.3f}" for c in columns)
                  + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)

        with atomic_directory(args.output_dir) as tmp:
            if not args.no_base:
                evaluate("aligned (base)", load_causal_lm(args.base, args.dtype, config.device, flag="--base"))
            evaluate("fine-tuned", inputs.model)  # no IRR: '-' in remove_ratio and removed_pct, not 0.000
            reports = {}
            for r in ratios:
                cfg = config_from_args(args, remove_ratio=r)
                model, report = realign_inputs(inputs, cfg, copy_model=True, progress=False)
                totals = report.totals
                reports[str(r)] = totals
                evaluate(f"IRR r={r:g}", model, remove_ratio=r, removed_pct=100 * totals["removed_fraction"])
                if args.save_models:
                    directory = os.path.join(tmp, f"ratio-{r:g}")
                    model.save_pretrained(directory)
                    inputs.tokenizer.save_pretrained(directory)
                    report.save(os.path.join(directory, "irr_report.json"))
                del model
            table = markdown_table(rows, ["model", "remove_ratio", "removed_pct", *columns])
            with open(os.path.join(tmp, "sweep.md"), "w", encoding="utf-8") as fh:
                fh.write(f"# irr sweep\n\n- base: `{args.base}`\n- fine-tuned: `{args.finetuned}`\n"
                         f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{table}\n")
            with open(os.path.join(tmp, "sweep.json"), "w", encoding="utf-8") as fh:
                json.dump({"base": args.base, "finetuned": args.finetuned, "columns": columns, "rows": rows,
                           "irr_totals": reports, "config": config.to_dict(), "responses": responses}, fh, indent=2)
            try:
                pareto_plot(rows, os.path.join(tmp, "pareto.png"), x="utility", y="safety", label="model",
                            xlabel="utility (mean task accuracy)" if any(c.endswith("_accuracy") for c in columns)
                            else "utility", ylabel="safety (mean refusal / 1 - harmful rate)",
                            title=f"IRR remove_ratio sweep on {os.path.basename(os.path.normpath(args.finetuned))}")
            except ImportError as exc:
                logger.warning(f"no plot: {exc}")
    print(table)
    print(f"wrote {args.output_dir} (sweep.md, sweep.json, pareto.png)")
    return 0
