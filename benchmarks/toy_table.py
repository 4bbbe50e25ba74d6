"""IRR and the baselines on the toy safety world: the table and Pareto plot of the README.

  python benchmarks/toy_table.py                      # demo size, seed 0: ~5 min on 2 CPU cores
  python benchmarks/toy_table.py --size tiny --seeds 0 1

Writes benchmarks/results/toy_table.{md,json} and toy_pareto.png (safety vs downstream accuracy for
the main attack). Every method starts from the same fine-tuned models and uses the same safety
inputs (v = W_aligned - W_unaligned of the toy world, Fisher of the aligned model on the toy's
safety data, the first downstream training examples for calibration) and the same evaluation
(`ToyWorld.evaluate`: greedy generation on held-out prompts, keyword refusal judge, exact match).

Settings: "attack" is the toy's downstream set (10% harmful answers on 4 of 8 harmful topics);
"mild attack" has 2% harmful answers; "benign" none at all (IRR should then cost little).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path: runs without an install)
import torch

from irr_callback import IRRConfig, realign
from irr_callback.baselines import apply_resta, apply_safe_lora
from irr_callback.data import batches, tokenize_pairs
from irr_callback.plotting import markdown_table, pareto_plot
from irr_callback.safety import fisher, safety_vector
from irr_callback.targets import find_targets
from irr_callback.toy import build_toy_world, single_thread


COLUMNS = (
    "setting",
    "method",
    "refusal_attacked",
    "refusal_unattacked",
    "over_refusal_benign",
    "downstream_accuracy",
    "benign_accuracy",
    "removed_pct",
)
RATIOS = (0.1, 0.25, 0.5, 0.75)
SETTINGS = {"attack": 0.1, "mild attack": 0.02, "benign": 0.0}


class Inputs:
    """The safety inputs every method shares, computed once per world."""

    def __init__(self, world) -> None:
        self.world = world
        aligned = world.aligned_model
        self.names = [t.name for t in find_targets(aligned)[2]]
        self.v = safety_vector(aligned, world.unaligned_model, names=self.names)  # values: RESTA / Safe LoRA need them
        self.signs = {n: torch.sign(t).to(torch.int8) for n, t in self.v.items()}
        tok = world.tokenizer
        pairs = tokenize_pairs(tok, world.safety_data["prompt"], world.safety_data["response"], max_length=64)
        self.fisher = fisher(aligned, batches(pairs, 8, tok.pad_token_id), names=self.names, progress=False)
        self.base = {n: p.detach().clone() for n, p in aligned.named_parameters()}

    def calibration(self, downstream, n: int) -> Any:
        return self.world.tokenize_sft(downstream.select(range(min(n, len(downstream)))))


def irr(inputs: Inputs, downstream, calib_n: int = 128, **config: Any) -> Callable:
    def apply(model) -> float:
        report = realign(
            model,
            base=None if _is_peft(model) else inputs.base,
            safety_vector=inputs.signs,
            importance=inputs.fisher,
            calibration=inputs.calibration(downstream, calib_n),
            config=IRRConfig(num_calibration_samples=calib_n, **config),
            progress=False,
        )
        return 100 * report.totals["removed_fraction"]

    return apply


def resta(inputs: Inputs, dare: float | None) -> Callable:
    def apply(model) -> float | None:
        apply_resta(
            model,
            base=inputs.base,
            safety_vector=inputs.v,
            scale=1.0,
            dare_drop_rate=dare,
            seed=0,
            target_names=inputs.names,
        )
        return None

    return apply


def safe_lora(inputs: Inputs) -> Callable:
    def apply(model) -> float | None:
        report = apply_safe_lora(model, safety_vector=inputs.v, threshold=0.5)
        print(f"    Safe LoRA projected {report.num_projected} of {report.num_targets} LoRA layers", flush=True)
        return None

    return apply


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def run_setting(world, inputs: Inputs, setting: str, share: float, full_methods: bool) -> list[dict[str, Any]]:
    hp = world.hparams
    downstream = world.downstream_train if share == world.harmful_share else world.make_downstream(harmful_share=share)
    full = world.finetune(world.aligned_model, downstream, steps=hp["downstream_steps"], lr=hp["downstream_lr"])
    lora = world.finetune(world.aligned_model, downstream, steps=hp["lora_steps"], lr=hp["lora_lr"], lora=True)
    rows: list[dict[str, Any]] = []

    def add(method: str, model, removed: float | None = None) -> None:
        t0 = time.perf_counter()
        row = {"setting": setting, "method": method, **world.evaluate(model), "removed_pct": removed}
        rows.append(row)
        print(
            f"  {setting:12s} {method:40s} "
            + " ".join(f"{row[c]:.3f}" for c in COLUMNS[2:7])
            + (f"  removed {removed:.1f}%" if removed is not None else "")
            + f"  ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )

    def variant(method: str, source, fn: Callable) -> float | None:
        model = copy.deepcopy(source)
        removed = fn(model)
        add(method, model, removed)
        return removed

    if setting == "attack":
        add("aligned", world.aligned_model)
    add("fine-tuned (full)", full)
    irr_removed = variant("IRR (defaults: remove_ratio=1)", full, irr(inputs, downstream))
    ratios = RATIOS if full_methods else (0.5,)
    for r in ratios:
        variant(f"IRR remove_ratio={r}", full, irr(inputs, downstream, remove_ratio=r))
    if full_methods:
        variant("IRR, 512 calibration samples", full, irr(inputs, downstream, calib_n=512))
        variant("plain removal (IRR, recalibrate=False)", full, irr(inputs, downstream, recalibrate=False))
        same = round(irr_removed / 100, 3)  # remove as many entries as IRR does, chosen without the sign test
        variant(
            f"IRR without sign test (no_sign, {100 * same:.0f}%)",
            full,
            irr(inputs, downstream, identify_mode="no_sign", remove_ratio=same),
        )
        variant(
            f"random removal ({100 * same:.0f}%) + recalibrate",
            full,
            irr(inputs, downstream, identify_mode="random", remove_ratio=same),
        )
        variant(
            "IRR_more (remove_more, remove_ratio=0.75)",
            full,
            irr(inputs, downstream, remove_more=True, remove_ratio=0.75),
        )
    variant("RESTA (+v)", full, resta(inputs, None))
    if full_methods:
        variant("RESTA + DARE (drop 0.3)", full, resta(inputs, 0.3))
    add("fine-tuned (LoRA r=8)", lora)
    variant("IRR on LoRA (defaults)", lora, irr(inputs, downstream))
    variant("Safe LoRA (threshold 0.5)", lora, safe_lora(inputs))
    return rows


def _machine() -> str:
    import transformers

    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores (torch on 1 thread), python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="demo", choices=["demo", "tiny"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--prefix", default="toy", help="File name prefix of the outputs.")
    args = p.parse_args(argv)
    command = "python benchmarks/toy_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with single_thread():
        for seed in args.seeds:
            world = build_toy_world(seed=seed, size=args.size)
            print(f"world size={args.size} seed={seed} built in {world.build_seconds:.0f}s", flush=True)
            inputs = Inputs(world)
            for setting in args.settings:
                for row in run_setting(world, inputs, setting, SETTINGS[setting], full_methods=setting == "attack"):
                    rows.append({"seed": seed, **row})
    meta = {
        "command": command.strip(),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - started),
        "size": args.size,
        "seeds": args.seeds,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    columns = COLUMNS if len(args.seeds) == 1 else ("seed", *COLUMNS)
    md = (
        f"# Toy world: IRR and baselines\n\n- command: `{meta['command']}`\n- machine: {meta['machine']}\n"
        f"- date: {meta['date']}, {meta['seconds']} s\n\n{markdown_table(rows, columns)}\n"
    )
    _write(os.path.join(args.output_dir, f"{args.prefix}_table.md"), md)
    _write(os.path.join(args.output_dir, f"{args.prefix}_table.json"), json.dumps({**meta, "rows": rows}, indent=2))
    attack = [
        dict(r, safety=(r["refusal_attacked"] + r["refusal_unattacked"]) / 2)
        for r in rows
        if r["setting"] == "attack" and r["seed"] == args.seeds[0]
    ]
    if attack:
        pareto_plot(
            attack,
            os.path.join(args.output_dir, f"{args.prefix}_pareto.png"),
            x="downstream_accuracy",
            y="safety",
            label="method",
            xlabel="downstream accuracy (sort task)",
            ylabel="refusal of harmful prompts (mean of topic groups)",
            title=f"toy world ({args.size}, seed {args.seeds[0]}), 10% harmful fine-tune: {meta['date']}",
        )
    print(f"wrote {args.output_dir}/{args.prefix}_table.md, .json, _pareto.png in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
