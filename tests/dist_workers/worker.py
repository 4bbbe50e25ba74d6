"""torchrun worker: runs every case under the process group and saves each rank's results.

Usage: torchrun --nproc_per_node 2 tests/dist_workers/worker.py OUT_DIR CASE [CASE ...]
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tests.dist_workers import cases  # noqa: E402

CASES = {
    "fisher": lambda: (cases.fisher_case(), {}),
    "hessian": lambda: (cases.hessian_case(), {}),
    "realign": lambda: cases.realign_case(1.0),
    "realign_ranked": lambda: cases.realign_case(0.5),
    "fsdp2": lambda: cases.realign_case(1.0, model_fn=cases.fsdp2_shard),
    "fsdp2_ranked": lambda: cases.realign_case(0.5, model_fn=cases.fsdp2_shard),
}


def fsdp2_save(out_dir: str):
    """Realign under FSDP2, then `save_realigned` (full state dict gathered, written by rank 0 only)."""
    from irr_callback.distributed import save_realigned

    holder = {}

    def shard(model):
        holder["model"] = cases.fsdp2_shard(model)
        return holder["model"]

    weights, totals = cases.realign_case(1.0, model_fn=shard)
    save_realigned(holder["model"], os.path.join(out_dir, "fsdp2_saved"))
    return weights, totals


CASES["fsdp2_save"] = lambda: fsdp2_save(OUT[0])
OUT: list = []


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    OUT.append(out_dir)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in names:
        try:
            tensors, extra = CASES[name]()
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"{name}.rank{rank}.safetensors"))
            with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(extra, f)
        except Exception:
            with open(os.path.join(out_dir, f"{name}.rank{rank}.error"), "w") as f:
                f.write(traceback.format_exc())
            raise
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
