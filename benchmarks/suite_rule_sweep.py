"""Replay the auto rule with other tolerances on recorded λ paths: which rule meets the most dev worlds (issue 19).

    python benchmarks/suite_rule_sweep.py benchmarks/results/suite_dev76_lambda_path_rho0_filter.json \\
        benchmarks/results/suite_dev76_build2_lambda_path_rho0_filter.json --name suite_dev_rule_sweep
    python benchmarks/suite_rule_sweep.py PATHS... --fix AUTO_FALLBACK_DOWN=0.05   # hold one constant (pre-registered rule)
    python benchmarks/suite_rule_sweep.py PATHS... --fix AUTO_CANDIDATES=[0.05,0.2,0.5]   # a candidate set
    python benchmarks/suite_rule_sweep.py PATHS... --floor 0.7   # only rules that keep the tails

Why: a tolerance of the rule is a number chosen on dev worlds. One path file (`suite_lambda_path.py`) records, per
world, the held-out measures of every λ of a grid and what each λ gives on the evaluation, so a rule is scored by
replaying the library's own `search_weight` with the tolerances patched in (as `suite_lambda_path.py --simulate`
does for the shipped ones). Several files (builds of the same worlds on different machines, other variants) are
scored together: a rule counts the world-builds it meets over all of them.
The paths record trial candidates (each solved from its share of the rows). Since issue 19's eighth round the
shipped search measures its first candidate on the real run instead (`AUTO_KEEP_FIRST`: three quarters of the rows),
so a replay approximates that candidate's measures; the real runs (`suite.py`) are the reference.

The criterion, fixed before the sweep is read: most world-builds meeting the target; then most with both the
downstream and the old-task ratio >= 0.8; then the higher median old-task ratio. The shipped rule is always a row,
and a rule is only worth a change when it beats the shipped one by more than one world-build per file.
Writes benchmarks/results/<name>.json and .md (the best rules, the shipped one, and per-file counts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common
from suite_lambda_path import simulate


#: the tolerances swept (names of `irr_callback.pipeline.auto_weight` constants) and their values
SWEEP = {
    "AUTO_TOLERANCE": (0.002, 0.005, 0.01, 0.02),
    "AUTO_TASK_TOLERANCE": (0.05, 0.1, 0.15, 0.2),
    "AUTO_TASK_EXACT_TOLERANCE": (0.1, 0.15, 0.2, 0.3, 1.0),
    "AUTO_FALLBACK_DOWN": (None, 0.05, 0.1),
    "AUTO_RETAIN_TOLERANCE": (0.005, 0.01, 0.02, 0.05),
    # candidate sets whose refining midpoints are on the paths' grid (0.05 0.1 0.2 0.3 0.5 1 2 3)
    "AUTO_CANDIDATES": ((0.1, 0.3, 1.0), (0.05, 0.2, 0.5), (0.05, 0.3, 1.0), (0.1, 0.5, 2.0), (0.2, 0.5, 2.0)),
    # the search's order (the smallest candidate alone first): the same λ as the whole grid on every recorded path
    "AUTO_SMALLEST_FIRST": (True, False),
}


@contextmanager
def patched(values: dict[str, Any]) -> Iterator[None]:
    """The rule's constants set to `values` for a while."""
    from irr_callback.pipeline import auto_weight

    saved = {k: getattr(auto_weight, k) for k in values}
    try:
        for k, v in values.items():
            setattr(auto_weight, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(auto_weight, k, v)


def score(payloads: list[dict[str, Any]], values: dict[str, Any]) -> dict[str, Any]:
    """One rule on every file: world-builds meeting the target (per file and in all), both ratios >= 0.8, median
    old-task ratio, worst downstream and old-task ratios, and the λ chosen in each world-build."""
    rows, per_file = [], []
    with patched(values):
        for payload in payloads:
            mine = simulate(payload)["rows"]  # a λ the path did not record: KeyError naming the world
            per_file.append(sum(r["meets_target"] for r in mine))
            rows += mine
    return {
        "met": sum(r["meets_target"] for r in rows),
        "met_full": sum(r["meets_target"] for r in rows if r["finetune"] == "full"),
        "met_lora": sum(r["meets_target"] for r in rows if r["finetune"] == "lora"),
        "per_file": per_file,
        "both_ratios_at_least_0.8": sum(min(r["old_ratio"], r["downstream_ratio"]) >= 0.8 for r in rows),
        "median_old_ratio": statistics.median(r["old_ratio"] for r in rows),
        "min_old_ratio": min(r["old_ratio"] for r in rows),
        "min_downstream_ratio": min(r["downstream_ratio"] for r in rows),
        "choices": [r["safety_weight"] for r in rows],
    }


def _keeps_tails(rule: dict[str, Any], shipped: dict[str, Any], floor: float) -> bool:
    """At least as many world-builds with both ratios >= 0.8 as the shipped rule, and no ratio under `floor`."""
    return (
        rule["both_ratios_at_least_0.8"] >= shipped["both_ratios_at_least_0.8"]
        and min(rule["min_old_ratio"], rule["min_downstream_ratio"]) >= floor
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="λ path files (suite_lambda_path.py), dev worlds only")
    p.add_argument("--name", default=None, help="Write benchmarks/results/<name>.json and .md")
    p.add_argument("--top", type=int, default=10)
    p.add_argument(
        "--fix",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="Hold a swept constant at one value (JSON: 0.05, null), e.g. to score one pre-registered rule",
    )
    p.add_argument(
        "--floor",
        type=float,
        default=None,
        help="Rank only the rules that keep at least as many world-builds with both ratios >= 0.8 as the shipped "
        "rule and no ratio under FLOOR (e.g. 0.7): the count without giving up the tails",
    )
    args = p.parse_args(argv)
    from irr_callback.pipeline import auto_weight

    sweep = dict(SWEEP)
    for item in args.fix:
        name, _, raw = item.partition("=")
        if name not in SWEEP:
            raise SystemExit(f"--fix {item!r}: NAME must be one of {sorted(SWEEP)}")
        value = json.loads(raw)
        sweep[name] = (tuple(value) if isinstance(value, list) else value,)  # a candidate set: a tuple, as shipped

    payloads = [json.loads(Path(path).read_text()) for path in args.paths]
    bad = [path for path, pl in zip(args.paths, payloads) if pl["split"] != "dev"]
    if bad:
        raise SystemExit(f"rules are chosen on dev worlds only: {bad} are not dev paths")
    shipped = {k: getattr(auto_weight, k) for k in SWEEP}
    base = {"rule": shipped, "changes": 0, **score(payloads, shipped)}
    results = []
    for combo in itertools.product(*sweep.values()):
        values = dict(zip(sweep, combo))
        changes = sum(values[k] != shipped[k] for k in SWEEP)
        results.append({"rule": values, "changes": changes, **score(payloads, values)})
    shipped_choices = base.pop("choices")
    base["other_lambda"] = 0
    for r in results:  # world-builds where the rule takes another λ than the shipped one
        r["other_lambda"] = sum(a != b for a, b in zip(r.pop("choices"), shipped_choices))
    if args.floor is not None:
        swept = len(results)
        results = [r for r in results if _keeps_tails(r, base, args.floor)]
        print(f"{len(results)} of {swept} rules keep the tails (both ratios >= 0.8 as often, none under {args.floor})")
    key = lambda r: (r["met"], r["both_ratios_at_least_0.8"], r["median_old_ratio"])  # noqa: E731
    results.sort(key=key, reverse=True)
    lines = [
        "| rule | changes | met (full/LoRA) | per file | both ≥ 0.8 | median old | min old | min downstream "
        "| another λ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [base, *results[: args.top]]:
        rule = ", ".join(f"{k.removeprefix('AUTO_').lower()}={v}" for k, v in r["rule"].items())
        lines.append(
            f"| {rule} | {r['changes']} | {r['met']} ({r['met_full']}/{r['met_lora']}) | {r['per_file']} | "
            f"{r['both_ratios_at_least_0.8']} | {r['median_old_ratio']:.2f} | {r['min_old_ratio']:.2f} | "
            f"{r['min_downstream_ratio']:.2f} | {r['other_lambda']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.name:
        kept = "" if args.floor is None else f" that keep the tails (--floor {args.floor})"
        intro = (
            f"{len(results)} rules{kept} on {len(payloads)} path files ({', '.join(Path(x).name for x in args.paths)}); "
            "the first row is the shipped rule, then the best by (met, both ratios >= 0.8, median old ratio).\n\n"
        )
        payload = {
            "paths": args.paths,
            "sweep": {k: list(v) for k, v in sweep.items()},
            "floor": args.floor,
            "rules": len(results),
        }
        _common.write_results(args.name, {**payload, "shipped": base, "best": results[: args.top]}, intro + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
