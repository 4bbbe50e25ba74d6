"""The full (unsharded) state dict of a model under any backend, for the one writer of the realigned
output (`irr_callback.outputs.realigned_model.save_realigned`)."""

from __future__ import annotations

import torch

from .collectives import is_distributed, is_fsdp1, rank_and_world


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) CPU state dict on the main process, None elsewhere. Collective: call on every rank.

    FSDP2 and FSDP1: `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True,
    cpu_offload=True)` (False when the weights are on the CPU already); ZeRO-3: one parameter gathered at a time (16-bit, the model's dtype);
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

        # cpu_offload also keeps the full dict on rank 0 only; weights already on the CPU (gloo) need no offload,
        # and FSDP1's offload of CPU tensors crashes the process (SIGSEGV, torch 2.13 on CPU)
        offload = any(p.device.type != "cpu" for p in params)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        return state if rank == 0 else None
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if rank == 0 else None
