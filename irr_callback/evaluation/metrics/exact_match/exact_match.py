"""Exact-match accuracy between predictions and references, offline.

``evaluate.load("exact_match")`` needs the Hub; this local module does not:
``evaluate.load(irr_callback.evaluation.metric_path("exact_match"))``. Same output key
(``exact_match``) as the Hub metric. One import per line: ``evaluate`` parses this file's imports.
"""

import re
import string

import datasets
import evaluate


_DESCRIPTION = """
Share of predictions equal to their reference after optional normalisation (strip, whitespace
collapsing, case, punctuation, regexes removed first).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str), references (list of str).
    ignore_case (bool, default False), ignore_punctuation (bool, default False),
    regexes_to_ignore (list of str, optional): removed from both sides before comparing.
    strip (bool, default True): strip and collapse whitespace.
Returns:
    exact_match (float in [0, 1]), n (int).
Examples:
    >>> m = evaluate.load(metric_path("exact_match"))
    >>> m.compute(predictions=["b c d", "7"], references=["b c d", "8"])
    {'exact_match': 0.5, 'n': 2}
"""

_CITATION = ""


def _normalize(text, ignore_case, ignore_punctuation, regexes, strip):
    for rx in regexes:
        text = re.sub(rx, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if strip:
        text = " ".join(text.split())
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions, references, ignore_case=False, ignore_punctuation=False, regexes_to_ignore=None, strip=True
    ):
        regexes = list(regexes_to_ignore or [])
        n = len(predictions)
        hits = sum(
            _normalize(p, ignore_case, ignore_punctuation, regexes, strip)
            == _normalize(r, ignore_case, ignore_punctuation, regexes, strip)
            for p, r in zip(predictions, references)
        )
        return {"exact_match": hits / n if n else float("nan"), "n": n}
