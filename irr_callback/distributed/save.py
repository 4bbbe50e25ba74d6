"""The one writer of a realigned model's output directory, correct under every backend (gathers the
full state dict where the weights are sharded, writes atomically on the main process)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .collectives import is_distributed, is_fsdp1, raise_if_any_failed, rank_and_world


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) CPU state dict on the main process, None elsewhere. Collective: call on every rank.

    FSDP2 and FSDP1: `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True,
    cpu_offload=True)`; ZeRO-3: one parameter gathered at a time (16-bit, the model's dtype);
    replicated / single process: the local state dict.
    """
    from ..targets import unwrap

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
    if is_distributed() and (any(type(p).__name__ == "DTensor" for p in params) or is_fsdp1(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if rank == 0 else None
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if rank == 0 else None


def save_realigned(
    model: torch.nn.Module, output_dir: str, *, processing_class: Any = None, report: Any = None
) -> None:
    """Save the (realigned) model as a plain `from_pretrained` directory, correctly under any backend.

    Call on EVERY rank (gathering is collective). A barrier first (every rank has finished writing),
    then the main process writes `save_pretrained` output (+ tokenizer, + `irr_report.json`) into a
    temporary directory next to `output_dir` and renames it into place (`saving.atomic_directory`), so
    a reader never sees a half-written directory; a final flag reduction returns only once it is there,
    and raises on every rank if the write failed. ZeRO-3 under the Trainer /
    accelerate: this gathers parameter by parameter, so `zero3_save_16bit_model` is not required.
    """
    import os

    from ..saving import atomic_directory
    from ..targets import unwrap

    if is_distributed():
        dist.barrier()
    state = full_state_dict(model)
    error: BaseException | None = None
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
