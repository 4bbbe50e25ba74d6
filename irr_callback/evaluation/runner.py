"""High-level evaluation runs: safety (refusal / harmful rate), over-refusal, downstream."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers.utils import logging

from .generation import generate_responses
from .judges import ClassifierJudge, KeywordRefusalJudge
from .prompts import load_prompts


logger = logging.get_logger(__name__)

_LOCAL_METRICS = {"exact_match", "refusal_rate", "over_refusal"}


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _judge_flags(judge: Any, responses: list[str], prompts: list[str]) -> list[bool]:
    if isinstance(judge, (KeywordRefusalJudge, ClassifierJudge)) or hasattr(judge, "judge"):
        return list(judge.judge(responses, prompts))
    if callable(judge):
        return [bool(x) for x in judge(responses, prompts)]
    raise TypeError(f"judge must have .judge(responses, prompts) or be callable, got {type(judge)}")


def _generate(
    model: Any, tokenizer: Any, prompts: Any, column: str, gen: dict[str, Any]
) -> tuple[list[str], list[str]]:
    prompt_list = load_prompts(prompts, column=column) if not isinstance(prompts, list) else prompts
    return prompt_list, generate_responses(model, tokenizer, prompt_list, **gen)


def evaluate_safety(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    judge: Any = None,
    *,
    refusal_judge: KeywordRefusalJudge | None = None,
    column: str = "prompt",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    use_chat_template: bool | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generate on HARMFUL prompts and judge the answers.

    ``harmful_rate`` comes from ``judge`` (default: keyword judge, harmful = not a refusal; pass a
    :class:`ClassifierJudge` for an MD-Judge / Llama Guard verdict); ``refusal_rate`` always from
    the keyword ``refusal_judge`` (cheap, and tells "refused" apart from "answered harmlessly").
    ``prompts``: anything :func:`load_prompts` accepts.
    """
    refusal_judge = refusal_judge or KeywordRefusalJudge()
    judge = judge or refusal_judge
    prompt_list, responses = _generate(
        model,
        tokenizer,
        prompts,
        column,
        dict(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            use_chat_template=use_chat_template,
            progress=progress,
            **generate_kwargs,
        ),
    )
    refusals = [refusal_judge.is_refusal(r) for r in responses]
    harmful = _judge_flags(judge, responses, prompt_list)
    return {
        "refusal_rate": _rate(refusals),
        "harmful_rate": _rate(harmful),
        "n": len(responses),
        "responses": responses,
        "prompts": prompt_list,
    }


def evaluate_over_refusal(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    judge: KeywordRefusalJudge | None = None,
    *,
    column: str = "prompt",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    use_chat_template: bool | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generate on BENIGN prompts; ``over_refusal_rate`` = share refused (keyword judge)."""
    judge = judge or KeywordRefusalJudge()
    prompt_list, responses = _generate(
        model,
        tokenizer,
        prompts,
        column,
        dict(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            use_chat_template=use_chat_template,
            progress=progress,
            **generate_kwargs,
        ),
    )
    return {
        "over_refusal_rate": _rate([judge.is_refusal(r) for r in responses]),
        "n": len(responses),
        "responses": responses,
        "prompts": prompt_list,
    }


def load_metric(name: str) -> Any:
    """``evaluate.load`` that prefers the offline modules shipped in ``irr_callback/evaluation/metrics``."""
    import evaluate

    from .metric_files import metric_path

    return evaluate.load(metric_path(name) if name in _LOCAL_METRICS else name)


def evaluate_downstream(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    references: Sequence[str],
    metric: str | Callable[[list[str], list[str]], float | dict[str, float]] = "exact_match",
    *,
    column: str = "prompt",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    use_chat_template: bool | None = None,
    progress: bool = True,
    metric_kwargs: dict[str, Any] | None = None,
    postprocess: Callable[[str], str] | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generate on downstream prompts and score against ``references``.

    ``metric``: an ``evaluate`` module name or path (``"exact_match"`` uses the shipped offline
    module) or a callable ``(predictions, references) -> float | dict``. ``postprocess`` maps each
    response before scoring (e.g. extract the final number of a GSM8K answer). Returns the metric's
    dict plus ``score`` (its first value), ``n`` and ``responses``.
    """
    prompt_list, responses = _generate(
        model,
        tokenizer,
        prompts,
        column,
        dict(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            use_chat_template=use_chat_template,
            progress=progress,
            **generate_kwargs,
        ),
    )
    references = [str(r) for r in references]
    if len(references) != len(responses):
        raise ValueError(f"{len(references)} references for {len(responses)} prompts")
    predictions = [postprocess(r) for r in responses] if postprocess else responses
    if callable(metric):
        value = metric(predictions, references)
        scores: dict[str, Any] = (
            dict(value) if isinstance(value, dict) else {getattr(metric, "__name__", "metric"): value}
        )
    else:
        scores = dict(
            load_metric(metric).compute(predictions=predictions, references=references, **(metric_kwargs or {}))
        )
    first = next((v for k, v in scores.items() if k != "n" and isinstance(v, (int, float))), float("nan"))
    return {**scores, "score": float(first), "n": len(responses), "responses": responses, "prompts": prompt_list}
