"""The realigned model's output directory, saved from a model in memory (the callback, `irr apply`,
`irr demo`).

`saving.write_output` puts what it is given into a directory (model, tokenizer, `irr_report.json`,
model card); `save_realigned` is its sharding-aware, atomic form: every rank calls it, the full state dict
is gathered where the weights are sharded, and the main process writes into a temp directory that
replaces `output_dir` only once complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.collectives import is_distributed, raise_if_any_failed, rank_and_world
from ..distributed.save import full_state_dict
from ..saving import atomic_directory, write_output
from ..targets import unwrap


def save_realigned(
    model: torch.nn.Module | None,
    output_dir: str,
    *,
    processing_class: Any = None,
    report: Any = None,
    card: Any = None,
    extra: Callable[[str], None] | None = None,
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Save the (realigned) model as a plain `from_pretrained` directory, correctly under any backend.

    Call on EVERY rank (gathering is collective). A barrier first (every rank has finished writing),
    then the main process writes `write_output` (+ `extra(tmp)`, e.g. a LoRA adapter) into a temporary
    directory next to `output_dir` and renames it into place (`saving.atomic_directory`), so a reader
    never sees a half-written directory; a final flag reduction returns only once it is there, and
    raises on every rank if the write failed. ZeRO-3 under the Trainer / accelerate: this gathers
    parameter by parameter, so `zero3_save_16bit_model` is not required. `model=None`: no model
    weights (e.g. only an adapter, written by `extra`). `rename`: the state dict (gathered, or the
    local one's views) is saved as `rename(state)`, e.g. a PeftModel's realigned frozen weights under the
    plain model's names (`peft_utils.merged_state_dict`): the merged model without a second model.
    """
    distributed = is_distributed()
    if distributed:
        dist.barrier()
    state = full_state_dict(model) if distributed and model is not None else None
    error: BaseException | None = None
    if rank_and_world()[0] == 0:
        try:
            if rename is not None and model is not None:
                state = rename(state if state is not None else unwrap(model).state_dict())
            with atomic_directory(output_dir) as tmp:
                write_output(
                    tmp, model=model, state_dict=state, processing_class=processing_class, report=report, card=card
                )
                if extra is not None:
                    extra(tmp)
        except Exception as exc:  # agreed on below: the other ranks must not wait forever
            error = exc
    if distributed:
        raise_if_any_failed(error)  # also the final barrier: returns once the directory is in place
    elif error is not None:
        raise error
