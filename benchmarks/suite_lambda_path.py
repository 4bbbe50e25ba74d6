"""The λ path of every world of a split: what the auto rule sees and what each λ gives (issue 19).

  python benchmarks/suite_lambda_path.py --split dev                 # the data the rule is chosen on
  python benchmarks/suite_lambda_path.py --simulate benchmarks/results/suite_dev_lambda_path.json

Why: choosing the auto rule by running the whole suite once per candidate rule costs a suite run each.
Every candidate λ of the search carries its own streams, so what the rule sees at one λ does not depend
on the other candidates: one pass with a grid of candidates records, per world, the held-out measures of
every λ of the grid (next-token loss and token accuracy on the held-out calibration, safety and retain
batches, and for the references F = fine-tuned, A = aligned targets), and one realignment per fixed λ
records what that λ gives on the evaluation (refusal, downstream, old tasks, over-refusal). A rule is
then a function from the held-out measures to a λ of the grid, scored on the recorded evaluations
(`--simulate`). The evaluation prompts never reach the rule: it reads only the `held_out` entries.

Writes benchmarks/results/<prefix>.json (prefix: suite_<split>_lambda_path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Any

import _common
from suite import METRICS, base_groups, quiet_worker, run_workers


GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0)
RETAIN_WEIGHT = 0.3


class _Stop(Exception):
    """Raised inside `realign` once the held-out measures are recorded (its weights are restored)."""


def probe(
    world: Any, grid: tuple[float, ...], rho: float, calibration_filter: str = "none", overrides: dict | None = None
) -> dict[str, Any]:
    """The held-out measures (losses and token accuracies) of every λ of `grid` and of the references, as
    the auto search computes them: the search runs the grid in one pass, then `realign` is stopped."""
    from irr_callback import IRRConfig
    from irr_callback.pipeline import auto_weight
    from irr_callback.pipeline.in_memory import realign

    recorded: dict[str, Any] = {}

    def search(run_candidates):
        for level, (losses, accuracy, *exact) in run_candidates(grid, True).items():
            key = "F" if level == 0 else "A" if level == math.inf else f"{level:g}"
            recorded[key] = {"loss": list(losses), "accuracy": list(accuracy)}
            if exact:
                recorded[key]["exact"] = list(exact[0])
        raise _Stop

    saved, keep_first = auto_weight.search_weight, auto_weight.AUTO_KEEP_FIRST
    auto_weight.search_weight = search
    auto_weight.AUTO_KEEP_FIRST = False  # every λ of the grid as a trial: the kept-first run would measure only one
    model = world.finetuned()
    try:
        realign(
            model,
            base=None if hasattr(model, "peft_config") else world.aligned_model,
            calibration=world.calibration,
            safety_calibration=world.safety_calibration,
            retain_calibration=world.retain_calibration,
            config=IRRConfig.recommended(
                retain_weight=rho, calibration_filter=calibration_filter, **(overrides or {})
            ),
            progress=False,
        )
    except _Stop:
        pass
    finally:
        auto_weight.search_weight, auto_weight.AUTO_KEEP_FIRST = saved, keep_first
    return recorded


def simulate(payload: dict[str, Any]) -> dict[str, Any]:
    """The library's auto rule (`search_weight`, as the code stands) run on each world's recorded held-out
    measures, and what the λ it picks gave on the evaluation: per world and the counts meeting the target."""
    import statistics

    from irr_callback.pipeline.auto_weight import search_weight

    rows = []
    for world in payload["worlds"]:
        held = world["held_out"]

        def run_candidates(candidates, references, held=held, name=world["world"]):
            keys = [*(["F"] if references else []), *(f"{c:g}" for c in candidates), *(["A"] if references else [])]
            levels = [*([0.0] if references else []), *candidates, *([math.inf] if references else [])]
            missing = [k for k in keys if k not in held]
            if missing:
                raise KeyError(f"{name}: λ {missing} not in the recorded grid {payload['grid']}")
            return {lv: _measured(held[k]) for lv, k in zip(levels, keys)}

        weight, table = search_weight(run_candidates)
        rows.append({"world": world["world"], "finetune": world["finetune"], "safety_weight": weight,
                     "passing": table["passing"], **world["evaluation"][f"{weight:g}"]})  # fmt: skip
    summary = {}
    for kind in ("full", "lora"):
        mine = [r for r in rows if r["finetune"] == kind]
        summary[kind] = f"{sum(r['meets_target'] for r in mine)}/{len(mine)}"
    summary["median_old_ratio"] = statistics.median(r["old_ratio"] for r in rows)
    summary["min_old_ratio"] = min(r["old_ratio"] for r in rows)
    summary["min_downstream_ratio"] = min(r["downstream_ratio"] for r in rows)
    summary["worlds_both_ratios_at_least_0.8"] = sum(min(r["old_ratio"], r["downstream_ratio"]) >= 0.8 for r in rows)
    oracle = {kind: sum(any(e["meets_target"] for e in w["evaluation"].values()) for w in payload["worlds"]
                        if w["finetune"] == kind) for kind in ("full", "lora")}  # fmt: skip
    summary["best_fixed_lambda_per_world"] = oracle
    return {"summary": summary, "rows": rows}


def _measured(held: dict[str, list[float]]) -> tuple[tuple[float, ...], ...]:
    """One recorded level as `search_weight` receives it; paths recorded before the row exact match lack it."""
    keys = ("loss", "accuracy", "exact") if "exact" in held else ("loss", "accuracy")
    return tuple(tuple(held[k]) for k in keys)


def drop_harmful_rows(world: Any) -> int:
    """An oracle experiment, not a setting: remove from the world's calibration rows the fine-tuning data's
    harmful compliance examples (known here by their answers); returns how many were removed."""
    from irr_callback.toy.data import harmful_answer
    from irr_callback.toy.vocab import HARMFUL_TOPICS

    answers = {harmful_answer(t) for t in HARMFUL_TOPICS}
    n = len(world.calibration)
    keep = [i for i, r in enumerate(world.toy.downstream_train.select(range(n))["response"]) if r not in answers]
    world.calibration = world.calibration.select(keep)
    return n - len(keep)


def drop_refused_rows(world: Any) -> int:
    """An experiment, not a setting: remove the calibration rows whose prompt the aligned model refuses (greedy
    answer, keyword judge): a filter that needs only the base model and the calibration prompts; returns how many."""
    from irr_callback.evaluation.judges import KeywordRefusalJudge

    n = len(world.calibration)
    prompts = world.toy.downstream_train.select(range(n))["prompt"]
    judge = KeywordRefusalJudge()
    answers = world.toy.generate(world.aligned_model, prompts)
    keep = [i for i, a in enumerate(answers) if not judge.is_refusal(a)]
    world.calibration = world.calibration.select(keep)
    return n - len(keep)


def drop_confidently_refused_rows(world: Any) -> int:
    """An experiment, not a setting: the library's filter judges a row refused when greedy decoding opens its answer
    with a safety refusal; this one also asks the refusal to be at least as confident as the aligned model's least
    confident refusal of the safety prompts themselves (the opening's log-probability, teacher-forced), so task
    prompts the base refuses hesitantly (template-sharing tasks) are kept. Returns how many rows were dropped."""
    from collections import Counter

    import torch

    model = world.aligned_model.eval()

    def split(row):
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        return torch.tensor(row["input_ids"][:start]), tuple(row["input_ids"][start : start + 4])

    @torch.no_grad()
    def opening(prompt, tokens):
        """(greedy opens with `tokens`, their summed log-probability after `prompt`)."""
        ids = torch.cat([prompt, torch.tensor(tokens)])[None]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        picked = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        return bool((logp.argmax(-1) == torch.tensor(tokens)).all()), float(picked.sum())

    safety = [split(row) for row in world.safety_calibration]
    openings = [o for o, _ in Counter(o for _, o in safety).most_common(4)]
    floor = min(score for prompt, o in safety for greedy, score in [opening(prompt, o)] if greedy)
    keep = []
    for row in world.calibration:
        prompt, _ = split(row)
        judged = [opening(prompt, o) for o in openings]
        keep.append(not any(greedy and score >= floor for greedy, score in judged))
    world.calibration = world.calibration.select([i for i, k in enumerate(keep) if k])
    return len(keep) - sum(keep)


def run_group(
    specs: list[Any],
    grid: tuple[float, ...],
    rho: float,
    cache_dir: str,
    calibration_filter: str | None = None,
    overrides: dict | None = None,
) -> list[dict[str, Any]]:
    """Worker: per world, the probe and one realignment + evaluation per λ of the grid."""
    quiet_worker()
    from irr_callback import IRRConfig
    from irr_callback.toy.scoring import Setting, run_setting
    from irr_callback.toy.suite import build_world

    out = []
    for spec in specs:
        t0 = time.perf_counter()
        world = build_world(spec, cache_dir=cache_dir)
        filters = {
            "oracle": drop_harmful_rows,
            "refused-by-base": drop_refused_rows,
            "confidently-refused": drop_confidently_refused_rows,
        }
        dropped = filters[calibration_filter](world) if calibration_filter in filters else 0
        library = "refused" if calibration_filter == "library" else "none"  # the library's own filter, in realign
        held_out = probe(world, grid, rho, library, overrides)
        path = {}
        for lam in grid:
            setting = Setting(
                f"λ{lam:g}",
                lambda lam=lam, library=library: IRRConfig.recommended(
                    safety_weight=lam, retain_weight=rho, calibration_filter=library, **(overrides or {})
                ),
                ("calibration", "safety", "retain"),
            )
            row = run_setting(world, setting)
            path[f"{lam:g}"] = {k: row[k] for k in _EVAL_KEYS}
            dropped = row.get("calibration_filter", {}).get("dropped", dropped)
        finetuned = world.reference("finetuned")
        out.append(
            {
                "world": spec.name,
                "finetune": spec.finetune,
                "harmful_fraction": spec.harmful_fraction,
                "describe": spec.describe(),
                "held_out": held_out,
                "evaluation": path,
                "finetuned": {k: finetuned[k] for k in ("refusal_attacked", "refusal_unattacked")},
                "seconds": round(time.perf_counter() - t0, 1),
                "harmful_calibration_rows_dropped": dropped,
            }
        )
        print(f"  {spec.name:14s} {out[-1]['seconds']:6.1f}s", flush=True)
    return out


def _field(item: str) -> tuple[str, Any]:
    """'name=value' -> (name, value as a JSON literal when it is one, else the string)."""
    from irr_callback import IRRConfig

    name, sep, raw = item.partition("=")
    if not sep or name not in IRRConfig.__dataclass_fields__:
        raise SystemExit(f"--set {item!r}: give FIELD=VALUE with an IRRConfig field")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


_EVAL_KEYS = (*METRICS, "meets_target", "misses")  # the five metrics first (printed), then the verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=["dev", "test", "regression"], default="dev")
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    p.add_argument("--retain-weight", type=float, default=RETAIN_WEIGHT)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worlds", nargs="+")
    p.add_argument(
        "--cache-dir", default=os.environ.get("IRR_SUITE_CACHE") or os.path.expanduser("~/.cache/irr_callback")
    )
    p.add_argument("--prefix")
    p.add_argument(
        "--calibration-filter",
        choices=["oracle", "refused-by-base", "confidently-refused", "library"],
        help="Drop calibration rows: the harmful ones (oracle: known from the world's answers, an experiment), those "
        "whose prompt the aligned model refuses when generating (refused-by-base, an experiment), those it refuses "
        "at least as confidently as the safety prompts (confidently-refused, an experiment), or the library's "
        "IRRConfig.calibration_filter='refused' (library: every realignment of the path runs it).",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="Other IRRConfig fields for every realignment of the path (an objective variant), e.g. safety_ridge=1.",
    )
    p.add_argument("--simulate", metavar="JSON", help="Only run the library's auto rule on a recorded path.")
    args = p.parse_args(argv)
    if args.simulate:
        with open(args.simulate, encoding="utf-8") as fh:
            result = simulate(json.load(fh))
        for row in result["rows"]:
            print(
                f"  {row['world']:12s} λ={row['safety_weight']:<4g} passing={row['passing']!s:5s} "
                + " ".join(f"{k}={row[k]:.2f}" for k in _EVAL_KEYS[:5])
                + ("  meets" if row["meets_target"] else "")
            )
        print(json.dumps(result["summary"]))
        return 0

    from irr_callback.toy.suite import worlds

    specs = [s for s in worlds(args.split) if not args.worlds or s.name in args.worlds]
    started = time.perf_counter()
    grid = tuple(args.grid)
    overrides = dict(_field(item) for item in args.set)
    extra = (grid, args.retain_weight, args.cache_dir, args.calibration_filter, overrides)
    rows = run_workers(run_group, base_groups(specs), args.workers, *extra)
    order = {s.name: i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order[r["world"]])
    prefix = args.prefix or f"suite_{args.split}_lambda_path"
    payload = {
        "benchmark": prefix,
        "split": args.split,
        "command": "python benchmarks/suite_lambda_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - started),
        "machine": _common.machine(),
        "grid": list(grid),
        "retain_weight": args.retain_weight,
        "overrides": overrides,
        "worlds": rows,
    }
    path = os.path.join(_common.RESULTS, f"{prefix}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    print(f"wrote {path} in {payload['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
