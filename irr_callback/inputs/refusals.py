"""Safety data written by the base model itself: harmful prompts and the base's own (refusing) answers.

`write_refusals` answers harmful prompts with the live model (at train begin it is still the base):
batched greedy generation through the package's one generation routine
(`evaluation.generate_responses`: left padding, the tokenizer's chat template when it has one), in
place, without a copy of the model. The answers are cached as JSON under the base fingerprint, like
the other safety inputs (`<cache_dir>/<base fingerprint id>/refusals-<key>.json`, key = prompts,
generation settings, tokenizer and a fingerprint of every model weight), and checked with the
keyword refusal judge: when few of them are refusals the base does not look aligned, and a warning
says so (then there is nothing for the safety stream to restore).

`safety_dataset_for_run` is what `IRRCallback` calls at train begin: the user's safety data when it
has responses; its prompts answered by the base when it has none; and with no safety data at all, the
default harmful prompts (`safety_prompts.load_default_prompts`) answered by the base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .. import distributed
from ..config import IRRConfig
from ..evaluation.generation import generate_responses
from ..evaluation.judges import KeywordRefusalJudge
from ..saving import atomic_file
from .data import load_examples, require_columns
from .irr_files import fingerprint as weights_fingerprint
from .irr_files import fingerprint_id
from .safety_prompts import PromptSet, load_default_prompts
from .sources import cache_root


logger = logging.get_logger(__name__)

#: below this share of refusals (keyword judge) the base is reported as not looking aligned
MIN_REFUSAL_RATE = 0.5
_FORMAT = 1  # version of the cache file's layout


@dataclass
class Refusals:
    """Prompts, the base model's answers, and how they were obtained."""

    prompts: list[str]
    responses: list[str]
    refusal_rate: float
    seconds: float  # generation time (0 when read from the cache)
    cached: bool = False
    path: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    judged: bool = True  # False for the retain stream's general prompts: no refusal check

    @property
    def looks_aligned(self) -> bool:
        return self.refusal_rate >= MIN_REFUSAL_RATE

    def describe(self) -> dict[str, Any]:
        judged = {"refusal_rate": round(self.refusal_rate, 4), "looks_aligned": self.looks_aligned}
        return {
            "generated_responses": True,
            "responses": len(self.responses),
            **(judged if self.judged else {}),
            "generation_seconds": round(self.seconds, 3),
            "cached": self.cached,
            "path": self.path,
            **self.settings,
        }


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())},
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def refusal_rate(responses: Sequence[str], judge: Any = None) -> float:
    """Share of `responses` the keyword refusal judge (or `judge`) counts as refusals."""
    if not responses:
        return 0.0
    flags = (judge or KeywordRefusalJudge()).judge(list(responses))  # True = harmful, i.e. not a refusal
    return sum(not f for f in flags) / len(flags)


def check_refusals(responses: Sequence[str], *, min_rate: float = MIN_REFUSAL_RATE, judge: Any = None) -> float:
    """The refusal rate; warns when it is below `min_rate` (the base does not look aligned)."""
    rate = refusal_rate(responses, judge)
    if rate < min_rate:
        logger.warning(
            f"IRR: only {rate:.0%} of the base model's {len(responses)} answers to harmful prompts look like "
            f"refusals (keyword judge; expected >= {min_rate:.0%}): the base does not look aligned, so the safety "
            "stream has little safe behaviour to restore. Pass safety_dataset= with safe responses, or check "
            "that the model given to the Trainer is the aligned chat model (and its tokenizer's chat template)."
        )
    return rate


def write_refusals(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    base_fingerprint: str | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
    min_refusal_rate: float = MIN_REFUSAL_RATE,
    cached_only: bool = False,
    kind: str = "refusals",
    collective: bool = False,
) -> Refusals:
    """The model's own greedy answers to `prompts` (same order), cached when `cache_dir` is given.

    Generation runs on `model` itself (no copy; eval mode and no autograd for the duration, its mode
    restored after), in batches of `batch_size`, with the tokenizer's chat template when it has one.
    The cache file is `<cache_dir>/<fingerprint id>/refusals-<key>.json`. The fingerprint is
    `base_fingerprint` when given (the callback's fingerprint of the base's target weights, the same
    directory as the other safety inputs: a resumed run, whose live model is no longer the base, finds
    the answers the base wrote), else a fingerprint of every weight of `model`. `cached_only=True`
    (a resumed run) raises instead of generating when the answers are not in the cache. `kind`: "refusals"
    (harmful prompts: the answers are checked with the refusal judge) or "answers" (the retain stream's general
    prompts: no judge; cache file `answers-<key>.json`).
    `collective=True` (weights sharded over the processes: every forward is a collective): every rank calls
    this, the cache hit is agreed on by all, every rank generates the same answers in step (`synced_gpus`),
    and the main process alone writes the cache.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("write_refusals: no prompts")
    judged, what = kind == "refusals", "safety" if kind == "refusals" else "retain"
    if tokenizer is None:
        raise ValueError(
            "the base model's answers to the safety prompts are generated with the run's tokenizer: pass "
            "processing_class to the Trainer (or to IRRCallback.bind)"
        )
    model_fp = base_fingerprint or weights_fingerprint(dict(model.named_parameters()))
    settings = {"max_new_tokens": max_new_tokens, "greedy": True}
    key = _digest([_FORMAT, model_fp, prompts, settings, _tokenizer_identity(tokenizer)])[:20]
    path = None
    if cache_dir is not None:
        path = os.path.join(os.path.expanduser(cache_dir), fingerprint_id(model_fp), f"{kind}-{key}.json")
        hit = _read(path, prompts)
        if collective and distributed.all_reduce_count(hit is None) > 0:
            hit = None  # all ranks read the cache or all generate: a forward is a collective
        if hit is not None:
            logger.info(f"IRR: reusing the base model's cached answers to {len(prompts)} {what} prompts ({path})")
            rate = check_refusals(hit, min_rate=min_refusal_rate) if judged else 0.0
            return Refusals(prompts, hit, rate, 0.0, cached=True, path=path, settings=settings, judged=judged)
    if cached_only:
        raise FileNotFoundError(
            f"the base model's answers to the {len(prompts)} {what} prompts are not in the cache "
            f"({path or 'no cache_dir'}), and the live model is no longer the base (resumed run): set "
            "safety_dataset= with responses, or restart the run from step 0"
        )
    logger.info(
        f"IRR: the base model writes its answers to {len(prompts)} {what} prompts (greedy, batches of {batch_size})"
    )
    start = time.perf_counter()
    with distributed.generation_scope(model) if collective else contextlib.nullcontext():
        responses = generate_responses(
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            progress=progress,
            use_cache=True,  # training configs often switch the KV cache off (gradient checkpointing)
            **({"synced_gpus": True, "inference_mode": False} if collective else {}),
        )
    seconds = time.perf_counter() - start
    device = next(model.parameters()).device
    # on a CPU shared with other jobs, several torch threads per tiny step can be 10-30x slower than one
    # (measured: 128 answers of a 2-layer model, 2 s on 1 thread, 30-60 s on 2 threads at load 10; issue 23)
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    logger.info(f"IRR: {len(prompts)} {what} answers generated in {seconds:.1f} s (on {device}{threads})")
    rate = check_refusals(responses, min_rate=min_refusal_rate) if judged else 0.0
    if path is not None and (not collective or distributed.rank_and_world()[0] == 0):  # sharded: main writes
        _write(path, prompts, responses, {"kind": kind, "fingerprint": model_fp, **settings, "seconds": seconds})
    return Refusals(prompts, responses, rate, seconds, path=path, settings=settings, judged=judged)


def _read(path: str, prompts: list[str]) -> list[str] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("format") != _FORMAT or data.get("prompts") != prompts:
            raise ValueError("made for other prompts")
        responses = data["responses"]
        if len(responses) != len(prompts) or not all(isinstance(r, str) for r in responses):
            raise ValueError("responses do not match the prompts")
        return responses
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged entry is regenerated, not trusted
        logger.warning(f"IRR: ignoring cache file {path}: {exc}")
        return None


def _write(path: str, prompts: list[str], responses: list[str], info: dict[str, Any]) -> None:
    payload = {"format": _FORMAT, **info, "prompts": prompts, "responses": responses}
    with atomic_file(path, suffix=".json.tmp") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False, indent=1)


# ------------------------------------------------------------------------------------- for the callback
def safety_dataset_for_run(
    model: nn.Module,
    tokenizer: Any,
    config: IRRConfig,
    *,
    safety_dataset: Any = None,
    base_fingerprint: str | None = None,
    online: bool | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cached_only: bool = False,
    collective: bool = False,
):
    """The safety data of a run as a `datasets.Dataset` with the config's prompt and response columns,
    and a description of it for the report: `(dataset, info)`.

    - `safety_dataset` (or `config.safety_dataset`) with a response column: returned as it is;
    - without a response column: its first `num_safety_samples` prompts, answered by the base model;
    - neither: `num_safety_samples` default harmful prompts (the hub set online, the shipped set
      offline; `irr_seed` picks them), answered by the base model.

    Answers are cached under `cache_dir` (`IRRConfig.cache_dir`, `$IRR_CACHE`, ~/.cache/irr_callback),
    in the directory of `base_fingerprint`; a resumed run passes `cached_only=True`, a model whose weights are
    sharded over the processes `collective=True` (every rank calls it; see `write_refusals`).
    """
    return _answered_dataset(
        model,
        tokenizer,
        config,
        kind="refusals",
        field="safety",
        source=safety_dataset if safety_dataset is not None else config.safety_dataset,
        columns=(config.safety_prompt_column, config.safety_response_column),
        num_samples=config.num_safety_samples,
        max_new_tokens=config.safety_max_new_tokens,
        default=lambda: load_default_prompts(config.num_safety_samples, seed=config.irr_seed, online=online),
        base_fingerprint=base_fingerprint,
        batch_size=batch_size,
        progress=progress,
        cached_only=cached_only,
        collective=collective,
    )


def retain_dataset_for_run(
    model: nn.Module,
    tokenizer: Any,
    config: IRRConfig,
    *,
    retain_dataset: Any = None,
    base_fingerprint: str | None = None,
    online: bool | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cached_only: bool = False,
    collective: bool = False,
):
    """The retain stream's data, as `safety_dataset_for_run` gives the safety data: `retain_dataset` (or
    `config.retain_dataset`) with a response column as it is; without one, its first `num_retain_samples`
    prompts answered by the base model; neither: `num_retain_samples` default general prompts
    (`general_prompts.load_general_prompts`) answered by the base model, `retain_max_new_tokens` each,
    cached under the base fingerprint as `answers-<key>.json`; `collective` as in `write_refusals`. Returns
    `(dataset, info)`."""
    from .general_prompts import load_general_prompts

    return _answered_dataset(
        model,
        tokenizer,
        config,
        kind="answers",
        field="retain",
        source=retain_dataset if retain_dataset is not None else config.retain_dataset,
        columns=(config.retain_prompt_column, config.retain_response_column),
        num_samples=config.num_retain_samples,
        max_new_tokens=config.retain_max_new_tokens,
        default=lambda: load_general_prompts(config.num_retain_samples, seed=config.irr_seed, online=online),
        base_fingerprint=base_fingerprint,
        batch_size=batch_size,
        progress=progress,
        cached_only=cached_only,
        collective=collective,
    )


def _answered_dataset(
    model, tokenizer, config: IRRConfig, *, kind, field, source, columns, num_samples, max_new_tokens, default, **kw
):
    """Prompts with answers for one stream (`field`: "safety" or "retain"): the user's data, or its prompts /
    the default prompts answered by the base model (`write_refusals` with `kind`)."""
    import datasets

    prompt_col, response_col = columns
    what = f"{field}_dataset"
    chosen: PromptSet | None = None
    if source is None:
        chosen = default()
        prompts, info = chosen.prompts, {"source": "default", **chosen.describe()}
    else:
        data = load_examples(source, what=f"IRRConfig.{what}")
        require_columns(data, [prompt_col], what=what, fields=[f"{field}_prompt_column"])
        label = source if isinstance(source, str) else type(source).__name__
        if response_col in data.column_names:
            return data, {"source": what, "set": label, "prompts": len(data), "generated_responses": False}
        head = data.select(range(min(num_samples, len(data))))
        prompts = [str(p) for p in head[prompt_col] if p is not None and str(p).strip()]
        if not prompts:
            raise ValueError(f"{what} '{label}' has no non-empty prompt in column '{prompt_col}'")
        info = {"source": what, "set": label, "prompts": len(prompts)}
    answers = write_refusals(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        base_fingerprint=kw["base_fingerprint"],
        batch_size=kw["batch_size"],
        cache_dir=cache_root(config),
        progress=kw["progress"],
        cached_only=kw["cached_only"],
        kind=kind,
        collective=kw.get("collective", False),
    )
    info.update(answers.describe(), generated_responses=True)
    judged = f"{answers.refusal_rate:.0%} refusals, " if kind == "refusals" else ""
    logger.info(
        f"IRR: {field} data: {len(prompts)} prompts from {info['set']}, answered by the base model "
        f"({judged}{'cached' if answers.cached else f'{answers.seconds:.1f} s'})"
    )
    return datasets.Dataset.from_dict({prompt_col: answers.prompts, response_col: answers.responses}), info
