"""Local path or Hub id: the one rule that tells them apart, shared by the inputs (datasets, models),
the outputs (the model card's `base_model`) and the CLI; and `portable_paths`, which keeps this machine's
paths out of what is written into an output (`IRRReport.save`, the callback's card notes)."""

from __future__ import annotations

import os
from typing import Any


# Suffixes that make a name a file the user means on this machine, never a hub id.
LOCAL_SUFFIXES = (
    ".json",
    ".jsonl",
    ".csv",
    ".tsv",
    ".txt",
    ".parquet",
    ".arrow",
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".pkl",
    ".yaml",
    ".yml",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
)


def looks_like_local_path(path: Any) -> bool:
    """True for what a user means as a local path: it starts with `.`, `/` or `~`, has more than one `/`, ends in a
    file extension (`data/x.jsonl`), or its first part is a directory that exists here (`models/nope` next to a
    `models/` folder). Anything else (`org/name`) may be a hub id."""
    text = os.fspath(path)
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or "\\" in text:
        return True
    if text.count("/") > 1 or text.lower().endswith(LOCAL_SUFFIXES):
        return True
    head = text.split("/", 1)[0]
    return "/" in text and bool(head) and os.path.isdir(head)


def portable_paths(value: Any, root: str) -> Any:
    """`value` (JSON-like) with every absolute or home-relative path replaced: relative to `root` when inside
    it (`_irr/irr_report.json`), else its last component (a cache file's name, a dataset file's name)."""
    if isinstance(value, dict):
        return {k: portable_paths(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, root) for v in value]
    if not isinstance(value, str) or not (os.path.isabs(value) or value.startswith("~")):
        return value
    path = os.path.abspath(os.path.expanduser(value))
    root = os.path.abspath(root)
    if os.path.commonpath([path, root]) == root:
        return os.path.relpath(path, root)
    return os.path.basename(os.path.normpath(path)) or value
