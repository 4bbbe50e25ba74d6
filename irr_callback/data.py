"""Datasets in, token batches out: hub ids, local json/jsonl, `datasets.Dataset` or lists of rows.

Two shapes of tokenized data are needed: calibration sequences (downstream text, no labels) and
supervised pairs (prompt → response, loss on the response tokens only) for the Fisher estimate
and the harmful fine-tune.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch


class DataError(ValueError):
    """A dataset is missing, unreadable or lacks a needed column; the message names it."""


def load_rows(source: Any, *, split: str = "train", what: str = "dataset"):
    """A `datasets.Dataset` from a hub id, a local .json/.jsonl/.csv/.parquet file, a Dataset or a list of dicts."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"{what}: no split '{split}' (splits: {list(source)})")
        return source[split]
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(r, dict) for r in source):
            raise DataError(f"{what}: a list of rows must be a non-empty list of dicts")
        return datasets.Dataset.from_list(list(source))
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"{what}: expected a path, a hub id, a datasets.Dataset or a list of dicts, "
                        f"got {type(source).__name__}")
    path = os.fspath(source)
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    ext = os.path.splitext(path)[1].lower()
    if ext in builders:
        if not os.path.isfile(path):
            raise DataError(f"{what}: file '{path}' does not exist")
        try:
            return datasets.load_dataset(builders[ext], data_files=path, split="train")
        except Exception as exc:
            raise DataError(f"{what}: cannot read '{path}' ({type(exc).__name__}: {exc})") from exc
    if os.path.isdir(path):
        try:
            return datasets.load_from_disk(path)
        except Exception:
            return datasets.load_dataset(path, split=split)
    if path.startswith((".", "/")) or os.sep in path and not _looks_like_hub_id(path):
        raise DataError(f"{what}: '{path}' does not exist")
    return datasets.load_dataset(path, split=split)  # a hub id: the user has the hub


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/"))


def require_columns(rows, columns: Sequence[str], *, what: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; it has {rows.column_names}")


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it at inference: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def tokenize_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                   max_length: int = 512) -> list[dict[str, list[int]]]:
    """Prompt → response examples with labels on the response (+ EOS) only; the prompt is -100."""
    eos = tokenizer.eos_token or ""
    rows = []
    for prompt, response in zip(prompts, responses):
        prompt_text = format_prompt(tokenizer, prompt)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(str(response) + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        if all(label == -100 for label in labels):
            continue  # the prompt filled the whole window: nothing to learn from
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def collate(rows: Sequence[dict[str, list[int]]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows; labels are padded with -100."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    if "labels" in rows[0]:
        out["labels"] = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        out["attention_mask"][i, :n] = 1
        if "labels" in out:
            out["labels"][i, :n] = torch.tensor(r["labels"])
    return out


def batched(rows: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    return [collate(rows[i:i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]


def calibration_rows(source: Any, tokenizer=None, *, max_samples: int, max_length: int = 512,
                     text_column: Optional[str] = None, prompt_column: str = "prompt",
                     response_column: str = "response") -> list[dict[str, list[int]]]:
    """The first `max_samples` downstream examples as token ids.

    Uses `input_ids` when present; otherwise a text column (`text_column`, or 'text') or
    prompt/response columns (rendered with the chat template) tokenized with `tokenizer`.
    """
    rows = load_rows(source, what="calibration data")
    rows = rows.select(range(min(max_samples, len(rows))))
    if len(rows) == 0:
        raise DataError("calibration data is empty")
    if "input_ids" in rows.column_names:
        return [{"input_ids": list(r["input_ids"])[:max_length]} for r in rows]
    if tokenizer is None:
        raise DataError("calibration data is not tokenized (no 'input_ids') and no tokenizer was given")
    column = text_column or ("text" if "text" in rows.column_names else None)
    if column is not None:
        require_columns(rows, [column], what="calibration data")
        texts = [str(t) for t in rows[column]]
    elif prompt_column in rows.column_names and response_column in rows.column_names:
        texts = [format_prompt(tokenizer, p) + str(r) + (tokenizer.eos_token or "")
                 for p, r in zip(rows[prompt_column], rows[response_column])]
    else:
        raise DataError(f"calibration data needs 'input_ids', a text column ('text' or --calibration-text-column) "
                        f"or '{prompt_column}'/'{response_column}' columns; it has {rows.column_names}")
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            out.append({"input_ids": ids})
    if not out:
        raise DataError("calibration data has no tokens after tokenization")
    return out
