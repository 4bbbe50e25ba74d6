"""Collectives and plain process-group helpers: every rank calls them in the same order.

Statistics are raw sums reduced ONCE per module with an in-place `all_reduce(SUM)`; an error on one
rank is agreed on by all ranks (`raise_if_any_failed`, one flag reduction) so no rank hangs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist


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
    return list(items[start : start + per_rank + (1 if rank < extras else 0)])


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


def shard_batches(
    batches: Sequence[dict[str, Any]], make_padding: Callable[[dict[str, Any]], dict[str, Any]]
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


def raise_if_any_failed(error: BaseException | None) -> None:
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


def is_fsdp1(model: torch.nn.Module) -> bool:
    """Wrapped in FSDP1 (`FullyShardedDataParallel`) anywhere."""
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())
