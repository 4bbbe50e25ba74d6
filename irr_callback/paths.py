"""Local path or Hub id: the one rule that tells them apart, shared by the inputs (datasets, models),
the outputs (the model card's `base_model`) and the CLI."""

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
