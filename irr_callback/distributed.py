"""Process-group helpers for IRR inside multi-process jobs (DDP, ZeRO-1/2, FSDP2, ZeRO-3).

Why: users fine-tune on several GPUs and IRR must run in the same job, dividing the work and
giving the single-process result. The rules, followed everywhere here:

- every rank gets the SAME full data and splits it itself (`PartialState.split_between_processes`,
  contiguous shares, no duplicated sample); shorter shares are padded with zero-weight copies so
  every rank runs the same number of forward passes (under FSDP / ZeRO-3 a forward is a collective);
- statistics are raw sums (Σxxᵀ, Σ grad², token and batch counts) reduced ONCE per module with an
  in-place `all_reduce(SUM)`, then normalised;
- no collective is ever behind a rank check; an error on one rank is agreed on by all ranks (one
  flag reduction per layer) so every rank restores its weights instead of hanging.

Without an initialised process group (or with one process) `context_for` returns `SingleProcess`,
whose hooks are no-ops: the single-process path runs no collective.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from transformers.utils import logging

logger = logging.get_logger(__name__)

SolveFn = Callable[[list, torch.Tensor, int], None]


# ---- plain helpers ---------------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def split_for_this_rank(items: Sequence[Any]) -> list[Any]:
    """This rank's contiguous share of `items` (the same full list on every rank).

    Uses accelerate's `PartialState().split_between_processes` when accelerate's state is already set
    up for this process group (Trainer / `accelerate launch`); otherwise (plain torchrun, or accelerate
    on CPU, which sees one process) the same arithmetic on torch.distributed's rank, without creating
    an accelerate state that would disagree with the process group.
    """
    from accelerate.state import PartialState

    rank, world = rank_and_world()
    if PartialState._shared_state:  # initialised by the Trainer / Accelerator: use it if it agrees
        state = PartialState()
        if state.num_processes == world and state.process_index == rank:
            with state.split_between_processes(list(items)) as share:
                return list(share)
    per_rank, extras = divmod(len(items), world)
    start = rank * per_rank + min(rank, extras)
    return list(items[start:start + per_rank + (1 if rank < extras else 0)])


def device_of_group(tensor: torch.Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU ones. Returns the device a collective must use."""
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if backend == "gloo" else tensor.device


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (moved to the backend's device and back only when needed)."""
    target = device_of_group(tensor)
    if tensor.device == target:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(target)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


def all_reduce_count(value: int) -> int:
    """Sum of an integer over ranks."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=device_of_group(torch.empty(0)))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def all_reduce_max(value: int) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device_of_group(torch.empty(0)))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """In-place broadcast from rank `src`."""
    target = device_of_group(tensor)
    if tensor.device == target and tensor.is_contiguous():
        dist.broadcast(tensor, src=src)
        return tensor
    moved = tensor.detach().to(target).contiguous()
    dist.broadcast(moved, src=src)
    tensor.copy_(moved)
    return tensor


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """An owner rank per item, balancing the summed sizes (largest first onto the least loaded rank).

    Deterministic (ties go to the lower index / lower rank), so every rank computes the same plan.
    """
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


def shard_batches(batches: Sequence[dict[str, Any]], make_padding: Callable[[dict[str, Any]], dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """This rank's share of `batches`, padded to the largest share with `make_padding(batches[0])`.

    A padding batch is a zero-weight copy of a real batch (so its forward is numerically ordinary);
    `make_padding` marks it so consumers give it zero weight.
    """
    share = split_for_this_rank(batches)
    longest = all_reduce_max(len(share))
    while len(share) < longest:
        share.append(make_padding(batches[0]))
    return share


def calibration_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a calibration batch whose tokens all carry zero weight in H (`irr_token_mask`) and
    in a held-out loss (`irr_loss_mask`)."""
    zero = torch.zeros_like(batch["attention_mask"])
    return {**batch, "irr_token_mask": zero, **({"irr_loss_mask": zero} if "irr_loss_mask" in batch else {})}


# ---- realign contexts: the hook points the driver calls ----------------------------------------
class SingleProcess:
    """No process group: every hook is the identity (the single-process path runs no collective)."""

    kind = "single"
    rank, world_size = 0, 1
    stop_capture_early = True  # the input capture may end each forward at the last layer (see driver)

    def shard_calibration(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return batches

    def reduce_hessian(self, accumulator: Any) -> None:
        """Raw Σxxᵀ and token count of one input, summed over ranks before `finalize`."""

    def solve_layer(self, groups: list, solve: SolveFn, backup: Any) -> None:
        """Realign every group of one layer; on return every rank holds the same new weights.

        `solve` is a `functools.partial` of the driver's group solver (`solve(group, hessian, tokens)`);
        backends that solve differently read its keywords (base, safety, importance, config, backup, report).
        """
        for group, (hessian, tokens) in groups:
            solve(group, hessian, tokens)

    def merge_stats(self, modules: list, order: Sequence[str]) -> list:
        return modules

    def restore(self, backup: Any) -> None:
        backup.restore()


class Replicated(SingleProcess):
    """DDP and ZeRO-1/2: every rank holds the full weights. H is all-reduced; each group is solved
    by one owner (balanced by size) and the new weights are broadcast from it."""

    kind = "replicated"

    def __init__(self) -> None:
        self.rank, self.world_size = rank_and_world()

    def shard_calibration(self, batches):
        return shard_batches(batches, calibration_padding)

    def reduce_hessian(self, accumulator) -> None:
        all_reduce_sum_(accumulator.sum)
        accumulator.tokens = all_reduce_count(accumulator.tokens)

    def owners(self, groups: list) -> list[int]:
        return assign_owners([sum(t.weight.numel() for t in group) for group, _ in groups], self.world_size)

    def solve_layer(self, groups, solve, backup) -> None:
        owners = self.owners(groups)
        error: Optional[BaseException] = None
        for (group, (hessian, tokens)), owner in zip(groups, owners):
            if owner == self.rank and error is None:
                try:
                    solve(group, hessian, tokens)
                except Exception as exc:  # agreed on below, then re-raised on every rank
                    error = exc
        raise_if_any_failed(error)
        for (group, _), owner in zip(groups, owners):
            for t in group:
                self._receive(t, owner, backup)

    def _receive(self, target: Any, owner: int, backup: Any) -> None:
        if self.rank != owner:
            backup.save(target.weight)
        broadcast_(target.weight.data, owner)
        if target.kind == "lora" and self.rank != owner:
            lora_b = target.module.lora_B[target.adapter].weight
            backup.save(lora_b)
            lora_b.data.zero_()

    def merge_stats(self, modules, order):
        return gather_stats(modules, order)


def raise_if_any_failed(error: Optional[BaseException]) -> None:
    """One flag reduction: if any rank failed, every rank raises (so every rank restores)."""
    failed = all_reduce_count(1 if error is not None else 0)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"IRR failed on {failed} other process(es) (see their logs); weights restored")


def gather_stats(modules: list, order: Sequence[str]) -> list:
    """Every rank's ModuleStats, one per target, in target order (each module solved once somewhere)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, modules)
    by_name: dict[str, Any] = {}
    for part in gathered:
        for stats in part:
            by_name.setdefault(stats.name, stats)
    return [by_name[name] for name in order if name in by_name]


def context_for(model: torch.nn.Module, targets: Sequence[Any]) -> SingleProcess:
    """The realign context matching how `model` is distributed (detected from its target weights)."""
    if not is_distributed():
        return SingleProcess()
    weights = [t.weight for t in targets]
    if any(hasattr(w, "ds_id") for w in weights):
        from .backends.zero3 import Zero3

        return Zero3()
    if any(type(w).__name__ == "DTensor" or type(getattr(w, "data", None)).__name__ == "DTensor" for w in weights):
        from .backends.fsdp2 import RowSharded

        return RowSharded()
    if _is_fsdp1(model):
        from .backends.fsdp1 import FSDP1

        return FSDP1(model)
    return Replicated()


def _is_fsdp1(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())



# ---- Fisher ------------------------------------------------------------------------------------
def fisher_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """A copy of a safety batch whose loss is multiplied by zero (`irr_weight`)."""
    return {**batch, "irr_weight": 0.0}


def shard_fisher_batches(batches: Any, max_batches: Optional[int]) -> list[dict[str, Any]]:
    """The first `max_batches` safety batches (the same on every rank), this rank's share, padded."""
    full = []
    for batch in batches:
        if max_batches is not None and len(full) >= max_batches:
            break
        full.append(batch)
    if not full:
        raise ValueError("fisher: no batch was given")
    for index, batch in enumerate(full):  # checked on every rank, before any collective
        if "labels" not in batch:
            raise ValueError("fisher: every batch needs 'labels' (-100 on prompt and padding tokens)")
        if int((torch.as_tensor(batch["labels"]) != -100).sum()) == 0:
            raise ValueError(f"fisher: batch #{index} has no labelled token")
    return shard_batches(full, fisher_padding)


def reduce_fisher_(sums: dict[str, torch.Tensor], count: int) -> int:
    """Σ grad² per parameter and the batch count summed over ranks (in place; one reduction per tensor)."""
    for tensor in sums.values():
        all_reduce_sum_(tensor)
    return all_reduce_count(count)


def check_local_gradients(model: torch.nn.Module) -> None:
    """Σ grad² is exact only with per-rank, unsynchronised gradients: refuse wrapped/sharded models."""
    if type(model).__name__ == "DistributedDataParallel":
        raise ValueError("fisher: pass the unwrapped model (ddp_model.module): DDP averages gradients across "
                         "ranks, which would make the squared gradients wrong")
    for p in model.parameters():
        if type(p).__name__ == "DTensor" or hasattr(p, "ds_id") or _is_fsdp1(model):
            raise ValueError("fisher: sharded parameters (FSDP / ZeRO-3) reduce-scatter gradients, so per-batch "
                             "squared gradients cannot be formed; compute the Fisher once per base model "
                             "with DDP or one GPU (`irr fisher`) and pass the file (IRRConfig.fisher)")
        break


# ---- saving --------------------------------------------------------------------------------------
def full_state_dict(model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The full (unsharded) CPU state dict on the main process, None elsewhere. Collective: call on every rank.

    FSDP2 and FSDP1: `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True,
    cpu_offload=True)`; ZeRO-3: one parameter gathered at a time (16-bit, the model's dtype);
    replicated / single process: the local state dict.
    """
    from .targets import unwrap

    rank, _ = rank_and_world()
    params = list(model.parameters())
    if is_distributed() and any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        module = unwrap(model)
        keys = set(module.state_dict().keys())  # persistent buffers only (no rotary caches)
        out: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().to("cpu", copy=True)
        if rank == 0:
            for name, buf in module.named_buffers():
                if name in keys:
                    out[name] = buf.detach().to("cpu", copy=True)
        return out if rank == 0 else None
    if is_distributed() and (any(type(p).__name__ == "DTensor" for p in params) or _is_fsdp1(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if rank == 0 else None
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if rank == 0 else None


def save_realigned(model: torch.nn.Module, output_dir: str, *, processing_class: Any = None,
                   report: Any = None) -> None:
    """Save the (realigned) model as a plain `from_pretrained` directory, correctly under any backend.

    Call on EVERY rank (gathering is collective). A barrier first (every rank has finished writing),
    then the main process writes `save_pretrained` output (+ tokenizer, + `irr_report.json`) into a
    temporary directory next to `output_dir` and renames it into place (`saving.atomic_directory`), so
    a reader never sees a half-written directory; a final flag reduction returns only once it is there,
    and raises on every rank if the write failed. ZeRO-3 under the Trainer /
    accelerate: this gathers parameter by parameter, so `zero3_save_16bit_model` is not required.
    """
    import os

    from .saving import atomic_directory
    from .targets import unwrap

    if is_distributed():
        dist.barrier()
    state = full_state_dict(model)
    error: Optional[BaseException] = None
    if state is not None:
        try:
            with atomic_directory(output_dir) as tmp:
                unwrap(model).save_pretrained(tmp, state_dict=state)
                if processing_class is not None:
                    processing_class.save_pretrained(tmp)
                if report is not None:
                    report.save(os.path.join(tmp, "irr_report.json"))
        except Exception as exc:  # agreed on below: the other ranks must not wait forever
            error = exc
    if is_distributed():
        raise_if_any_failed(error)  # also the final barrier: returns once the directory is in place
    elif error is not None:
        raise error
