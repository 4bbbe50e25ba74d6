"""Safety-vs-utility tables and Pareto plots (matplotlib is imported lazily: an optional extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, floatfmt: str = ".3f") -> str:
    """A GitHub markdown table of `rows` restricted to `columns` (missing values shown as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def pareto_front(rows: Sequence[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """Rows not dominated on (x, y), both to be maximised, sorted by x."""
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = [
        r for r in points if not any(o[x] >= r[x] and o[y] >= r[y] and (o[x] > r[x] or o[y] > r[y]) for o in points)
    ]
    return sorted(front, key=lambda r: r[x])


def pareto_plot(
    rows: Sequence[dict[str, Any]],
    path: str,
    *,
    x: str,
    y: str,
    label: str = "method",
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> str:
    """Scatter of every row on (x, y) with the Pareto front drawn; written as PNG to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'irr-callback[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for row in rows:
        if row.get(x) is None or row.get(y) is None:
            continue
        ax.scatter(row[x], row[y], s=40)
        ax.annotate(str(row.get(label, "")), (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(rows, x, y)
    if len(front) > 1:
        ax.plot([r[x] for r in front], [r[y] for r in front], "--", color="grey", linewidth=1, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
