"""The default general prompts of the retain stream, when the user gives no retain data.

The retain stream protects what the model could already do: benign, everyday requests (writing, maths,
code, science, history, cooking, language, advice, reasoning, ...). Online: the instructions of
Databricks' Dolly 15k (CC BY-SA 3.0) that need no context passage, loaded with `datasets` by hub id.
Offline (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`), or when the hub cannot be reached: 120 prompts over
12 categories shipped inside the package (`resources/general_prompts.jsonl`, written for this project,
Apache-2.0). The selection is deterministic like the harmful prompts' (`safety_prompts.select`).
"""

from __future__ import annotations

from transformers.utils import logging

from .safety_prompts import HUB_SPLIT, PromptSet, hub_offline, prompt_set, shipped_rows


logger = logging.get_logger(__name__)

#: the hub set used online: Dolly 15k's instructions without a context passage
HUB_DATASET = "databricks/databricks-dolly-15k"
HUB_COLUMN = "instruction"
HUB_CONTEXT_COLUMN = "context"
HUB_LICENSE = "CC-BY-SA-3.0"
#: the set shipped inside the package, used offline or when the hub cannot be reached
SHIPPED_FILE = "resources/general_prompts.jsonl"
SHIPPED_NAME = "irr_callback/" + SHIPPED_FILE
SHIPPED_LICENSE = "Apache-2.0"


def shipped_general_prompts(num_prompts: int | None = None, *, seed: int = 0, fallback_reason: str | None = None):
    """The general prompts shipped inside the package (no network)."""
    every = [r["prompt"] for r in shipped_rows(SHIPPED_FILE)]
    return prompt_set(
        every,
        num_prompts,
        seed,
        "all",
        name=SHIPPED_NAME,
        source="shipped",
        license=SHIPPED_LICENSE,
        fallback_reason=fallback_reason,
    )


def hub_general_prompts(num_prompts: int | None = None, *, seed: int = 0, dataset_id: str = HUB_DATASET) -> PromptSet:
    """The hub set (instructions with an empty context passage), loaded with `datasets.load_dataset`;
    raises when it cannot be loaded."""
    import datasets

    data = datasets.load_dataset(dataset_id, split=HUB_SPLIT)
    if HUB_COLUMN not in data.column_names:
        raise KeyError(f"hub dataset '{dataset_id}' has no column '{HUB_COLUMN}' (columns: {data.column_names})")
    contexts = data[HUB_CONTEXT_COLUMN] if HUB_CONTEXT_COLUMN in data.column_names else [""] * len(data)
    every = [str(p) for p, c in zip(data[HUB_COLUMN], contexts) if not (c or "").strip()]
    chosen = prompt_set(every, num_prompts, seed, "all", name=dataset_id, source="hub", license=HUB_LICENSE)
    if not chosen.prompts:
        raise ValueError(f"hub dataset '{dataset_id}' gave no usable prompt")
    return chosen


def load_general_prompts(num_prompts: int | None = 64, *, seed: int = 0, online: bool | None = None) -> PromptSet:
    """The default general prompts: the hub set online, the shipped set offline (`online=False`, the HF
    offline variables) or when loading the hub set fails (logged and recorded as the fallback reason)."""
    if online is None:
        online = not hub_offline()
    if not online:
        chosen = shipped_general_prompts(num_prompts, seed=seed, fallback_reason="offline")
    else:
        try:
            chosen = hub_general_prompts(num_prompts, seed=seed)
        except Exception as exc:  # the hub is optional: any failure falls back to the shipped set
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning(
                f"IRR: could not load the hub general prompts '{HUB_DATASET}' ({reason}); using the shipped set"
            )
            chosen = shipped_general_prompts(num_prompts, seed=seed, fallback_reason=reason)
    logger.info(f"IRR: default retain prompts: {len(chosen.prompts)} from {chosen.name} ({chosen.license})")
    return chosen
