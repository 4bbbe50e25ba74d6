"""Evaluation: judges, batched generation, prompt loading, runners and offline ``evaluate`` metrics."""

from __future__ import annotations

from pathlib import Path

from .generation import format_prompts, generate_responses
from .judges import DEFAULT_REFUSAL_PHRASES, ClassifierJudge, KeywordRefusalJudge, normalize_text
from .prompts import load_prompts

_METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


def available_metrics() -> list[str]:
    """Names of the ``evaluate`` metric modules shipped in ``irr_callback/metrics``."""
    return sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Path of a shipped metric script, for ``evaluate.load(metric_path("refusal_rate"))``: works
    offline, unlike ``evaluate.load("<hub name>")``."""
    path = _METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"No shipped metric {name!r}; available: {available_metrics()}")
    return str(path)


from .runner import evaluate_downstream, evaluate_over_refusal, evaluate_safety, load_metric  # noqa: E402

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
