"""How wall time and peak memory of `realign` (in memory) and `realign_checkpoint` (offline, one layer
at a time) grow with width, depth and calibration tokens; and the larger-than-RAM demonstration.

Each point runs in a fresh process. "extra RSS" is the peak resident memory above the process before
the call (for `realign`, the fine-tuned model is already loaded; for the offline path nothing is).

    python benchmarks/bench_scale.py                 # the grid (a few minutes on 2 cores)
    python benchmarks/bench_scale.py --big           # + a ~2.4 GB float32 checkpoint realigned offline
    python benchmarks/bench_scale.py --big-only --big-hidden 2048 --big-layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import _common  # noqa: F401
import torch
from _common import AnonPeak, gib, peak_rss_bytes, reset_peak_rss, rss_anon_bytes, rss_bytes, run_worker, write_results
from _models import build_checkpoints, calibration_batches, llama_config, materialise, warm_up


HERE = os.path.abspath(__file__)


def worker(kind: str, workdir: str, batch: int, seqs: int, tokens: int) -> dict:
    import gc

    from irr_callback import IRRConfig, realign, realign_checkpoint

    cfg = IRRConfig(num_calibration_samples=seqs, calibration_max_length=tokens, calibration_batch_size=batch)
    batches = calibration_batches(workdir, batch)
    model = None
    if kind == "realign":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(os.path.join(workdir, "ft")).eval()
        materialise(model)
    warm_up(kind)
    gc.collect()
    baseline = rss_bytes()
    anon_baseline = rss_anon_bytes()
    reset_peak_rss()
    sampler = AnonPeak().__enter__()
    start = time.perf_counter()
    if kind == "realign":
        realign(
            model,
            base=os.path.join(workdir, "base"),
            safety_vector=os.path.join(workdir, "safety.safetensors"),
            calibration=batches,
            config=cfg,
            progress=False,
        )
    else:
        out = os.path.join(workdir, "out")
        realign_checkpoint(
            os.path.join(workdir, "ft"),
            base=os.path.join(workdir, "base"),
            safety_vector=os.path.join(workdir, "safety.safetensors"),
            calibration=batches,
            output_dir=out,
            config=cfg,
            progress=False,
        )
    seconds = time.perf_counter() - start
    sampler.__exit__()
    peak = peak_rss_bytes()
    result = {
        "kind": kind,
        "seconds": seconds,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "extra_rss": peak - baseline,
        "extra_anon": sampler.peak - anon_baseline,
    }
    if kind == "offline":
        shutil.rmtree(os.path.join(workdir, "out"), ignore_errors=True)
    return result


def point(
    label: str,
    hidden: int,
    layers: int,
    seqs: int,
    tokens: int,
    kinds: list[str],
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    from irr_callback import IRRConfig

    batch = batch or IRRConfig().calibration_batch_size  # the library default, like every other setting here
    workdir = tempfile.mkdtemp(prefix="irr-bench-scale-")
    try:
        cfg = llama_config(hidden, layers, max_tokens=tokens)
        sizes = build_checkpoints(workdir, cfg, seqs=seqs, tokens=tokens, dtype=dtype)
        runs = {
            k: run_worker(
                HERE,
                [
                    "--worker",
                    k,
                    "--workdir",
                    workdir,
                    "--batch",
                    str(batch),
                    "--seqs",
                    str(seqs),
                    "--tokens",
                    str(tokens),
                ],
                timeout=5400,
            )
            for k in kinds
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row = {
        "label": label,
        "hidden": hidden,
        "layers": layers,
        "seqs": seqs,
        "tokens": tokens,
        "dtype": str(dtype),
        **sizes,
        "runs": runs,
    }
    msg = ", ".join(
        f"{k} {r['seconds']:.1f}s +{gib(r['extra_rss'])} (anon +{gib(r['extra_anon'])})" for k, r in runs.items()
    )
    print(
        f"{label}: hidden {hidden} layers {layers} calib {seqs}x{tokens}: {msg}  "
        f"(checkpoint {gib(sizes['checkpoint_bytes'])})",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="also realign a multi-GB checkpoint offline")
    parser.add_argument("--big-only", action="store_true", help="only the multi-GB checkpoint")
    parser.add_argument("--big-hidden", type=int, default=2048)
    parser.add_argument("--big-layers", type=int, default=12)
    parser.add_argument("--name", default="bench_scale")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seqs", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.batch, args.seqs, args.tokens)))
        return
    rows = []
    both = ["realign", "offline"]
    if not args.big_only:
        for hidden in (256, 512, 1024):
            rows.append(point("width", hidden, 4, 8, 128, both))
        for layers in (2, 8):
            rows.append(point("depth", 512, layers, 8, 128, both))
        for seqs in (32, 128):
            rows.append(point("tokens", 512, 4, seqs, 128, both))
    if args.big or args.big_only:
        rows.append(point("larger than RAM", args.big_hidden, args.big_layers, 8, 256, ["offline"]))
    md = [
        "| sweep | hidden | layers | calibration | checkpoint | target params | realign: wall | realign: extra "
        "RSS (B/target param) | realign: extra anonymous (B/target param) | offline: wall | offline: peak RSS | "
        "offline: peak anonymous | checkpoint / offline peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rr, ro = r["runs"].get("realign"), r["runs"].get("offline")
        md.append(
            f"| {r['label']} | {r['hidden']} | {r['layers']} | {r['seqs']}×{r['tokens']} | {gib(r['checkpoint_bytes'])} | "
            f"{r['target_params'] / 1e6:.1f} M | "
            + (
                f"{rr['seconds']:.1f} s | {gib(rr['extra_rss'])} ({rr['extra_rss'] / r['target_params']:.2f}) | "
                f"{gib(rr['extra_anon'])} ({rr['extra_anon'] / r['target_params']:.2f}) | "
                if rr
                else "- | - | - | "
            )
            + (
                f"{ro['seconds']:.1f} s | {gib(ro['extra_rss'])} | {gib(ro['extra_anon'])} | "
                f"{r['checkpoint_bytes'] / ro['extra_rss']:.1f}× |"
                if ro
                else "- | - | - | - |"
            )
        )
    md.append(
        "\nfloat32 checkpoints; base and sign-only safety vector read lazily from safetensors; default "
        "IRRConfig (disk backup, fallback_to_removal on). offline peak RSS is everything the call allocates "
        "(one layer, its Hessians and factors, calibration activations)."
    )
    write_results(args.name, {"points": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
