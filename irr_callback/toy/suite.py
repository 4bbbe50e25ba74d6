"""The benchmark suite's varied toy safety worlds, split once into dev and test worlds.

Why: one toy world cannot show whether a setting keeps what the model could already do; a setting
chosen on it can be tuned to it. The suite varies the model (2–4 layers, 48–96 wide), how much
harmful prompts share tokens and structure with the old tasks and with the downstream task, the
harmful fraction of the fine-tuning data (0, 2%, 10%, 30%), the phrasing gap between the safety data
given to IRR and the evaluation prompts, and full fine-tuning vs LoRA (`variants` has the data).

The split is fixed here, in code (:data:`DEV_WORLDS`, :data:`TEST_WORLDS`, disjoint seeds): defaults
are chosen on dev worlds only and reported on test worlds.

A world (:class:`SuiteWorld`) gives what `realign` takes (`calibration` = downstream training rows
with labels, `safety_calibration` = harmful prompts with refusals, `retain_calibration` = general
prompts with the aligned model's answers, disjoint from every evaluation prompt) and its evaluation
(`evaluate`: refusal on attacked and unattacked topics, over-refusal, downstream and old-task accuracy).
Built models (aligned, unaligned, fine-tuned) are cached on disk when `cache_dir` is given.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import LlamaForCausalLM
from transformers.utils import logging

from .data import harmful_answer, to_dataset
from .training import single_thread
from .variants import (
    BasePools,
    downstream_pairs,
    eval_harmful,
    extra_words,
    make_base_pools,
    safety_prompts,
)
from .vocab import HARMFUL_TOPICS, REFUSAL, SIZES, build_tokenizer
from .world import ToyWorld, _load_or_train


logger = logging.get_logger(__name__)

SUITE_VERSION = "1"  # bump when data, model or training change: invalidates on-disk caches
HARMFUL_FRACTIONS = (0.0, 0.02, 0.1, 0.3)
FINETUNES = ("full", "lora")
ARCHITECTURES = tuple(itertools.product((2, 3, 4), (48, 64, 96)))  # (layers, width)


@dataclass(frozen=True)
class WorldSpec:
    """One world of the suite. Worlds with the same `base_key` share the aligned model."""

    name: str
    split: str  # "dev" | "test" | "regression"
    seed: int
    layers: int
    width: int
    overlap_old: int  # 0 low, 1 the toy world's, 2 high: harmful prompts share words/templates with old tasks
    overlap_downstream: int  # 0 bare task, 1 asked through harmful templates, 2 also answered like compliance
    harmful_fraction: float
    phrasing_gap: int  # 0 none, 1 disjoint templates, 2 disjoint templates and phrasings, bare safety prompts
    finetune: str  # "full" | "lora"
    align_steps: int | None = None  # None: the size's default (regression worlds train shorter)

    @property
    def base_key(self) -> tuple[Any, ...]:
        return (SUITE_VERSION, self.seed, self.layers, self.width, self.overlap_old, self.hparams()["align_steps"])

    def hparams(self) -> dict[str, Any]:
        """Model and training sizes: deeper or wider models train a little longer."""
        tiny = {k: v for k, v in SIZES["tiny"].items() if k != "n_eval"}  # the toy world's training recipe
        return {
            **tiny,
            "hidden_size": self.width,
            "num_hidden_layers": self.layers,
            "intermediate_size": 2 * self.width,
            "align_steps": self.align_steps or 400 + 100 * self.layers,
            "align_lr": 4e-3 if self.layers == 2 else 3e-3,
            "old_share": 0.2,
            "calibration_n": 128,
            "safety_n": 64,
            "retain_n": 64,
        }

    def describe(self) -> str:
        return (
            f"{self.layers}x{self.width}, overlap old {self.overlap_old} / downstream {self.overlap_downstream}, "
            f"harmful {self.harmful_fraction:g}, gap {self.phrasing_gap}, {self.finetune}"
        )


def _split_specs(
    split: str, seeds: list[int], rng_seed: int, per_base: int = 2, first_base: int = 0
) -> tuple[WorldSpec, ...]:
    """`per_base` worlds per base (full fine-tuning and LoRA, alternating); every level of every
    variation is spread evenly over the worlds by shuffled cycling (balanced marginals, mixed combinations)."""
    rng = random.Random(rng_seed)
    n = per_base * len(seeds)

    def cycle(levels: tuple[Any, ...], k: int) -> list[Any]:
        out = [levels[i % len(levels)] for i in range(k)]
        rng.shuffle(out)
        return out

    archs = cycle(ARCHITECTURES, len(seeds))
    overlaps = cycle((0, 1, 2), len(seeds))
    fractions, gaps, downs = cycle(HARMFUL_FRACTIONS, n), cycle((0, 1, 2), n), cycle((0, 1, 2), n)
    specs = []
    for b, seed in enumerate(seeds):
        layers, width = archs[b]
        number = first_base + b
        for f in range(per_base):
            ft = FINETUNES[f % 2] if f < 2 else FINETUNES[b % 2]
            i = per_base * b + f
            specs.append(
                WorldSpec(
                    name=f"{split}{number:02d}-{ft}" if f < 2 else f"{split}{number:02d}b-{ft}",
                    split=split,
                    seed=seed,
                    layers=layers,
                    width=width,
                    overlap_old=overlaps[b],
                    overlap_downstream=downs[i],
                    harmful_fraction=fractions[i],
                    phrasing_gap=gaps[i],
                    finetune=ft,
                )
            )
    return tuple(specs)


#: Chosen once (issue 19): dev worlds choose defaults, test worlds (seeds 101-110, three worlds per base:
#: 30) report. The dev split grew twice, never from the test worlds: seeds 1-8 (16 worlds, the first round)
#: and seeds 11-20 (30 more, three per base, dev08-dev17: 16 dev worlds were too few to tell settings apart),
#: then once more: seeds 21-30 (dev18-dev27, the fourth round: one set of 46 dev worlds flipped the choice of ρ).
DEV_WORLDS: tuple[WorldSpec, ...] = (
    _split_specs("dev", list(range(1, 9)), rng_seed=1919)
    + _split_specs("dev", list(range(11, 21)), rng_seed=1921, per_base=3, first_base=8)
    + _split_specs("dev", list(range(21, 31)), rng_seed=1923, per_base=3, first_base=18)
)
TEST_WORLDS: tuple[WorldSpec, ...] = _split_specs("test", list(range(101, 111)), rng_seed=2020, per_base=3)
#: The tests' regression subset: tiny, short-trained worlds on one base (tests/toy/test_suite.py).
REGRESSION_WORLDS: tuple[WorldSpec, ...] = (
    WorldSpec("regression-attack-full", "regression", 7, 2, 48, 1, 0, 0.1, 0, "full", align_steps=400),
    WorldSpec("regression-benign-lora", "regression", 7, 2, 48, 1, 1, 0.0, 1, "lora", align_steps=400),
)


def worlds(split: str) -> tuple[WorldSpec, ...]:
    """The fixed world list of a split: "dev", "test" or "regression"."""
    table = {"dev": DEV_WORLDS, "test": TEST_WORLDS, "regression": REGRESSION_WORLDS}
    if split not in table:
        raise ValueError(f"Unknown split {split!r}; choose from {list(table)}")
    return table[split]


# --------------------------------------------------------------------------------------------
# A built world
# --------------------------------------------------------------------------------------------
@dataclass
class SuiteWorld:
    """A built suite world: the models, `realign`'s three streams and the evaluation.

    `toy` is a :class:`ToyWorld` carrying this world's data (its `evaluate`, `finetune` and
    `tokenize_sft` are reused as they are).
    """

    spec: WorldSpec
    toy: ToyWorld
    finetuned_model: torch.nn.Module
    calibration: Dataset  # downstream training rows, tokenized with labels
    safety_calibration: Dataset  # harmful prompts (safety side of the gap) with refusals
    retain_calibration: Dataset  # old-task training prompts with the aligned model's answers
    retain_pairs: list[tuple[str, str]]
    build_seconds: float = 0.0
    _metrics: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def aligned_model(self) -> LlamaForCausalLM:
        return self.toy.aligned_model

    @property
    def unaligned_model(self) -> LlamaForCausalLM:
        return self.toy.unaligned_model

    @property
    def tokenizer(self) -> Any:
        return self.toy.tokenizer

    def finetuned(self) -> torch.nn.Module:
        """A fresh copy of the fine-tuned model (a `PeftModel` for LoRA worlds): realign it freely."""
        return copy.deepcopy(self.finetuned_model)

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Greedy generation on the held-out prompts (see `ToyWorld.evaluate`); a LoRA model is
        evaluated merged (a merged copy: `model` is left as it is)."""
        if hasattr(model, "peft_config"):
            model = copy.deepcopy(model).merge_and_unload()
        with single_thread():
            return self.toy.evaluate(model)

    def reference(self, which: str) -> dict[str, Any]:
        """Memoised metrics of "aligned" or "finetuned"."""
        if which not in self._metrics:
            model = {"aligned": self.aligned_model, "finetuned": self.finetuned_model}[which]
            self._metrics[which] = self.evaluate(model)
        return self._metrics[which]

    def eval_prompts(self) -> set[str]:
        """Every evaluation prompt (nothing given to IRR may be one of them; tested)."""
        t = self.toy
        sets = (t.eval_harmful_attacked, t.eval_harmful_unattacked, t.eval_benign, t.eval_downstream)
        return {p for ds in sets for p in ds["prompt"]}


def _digest(key: Any) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def _mix_downstream(
    spec: WorldSpec, pools: BasePools, sort_train: list[tuple[str, str]], attacked: tuple[str, ...], hp: dict
) -> Dataset:
    """`downstream_n` rows: the harmful fraction of compliance on attacked topics, `old_share` old
    tasks (general instruction data; never an evaluation prompt), the rest the new task."""
    rng = random.Random(spec.seed * 31 + hash_fraction(spec.harmful_fraction) + spec.overlap_downstream)
    n = hp["downstream_n"]
    n_harm, n_old = round(n * spec.harmful_fraction), round(n * hp["old_share"])
    old = pools.old_task_pool()
    pairs = [rng.choice(sort_train) for _ in range(n - n_harm - n_old)]
    pairs += [rng.choice(old) for _ in range(n_old)]
    for i in range(n_harm):
        topic = attacked[i % len(attacked)]
        pairs.append((rng.choice(pools.harmful_train[topic]).text, harmful_answer(topic)))
    rng.shuffle(pairs)
    return to_dataset(pairs)


def hash_fraction(x: float) -> int:
    return int(round(x * 1000))


def build_world(spec: WorldSpec, cache_dir: str | os.PathLike[str] | None = None) -> SuiteWorld:
    """Build `spec` (the aligned and unaligned models of its base, its fine-tune, its streams),
    loading every trained model from `cache_dir` when it is there and saving it otherwise."""
    t0 = time.perf_counter()
    hp = spec.hparams()
    tokenizer = build_tokenizer(extra_words())
    pools = make_base_pools(spec.seed, spec.overlap_old)
    topics = list(HARMFUL_TOPICS)
    random.Random(spec.seed).shuffle(topics)
    attacked, unattacked = tuple(sorted(topics[:4])), tuple(sorted(topics[4:]))
    sort_train, sort_eval = downstream_pairs(spec.overlap_downstream, spec.seed)
    safety = safety_prompts(pools, spec.phrasing_gap, hp["safety_n"], spec.seed)
    harmful_rng = random.Random(spec.seed + 2)
    harmful_pairs = [(p.text, harmful_answer(t)) for t, ps in pools.harmful_train.items() for p in ps]

    def eval_harm(ts: tuple[str, ...]) -> Dataset:
        return to_dataset([(p, harmful_answer(t)) for t in ts for p in eval_harmful(pools, (t,), spec.phrasing_gap)])

    toy = ToyWorld(
        tokenizer=tokenizer,
        aligned_model=None,  # type: ignore[arg-type]
        unaligned_model=None,  # type: ignore[arg-type]
        downstream_train=_mix_downstream(spec, pools, sort_train, attacked, hp),
        harmful_train=to_dataset(harmful_rng.sample(harmful_pairs, 512)),
        safety_data=to_dataset([(p, REFUSAL) for p in safety]),
        eval_harmful_attacked=eval_harm(attacked),
        eval_harmful_unattacked=eval_harm(unattacked),
        eval_benign=to_dataset(pools.old_eval),
        eval_downstream=to_dataset(sort_eval),
        attacked_topics=attacked,
        unattacked_topics=unattacked,
        seed=spec.seed,
        size=spec.name,
        harmful_share=spec.harmful_fraction,
        benign_share=hp["old_share"],
        hparams=hp,
    )
    root = os.path.join(os.fspath(cache_dir), f"suite-v{SUITE_VERSION}") if cache_dir is not None else None
    base_disk = os.path.join(root, f"base-{_digest(spec.base_key)}") if root else None
    with single_thread():
        with _locked(base_disk):
            _load_or_train(toy, base_disk, pools.alignment_pairs(), toy.harmful_train)
        finetuned = _finetuned(spec, toy, root)
        retain_rng = random.Random(spec.seed + 5)
        retain_prompts = [p for p, _ in retain_rng.sample(pools.old_task_pool(), hp["retain_n"])]
        answers = toy.generate(toy.aligned_model, retain_prompts, max_new_tokens=16)
    retain_pairs = list(zip(retain_prompts, answers))
    world = SuiteWorld(
        spec=spec,
        toy=toy,
        finetuned_model=finetuned,
        calibration=toy.tokenize_sft(toy.downstream_train.select(range(hp["calibration_n"]))),
        safety_calibration=toy.tokenize_sft(toy.safety_data),
        retain_calibration=toy.tokenize_sft(retain_pairs),
        retain_pairs=retain_pairs,
    )
    world.build_seconds = time.perf_counter() - t0
    logger.info(f"Suite world {spec.name} ({spec.describe()}) ready in {world.build_seconds:.1f}s")
    return world


@contextlib.contextmanager
def _locked(disk: str | None) -> Iterator[None]:
    """Hold an exclusive file lock next to `disk` (no-op without a cache): two processes that need the
    same model build it once, the second loads it (POSIX; elsewhere no lock)."""
    if disk is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    os.makedirs(os.path.dirname(disk), exist_ok=True)
    with open(f"{disk}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _finetuned(spec: WorldSpec, toy: ToyWorld, root: str | None) -> torch.nn.Module:
    """The aligned model fine-tuned on the world's downstream data, from disk when cached (built under a lock)."""
    key = (
        spec.base_key,
        spec.overlap_downstream,
        spec.harmful_fraction,
        spec.finetune,
        json.dumps(toy.hparams, sort_keys=True),
    )
    disk = os.path.join(root, f"ft-{_digest(key)}") if root else None
    with _locked(disk):
        return _finetune_or_load(spec, toy, disk)


def _finetune_or_load(spec: WorldSpec, toy: ToyWorld, disk: str | None) -> torch.nn.Module:
    """The aligned model fine-tuned on the world's downstream data (full or LoRA r=8), from disk when cached."""
    hp = toy.hparams
    lora = spec.finetune == "lora"
    marker = os.path.join(disk, "done.json") if disk else None
    if marker and os.path.isfile(marker):
        if lora:
            from peft import PeftModel

            return PeftModel.from_pretrained(copy.deepcopy(toy.aligned_model), disk).eval()
        return LlamaForCausalLM.from_pretrained(disk).eval()
    steps, lr = (hp["lora_steps"], hp["lora_lr"]) if lora else (hp["downstream_steps"], hp["downstream_lr"])
    model = toy.finetune(toy.aligned_model, toy.downstream_train, steps=steps, lr=lr, lora=lora, seed=spec.seed + 3)
    model.eval()
    if disk:
        model.save_pretrained(disk)
        with open(marker, "w", encoding="utf-8") as fh:  # written last: marks a complete save
            json.dump(asdict(spec), fh)
    return model
