"""The realigned LoRA adapter at the trained rank, 2x and 4x that rank, against the exact merged model (issue 22).

  python benchmarks/bench_lora_adapter.py                       # every toy LoRA world: seeds 0-2 x 3 settings
  python benchmarks/bench_lora_adapter.py --seeds 0 --settings attack --size tiny

Worlds: the toy table's (`benchmarks/toy_table.py`): per seed the toy world at demo size, and per setting
(attack, mild attack, benign) its LoRA fine-tune (r=8, alpha=16, every linear layer, `ToyWorld.finetune`).
Each is realigned with the paper's IRR (`IRRConfig()`, the toy's sign-only safety vector: a removal mask, so
the adapter is the truncation of the masked solution) and with `IRRConfig.recommended()` (no mask: the adapter
is the exact rank-constrained optimum), calibration on the first 128 downstream examples. One realignment per
world and setting; the adapter at each rank comes from the same layer loop (`AdapterFactors`, one rank multiple
after another). An adapter is evaluated as W_A + BA written into a copy of the merged model (the adapter's
forward up to float rounding). Columns: refusal (attacked, unattacked topics), over-refusal, downstream and
old-task (benign) accuracy (`ToyWorld.evaluate`: greedy generation, keyword judge, exact match), and the share
of prompts whose greedy output equals the exact merged model's. Writes benchmarks/results/<prefix>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import _common  # noqa: F401  (puts the repository root on sys.path: runs without an install)
import torch
from _common import write_results
from toy_table import SETTINGS, Inputs

from irr_callback import IRRConfig, realign
from irr_callback.outputs.plotting import markdown_table
from irr_callback.pipeline.lowrank import AdapterFactors
from irr_callback.toy import build_toy_world, single_thread


MULTIPLES = (1, 2, 4)
METRICS = ("refusal_attacked", "refusal_unattacked", "over_refusal_benign", "downstream_accuracy", "benign_accuracy")


class EveryMultiple(AdapterFactors):
    """The adapter at several rank multiples from one layer loop: the step is run once per multiple."""

    def __init__(self, multiples) -> None:
        super().__init__()
        self.multiples = multiples
        self.by_multiple: dict[int, dict] = {m: {} for m in multiples}

    def after(self, groups, settings) -> None:
        saved = dict(self._saved)
        for m in self.multiples:
            self._saved, self.multiple, self.factors = dict(saved), m, {}
            super().after(groups, settings)
            self.by_multiple[m].update(self.factors)


def _plain(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _adapter_model(merged, base, factors) -> torch.nn.Module:
    model = copy.deepcopy(merged)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, f in factors.items():
            plain = _plain(name)
            params[plain].copy_((base[plain].double() + f.b.double() @ f.a.double()).to(params[plain].dtype))
    return model


def _same_output(responses, reference) -> float:
    pairs = [(a, b) for name in reference for a, b in zip(responses[name], reference[name])]
    return sum(a == b for a, b in pairs) / len(pairs)


def run_world(seed: int, size: str, settings: list[str], calib_n: int) -> list[dict]:
    world = build_toy_world(seed=seed, size=size)
    inputs = Inputs(world)
    hp = world.hparams
    rows = []
    for setting in settings:
        share = SETTINGS[setting]
        downstream = (
            world.downstream_train if share == world.harmful_share else world.make_downstream(harmful_share=share)
        )
        finetuned = world.finetune(
            world.aligned_model, downstream, steps=hp["lora_steps"], lr=hp["lora_lr"], lora=True
        )
        for method, config in (
            ("paper IRR (mask)", IRRConfig(num_calibration_samples=calib_n)),
            ("recommended (no mask)", IRRConfig.recommended(num_calibration_samples=calib_n)),
        ):
            peft = copy.deepcopy(finetuned)
            recorder = EveryMultiple(MULTIPLES)
            t0 = time.perf_counter()
            report = realign(
                peft,
                safety_vector=inputs.signs,
                calibration=inputs.calibration(downstream, calib_n),
                safety_calibration=inputs.safe if config.uses_safety_stream else None,
                config=config,
                progress=False,
                lowrank=recorder,
            )
            seconds = time.perf_counter() - t0
            merged = copy.deepcopy(peft).merge_and_unload().eval()
            exact = world.evaluate(merged, return_responses=True)
            reference = exact.pop("responses")
            common = {"seed": seed, "setting": setting, "method": method, "safety_weight": report.safety_weight or 0}
            rows.append({**common, "model": "merged (exact)", **exact, "same_output": 1.0, "realign_s": seconds})
            for m in MULTIPLES:
                factors = recorder.by_multiple[m]
                result = world.evaluate(_adapter_model(merged, inputs.base, factors).eval(), return_responses=True)
                same = _same_output(result.pop("responses"), reference)
                rows.append(
                    {
                        **common,
                        "model": f"adapter {m}x trained rank",
                        **result,
                        "same_output": same,
                        "max_rank": max(f.rank for f in factors.values()),
                        "max_relative_gap": max(f.relative_gap for f in factors.values()),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per method and adapter rank, over every world: the largest difference to the exact merged model in each
    metric, and the mean and smallest share of identical greedy outputs."""
    merged = {(r["seed"], r["setting"], r["method"]): r for r in rows if r["model"] == "merged (exact)"}
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for m in MULTIPLES:
            mine = [r for r in rows if r["method"] == method and r["model"] == f"adapter {m}x trained rank"]
            if not mine:
                continue
            diffs = {
                k: max(abs(r[k] - merged[(r["seed"], r["setting"], r["method"])][k]) for r in mine) for k in METRICS
            }
            out.append(
                {
                    "method": method,
                    "adapter rank": f"{m}x trained",
                    "worlds": len(mine),
                    **{f"max |Δ| {k}": v for k, v in diffs.items()},
                    "same_output mean": sum(r["same_output"] for r in mine) / len(mine),
                    "same_output min": min(r["same_output"] for r in mine),
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--size", default="demo", choices=["demo", "tiny"])
    p.add_argument("--calibration", type=int, default=128)
    p.add_argument("--prefix", default="bench_lora_adapter")
    args = p.parse_args()
    started = time.perf_counter()
    rows = []
    with single_thread():
        for seed in args.seeds:
            rows += run_world(seed, args.size, args.settings, args.calibration)
    summary = summarise(rows)
    columns = ["seed", "setting", "method", "model", *METRICS, "same_output", "max_rank", "max_relative_gap"]
    text = (
        f"{round(time.perf_counter() - started)} s, single thread.\n\n"
        "Per method and adapter rank, over every world: the largest difference to the exact merged model of the "
        "same world, and the share of prompts with the same greedy output as the merged model.\n\n"
        + markdown_table(summary, list(summary[0]))
        + "\n\nEvery world:\n\n"
        + markdown_table(rows, columns)
        + "\n"
    )
    write_results(args.prefix, {"summary": summary, "rows": rows, "args": vars(args)}, text)
    print(text)


if __name__ == "__main__":
    main()
