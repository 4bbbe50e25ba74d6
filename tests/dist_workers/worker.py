"""torchrun worker: runs every case under the process group and saves each rank's results.

Usage: torchrun --nproc_per_node 2 tests/dist_workers/worker.py OUT_DIR CASE [CASE ...]
"trainer" (if given, first) needs OUT_DIR/models from `trainer_case.save_models`; "zero3*" need deepspeed
(DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

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
    "safety": lambda: cases.safety_case(0.5),
    "safety_auto": lambda: cases.safety_case("auto"),
    "retain_auto": lambda: cases.safety_case("auto", retain=True),
    "fsdp2_safety": lambda: cases.safety_case(0.5, model_fn=cases.fsdp2_shard),
    "fsdp2_safety_auto": lambda: cases.safety_case("auto", model_fn=cases.fsdp2_shard),
    "fsdp1": lambda: cases.realign_case(1.0, model_fn=cases.fsdp1_wrap),
    "fsdp1_safety": lambda: cases.safety_case(0.5, model_fn=cases.fsdp1_wrap),
    "fsdp1_safety_auto": lambda: cases.safety_case("auto", model_fn=cases.fsdp1_wrap),
    "zero3_safety": lambda: cases.safety_case(0.5, model_fn=lambda m: cases.zero3_engine(m).module),
    "zero3_safety_auto": lambda: cases.safety_case("auto", model_fn=lambda m: cases.zero3_engine(m).module),
    "safety_auto_put_back": lambda: cases.safety_case("auto", put_back=True),
    "fsdp2_safety_auto_put_back": lambda: cases.safety_case("auto", model_fn=cases.fsdp2_shard, put_back=True),
    "zero3_safety_auto_put_back": lambda: cases.safety_case(
        "auto", model_fn=lambda m: cases.zero3_engine(m).module, put_back=True
    ),
    "fine_tuned_task": lambda: cases.safety_case("auto", retain=True, put_back=True, task_term="fine-tuned"),
    "fsdp2_fine_tuned_task": lambda: cases.safety_case(
        "auto", retain=True, model_fn=cases.fsdp2_shard, put_back=True, task_term="fine-tuned"
    ),
    "zero3_fine_tuned_task": lambda: cases.safety_case(
        "auto", retain=True, model_fn=lambda m: cases.zero3_engine(m).module, put_back=True, task_term="fine-tuned"
    ),
    "true_sequential": lambda: cases.safety_case("auto", retain=True, put_back=True, sequential=True),
    "fsdp2_true_sequential": lambda: cases.safety_case(
        "auto", retain=True, model_fn=cases.fsdp2_shard, put_back=True, sequential=True
    ),
    "zero3_true_sequential": lambda: cases.safety_case(
        "auto", retain=True, model_fn=lambda m: cases.zero3_engine(m).module, put_back=True, sequential=True
    ),
    "filter_auto": lambda: cases.filter_case(),
    "fsdp2_filter_auto": lambda: cases.filter_case(model_fn=cases.fsdp2_shard),
    "zero3_filter_auto": lambda: cases.filter_case(model_fn=lambda m: cases.zero3_engine(m).module),
}


def fsdp2_save(out_dir: str):
    """Realign under FSDP2, then `save_realigned` (full state dict gathered, written by rank 0 only)."""
    from irr_callback.outputs.realigned_model import save_realigned

    holder = {}

    def shard(model):
        holder["model"] = cases.fsdp2_shard(model)
        return holder["model"]

    weights, totals = cases.realign_case(1.0, model_fn=shard)
    save_realigned(holder["model"], os.path.join(out_dir, "fsdp2_saved"))
    return weights, totals


def zero3(remove_ratio: float, save: bool = False):
    """Realign a ZeRO-3 engine's module (deepspeed on CPU); optionally `save_realigned` it afterwards."""
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

    from irr_callback.outputs.realigned_model import save_realigned

    engines, depth = [], []

    def shard(model):
        engines.append(cases.zero3_engine(model))
        depth.append(len(FWD_MODULE_STACK))
        return engines[-1].module

    weights, totals = cases.realign_case(remove_ratio, model_fn=shard)
    # DeepSpeed pushes a module in its pre-forward hook and pops it in its post-forward hook: a forward
    # interrupted mid-model (as the input capture once did) leaves entries behind
    totals["unfinished_forwards"] = len(FWD_MODULE_STACK) - depth[0]
    totals["partitioned"] = all(hasattr(p, "ds_id") and p.numel() == 0 for p in engines[0].module.parameters())
    if save:
        save_realigned(engines[0].module, os.path.join(OUT[0], "zero3_saved"))
    return weights, totals


def zero3_failure():
    """Rank 1's solver fails at layer 1 (after layer 0 was written): every rank raises and restores."""
    import irr_callback as irr
    import irr_callback.pipeline.solve as solve_step
    from irr_callback import IRRConfig, realign
    from irr_callback.targets import find_targets
    from tests.helpers import calibration, triple

    base, ft, unaligned = triple("llama")
    module = cases.zero3_engine(ft).module
    original = solve_step.realign_group

    def failing(deltas, *args, names, **kwargs):
        if dist.get_rank() == 1 and "layers.1." in names[0]:
            raise RuntimeError("injected failure")
        return original(deltas, *args, names=names, **kwargs)

    solve_step.realign_group = failing
    try:
        realign(
            module,
            base=base,
            safety_vector=irr.safety_vector(base, unaligned),
            calibration=calibration(**cases.CALIBRATION),
            config=IRRConfig(**cases.CONFIG),
            progress=False,
        )
        error = "no error"
    except RuntimeError as exc:
        error = str(exc)
    finally:
        solve_step.realign_group = original
    _, _, targets = find_targets(module)
    return {t.name: cases.zero3_full(t.weight) for t in targets}, {"error": error}


def trainer():
    """Trainer + IRRCallback under DDP; accelerate initialises the process group (run first)."""
    from tests.dist_workers import trainer_case

    models = os.path.join(OUT[0], "models")
    result = trainer_case.run(
        {name: os.path.join(models, name) for name in ("aligned", "unaligned")}, OUT[0], int(os.environ["WORLD_SIZE"])
    )
    result["distributed"] = dist.is_initialized() and dist.get_world_size() == int(os.environ["WORLD_SIZE"])
    tensors = {f"{key}.{k}": v for key in ("finetuned", "live") for k, v in result.pop(key).items()}
    return tensors, result


def noarg(backend: str):
    """`IRRCallback()` with no arguments under `backend` (tests/dist_workers/callback_case.py)."""
    from tests.dist_workers import callback_case

    state, info = callback_case.run(backend, OUT[0])
    return {k: v.contiguous() for k, v in state.items()}, info


CASES["trainer"] = trainer
for _backend in ("ddp", "fsdp2", "fsdp1", "zero3"):
    CASES[f"noarg_{_backend}"] = lambda b=_backend: noarg(b)
CASES["lora"] = lambda: cases.lora_case(os.path.join(OUT[0], "lora_merged"))
CASES["fsdp2_save"] = lambda: fsdp2_save(OUT[0])
CASES["zero3_failure"] = zero3_failure
CASES["zero3"] = lambda: zero3(1.0, save=True)
CASES["zero3_ranked"] = lambda: zero3(0.5)
OUT: list = []


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    OUT.append(out_dir)
    rank = int(os.environ["RANK"])
    if any(name.startswith("zero3") or name == "noarg_zero3" for name in names):
        import deepspeed.ops

        # DeepSpeed's optional CPU shared-memory all-reduce op is JIT-compiled (~4 min on 2 cores) on first
        # use; marked incompatible, DeepSpeed's collectives go through torch.distributed (gloo) instead
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    for name in names:
        if not dist.is_initialized() and name != "trainer":  # "trainer" lets accelerate initialise it
            dist.init_process_group("gloo")
        try:
            tensors, extra = CASES[name]()
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                os.path.join(out_dir, f"{name}.rank{rank}.safetensors"),
            )
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
