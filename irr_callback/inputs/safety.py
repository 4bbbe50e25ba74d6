"""The two safety inputs of IRR: the safety vector v = W_aligned − W_unaligned and the Fisher importance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .. import distributed
from ..tensors import as_tensor_mapping, canonical_name, tensor_shape


logger = logging.get_logger(__name__)


def safety_vector(
    aligned: Any,
    unaligned: Any,
    *,
    names: Sequence[str] | None = None,
    sign_only: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The safety vector v = W_aligned − W_unaligned, one tensor at a time.

    The unaligned model is the aligned one fine-tuned on harmful data: v points from "harmful" back
    to "safe", and IRR removes the fine-tuning deltas whose sign conflicts with it.

    Args:
        aligned: the aligned (base) model, a name → tensor mapping or a safetensors path.
        unaligned: the unaligned model, in the same forms.
        names: the parameters to compute (default: every floating-point tensor the two have in common).
        sign_only: keep int8 signs (1 byte per entry): all IRR ever uses is sign(v), whatever the
            remove_ratio; baselines such as RESTA need the values.
        dtype: dtype of the values (default: the aligned tensor's); ignored with `sign_only`.

    Returns:
        A name → tensor dict keyed like `model.named_parameters()`.

    Example:

    ```python
    >>> from irr_callback import safety_vector
    >>> v = safety_vector("aligned/model.safetensors", unaligned_model, sign_only=True)
    ```
    """
    a_map = as_tensor_mapping(aligned, what="aligned")
    u_map = as_tensor_mapping(unaligned, what="unaligned")
    keys = list(names) if names is not None else [k for k in a_map if k in u_map]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        for label, mapping in (("aligned", a_map), ("unaligned", u_map)):
            if key not in mapping:
                raise KeyError(f"{label} model has no parameter '{key}'")
        if tensor_shape(a_map, key) != tensor_shape(u_map, key):
            raise ValueError(
                f"'{key}': aligned shape {tensor_shape(a_map, key)} != unaligned shape "
                f"{tensor_shape(u_map, key)} (different architectures?)"
            )
        a, u = a_map[key], u_map[key]
        if not a.is_floating_point():
            continue
        diff = a.detach().float().cpu() - u.detach().float().cpu()
        if sign_only:
            out[key] = torch.sign(diff).to(torch.int8)
        else:
            out[key] = diff.to(dtype or a.dtype)
    if not out:
        raise ValueError("the aligned and unaligned models share no floating-point parameter")
    return out


def fisher(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    names: Sequence[str] | None = None,
    max_batches: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher F = mean over mini-batches of (∇ mean loss)², as the IRR reference computes it.

    The importance IRR ranks sign conflicts by when `remove_ratio` < 1, computed on the aligned model
    with safety data (harmful prompts, safe responses). The model is left as found: grads None, the
    same train/eval mode, the same `requires_grad` flags. Inside a process group every rank passes the
    same batches; each takes its share (padding with zero-weight batches) and the raw sums Σ grad² and
    batch counts are summed over ranks.

    Args:
        model: the aligned model (unwrapped: not DDP, FSDP or ZeRO-3).
        batches: mini-batches with `input_ids`, `attention_mask` and `labels` (-100 on tokens that carry
            no loss: prompt, padding); the loss is on the labelled (response) tokens only.
        names: the parameters to compute (default: every floating-point parameter).
        max_batches: stop after this many batches.
        dtype: dtype of the result.
        progress: show a progress bar.

    Returns:
        A name → tensor dict keyed like `model.named_parameters()`.

    Example:

    ```python
    >>> from irr_callback import fisher
    >>> importance = fisher(base_model, safety_loader, names=[n for n, _ in base_model.named_parameters()])
    ```
    """
    sharded = distributed.is_distributed()
    if sharded:
        distributed.check_local_gradients(model)
        batches, max_batches = distributed.shard_fisher_batches(batches, max_batches), None
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    wanted = list(names) if names is not None else [n for n, p in params.items() if p.is_floating_point()]
    missing = [n for n in wanted if n not in params]
    if missing:
        raise KeyError(f"fisher: the model has no parameter(s) {missing[:3]}")
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in wanted}
    count = 0
    device = next(model.parameters()).device
    model.eval()  # no dropout: the Fisher of the deterministic model
    try:
        for p in params.values():
            p.requires_grad_(False)
        for n in wanted:
            params[n].requires_grad_(True)
        for batch in logging.tqdm(batches, desc="Fisher", disable=not progress):
            if max_batches is not None and count >= max_batches:
                break
            if "labels" not in batch:
                raise ValueError("fisher: every batch needs 'labels' (-100 on prompt and padding tokens)")
            if int((torch.as_tensor(batch["labels"]) != -100).sum()) == 0:
                raise ValueError(f"fisher: batch #{count} has no labelled token")
            model.zero_grad(set_to_none=True)
            inputs = {
                k: torch.as_tensor(batch[k]).to(device)
                for k in ("input_ids", "attention_mask", "labels")
                if k in batch
            }
            loss = model(**inputs, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fisher: non-finite loss on batch #{count}")
            weight = float(batch.get("irr_weight", 1.0))  # 0 on padding batches of a process group
            (loss * weight if weight != 1.0 else loss).backward()
            for n in wanted:
                grad = params[n].grad
                if grad is not None:
                    sums[n].add_(grad.detach().float().square())
            count += 1 if weight else 0
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if sharded:
        count = distributed.reduce_fisher_(sums, count)
    if count == 0:
        raise ValueError("fisher: no batch was given")
    logger.info(f"Fisher importance from {count} mini-batches over {len(wanted)} parameters")
    return {n: (s / count).to(dtype).cpu() for n, s in sums.items()}


def fisher_from_pairs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """`fisher` on prompt / response pairs (harmful prompts, safe responses): the loss on the response
    tokens only, batches of `batch_size` padded with the tokenizer's padding id. The one place the
    callback, `irr apply --safety-data` and `irr fisher` turn such data into importance. Returns the
    importance and the number of pairs used (pairs whose response was truncated away carry no loss)."""
    from .data import batches, padding_id, tokenize_pairs

    examples = tokenize_pairs(tokenizer, list(prompts), list(responses), max_length=max_length)
    scores = fisher(
        model, batches(examples, batch_size, padding_id(tokenizer)), names=names, dtype=dtype, progress=progress
    )
    return scores, len(examples)
