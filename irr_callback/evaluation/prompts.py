"""Load evaluation prompts from a hub dataset, a local file, a ``Dataset`` or a list."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers.utils import logging


logger = logging.get_logger(__name__)

_FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet")


def _column(rows: Any, column: str, origin: str) -> list[str]:
    """Pull ``column`` out of a Dataset / list of dicts / dict of lists, with a clear error."""
    if isinstance(rows, Dataset):
        if column not in rows.column_names:
            raise KeyError(f"Column {column!r} not found in {origin}; available columns: {rows.column_names}")
        return [str(x) for x in rows[column]]
    if isinstance(rows, dict):
        if column not in rows:
            raise KeyError(f"Column {column!r} not found in {origin}; available keys: {sorted(rows)}")
        return [str(x) for x in rows[column]]
    out: list[str] = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict):
            if column not in row:
                raise KeyError(f"Column {column!r} not found in {origin} (record {i}); keys: {sorted(row)}")
            out.append(str(row[column]))
        else:
            raise TypeError(f"Record {i} of {origin} is {type(row).__name__}, expected a str or an object")
    return out


def _read_file(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    origin = f"file {str(path)!r}"
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return _column(records, column, origin)
    if suffix == ".json":
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and column not in data:
            # {"data": [...]} style wrappers: take the single list-valued entry.
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1 and lists[0] and isinstance(lists[0][0], (dict, str)):
                data = lists[0]
        return _column(data, column, origin)
    if suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    if suffix in (".csv", ".parquet"):
        from datasets import load_dataset

        ds = load_dataset(suffix[1:], data_files=str(path), split="train")
        return _column(ds, column, origin)
    raise ValueError(f"Unsupported prompt file type {suffix!r} for {path}; use one of {_FILE_SUFFIXES}")


def load_prompts(
    source: str | os.PathLike[str] | Dataset | DatasetDict | Iterable[str],
    column: str = "prompt",
    *,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
    **load_kwargs: Any,
) -> list[str]:
    """Prompts as a list of strings.

    ``source`` may be: a list of strings; a ``datasets.Dataset`` (or ``DatasetDict``, ``split`` is
    used); a local ``.json`` (list of objects/strings, or dict of columns), ``.jsonl``, ``.txt``
    (one prompt per line), ``.csv`` or ``.parquet`` file; or a Hub dataset id, loaded with
    ``datasets.load_dataset(source, name, split=split, **load_kwargs)``. ``limit`` keeps the first
    ``limit`` prompts.
    """
    if isinstance(source, DatasetDict):
        if split not in source:
            raise KeyError(f"Split {split!r} not in DatasetDict; available splits: {list(source)}")
        source = source[split]
    if isinstance(source, Dataset):
        prompts = _column(source, column, "dataset")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            prompts = _read_file(path, column)
        elif path.suffix.lower() in _FILE_SUFFIXES or path.is_dir() or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"Prompt file not found: {str(path)!r}")
        else:
            from datasets import load_dataset

            logger.info(f"Loading prompts from the Hub dataset {source!r} (split {split!r})")
            ds = load_dataset(str(source), name, split=split, **load_kwargs)
            prompts = _column(ds, column, f"dataset {source!r}")
    else:
        items = list(source)
        if not all(isinstance(x, str) for x in items):
            raise TypeError("A prompt list must contain only strings.")
        prompts = items
    if limit is not None:
        prompts = prompts[:limit]
    return prompts
