"""What the recommended setting costs against the paper's IRR, on the same model and data, in one run.

A 4-layer, 512-wide Llama (random init from a `LlamaConfig`, vocabulary 32000), a "fine-tuned" copy
(base + small noise) and a sign-only safety vector; realistic stream sizes: calibration 32 rows × 128
tokens (`--calibration-prompt` of them a prompt, default 0: all trained; the calibration filter judges only
rows with a prompt), safety 32 × 40 (a 24-token prompt and a 16-token refusal), retain 32 × 64 (a
32-token prompt and a 32-token answer). Each kind runs in a fresh process, rounds interleaved (the
machine's speed drifts), best wall time per kind:

  - paper: `IRRConfig()` with the safety vector (the paper's IRR), calibration only;
  - recommended: `IRRConfig.recommended()` as it stands (safety stream + aligned twin, λ by auto, the retain
    stream: ρ = 0.3 since issue 19's seventh round);
  - recommended_full_grid: the same with `auto_weight.AUTO_SMALLEST_FIRST = False` (the search of rounds 1–6: the
    whole coarse grid in one pass; what the search costs where the smallest candidate does not pass, give or take
    one pass's overhead);
  - recommended_no_retain: `IRRConfig.recommended(retain_weight=0)` (the preset of rounds 5 and 6);
  - fixed / fixed_no_retain: the same at λ = 0.3 (no search): what the search itself costs;
  - recommended_no_stop / recommended_no_stop_trial: the preset where no candidate passes (`AUTO_TOLERANCE` and
    `AUTO_MIN_GAP` patched so that nothing does: this benchmark's fine-tune leaves nothing to restore), so the
    search runs every round and the fallback; with the smallest candidate run as the real run and put back
    (`AUTO_KEEP_FIRST`, issue 19's eighth round), and without it (`_trial`: the search of round 7). The cost of the
    case where the smallest candidate is not chosen, at its largest;
  - recommended_true_sequential / fixed_true_sequential: the preset (auto, or λ = 0.3) with `true_sequential=True`
    (a pass of each layer per group of targets), and recommended_fine_tuned_task with `task_term="fine-tuned"`
    (the calibration and retain streams' fine-tuned twins): the options of issue 19's ninth round.

    python benchmarks/bench_cost.py                                   # the table in benchmarks/results/bench_cost.md
    python benchmarks/bench_cost.py --safety-tokens 128 --name bench_cost_long_safety
    python benchmarks/bench_cost.py --kinds paper,recommended --repeat 1 --name /tmp/x   # quick

"Of which the λ search" includes, where the first candidate is kept as the run, that realignment. The ratio the
issue asks about is recommended / paper (round 6 and before: `recommended_retain` was the preset
with ρ = 1 and the retain stream, and `recommended` had none). The auto search's own seconds are read
from the report (`report.auto["seconds"]`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import _common  # noqa: F401
import torch
from _common import machine, run_worker, write_results


HERE = os.path.abspath(__file__)
KINDS = (
    "paper",
    "recommended",
    "recommended_full_grid",
    "recommended_no_retain",
    "fixed",
    "fixed_no_retain",
    "recommended_no_stop",
    "recommended_no_stop_trial",
    "recommended_true_sequential",
    "fixed_true_sequential",
    "recommended_fine_tuned_task",
)


def build(workdir: str, args) -> dict:
    from _models import llama_config
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.hidden, args.layers, vocab=args.vocab)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(os.path.join(workdir, "base"))
    g = torch.Generator().manual_seed(1)
    vector = {}
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".layers." in name and p.dim() == 2:
                vector[name] = torch.sign(torch.randn(p.shape, generator=g)).to(torch.int8)
            p.add_(0.002 * torch.randn(p.shape, generator=g))
    base.save_pretrained(os.path.join(workdir, "ft"))
    save_file(vector, os.path.join(workdir, "safety.safetensors"))
    streams = {
        "calibration": (args.seqs, args.tokens, args.calibration_prompt),
        "safety": (args.safety_seqs, args.safety_tokens, args.safety_tokens * 3 // 5),
        "retain": (args.retain_seqs, args.retain_tokens, args.retain_tokens // 2),
    }
    for name, (rows, length, prompt) in streams.items():
        ids = torch.randint(3, args.vocab, (rows, length), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        save_file({"input_ids": ids, "labels": labels}, os.path.join(workdir, f"stream_{name}.safetensors"))
    return {"target_params": sum(t.numel() for t in vector.values()), "streams": streams}


def rows(workdir: str, name: str) -> list[dict]:
    from safetensors.torch import load_file

    data = load_file(os.path.join(workdir, f"stream_{name}.safetensors"))
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab} for i, lab in zip(*data.values())]


def worker(kind: str, workdir: str, args) -> dict:
    from _models import warm_up
    from transformers import LlamaForCausalLM

    from irr_callback import IRRConfig, realign

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(os.path.join(workdir, "ft"), dtype=torch.float32).eval()
    cal = rows(workdir, "calibration")
    sizes = dict(
        num_calibration_samples=len(cal),
        num_safety_samples=args.safety_seqs,
        num_retain_samples=args.retain_seqs,
        calibration_max_length=max(args.tokens, args.safety_tokens, args.retain_tokens),
        calibration_batch_size=args.batch,
    )
    kwargs = {}
    if kind == "paper":
        config = IRRConfig(**sizes)
        kwargs["safety_vector"] = os.path.join(workdir, "safety.safetensors")
    else:
        from irr_callback.pipeline import auto_weight

        if kind == "recommended_full_grid":
            auto_weight.AUTO_SMALLEST_FIRST = False
        if kind.startswith("recommended_no_stop"):
            auto_weight.AUTO_TOLERANCE, auto_weight.AUTO_MIN_GAP = -1.0, float("-inf")
            auto_weight.AUTO_KEEP_FIRST = not kind.endswith("_trial")
        weight = "auto" if kind.startswith("recommended") else 0.3
        options = {"retain_weight": 0.0} if kind.endswith("_no_retain") else {}
        if kind.endswith("_true_sequential"):
            options["true_sequential"] = True
        if kind.endswith("_fine_tuned_task"):
            options["task_term"] = "fine-tuned"
        config = IRRConfig.recommended(safety_weight=weight, **options, **sizes)
        kwargs["safety_calibration"] = rows(workdir, "safety")
        if config.uses_retain_stream:
            kwargs["retain_calibration"] = rows(workdir, "retain")
    warm_up("ours")
    start = time.perf_counter()
    report = realign(
        model, base=os.path.join(workdir, "base"), calibration=cal, config=config, progress=False, **kwargs
    )
    seconds = time.perf_counter() - start
    return {
        "kind": kind,
        "seconds": seconds,
        "search_seconds": (report.auto or {}).get("seconds"),
        "filter_seconds": (report.calibration_filter or {}).get("seconds"),
        "filter_judged": (report.calibration_filter or {}).get("judged"),
        "safety_weight": report.safety_weight,
        "candidates": [c["safety_weight"] for c in (report.auto or {}).get("candidates", [])],
        "kept": (report.auto or {}).get("kept_written_weights"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--safety-seqs", type=int, default=32)
    parser.add_argument("--safety-tokens", type=int, default=40)
    parser.add_argument("--retain-seqs", type=int, default=32)
    parser.add_argument("--retain-tokens", type=int, default=64)
    parser.add_argument("--calibration-prompt", type=int, default=0, help="prompt tokens of each calibration row")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--name", default="bench_cost")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. the code state measured)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args)))
        return
    workdir = tempfile.mkdtemp(prefix="irr-bench-cost-")
    every: dict[str, list[dict]] = {}
    try:
        sizes = build(workdir, args)
        for rep in range(args.repeat):
            for kind in args.kinds.split(","):
                r = run_worker(HERE, [*sys.argv[1:], "--worker", kind, "--workdir", workdir])
                every.setdefault(kind, []).append(r)
                print(
                    f"[{rep + 1}/{args.repeat}] {kind}: {r['seconds']:.1f}s (search {r['search_seconds']})", flush=True
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {k: min(rs, key=lambda r: r["seconds"]) for k, rs in every.items()}
    paper = best.get("paper", {}).get("seconds")
    streams = ", ".join(f"{k} {r} × {t} ({p} prompt tokens)" for k, (r, t, p) in sizes["streams"].items())
    md = [
        f"Llama: hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
        f"{sizes['target_params'] / 1e6:.1f} M target parameters, float32; streams: {streams}; batches of "
        f"{args.batch}; torch on {args.threads} threads. Best of {args.repeat} interleaved rounds, each kind "
        "in a fresh process.\n",
        "| kind | wall (best) | / paper | of which the λ search | the calibration filter (rows judged) | λ "
        "| candidates run | all rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in best.items():
        ratio = f"{r['seconds'] / paper:.2f}×" if paper else "-"
        search = f"{r['search_seconds']:.1f} s" if r["search_seconds"] is not None else "-"
        judged = r.get("filter_seconds")
        judged = f"{judged:.1f} s ({r['filter_judged']})" if judged is not None else "-"
        md.append(
            f"| {kind} | {r['seconds']:.1f} s | {ratio} | {search} | {judged} | {r['safety_weight'] or '-'} | "
            f"{', '.join(f'{c:g}' for c in r.get('candidates') or []) or '-'}"
            + (" (the first kept)" if r.get("kept") else "")
            + " | "
            + " / ".join(f"{x['seconds']:.1f}" for x in every[kind])
            + " s |"
        )
    if args.note:
        md.append(f"\n{args.note}")
    payload = {"args": vars(args), "machine": machine(), "runs": every, "best": best}
    write_results(args.name, payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
