"""Which calibration tokens should enter H when the fine-tune's loss was masked (issue 23, point 3).

  python benchmarks/bench_calibration_tokens.py                     # demo worlds, seeds 0-2, attack + mild attack
  python benchmarks/bench_calibration_tokens.py --seeds 0 --settings attack

The toy world's downstream fine-tune trains on the response tokens only (labels -100 on the prompt), like
TRL's `completion_only_loss` / `assistant_only_loss`. Each method realigns the same fine-tuned model twice
from the same first 128 training examples: with every real token in H (`calibration_loss_tokens_only=False`,
the default) and with only the trained tokens (`True`). The three numbers: refusal (attacked and
unattacked topics), the new task (downstream accuracy) and what the model could already do (benign
accuracy), from `ToyWorld.evaluate` (held-out prompts; never used to choose anything here).
Writes benchmarks/results/bench_calibration_tokens.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
from toy_table import METRICS, SETTINGS, Inputs, _is_peft, _machine, _realign, _write

from irr_callback import IRRConfig
from irr_callback.outputs.plotting import markdown_table
from irr_callback.toy import build_toy_world, single_thread


METHODS: tuple[tuple[str, dict[str, Any] | None, bool], ...] = (
    ("IRR (paper defaults)", {}, False),
    ("λ=0.2, aligned term, no sign mask", {"safety_weight": 0.2, "identify_mode": "none"}, True),
    ("recommended (auto λ)", None, True),
)


def config(fields: dict[str, Any] | None, only: bool) -> IRRConfig:
    extra = {"num_calibration_samples": 128, "calibration_loss_tokens_only": only}
    return IRRConfig.recommended(**extra) if fields is None else IRRConfig(**fields, **extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="demo", choices=["demo", "tiny"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["attack", "mild attack"], choices=list(SETTINGS))
    p.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/bench_calibration_tokens.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with single_thread():
        for seed in args.seeds:
            world = build_toy_world(seed=seed, size=args.size)
            inputs = Inputs(world)
            hp = world.hparams
            for setting in args.settings:
                share = SETTINGS[setting]
                downstream = (
                    world.downstream_train
                    if share == world.harmful_share
                    else world.make_downstream(harmful_share=share)
                )
                tuned = {
                    "full": world.finetune(
                        world.aligned_model, downstream, steps=hp["downstream_steps"], lr=hp["downstream_lr"]
                    ),
                    "lora": world.finetune(
                        world.aligned_model, downstream, steps=hp["lora_steps"], lr=hp["lora_lr"], lora=True
                    ),
                }
                for ft, source in tuned.items():
                    reference = world.evaluate(
                        copy.deepcopy(source).merge_and_unload() if _is_peft(source) else source
                    )
                    rows.append({"seed": seed, "setting": setting, "ft": ft, "method": "fine-tuned", **reference})
                    for method, fields, safety in METHODS:
                        for only in (False, True):
                            model = copy.deepcopy(source)
                            extra = _realign(inputs, model, downstream, 128, config(fields, only), safety=safety)
                            if _is_peft(model):
                                model = model.merge_and_unload()
                            row = {
                                "seed": seed,
                                "setting": setting,
                                "ft": ft,
                                "method": method,
                                "tokens in H": "trained only" if only else "all",
                                **world.evaluate(model),
                                "safety_weight": extra["safety_weight"],
                            }
                            rows.append(row)
                            print(
                                f"seed {seed} {setting:11s} {ft:4s} {method:36s} {row['tokens in H']:12s} "
                                + " ".join(f"{row[m]:.3f}" for m in METRICS),
                                flush=True,
                            )
    meta = {
        "command": command.strip(),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - started),
        "size": args.size,
        "seeds": args.seeds,
    }
    means = []
    for (method, _, _), only in ((m, o) for m in METHODS for o in (False, True)):
        for ft in ("full", "lora"):
            sel = [
                r
                for r in rows
                if r["method"] == method and r["ft"] == ft and r["tokens in H"] == ("trained only" if only else "all")
            ]
            if sel:
                means.append(
                    {
                        "ft": ft,
                        "method": method,
                        "tokens in H": "trained only" if only else "all",
                        "worlds": len(sel),
                        **{m: round(sum(r[m] for r in sel) / len(sel), 3) for m in METRICS},
                    }
                )
    columns = ("seed", "setting", "ft", "method", "tokens in H", "safety_weight", *METRICS)
    md = (
        "# Calibration tokens in H: all vs only the trained ones (issue 23)\n\n"
        f"- command: `{meta['command']}`\n- machine: {meta['machine']}\n- date: {meta['date']}, {meta['seconds']} s\n"
        f"- {args.size} worlds, seeds {', '.join(map(str, args.seeds))}, settings {', '.join(args.settings)}; every "
        "world shown (no best-of); means below are over the worlds.\n\n"
        f"## Means over worlds\n\n{markdown_table(means, ('ft', 'method', 'tokens in H', 'worlds', *METRICS))}\n\n"
        f"## Every row\n\n{markdown_table(rows, columns)}\n"
    )
    os.makedirs(args.output_dir, exist_ok=True)
    _write(os.path.join(args.output_dir, "bench_calibration_tokens.md"), md)
    _write(
        os.path.join(args.output_dir, "bench_calibration_tokens.json"),
        json.dumps({**meta, "means": means, "rows": rows}, indent=2),
    )
    print(f"wrote {args.output_dir}/bench_calibration_tokens.md, .json in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
