"""Per-rank peak memory of the recommended setting (aligned twin; fixed λ and safety_weight='auto') under every
multi-process backend, on CPU (gloo, 2 processes), for a ~100M-parameter Llama.

    python benchmarks/bench_distributed_memory.py            # every backend, both settings (~20 min on 2 cores)
    python benchmarks/bench_distributed_memory.py --backends fsdp2 --settings auto

Each rank holds what `IRRCallback` holds at train end: the fine-tuned model as the backend shards it and the base
of the targets as the callback keeps it (whole under one process / DDP; each rank's part under FSDP2, FSDP1,
ZeRO-3: `distributed.ShardedSnapshot`). Measured per rank: RssAnon just before `realign` (the training state
this benchmark has: weights, snapshot, data) and its peak during `realign` (sampled every 5 ms); the difference
is what IRR adds. Writes benchmarks/results/bench_distributed_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ROOT, AnonPeak, gib, rss_anon_bytes, write_results  # noqa: E402


BACKENDS = ["single", "ddp", "fsdp2", "fsdp1", "zero3"]
SETTINGS = {"twin": 1.0, "auto": "auto"}  # the aligned twin at a fixed λ, and with λ chosen by 'auto'
SHAPE = dict(hidden=768, layers=12, inter=2048, vocab=8000)  # 97.5M parameters, 85M in the decoder targets
DATA = dict(calibration=(8, 64), safety=(8, 32), batch=2)  # (sequences, tokens), calibration_batch_size


def model_and_data():
    import torch
    from _models import llama_config
    from transformers import LlamaForCausalLM

    cfg = llama_config(SHAPE["hidden"], SHAPE["layers"], SHAPE["inter"], vocab=SHAPE["vocab"])
    torch.manual_seed(0)
    aligned = LlamaForCausalLM(cfg).eval()
    finetuned = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=g))
    n, length = DATA["calibration"]
    calibration = [{"input_ids": torch.randint(3, cfg.vocab_size, (n, length), generator=g)}]
    n, length = DATA["safety"]
    ids = torch.randint(3, cfg.vocab_size, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    safety = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    return aligned, finetuned, calibration, safety


def shard(model, backend: str):
    import torch

    if backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(model.model.layers[0])})
        return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    if backend == "zero3":
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
        return deepspeed.initialize(model=model, config=config)[0].module
    return model


def worker(backend: str, setting: str) -> dict:
    """One rank (or the single process): build, shard, snapshot the base like the callback, realign, measure."""
    import gc

    import torch

    from irr_callback import IRRConfig, realign
    from irr_callback.distributed import ShardedSnapshot, sharding_kind
    from irr_callback.inputs.snapshot import take_snapshot
    from irr_callback.targets import find_targets

    torch.set_num_threads(1)
    if backend != "single":
        if backend == "zero3":
            import deepspeed.ops

            compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
            if isinstance(compatible, dict):  # no JIT build of DeepSpeed's CPU all-reduce op: gloo
                compatible["deepspeed_shm_comm"] = False
        torch.distributed.init_process_group("gloo")
    aligned, finetuned, calibration, safety = model_and_data()
    aligned = shard(aligned, backend)
    _, _, targets = find_targets(aligned)
    if sharding_kind(aligned, targets):
        base = ShardedSnapshot.take(aligned, {t.name: t.weight for t in targets})
    else:
        base = take_snapshot(targets)
    del aligned, targets
    model = shard(finetuned, backend)
    del finetuned
    gc.collect()
    config = IRRConfig.recommended(
        safety_weight=SETTINGS[setting],
        num_calibration_samples=DATA["calibration"][0],
        num_safety_samples=DATA["safety"][0],
        calibration_batch_size=DATA["batch"],
    )
    before = rss_anon_bytes()
    started = time.perf_counter()
    with AnonPeak() as peak:
        report = realign(
            model, base=base, calibration=calibration, safety_calibration=safety, config=config, progress=False
        )
    seconds = time.perf_counter() - started
    rank = torch.distributed.get_rank() if backend != "single" else 0
    result = {
        "backend": backend,
        "setting": setting,
        "rank": rank,
        "rss_anon_before": before,
        "rss_anon_peak": peak.peak,
        "added": peak.peak - before,
        "seconds": seconds,
        "safety_weight": report.safety_weight,
        "modules": len(report.modules),
    }
    if backend != "single":
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, result)
        torch.distributed.destroy_process_group()
        return {"ranks": gathered}
    return {"ranks": [result]}


def run(backend: str, setting: str) -> list[dict]:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    script = os.path.abspath(__file__)
    if backend == "single":
        cmd = [sys.executable, script, "--worker", backend, setting]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", script]
        cmd += ["--worker", backend, setting]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{backend}/{setting} failed:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"ranks"')]
    return json.loads(lines[-1])["ranks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out = worker(*args.worker)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(out), flush=True)
        return
    rows = []
    for setting in args.settings:  # every backend's twin first: the auto runs are ~4x longer
        for backend in args.backends:
            ranks = run(backend, setting)
            rows.extend(ranks)
            for r in ranks:
                print(
                    f"{backend:6} {setting:5} rank {r['rank']}: before {gib(r['rss_anon_before'])}, peak "
                    f"{gib(r['rss_anon_peak'])} (+{gib(r['added'])}), {r['seconds']:.0f} s, λ={r['safety_weight']}",
                    flush=True,
                )
            report(rows)  # after every run: a partial table survives an interrupted benchmark


def report(rows: list[dict]) -> None:
    lines = [
        "Per-rank RssAnon (GiB) of `realign` with the recommended setting, 2 processes on CPU (gloo), a "
        f"{SHAPE['layers']}-layer Llama (hidden {SHAPE['hidden']}, MLP {SHAPE['inter']}, vocab {SHAPE['vocab']}: "
        "97.5M parameters, 85M in the targets; fp32). Calibration "
        f"{DATA['calibration'][0]}×{DATA['calibration'][1]} tokens, safety {DATA['safety'][0]}×{DATA['safety'][1]}, "
        f"batch {DATA['batch']}. 'before' = the model as sharded + the base snapshot as the callback keeps it + "
        "data; 'peak' sampled every 5 ms during realign. The machine (2 cores) was shared with other jobs: "
        "seconds are indicative only; memory is per process and not affected.",
        "",
        "| backend | setting | rank | before | peak | added by IRR | seconds | λ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['setting']} | {r['rank']} | {r['rss_anon_before'] / 2**30:.2f} | "
            f"{r['rss_anon_peak'] / 2**30:.2f} | {r['added'] / 2**30:.2f} | {r['seconds']:.0f} | {r['safety_weight']} |"
        )
    write_results("bench_distributed_memory", {"shape": SHAPE, "data": DATA, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
