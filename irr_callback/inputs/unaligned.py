"""Build the unaligned model the way the IRR authors did: a short fine-tune of the aligned base on
harmful prompt → harmful answer pairs, and return sign(v), v = W_A − W_U, for the targets.

The fine-tune runs on the live model itself, not on a copy (at 7B-70B a copy is a second model in
memory): its PEFT adapter, if any, is taken out (`unload`, as the old copy did), a temporary LoRA
adapter is put on the frozen base (v = −ΔW_LoRA), and on the way out, error or not, everything is put
back: the same module tree, the same Parameter objects (the Trainer's optimizer holds them), values,
`requires_grad` flags, gradients and train/eval modes. A full harmful fine-tune (`unaligned_lora_rank=0`)
trains the live weights in place and restores them from a CPU copy of every parameter (host memory
instead of a second model on the accelerator). Weights sharded by FSDP/ZeRO-3 cannot take a temporary
adapter here: they keep the former path, a deep copy of the model. All of it runs inside
`torch.random.fork_rng`, so the training run's random stream is the same with or without it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import logging

from .. import distributed
from ..config import IRRConfig
from ..pipeline.memory import release_free_memory
from ..targets import Target, unwrap
from .data import batches as make_batches


logger = logging.get_logger(__name__)

ADAPTER = "irr_harmful"  # the temporary adapter's name (never saved)
_MISSING = object()


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the base model without any PEFT wrapper (adapters dropped, not merged).
    Only for sharded weights, where no temporary adapter can be injected in place."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "peft_config") and hasattr(clone, "unload"):
        clone = clone.unload()
    return unwrap(clone)


def _peft_wrapper(model: nn.Module) -> nn.Module | None:
    """The PeftModel (under a DDP wrapper or not) whose `unload()` gives the plain base, else None."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = inner
    return model if hasattr(model, "peft_config") and hasattr(model, "unload") else None


@contextmanager
def live_base(model: nn.Module, *, keep_values: bool) -> Iterator[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """(plain base, {name: CPU copy}) of the live `model`, to fine-tune in place; left exactly as found.

    The PEFT adapter is unloaded (not merged) so the base alone is trained, as on the former copy.
    On exit every module of the original tree gets back its children and parameters (the same
    objects), every parameter its `requires_grad` and `.grad`, every module its train/eval mode, the
    root its `peft_config` attribute (which peft deletes on unload and sets on injection). With
    `keep_values` every parameter is first copied to the CPU and copied back on exit (a full harmful
    fine-tune writes them); the copies are the dict yielded. Without, the dict is empty: a frozen base
    under a LoRA adapter is never written."""
    root = unwrap(model)
    modules = list(model.modules())
    tree = [(m, dict(m._modules), dict(m._parameters)) for m in modules]
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in modules]
    peft_config = root.__dict__.get("peft_config", _MISSING)
    copies: dict[int, torch.Tensor] = {}
    try:
        wrapper = _peft_wrapper(model)
        plain = wrapper.unload() if wrapper is not None else root
        before: dict[str, torch.Tensor] = {}
        if keep_values:
            for p in params:  # the adapter's own weights too: unload may put a modules_to_save copy in the tree
                copies[id(p)] = p.detach().to("cpu", copy=True)
            before = {n: copies[id(p)] for n, p in plain.named_parameters() if id(p) in copies}
        yield plain, before
    finally:
        for m, children, own in tree:
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(own)
        with torch.no_grad():
            for p in params:
                if id(p) in copies:
                    p.copy_(copies[id(p)])
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in modes:
            m.training = training
        root.__dict__.pop("peft_config", None)
        if peft_config is not _MISSING:
            root.__dict__["peft_config"] = peft_config


def _add_lora(plain: nn.Module, module_names: list[str], rank: int) -> None:
    """A LoRA adapter on `module_names` of `plain`, initialised and cast exactly as `get_peft_model` does
    (same modules in the same order: the same random draws), without a PeftModel around the live model."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    tuner = LoraModel(
        plain,
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=module_names),
        ADAPTER,
    )
    tuner._cast_adapter_dtype(adapter_name=ADAPTER, autocast_adapter_dtype=True)  # as PeftModel.__init__ does


def _checkpointing(model: nn.Module) -> bool:
    """Gradient (activation) checkpointing is on: transformers 5 renamed the flag and warns on the old name."""
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, flag, False))


def _finetune(
    plain: nn.Module,
    before: dict[str, torch.Tensor],
    examples: list[dict],
    names: dict[str, str],
    config: IRRConfig,
    pad_token_id: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Fine-tune `plain` (modified: an adapter added, or every weight trained) and read sign(v) per target.
    `before`: the targets' values before (CPU), needed by a full fine-tune."""
    if config.unaligned_lora_rank == 0:
        plain.requires_grad_(True)  # the base of a PeftModel comes frozen: a full fine-tune trains it all
    else:
        _add_lora(plain, sorted(set(names.values())), config.unaligned_lora_rank)
    hook = None
    if _checkpointing(plain):  # a frozen embedding would cut reentrant checkpoints' grads
        hook = plain.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        params = [p for p in plain.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.unaligned_learning_rate, weight_decay=0.0)
        data = make_batches(examples, config.unaligned_batch_size, pad_token_id)
        device = next(plain.parameters()).device
        plain.train()
        loss = torch.tensor(float("nan"))
        for _, batch in zip(
            logging.tqdm(range(config.unaligned_steps), desc="IRR harmful fine-tune", disable=not progress),
            itertools.cycle(data),
        ):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = plain(**batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError("harmful fine-tune: non-finite loss (lower unaligned_learning_rate)")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del optimizer
    finally:
        if hook is not None:
            hook.remove()
    logger.info(f"IRR: harmful fine-tune done ({config.unaligned_steps} steps, final loss {loss.item():.4f})")
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if config.unaligned_lora_rank > 0:
            lora = {n: m for n, m in plain.named_modules() if hasattr(m, "get_delta_weight")}
            for name, module_name in names.items():
                delta = lora[module_name].get_delta_weight(ADAPTER).float().cpu()
                out[name] = torch.sign(-delta).to(torch.int8)
        else:
            trained = dict(plain.named_parameters())
            for name in names:
                out[name] = torch.sign(before[name].float() - trained[name].detach().float().cpu()).to(torch.int8)
    return out


def harmful_finetune_vector(
    model: nn.Module,
    examples: list[dict],
    targets: list[Target],
    config: IRRConfig,
    *,
    pad_token_id: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """sign(v) (int8) for every target, from `config.unaligned_steps` steps on `examples` (`progress`: a bar).
    `model` (plain or PeftModel) is fine-tuned in place and left exactly as it was (see `live_base`)."""
    if not examples:
        raise ValueError("harmful_dataset: no example to fine-tune on")
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    names = {t.name: t.name.rsplit(".", 1)[0] for t in targets}  # parameter → module name
    full = config.unaligned_lora_rank == 0
    args = (examples, names, config, pad_token_id, progress)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.irr_seed)
        sharded = distributed.sharding_kind(model, targets)
        if sharded:  # no adapter can be injected into sharded weights here: the former copy
            logger.warning(f"IRR: weights sharded by {sharded}: the harmful fine-tune runs on a copy of the model")
            student = plain_copy(model)
            weights = dict(student.named_parameters())
            before = {n: weights[n].detach().to("cpu", copy=True) for n in names} if full else {}
            out = _finetune(student, before, *args)
            del student, weights, before
        else:
            with live_base(model, keep_values=full) as (plain, before):
                out = _finetune(plain, before, *args)
    release_free_memory()  # its activations and optimizer state: the training run starts from a trimmed heap
    return out
