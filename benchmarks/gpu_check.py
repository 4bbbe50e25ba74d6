"""GPU check: realign a small Llama built from a config, in one process and under DDP / FSDP2.

One process (`--mode single`) writes the reference weights; `torchrun ... --mode ddp|fsdp2` realigns
the same model with the work divided and checks every rank's weights against the reference.
Wall times and the comparison land in `benchmarks/results/gpu_check.json` (one entry per mode).
Smoke test without a GPU: `python benchmarks/gpu_check.py --device cpu --size tiny`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

SIZES = {  # hidden, intermediate, layers, heads, kv heads, calibration sequences x length
    "tiny": (64, 128, 2, 4, 2, 16, 32),
    "small": (1024, 2816, 8, 16, 4, 128, 512),
}


def build(size: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, heads, kv, _, _ = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=1024,
        pad_token_id=0,
    )
    base = LlamaForCausalLM(cfg).to(dtype).eval()
    models = [base]
    for seed in (1, 2):  # fine-tuned and unaligned stand-ins: the base plus seeded noise
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
        models.append(m)
    return [m.to(device) for m in models]


def run(args) -> dict:
    import irr_callback as irr
    from irr_callback import IRRConfig, realign
    from irr_callback.targets import find_targets

    distributed = args.mode != "single"
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float32
    base, ft, unaligned = build(args.size, device, dtype)
    v = irr.safety_vector(base, unaligned, sign_only=True)
    n_seq, length = SIZES[args.size][5:]
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 1024, (n_seq, length), generator=g)}]
    if args.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(args.device, (dist.get_world_size(),))
        for layer in ft.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(ft, mesh=mesh)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = realign(
        ft,
        base=base,
        safety_vector=v,
        calibration=calib,
        progress=False,
        config=IRRConfig(calibration_batch_size=8, num_calibration_samples=n_seq),
    )
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    _, _, targets = find_targets(ft)
    weights = {
        t.name: (t.weight.full_tensor() if type(t.weight).__name__ == "DTensor" else t.weight).detach().float().cpu()
        for t in targets
    }
    ref_path = os.path.join(args.results, f"gpu_check_reference_{args.size}_{args.device}.pt")
    entry = {
        "mode": args.mode,
        "device": args.device,
        "size": args.size,
        "seconds": round(seconds, 3),
        "world_size": dist.get_world_size() if distributed else 1,
        "removed": report.totals["removed"],
        "peak_gpu_mib": (torch.cuda.max_memory_allocated() // 2**20) if args.device == "cuda" else None,
    }
    if args.mode == "single":
        torch.save(weights, ref_path)
        entry["equal_to_single"] = True
    else:
        reference = torch.load(ref_path, weights_only=True)
        diff = max(float((weights[k] - reference[k]).abs().max()) for k in reference)
        entry["max_abs_diff_vs_single"] = diff
        entry["equal_to_single"] = diff <= args.atol
        # identical on every rank: compare a checksum
        total = torch.tensor(
            [sum(float(w.double().sum()) for w in weights.values())], dtype=torch.float64, device=device
        )
        gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, total)
        entry["identical_across_ranks"] = all(bool(torch.equal(x, gathered[0])) for x in gathered)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return entry if rank == 0 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp2"], default="single")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible (use --device cpu for a smoke test)")
    os.makedirs(args.results, exist_ok=True)
    entry = run(args)
    if not entry:
        return
    path = os.path.join(args.results, "gpu_check.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    results[f"{args.mode}/{args.device}/{args.size}"] = entry
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    print(json.dumps(entry))
    if not entry["equal_to_single"] or not entry.get("identical_across_ranks", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
