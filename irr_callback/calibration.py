"""Calibration data → padded batches of `input_ids` + `attention_mask`, capped in count and length."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


class CalibrationError(ValueError):
    """The calibration data cannot be used; the message says which column or batch."""


def calibration_batches(
    calibration: Any, *, max_samples: int, max_length: int, batch_size: int, pad_token_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Normalise a `datasets.Dataset`, a list of examples or an iterable of batches (a DataLoader).

    Keeps the first `max_samples` sequences, truncates each to `max_length` tokens, and builds an
    attention mask when none is given. Raises `CalibrationError` when no real token is left.
    """
    sequences = _sequences(calibration, max_samples)
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = [(ids[:max_length], mask[:max_length]) for ids, mask in sequences[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(chunk):
            input_ids[row, : len(ids)] = ids
            attention[row, : len(mask)] = mask
        batches.append({"input_ids": input_ids, "attention_mask": attention})
    if not batches or sum(int(b["attention_mask"].sum()) for b in batches) == 0:
        raise CalibrationError("calibration data has no tokens (empty, or attention_mask is all zeros)")
    return batches


def _sequences(calibration: Any, max_samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if calibration is None:
        raise CalibrationError("calibration data is required")
    try:
        import datasets

        if isinstance(calibration, datasets.Dataset):
            if "input_ids" not in calibration.column_names:
                raise CalibrationError(
                    f"calibration dataset has no 'input_ids' column (columns: "
                    f"{calibration.column_names}); tokenize it first"
                )
            calibration = calibration.select(range(min(max_samples, len(calibration))))
    except ImportError:  # pragma: no cover
        pass
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for item in _iterate(calibration):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise CalibrationError(
                f"calibration item #{len(out)} has no 'input_ids' "
                f"(got {type(item).__name__} with keys {list(item)[:5] if isinstance(item, Mapping) else '-'})"
            )
        ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        mask = item.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        if mask.shape != ids.shape:
            raise CalibrationError(
                f"calibration item #{len(out)}: attention_mask shape {tuple(mask.shape)} != "
                f"input_ids shape {tuple(ids.shape)}"
            )
        rows = [(ids, mask)] if ids.dim() == 1 else list(zip(ids, mask))
        for row_ids, row_mask in rows:
            keep = row_mask.bool()
            if not keep.any():
                continue
            # drop padding wherever it was (left or right): only real tokens are used and re-padded right
            out.append((row_ids[keep], row_mask[keep]))
            if len(out) >= max_samples:
                return out
    return out


def _iterate(calibration: Any) -> Iterable[Any]:
    if isinstance(calibration, Mapping):
        return [calibration]
    return calibration
