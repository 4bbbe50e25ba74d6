"""Resolve the safety inputs of a run (safety vector, Fisher importance) and cache what was computed.

Safety vector, first source given wins: `safety_vector` file (ours, checked against the base) →
`unaligned_model` (streamed shard by shard) → `harmful_dataset` (a short harmful fine-tune of the base,
on the live model with a temporary adapter, see `unaligned`). Fisher: `fisher` file → computed on the base from `safety_dataset`. Computed results
are cached as our safetensors files under `<cache_dir>/<base fingerprint id>/`, keyed by the data and
the settings, so the next run on the same base reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .. import distributed
from ..config import IRRConfig, IRRConfigError
from ..targets import Target
from ..tensors import SafetensorsMapping
from .data import (
    check_local_path,
    data_fingerprint,
    load_examples,
    padding_id,
    require_columns,
    safety_pairs,
    tokenize_pairs,
)
from .irr_files import IRRFileError, fingerprint_id, load_irr_file, save_irr_file
from .safety import fisher_from_pairs
from .safety import safety_vector as compute_safety_vector


logger = logging.get_logger(__name__)


def cache_root(config: IRRConfig) -> str:
    return os.path.expanduser(config.cache_dir or os.environ.get("IRR_CACHE") or "~/.cache/irr_callback")


@dataclass
class Resolved:
    """A resolved input and where it came from (recorded in the IRR report)."""

    tensors: Mapping[str, torch.Tensor] | None
    source: str  # "safety_vector", "unaligned_model", "harmful_dataset", "fisher", "safety_dataset", "none"
    cached: bool = False
    path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "cached": self.cached, "path": self.path, **self.info}


@dataclass
class BaseContext:
    """What the resolvers need to know about the base (aligned) model of the run."""

    model: nn.Module  # the live model, still equal to the base at train begin
    targets: list[Target]
    base: Mapping[str, torch.Tensor]  # name → base tensor, covering at least the targets
    fingerprint: str
    name: str  # base model id/path, for metadata
    tokenizer: Any = None
    progress: bool = True  # progress bars (the Trainer's disable_tqdm, main process only)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cache_path(config: IRRConfig, ctx: BaseContext, kind: str, key: str) -> str:
    return os.path.join(cache_root(config), fingerprint_id(ctx.fingerprint), f"{kind}-{key}.safetensors")


def _cached(path: str, kind: str, ctx: BaseContext) -> SafetensorsMapping | None:
    if not os.path.isfile(path):
        return None
    try:
        mapping = load_irr_file(path, kind=kind, base=ctx.base)
    except (IRRFileError, ValueError) as exc:  # a stale or damaged cache entry is recomputed, not trusted
        logger.warning(f"IRR: ignoring cache file {path}: {exc}")
        return None
    if any(n not in mapping for n in ctx.names):
        return None
    return mapping


def _store(
    path: str, tensors: dict[str, torch.Tensor], kind: str, ctx: BaseContext, extra: dict
) -> SafetensorsMapping:
    save_irr_file(
        path,
        tensors,
        kind=kind,
        base_fingerprint=_file_fingerprint(ctx, tensors),
        base_model=ctx.name,
        extra={f"irr_callback.{k}": str(v) for k, v in extra.items()},
    )
    return SafetensorsMapping(path)


def _file_fingerprint(ctx: BaseContext, tensors: Mapping[str, torch.Tensor]) -> str:
    from .irr_files import fingerprint

    return fingerprint(ctx.base, tensors.keys())


def _check_covers(mapping: Mapping, ctx: BaseContext, what: str, path: str) -> None:
    missing = [n for n in ctx.names if n not in mapping]
    if missing:
        raise IRRFileError(
            f"{what} file '{path}' has no entry for target(s) {missing[:3]} "
            f"({len(missing)} of {len(ctx.names)} targets missing)"
        )


# ------------------------------------------------------------------------------------- safety vector
def resolve_safety_vector(config: IRRConfig, ctx: BaseContext) -> Resolved:
    if config.safety_vector:
        mapping = load_irr_file(config.safety_vector, kind="safety_vector", base=ctx.base)
        _check_covers(mapping, ctx, "safety_vector", config.safety_vector)
        return Resolved(
            mapping,
            "safety_vector",
            path=config.safety_vector,
            info={"sign_only": mapping.metadata.get("irr_callback.sign_only") == "true"},
        )
    if config.unaligned_model:
        return _from_unaligned_model(config, ctx)
    if (config.harmful_dataset is not None and not isinstance(config.harmful_dataset, str)) or config.harmful_dataset:
        return _from_harmful_dataset(config.harmful_dataset, config, ctx)
    raise IRRConfigError(
        "IRRConfig needs a safety input: set safety_vector (a file), unaligned_model "
        "(a directory or hub id) or harmful_dataset (prompt/answer pairs)"
    )


def _unaligned_dir(source: str) -> str:
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        return source
    check_local_path(source, "IRRConfig.unaligned_model", FileNotFoundError)  # never a hub lookup for a local path
    if os.path.exists(source):
        raise FileNotFoundError(f"IRRConfig.unaligned_model: '{source}' is not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
    except Exception as exc:  # not found, not reachable, offline
        raise FileNotFoundError(
            f"IRRConfig.unaligned_model: cannot load '{source}' from the Hub ({type(exc).__name__}: {exc})"
        ) from exc


def _check_unaligned_architecture(directory: str, config: IRRConfig, ctx: BaseContext) -> None:
    """The same check as `irr apply`/`irr safety-vector`: the unaligned model's config.json against the live base's."""
    from .architecture import check_same_architecture, model_config_dict

    base = model_config_dict(ctx.model)
    if base is None:
        return  # not a transformers model: the tensor names and shapes are still checked
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"IRRConfig.unaligned_model: '{config.unaligned_model}' has no config.json")
    unaligned = AutoConfig.from_pretrained(directory).to_dict()  # as the CLI reads it (derived fields filled in)
    check_same_architecture(
        (f"the base model '{ctx.name or 'being trained'}'", base),
        (f"IRRConfig.unaligned_model '{config.unaligned_model}'", unaligned),
        IRRConfigError,
    )


def _from_unaligned_model(config: IRRConfig, ctx: BaseContext) -> Resolved:
    directory = _unaligned_dir(config.unaligned_model)
    _check_unaligned_architecture(directory, config, ctx)
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    stats = [
        (f, os.path.getsize(os.path.join(directory, f)), int(os.path.getmtime(os.path.join(directory, f))))
        for f in shards
    ]
    key = _key("unaligned_model", os.path.abspath(directory), stats, ctx.names)
    path = _cache_path(config, ctx, "safety_vector", key)
    hit = _cached(path, "safety_vector", ctx)
    if hit is not None:
        logger.info(f"IRR: reusing cached safety vector {path}")
        return Resolved(
            hit, "unaligned_model", cached=True, path=path, info={"unaligned_model": config.unaligned_model}
        )
    unaligned = SafetensorsMapping(directory)
    missing = [n for n in ctx.names if n not in unaligned]
    if missing:
        raise KeyError(
            f"IRRConfig.unaligned_model '{config.unaligned_model}' has no tensor(s) {missing[:3]} "
            f"(it has e.g. {list(unaligned)[:3]}); is it the same architecture as the base?"
        )
    v = compute_safety_vector(ctx.base, unaligned, names=ctx.names, sign_only=True)
    mapping = _store(
        path, v, "safety_vector", ctx, {"source": "unaligned_model", "unaligned_model": config.unaligned_model}
    )
    logger.info(f"IRR: safety vector from {config.unaligned_model} cached at {path}")
    return Resolved(mapping, "unaligned_model", path=path, info={"unaligned_model": config.unaligned_model})


def _from_harmful_dataset(source: Any, config: IRRConfig, ctx: BaseContext) -> Resolved:
    from .unaligned import harmful_finetune_vector

    dataset = load_examples(source, what="IRRConfig.harmful_dataset")
    require_columns(
        dataset,
        [config.harmful_prompt_column, config.harmful_response_column],
        what="harmful_dataset",
        fields=["harmful_prompt_column", "harmful_response_column"],
    )
    key = _key(
        "harmful_dataset",
        data_fingerprint(source, dataset),
        config.harmful_prompt_column,
        config.harmful_response_column,
        config.unaligned_steps,
        config.unaligned_learning_rate,
        config.unaligned_lora_rank,
        config.unaligned_batch_size,
        config.calibration_max_length,
        config.irr_seed,
        ctx.names,
    )
    path = _cache_path(config, ctx, "safety_vector", key)
    label = source if isinstance(source, str) else type(source).__name__
    hit = _cached(path, "safety_vector", ctx)
    if hit is not None:
        logger.info(f"IRR: reusing cached safety vector {path} (harmful fine-tune skipped)")
        return Resolved(hit, "harmful_dataset", cached=True, path=path, info={"harmful_dataset": label})
    examples = tokenize_pairs(
        ctx.tokenizer,
        dataset[config.harmful_prompt_column],
        dataset[config.harmful_response_column],
        max_length=config.calibration_max_length,
    )
    v = harmful_finetune_vector(
        ctx.model, examples, ctx.targets, config, pad_token_id=padding_id(ctx.tokenizer), progress=ctx.progress
    )
    mapping = _store(path, v, "safety_vector", ctx, {"source": "harmful_dataset", "harmful_dataset": label})
    logger.info(f"IRR: safety vector from a {config.unaligned_steps}-step harmful fine-tune cached at {path}")
    return Resolved(
        mapping,
        "harmful_dataset",
        path=path,
        info={
            "harmful_dataset": label,
            "examples": len(examples),
            "steps": config.unaligned_steps,
            "lora_rank": config.unaligned_lora_rank,
        },
    )


# ------------------------------------------------------------------------------------- Fisher
def resolve_fisher(
    config: IRRConfig, ctx: BaseContext, *, safety_dataset: Any = None, pairs: SafetyPairs | None = None
) -> Resolved:
    """Importance for remove_ratio < 1; `Resolved(None, "none")` when nothing ranks the deltas. `pairs`:
    the safety data already read (and its responses generated) for the safety stream, reused."""
    if not config.needs_importance:
        return Resolved(None, "none")
    if config.fisher:
        mapping = load_irr_file(config.fisher, kind="fisher", base=ctx.base)
        _check_covers(mapping, ctx, "fisher", config.fisher)
        return Resolved(mapping, "fisher", path=config.fisher)
    source = safety_dataset if safety_dataset is not None else config.safety_dataset
    if source is None:
        raise IRRConfigError(
            f"IRRConfig.remove_ratio={config.remove_ratio} < 1 ranks deltas by Fisher importance: "
            "set fisher (a file) or safety_dataset (harmful prompts with safe responses)"
        )
    dataset = load_examples(source, what="IRRConfig.safety_dataset")
    require_columns(dataset, [config.safety_prompt_column], what="safety_dataset", fields=["safety_prompt_column"])
    if config.fisher_max_samples is not None:
        dataset = dataset.select(range(min(config.fisher_max_samples, len(dataset))))
    has_response = config.safety_response_column in dataset.column_names
    key = _key(
        "fisher",
        data_fingerprint(source, dataset),
        config.safety_prompt_column,
        config.safety_response_column if has_response else f"generated:{config.safety_max_new_tokens}",
        config.fisher_batch_size,
        config.fisher_max_samples,
        config.calibration_max_length,
        ctx.names,
    )
    path = _cache_path(config, ctx, "fisher", key)
    label = pairs.label if pairs is not None else source if isinstance(source, str) else type(source).__name__
    hit = _cached(path, "fisher", ctx)
    if distributed.is_distributed() and distributed.all_reduce_count(hit is None):
        hit = None  # the computation below is collective: every rank takes the same branch
    if hit is not None:
        logger.info(f"IRR: reusing cached Fisher importance {path}")
        return Resolved(hit, "safety_dataset", cached=True, path=path, info={"safety_dataset": label})
    if pairs is None:
        pairs = load_safety_pairs(config, ctx, dataset, label)
    prompts, responses = pairs.prompts, pairs.responses
    if config.fisher_max_samples is not None:
        prompts, responses = prompts[: config.fisher_max_samples], responses[: config.fisher_max_samples]
    scores, used = fisher_from_pairs(
        ctx.model,
        ctx.tokenizer,
        prompts,
        responses,
        max_length=config.calibration_max_length,
        batch_size=config.fisher_batch_size,
        names=ctx.names,
        progress=ctx.progress,
    )
    mapping: Mapping[str, torch.Tensor] = scores  # the same sums on every rank; the main process caches them
    if distributed.rank_and_world()[0] == 0:
        mapping = _store(
            path,
            scores,
            "fisher",
            ctx,
            {"source": "safety_dataset", "safety_dataset": label, "generated_responses": pairs.generated},
        )
    return Resolved(
        mapping,
        "safety_dataset",
        path=path,
        info={"safety_dataset": label, "examples": used, "generated_responses": pairs.generated},
    )


# ------------------------------------------------------------------------------------- safety data
@dataclass
class SafetyPairs:
    """Harmful prompts with safe responses, read once per run (responses generated by the base when the
    dataset has none): the Fisher importance and the safety stream share them."""

    prompts: list[str]
    responses: list[str]
    generated: bool
    label: str


def safety_source(config: IRRConfig, safety_dataset: Any = None) -> Any:
    """The safety data of a run: the `datasets.Dataset` given to the callback, else `config.safety_dataset`."""
    return safety_dataset if safety_dataset is not None else config.safety_dataset


def load_safety_pairs(config: IRRConfig, ctx: BaseContext, source: Any, label: str | None = None) -> SafetyPairs:
    """Read the safety data (a source or an already loaded Dataset); generate the base model's own
    responses when the response column is missing (`ctx.model` must still be the base)."""
    import datasets

    dataset = (
        source if isinstance(source, datasets.Dataset) else load_examples(source, what="IRRConfig.safety_dataset")
    )
    prompts, responses, generated = safety_pairs(
        dataset,
        prompt_column=config.safety_prompt_column,
        response_column=config.safety_response_column,
        what="safety_dataset",
        model=ctx.model,
        tokenizer=ctx.tokenizer,
        max_new_tokens=config.safety_max_new_tokens,
        progress=ctx.progress,
    )
    if label is None:
        label = source if isinstance(source, str) else type(source).__name__
    return SafetyPairs(prompts, responses, generated, label)


def safety_calibration_examples(config: IRRConfig, pairs: SafetyPairs, tokenizer: Any) -> list[dict]:
    """The safety stream's rows, tokenized like the fine-tuning data (`data.tokenize_pairs`: the chat
    template when the tokenizer has one, labels -100 on the prompt), at most `num_safety_samples`."""
    n = config.num_safety_samples
    return tokenize_pairs(tokenizer, pairs.prompts[:n], pairs.responses[:n], max_length=config.calibration_max_length)


def retain_calibration_examples(config: IRRConfig, dataset: Any, tokenizer: Any) -> list[dict]:
    """The retain stream's rows: the first `num_retain_samples` prompt/response pairs of `dataset` (the
    config's retain columns), tokenized like the fine-tuning data (`data.tokenize_pairs`: the chat template
    when the tokenizer has one, labels -100 on the prompt); an already tokenized dataset (`input_ids`) as is."""
    n = config.num_retain_samples
    head = dataset.select(range(min(n, len(dataset))))
    if "input_ids" in head.column_names:
        return [dict(row) for row in head]
    columns = [config.retain_prompt_column, config.retain_response_column]
    require_columns(head, columns, what="retain_dataset", fields=["retain_prompt_column", "retain_response_column"])
    prompts = [str(p) for p in head[columns[0]]]
    responses = [str(r) for r in head[columns[1]]]
    return tokenize_pairs(tokenizer, prompts, responses, max_length=config.calibration_max_length)
