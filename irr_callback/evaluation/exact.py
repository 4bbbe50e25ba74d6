"""Exact match, the one rule: equal after collapsing whitespace (leading, trailing and repeated).

The shipped `evaluate` script (`metrics/exact_match`, loaded by path, so standalone) applies the same
rule with its default `strip=True`.
"""

from __future__ import annotations

from collections.abc import Sequence


def same_answer(prediction: str, reference: str) -> bool:
    return " ".join(prediction.split()) == " ".join(reference.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference (NaN without references)."""
    if not references:
        return float("nan")
    return sum(same_answer(p, r) for p, r in zip(predictions, references)) / len(references)
