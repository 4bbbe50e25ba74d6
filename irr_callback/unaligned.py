"""Build the unaligned model the way the IRR authors did: a short fine-tune of the aligned base on
harmful prompt → harmful answer pairs, and return v = W_A − W_U for the targets.

Works on a copy of the base (the model being trained is never touched) and inside
`torch.random.fork_rng`, so the training run's random stream is the same with or without it.
With a LoRA harmful fine-tune (the default) v = −ΔW_LoRA of that adapter.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from transformers.utils import logging

from .config import IRRConfig
from .data import batches as make_batches
from .targets import Target, unwrap


logger = logging.get_logger(__name__)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the base model without any PEFT wrapper (adapters dropped, not merged)."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "peft_config") and hasattr(clone, "unload"):
        clone = clone.unload()
    return unwrap(clone)


def harmful_finetune_vector(
    model: nn.Module,
    examples: list[dict],
    targets: list[Target],
    config: IRRConfig,
    *,
    pad_token_id: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """sign(v) (int8) for every target, from `config.unaligned_steps` steps on `examples` (`progress`: a bar)."""
    if not examples:
        raise ValueError("harmful_dataset: no example to fine-tune on")
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.irr_seed)
        student = plain_copy(model)
        names = {t.name: t.name.rsplit(".", 1)[0] for t in targets}  # parameter → module name
        base = {n: dict(student.named_parameters())[n].detach().to("cpu", copy=True) for n in names}
        if config.unaligned_lora_rank == 0:
            student.requires_grad_(True)  # the base of a PeftModel comes frozen: a full fine-tune trains it all
        else:
            from peft import LoraConfig, get_peft_model

            student = get_peft_model(
                student,
                LoraConfig(
                    r=config.unaligned_lora_rank,
                    lora_alpha=2 * config.unaligned_lora_rank,
                    lora_dropout=0.0,
                    target_modules=sorted(set(names.values())),
                ),
            )
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.unaligned_learning_rate, weight_decay=0.0)
        data = make_batches(examples, config.unaligned_batch_size, pad_token_id)
        device = next(student.parameters()).device
        student.train()
        loss = torch.tensor(float("nan"))
        for _, batch in zip(
            logging.tqdm(range(config.unaligned_steps), desc="IRR harmful fine-tune", disable=not progress),
            itertools.cycle(data),
        ):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = student(**batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError("harmful fine-tune: non-finite loss (lower unaligned_learning_rate)")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        logger.info(f"IRR: harmful fine-tune done ({config.unaligned_steps} steps, final loss {loss.item():.4f})")
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if config.unaligned_lora_rank > 0:
                lora = {n: m for n, m in unwrap(student).named_modules() if hasattr(m, "get_delta_weight")}
                for name, module_name in names.items():
                    delta = lora[module_name].get_delta_weight("default").float().cpu()
                    out[name] = torch.sign(-delta).to(torch.int8)
            else:
                trained = dict(student.named_parameters())
                for name in names:
                    out[name] = torch.sign(base[name].float() - trained[name].detach().float().cpu()).to(torch.int8)
        del student, optimizer
    return out
