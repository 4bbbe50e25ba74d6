"""Batched generation for evaluation: left padding, chat template, progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..inputs.data import padding_id


logger = logging.get_logger(__name__)

Prompt = str | list[dict[str, str]]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    use_chat_template: bool | None = None,
    add_generation_prompt: bool = True,
    system_prompt: str | None = None,
) -> tuple[list[str], bool]:
    """Render prompts to text. Returns ``(texts, templated)``; templated texts already carry the
    template's special tokens, so they must be tokenized with ``add_special_tokens=False`` (else BOS
    is doubled)."""
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template and not _has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template.")
    texts: list[str] = []
    for p in prompts:
        if not use_chat_template:
            if not isinstance(p, str):
                raise TypeError("Conversations (lists of messages) need a tokenizer chat template.")
            texts.append(p)
            continue
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system_prompt is not None and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        texts.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )
    return texts, bool(use_chat_template)


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    use_chat_template: bool | None = None,
    do_sample: bool = False,
    progress: bool = True,
    system_prompt: str | None = None,
    add_generation_prompt: bool = True,
    sort_by_length: bool = True,
    inference_mode: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate one response per prompt (same order as ``prompts``).

    Left padding so every row's last token is its prompt's last token (right padding would make
    the model continue after pad tokens). Prompts are grouped by length to waste less compute on
    padding; the output order is restored. ``use_chat_template=None`` uses the tokenizer's chat
    template when it has one. ``inference_mode=False``: plain no-grad instead of inference mode, for models
    that keep buffers across calls and are trained afterwards (FSDP2's all-gather buffers would become inference
    tensors). Extra keyword arguments go to ``model.generate``.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    texts, templated = format_prompts(
        tokenizer,
        prompts,
        use_chat_template=use_chat_template,
        add_generation_prompt=add_generation_prompt,
        system_prompt=system_prompt,
    )
    pad_id = padding_id(tokenizer, default=None)
    if pad_id is None:
        raise ValueError("Tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token.")
    encoded = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i])) if sort_by_length else list(range(len(encoded)))

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id)
    if tokenizer.eos_token_id is not None:
        gen_kwargs["eos_token_id"] = tokenizer.eos_token_id
    if not do_sample:
        # Silence "temperature is set but do_sample=False" when a model ships sampling defaults.
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    gen_kwargs.update(generate_kwargs)

    results: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for idx in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            with torch.inference_mode() if inference_mode else torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **gen_kwargs
                )
            new_tokens = out[:, width:]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, i in enumerate(idx):
                results[i] = decoded[row].strip()
    finally:
        if was_training:
            model.train()
    return results
