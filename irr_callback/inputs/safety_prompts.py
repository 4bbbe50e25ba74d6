"""The default harmful prompts of the safety stream, when the user gives no safety data.

Online: AdvBench's harmful behaviours (Zou et al. 2023, MIT license), loaded with `datasets` by its
hub id, pinned below (`HUB_DATASET`, `HUB_REVISION`, column `HUB_COLUMN`). Offline (`HF_HUB_OFFLINE`
or `HF_DATASETS_OFFLINE` set), or when the hub cannot be reached: 140 requests over 14 harm
categories shipped inside the package (`resources/harmful_prompts.jsonl`, written for this project,
Apache-2.0). Either way the same `split`, `seed` and `num_prompts` give the same prompts in the same
order (the order is a hash of seed and prompt, not a random generator), and the returned
`PromptSet.describe()` says which set was used, how many prompts it gave, and why the hub was not used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

#: the hub dataset of harmful instructions used online: AdvBench's 520 harmful behaviours (MIT)
HUB_DATASET = "walledai/AdvBench"
#: the dataset revision loaded (a commit of the hub repository), so the same data comes every time
HUB_REVISION = "9d4730540082fa4017450b65ca1c0e1d8d30446e"
HUB_SPLIT = "train"
HUB_COLUMN = "prompt"
HUB_LICENSE = "MIT"
#: the set shipped inside the package, used offline or when the hub cannot be reached
SHIPPED_FILE = "resources/harmful_prompts.jsonl"
SHIPPED_NAME = "irr_callback/" + SHIPPED_FILE
SHIPPED_LICENSE = "Apache-2.0"
SPLITS = ("all", "train", "test")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class PromptSet:
    """Harmful prompts and where they came from (what the log, the report and the cache key record)."""

    prompts: list[str]
    name: str  # the hub id, or SHIPPED_NAME
    source: str  # "hub" or "shipped"
    license: str
    available: int  # prompts in the chosen split before `num_prompts` was applied
    seed: int = 0
    split: str = "all"
    revision: str | None = None
    fallback_reason: str | None = None  # why the shipped set was used instead of the hub one

    def describe(self) -> dict[str, Any]:
        out = {
            "set": self.name,
            "origin": self.source,  # "hub" or "shipped"
            "license": self.license,
            "prompts": len(self.prompts),
            "available": self.available,
            "seed": self.seed,
            "split": self.split,
        }
        if self.revision:
            out["revision"] = self.revision
        if self.fallback_reason:
            out["fallback_reason"] = self.fallback_reason
        return out


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set to a true value."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARIABLES)


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def select(prompts: list[str], num_prompts: int | None = None, *, seed: int = 0, split: str = "all") -> list[str]:
    """A deterministic subset: `split` "test" is a fixed ~20% of the prompts (by a hash of the text),
    "train" the rest, "all" every prompt; they are ordered by a hash of (seed, prompt) and the first
    `num_prompts` kept. Duplicates and empty prompts are dropped."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_prompts is not None and (not isinstance(num_prompts, int) or num_prompts < 1):
        raise ValueError(f"num_prompts must be None or an integer >= 1, got {num_prompts!r}")
    unique = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if split != "all":
        in_test = {p: int(_rank(-1, p)[:8], 16) % 5 == 0 for p in unique}
        unique = [p for p in unique if in_test[p] == (split == "test")]
    ordered = sorted(unique, key=lambda p: _rank(seed, p))
    return ordered if num_prompts is None else ordered[:num_prompts]


def shipped_rows(file: str = SHIPPED_FILE) -> list[dict[str, str]]:
    """Every row of a file shipped in the package (default: the harmful prompts): `id`, `category`, `prompt`."""
    text = resources.files("irr_callback").joinpath(file).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def shipped_prompts(
    num_prompts: int | None = None, *, seed: int = 0, split: str = "all", fallback_reason: str | None = None
) -> PromptSet:
    """The set shipped inside the package (no network)."""
    every = [r["prompt"] for r in shipped_rows()]
    return prompt_set(
        every,
        num_prompts,
        seed,
        split,
        name=SHIPPED_NAME,
        source="shipped",
        license=SHIPPED_LICENSE,
        fallback_reason=fallback_reason,
    )


def hub_prompts(
    num_prompts: int | None = None,
    *,
    seed: int = 0,
    split: str = "all",
    dataset_id: str = HUB_DATASET,
    revision: str | None = HUB_REVISION,
    column: str = HUB_COLUMN,
) -> PromptSet:
    """The hub set, loaded with `datasets.load_dataset` (raises when it cannot be loaded)."""
    import datasets

    data = datasets.load_dataset(dataset_id, split=HUB_SPLIT, revision=revision)
    if column not in data.column_names:
        raise KeyError(f"hub dataset '{dataset_id}' has no column '{column}' (columns: {data.column_names})")
    every = [str(p) for p in data[column]]
    license = HUB_LICENSE if dataset_id == HUB_DATASET else "see the dataset card"
    chosen = prompt_set(
        every, num_prompts, seed, split, name=dataset_id, source="hub", license=license, revision=revision
    )
    if not chosen.prompts:
        raise ValueError(f"hub dataset '{dataset_id}' gave no usable prompt in split '{split}'")
    return chosen


def prompt_set(every: list[str], num_prompts: int | None, seed: int, split: str, **fields: Any) -> PromptSet:
    """`num_prompts` of `every` (see `select`), and how many the split had."""
    available = len(select(every, None, seed=seed, split=split))
    return PromptSet(
        select(every, num_prompts, seed=seed, split=split), available=available, seed=seed, split=split, **fields
    )


def load_default_prompts(
    num_prompts: int | None = 128, *, seed: int = 0, split: str = "all", online: bool | None = None
) -> PromptSet:
    """The default harmful prompts: the hub set online, the shipped set offline (`online=False`,
    `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` set) or when loading the hub set fails for any reason
    (no connection, dataset gone, ...); the fallback and its reason are logged and recorded."""
    if online is None:
        online = not hub_offline()
    if not online:
        chosen = shipped_prompts(num_prompts, seed=seed, split=split, fallback_reason="offline")
    else:
        try:
            chosen = hub_prompts(num_prompts, seed=seed, split=split)
        except Exception as exc:  # the hub is optional: any failure falls back to the shipped set
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning(
                f"IRR: could not load the hub safety prompts '{HUB_DATASET}' ({reason}); using the shipped set"
            )
            chosen = shipped_prompts(num_prompts, seed=seed, split=split, fallback_reason=reason)
    if num_prompts is not None and len(chosen.prompts) < num_prompts:
        logger.info(f"IRR: asked for {num_prompts} safety prompts, '{chosen.name}' has {len(chosen.prompts)}")
    logger.info(f"IRR: default safety prompts: {len(chosen.prompts)} from {chosen.name} ({chosen.license})")
    return chosen
