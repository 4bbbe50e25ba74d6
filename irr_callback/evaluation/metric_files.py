"""Where the shipped offline `evaluate` metric scripts are: a leaf module (imports nothing of the package)."""

from __future__ import annotations

from pathlib import Path


_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    """Names of the ``evaluate`` metric modules shipped in ``irr_callback/evaluation/metrics``."""
    return sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Path of a shipped metric script, for ``evaluate.load(metric_path("refusal_rate"))``: works
    offline, unlike ``evaluate.load("<hub name>")``."""
    path = _METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"No shipped metric {name!r}; available: {available_metrics()}")
    return str(path)
