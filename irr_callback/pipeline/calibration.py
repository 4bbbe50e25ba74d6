"""Calibration data → padded batches of `input_ids` + `attention_mask`, capped in count and length."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


class CalibrationError(ValueError):
    """The calibration data cannot be used; the message says which column or batch."""


TOKEN_SELECTIONS = ("all", "response", "prompt", "answer")


def calibration_batches(
    calibration: Any,
    *,
    max_samples: int,
    max_length: int,
    batch_size: int,
    pad_token_id: int = 0,
    token_selection: str | None = None,
    what: str = "calibration",
    loss_mask: bool = False,
    answer_weight: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Normalise a `datasets.Dataset`, a list of examples or an iterable of batches (a DataLoader).

    Keeps the first `max_samples` sequences, truncates each to `max_length` tokens, and builds an
    attention mask when none is given. Raises `CalibrationError` when no real token is left.
    `token_selection` ('all', 'response', 'prompt' or 'answer') adds `irr_token_mask`: the real tokens
    whose `labels` are set ('response', -100 marks prompt tokens), unset ('prompt'), all of them, or the
    positions that predict a response token ('answer': where greedy decoding decides the answer); rows
    without `labels` count as all response. `what` names the input in errors. `loss_mask` adds
    `irr_loss_mask`: the response tokens, whose next-token loss judges a held-out batch. `answer_weight` k > 1
    counts each answer position k times in the mask (selected or not) and every other selected token once ('all'
    when no selection is given).
    """
    if token_selection is not None and token_selection not in TOKEN_SELECTIONS:
        raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
    if not isinstance(answer_weight, int) or answer_weight < 1:
        raise ValueError(f"answer_weight must be an integer >= 1, got {answer_weight!r}")
    if answer_weight > 1 and token_selection is None:
        token_selection = "all"
    sequences = _sequences(calibration, max_samples, what)
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = [
            (ids[:max_length], mask[:max_length], response[:max_length])
            for ids, mask, response in sequences[start : start + batch_size]
        ]
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        selected = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, mask, response) in enumerate(chunk):
            input_ids[row, : len(ids)] = ids
            attention[row, : len(mask)] = mask
            if token_selection is not None:
                answer = torch.zeros_like(response)  # the positions whose next token is a response token
                answer[:-1] = response[1:]
                keep = {"all": mask.bool(), "response": response, "prompt": ~response, "answer": answer}[
                    token_selection
                ]
                real = mask.bool()
                weight = (keep & real).long()
                if answer_weight > 1:
                    weight[answer & real] = answer_weight
                selected[row, : len(mask)] = weight
            scored[row, : len(mask)] = (response & mask.bool()).long()
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if token_selection is not None:
            batch["irr_token_mask"] = selected
        if loss_mask:
            batch["irr_loss_mask"] = scored
        batches.append(batch)
    key = "attention_mask" if token_selection is None else "irr_token_mask"
    if not batches or sum(int(b[key].sum()) for b in batches) == 0:
        detail = "" if token_selection is None else f" of the {token_selection!r} tokens"
        raise CalibrationError(f"{what} has no tokens{detail} (empty, attention_mask all zeros, or labels all -100)")
    return batches


def unbatch(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each row of `calibration_batches`' right-padded batches, its tensors cut to its real tokens."""
    rows = []
    for batch in batches:
        for r in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][r].sum())
            rows.append({key: value[r, :length] for key, value in batch.items()})
    return rows


def _sequences(
    calibration: Any, max_samples: int, what: str = "calibration"
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, is_response) per real sequence, padding dropped."""
    if calibration is None:
        raise CalibrationError(f"{what} data is required")
    try:
        import datasets

        if isinstance(calibration, datasets.Dataset):
            if "input_ids" not in calibration.column_names:
                raise CalibrationError(
                    f"{what} dataset has no 'input_ids' column (columns: "
                    f"{calibration.column_names}); tokenize it first"
                )
            calibration = calibration.select(range(min(max_samples, len(calibration))))
    except ImportError:  # pragma: no cover
        pass
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for item in _iterate(calibration):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise CalibrationError(
                f"{what} item #{len(out)} has no 'input_ids' "
                f"(got {type(item).__name__} with keys {list(item)[:5] if isinstance(item, Mapping) else '-'})"
            )
        ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        mask = item.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        labels = item.get("labels")
        labels = torch.zeros_like(ids) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        for label, t in (("attention_mask", mask), ("labels", labels)):
            if t.shape != ids.shape:
                raise CalibrationError(
                    f"{what} item #{len(out)}: {label} shape {tuple(t.shape)} != input_ids shape {tuple(ids.shape)}"
                )
        rows = [(ids, mask, labels)] if ids.dim() == 1 else list(zip(ids, mask, labels))
        for row_ids, row_mask, row_labels in rows:
            keep = row_mask.bool()
            if not keep.any():
                continue
            # drop padding wherever it was (left or right): only real tokens are used and re-padded right
            out.append((row_ids[keep], row_mask[keep], row_labels[keep] != -100))
            if len(out) >= max_samples:
                return out
    return out


def _iterate(calibration: Any) -> Iterable[Any]:
    if isinstance(calibration, Mapping):
        return [calibration]
    return calibration
