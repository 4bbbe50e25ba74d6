"""Evaluation: judges, batched generation, prompt loading, runners and offline ``evaluate`` metrics."""

from __future__ import annotations

from .generation import format_prompts, generate_responses
from .judges import DEFAULT_REFUSAL_PHRASES, ClassifierJudge, KeywordRefusalJudge, normalize_text
from .metric_files import available_metrics, metric_path
from .prompts import load_prompts
from .runner import evaluate_downstream, evaluate_over_refusal, evaluate_safety, load_metric


__all__ = [
    "load_prompts",
    "evaluate_safety",
    "evaluate_over_refusal",
    "evaluate_downstream",
    "load_metric",
    "ClassifierJudge",
    "KeywordRefusalJudge",
    "DEFAULT_REFUSAL_PHRASES",
    "normalize_text",
    "format_prompts",
    "generate_responses",
    "metric_path",
    "available_metrics",
]
