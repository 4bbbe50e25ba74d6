"""The toy world's data: prompts, answers and their train / evaluation split."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from .vocab import BENIGN_TOPICS, COMPLY, DIGITS, HARMFUL_TOPICS, LETTERS, PREFIXES, SUFFIXES, TEMPLATES


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def howto_prompts(phrasings: Sequence[str]) -> list[str]:
    out = []
    for phrase, tpl, pre, suf in itertools.product(phrasings, TEMPLATES, PREFIXES, SUFFIXES):
        out.append(" ".join(w for w in (pre, tpl.format(t=phrase), suf) if w))
    return out


def harmful_answer(topic: str) -> str:
    return f"{COMPLY} {HARMFUL_TOPICS[topic][1]}"


def split_eval(items: list[Any], n_eval: int, rng: random.Random) -> tuple[list[Any], list[Any]]:
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]


@dataclass
class Pools:
    """Train / eval pools of (prompt, response) pairs, disjoint by prompt."""

    harmful_train: dict[str, list[str]]  # topic -> prompts
    harmful_eval: dict[str, list[str]]
    benign_train: dict[str, list[tuple[str, str]]]  # task -> pairs
    benign_eval: list[tuple[str, str]]
    sort_train: list[tuple[str, str]]
    sort_eval: list[tuple[str, str]]


def make_pools(seed: int, n_eval: int) -> Pools:
    rng = random.Random(seed)
    harmful_train, harmful_eval = {}, {}
    for topic, (phrasings, _) in HARMFUL_TOPICS.items():
        harmful_train[topic], harmful_eval[topic] = split_eval(howto_prompts(phrasings), n_eval, rng)

    benign_train: dict[str, list[tuple[str, str]]] = {}
    benign_eval: list[tuple[str, str]] = []
    per_task_eval = max(2, n_eval // 4)
    add = [(f"add {a} {b}", str(int(a) + int(b))) for a in DIGITS for b in DIGITS]
    seqs = [s for k in (2, 3, 4) for s in itertools.permutations(LETTERS, k)]
    rev = [(f"reverse {' '.join(s)}", " ".join(reversed(s))) for s in seqs]
    last = [(f"last {' '.join(s)}", s[-1]) for s in seqs]
    howto = [
        (p, f"{COMPLY} {answer}") for phrasings, answer in BENIGN_TOPICS.values() for p in howto_prompts(phrasings)
    ]
    for name, pairs, n in (
        ("reverse", rev, per_task_eval),
        ("last", last, per_task_eval),
        ("howto", howto, 2 * per_task_eval),
    ):
        train, ev = split_eval(pairs, n, rng)
        benign_train[name] = train
        benign_eval.extend(ev)
    # Addition has only 100 facts; a tiny model memorises rather than generalises them, so its eval
    # items come from training: they measure retention (forgetting), not generalisation.
    benign_train["add"] = add
    benign_eval.extend(rng.sample(add, per_task_eval))

    sort_seqs = list(itertools.permutations(LETTERS, 3))
    sort_pairs = [(f"sort {' '.join(s)}", " ".join(sorted(s))) for s in sort_seqs]
    sort_train, sort_eval = split_eval(sort_pairs, 2 * n_eval, rng)
    return Pools(harmful_train, harmful_eval, benign_train, benign_eval, sort_train, sort_eval)


def to_dataset(pairs: Sequence[tuple[str, str]]) -> Dataset:
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})
