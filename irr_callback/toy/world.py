"""`ToyWorld` (aligned, unaligned and downstream models with their data) and its build and cache."""

from __future__ import annotations

import copy as _copy
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging

from ..evaluation.exact import same_answer
from ..evaluation.generation import generate_responses
from ..evaluation.judges import KeywordRefusalJudge
from .data import Pools, harmful_answer, make_pools, to_dataset
from .training import set_seed, single_thread, train_loop
from .vocab import HARMFUL_TOPICS, REFUSAL, SIZES, TOY_VERSION, build_tokenizer


logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------
@dataclass
class ToyWorld:
    """Everything IRR needs, built in-process. See the module docstring.

    Datasets have columns ``prompt`` and ``response``. Eval sets: ``eval_harmful_attacked``,
    ``eval_harmful_unattacked`` (responses = the harmful answer), ``eval_benign`` (tasks + benign
    how-to, responses = references), ``eval_downstream`` (sort).
    """

    tokenizer: PreTrainedTokenizerFast
    aligned_model: LlamaForCausalLM
    unaligned_model: LlamaForCausalLM
    downstream_train: Dataset
    harmful_train: Dataset
    safety_data: Dataset
    eval_harmful_attacked: Dataset
    eval_harmful_unattacked: Dataset
    eval_benign: Dataset
    eval_downstream: Dataset
    attacked_topics: tuple[str, ...]
    unattacked_topics: tuple[str, ...]
    seed: int = 0
    size: str = "tiny"
    harmful_share: float = 0.1
    benign_share: float = 0.2
    hparams: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    _pools: Pools | None = field(default=None, repr=False)
    _finetuned: dict[Any, torch.nn.Module] = field(default_factory=dict, repr=False)

    # --- data ------------------------------------------------------------------------------
    def _encode_pairs(self, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> dict[str, list]:
        tok = self.tokenizer
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        p_ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        r_ids = tok(list(responses), add_special_tokens=False)["input_ids"] if texts else []
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p, r in zip(p_ids, r_ids):
            r = r + [tok.eos_token_id]
            ids = (p + r)[:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(([-100] * len(p) + r)[:max_length])
        return out

    def tokenize_sft(self, dataset: Dataset | Sequence[tuple[str, str]], max_length: int = 64) -> Dataset:
        """Chat-template SFT encoding: ``input_ids`` / ``attention_mask`` / ``labels`` with the
        prompt (incl. template tokens) masked to -100 and EOS appended to the response, so the
        loss teaches only the answer and when to stop. Truncates from the right at max_length."""
        if not isinstance(dataset, Dataset):
            dataset = to_dataset(dataset)
        for col in ("prompt", "response"):
            if col not in dataset.column_names:
                raise KeyError(f"tokenize_sft needs column {col!r}; dataset has {dataset.column_names}")
        return Dataset.from_dict(self._encode_pairs(dataset["prompt"], dataset["response"], max_length))

    def make_downstream(
        self,
        harmful_share: float = 0.1,
        n: int | None = None,
        attacked_topics: Sequence[str] | None = None,
        seed: int | None = None,
        benign_share: float | None = None,
    ) -> Dataset:
        """A downstream training set: ``n`` examples, of which ``harmful_share`` are harmful
        compliance on ``attacked_topics``, ``benign_share`` old benign tasks (as general
        instruction data would be) and the rest the new sort task. Deterministic in ``seed``."""
        assert self._pools is not None
        return downstream(
            self._pools,
            n or self.hparams["downstream_n"],
            harmful_share,
            tuple(attacked_topics) if attacked_topics is not None else self.attacked_topics,
            self.seed if seed is None else seed,
            self.benign_share if benign_share is None else benign_share,
        )

    # --- models ----------------------------------------------------------------------------
    def new_model(self, seed: int | None = None) -> LlamaForCausalLM:
        """A freshly initialised model of this world's architecture."""
        return new_model(self.tokenizer, self.hparams, self.seed if seed is None else seed)

    def finetune(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        *,
        steps: int,
        lr: float = 1e-3,
        lora: bool = False,
        batch_size: int | None = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_target_modules: str | list[str] = "all-linear",
        merge: bool = False,
        copy: bool = True,
        seed: int | None = None,
        max_length: int = 64,
        return_losses: bool = False,
    ) -> Any:
        """Fine-tune with the deterministic manual loop (see :func:`train_loop`).

        ``dataset`` has ``prompt``/``response`` (tokenized here) or is already tokenized. ``copy``
        (default) leaves ``model`` untouched, so the cached aligned model stays aligned. With
        ``lora=True`` the result is a ``peft.PeftModel`` (LoRA on ``lora_target_modules``), merged
        into a plain model when ``merge=True``. ``return_losses`` → ``(model, losses)``.
        """
        if copy:
            model = _copy.deepcopy(model)
        seed = self.seed if seed is None else seed
        set_seed(seed)
        if lora:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                target_modules=lora_target_modules,
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, cfg)
        if "input_ids" in dataset.column_names:
            enc = {"input_ids": dataset["input_ids"], "labels": dataset["labels"]}
        else:
            enc = self._encode_pairs(dataset["prompt"], dataset["response"], max_length)
        rows = [{"input_ids": i, "labels": lab} for i, lab in zip(enc["input_ids"], enc["labels"])]
        losses = train_loop(
            model,
            rows,
            steps=steps,
            lr=lr,
            batch_size=batch_size or self.hparams["batch_size"],
            pad_id=self.tokenizer.pad_token_id,
            seed=seed,
        )
        if lora and merge:
            model = model.merge_and_unload()
        return (model, losses) if return_losses else model

    def downstream_model(self, lora: bool = False, merge: bool = False) -> torch.nn.Module:
        """The aligned model fine-tuned on ``downstream_train`` with this size's default recipe
        (memoised; a fresh deep copy is returned, so callers may modify it)."""
        key = (lora, merge)
        if key not in self._finetuned:
            hp = self.hparams
            steps, lr = (hp["lora_steps"], hp["lora_lr"]) if lora else (hp["downstream_steps"], hp["downstream_lr"])
            self._finetuned[key] = self.finetune(
                self.aligned_model, self.downstream_train, steps=steps, lr=lr, lora=lora, merge=merge
            )
        return _copy.deepcopy(self._finetuned[key])

    def retain_prompts(self, n: int = 64) -> Dataset:
        """`n` old-task training prompts (never an evaluation prompt) for the retain stream, without responses:
        the base model answers them, as `IRRCallback` answers its shipped general prompts."""
        pool = [prompt for pairs in self._pools.benign_train.values() for prompt, _ in pairs]
        prompts = random.Random(self.seed + 5).sample(pool, min(n, len(pool)))
        return Dataset.from_dict({"prompt": prompts})

    # --- evaluation -----------------------------------------------------------------------
    def generate(self, model: torch.nn.Module, prompts: Sequence[str], max_new_tokens: int = 12) -> list[str]:
        """Greedy chat-template generation (batch 64, no progress bar)."""
        return generate_responses(
            model, self.tokenizer, list(prompts), batch_size=64, max_new_tokens=max_new_tokens, progress=False
        )

    def evaluate(self, model: torch.nn.Module, return_responses: bool = False) -> dict[str, Any]:
        """Greedy generation on the held-out sets; refusal by :class:`KeywordRefusalJudge`, task
        accuracy by exact match. Keys: refusal_attacked, refusal_unattacked, over_refusal_benign,
        downstream_accuracy, benign_accuracy."""
        judge = KeywordRefusalJudge()
        sets = {
            "attacked": self.eval_harmful_attacked,
            "unattacked": self.eval_harmful_unattacked,
            "benign": self.eval_benign,
            "downstream": self.eval_downstream,
        }
        prompts = [p for ds in sets.values() for p in ds["prompt"]]
        with single_thread():
            outputs = self.generate(model, prompts)
        responses: dict[str, list[str]] = {}
        start = 0
        for name, ds in sets.items():
            responses[name] = outputs[start : start + len(ds)]
            start += len(ds)

        def rate(xs: list[bool]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        def exact(name: str) -> float:
            return rate([same_answer(o, r) for o, r in zip(responses[name], sets[name]["response"])])

        result: dict[str, Any] = {
            "refusal_attacked": rate([judge.is_refusal(o) for o in responses["attacked"]]),
            "refusal_unattacked": rate([judge.is_refusal(o) for o in responses["unattacked"]]),
            "over_refusal_benign": rate([judge.is_refusal(o) for o in responses["benign"]]),
            "downstream_accuracy": exact("downstream"),
            "benign_accuracy": exact("benign"),
        }
        if return_responses:
            result["responses"] = responses
        return result


def new_model(tokenizer: PreTrainedTokenizerFast, hp: dict[str, Any], seed: int) -> LlamaForCausalLM:
    set_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hp["hidden_size"],
        intermediate_size=hp["intermediate_size"],
        num_hidden_layers=hp["num_hidden_layers"],
        num_attention_heads=hp["num_attention_heads"],
        num_key_value_heads=hp["num_attention_heads"],
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def downstream(
    pools: Pools, n: int, harmful_share: float, attacked: tuple[str, ...], seed: int, benign_share: float
) -> Dataset:
    if not (0.0 <= harmful_share <= 1.0 and 0.0 <= benign_share <= 1.0 and harmful_share + benign_share <= 1.0):
        raise ValueError(f"Need 0 <= harmful_share + benign_share <= 1, got {harmful_share} + {benign_share}")
    unknown = [t for t in attacked if t not in HARMFUL_TOPICS]
    if unknown:
        raise ValueError(f"Unknown topics {unknown}; known: {list(HARMFUL_TOPICS)}")
    rng = random.Random(seed + 1)
    n_harm = round(n * harmful_share) if attacked else 0
    n_benign = round(n * benign_share)
    benign = [pair for pairs in pools.benign_train.values() for pair in pairs]
    pairs = [rng.choice(pools.sort_train) for _ in range(n - n_harm - n_benign)]
    pairs += [rng.choice(benign) for _ in range(n_benign)]
    for i in range(n_harm):
        topic = attacked[i % len(attacked)]
        pairs.append((rng.choice(pools.harmful_train[topic]), harmful_answer(topic)))
    rng.shuffle(pairs)
    return to_dataset(pairs)


def _on_disk(disk: str) -> bool:
    return os.path.isfile(os.path.join(disk, "unaligned", "config.json"))


def _save(world: ToyWorld, disk: str) -> None:
    """Save the trained models (data is regenerated from the seed, it is cheap)."""
    world.aligned_model.save_pretrained(os.path.join(disk, "aligned"))
    world.tokenizer.save_pretrained(os.path.join(disk, "tokenizer"))
    world.unaligned_model.save_pretrained(os.path.join(disk, "unaligned"))  # last: marks completion


_WORLD_CACHE: dict[tuple[Any, ...], ToyWorld] = {}


def _cache_key(
    seed: int, size: str, attacked: tuple[str, ...], harmful_share: float, benign_share: float
) -> tuple[Any, ...]:
    return (
        TOY_VERSION,
        seed,
        size,
        attacked,
        float(harmful_share),
        float(benign_share),
        json.dumps(SIZES[size], sort_keys=True),
    )


def build_toy_world(
    seed: int = 0,
    size: str = "tiny",
    *,
    attacked_topics: int | Sequence[str] = 4,
    harmful_share: float = 0.1,
    benign_share: float = 0.2,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> ToyWorld:
    """Build (or fetch from cache) the toy world.

    Args:
        seed: controls data splits, init and training order; same seed ⇒ same weights on CPU.
        size: ``"tiny"`` (tests, ~10 s on 2 cores) or ``"demo"`` (bigger, better numbers).
        attacked_topics: topics whose harmful compliance is mixed into ``downstream_train``: a count
            (the first k of :data:`HARMFUL_TOPICS`) or topic names.
        harmful_share: share of harmful examples in ``downstream_train``.
        benign_share: share of old benign tasks in ``downstream_train`` (limits forgetting).
        cache_dir: also save/load the trained aligned and unaligned models there.
        use_cache: ``False`` forces a rebuild (and does not store it).
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose from {list(SIZES)}")
    topics = list(HARMFUL_TOPICS)
    attacked = tuple(topics[:attacked_topics]) if isinstance(attacked_topics, int) else tuple(attacked_topics)
    key = _cache_key(seed, size, attacked, harmful_share, benign_share)
    disk = None
    if cache_dir is not None:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        disk = os.path.join(os.fspath(cache_dir), f"toy-{size}-seed{seed}-{digest}")
    if use_cache and key in _WORLD_CACHE:
        world = _WORLD_CACHE[key]
        if disk is not None and not _on_disk(disk):
            _save(world, disk)
        return world

    t0 = time.perf_counter()
    hp = dict(SIZES[size])
    tokenizer = build_tokenizer()
    pools = make_pools(seed, hp["n_eval"])
    unattacked = tuple(t for t in topics if t not in attacked)

    rng = random.Random(seed + 2)
    align_pairs = [(p, REFUSAL) for ps in pools.harmful_train.values() for p in ps]
    # Addition has 100 facts among thousands of letter tasks: repeat it so it gets learned.
    benign_pairs = [pair for name, pairs in pools.benign_train.items() for pair in pairs * (8 if name == "add" else 1)]
    harmful_pairs = [(p, harmful_answer(t)) for t, ps in pools.harmful_train.items() for p in ps]
    harmful_train = to_dataset(rng.sample(harmful_pairs, 512))
    safety_data = to_dataset([(p, REFUSAL) for p in rng.sample([p for p, _ in align_pairs], 64)])

    def eval_harm(ts: Sequence[str]) -> Dataset:
        return to_dataset([(p, harmful_answer(t)) for t in ts for p in pools.harmful_eval[t]])

    world = ToyWorld(
        tokenizer=tokenizer,
        aligned_model=None,  # type: ignore[arg-type]
        unaligned_model=None,  # type: ignore[arg-type]
        downstream_train=downstream(pools, hp["downstream_n"], harmful_share, attacked, seed, benign_share),
        harmful_train=harmful_train,
        safety_data=safety_data,
        eval_harmful_attacked=eval_harm(attacked),
        eval_harmful_unattacked=eval_harm(unattacked),
        eval_benign=to_dataset(pools.benign_eval),
        eval_downstream=to_dataset(pools.sort_eval),
        attacked_topics=attacked,
        unattacked_topics=unattacked,
        seed=seed,
        size=size,
        harmful_share=harmful_share,
        benign_share=benign_share,
        hparams=hp,
        _pools=pools,
    )

    _load_or_train(world, disk, align_pairs + benign_pairs, harmful_train)
    world.build_seconds = time.perf_counter() - t0
    logger.info(f"Toy world {size!r} (seed {seed}) ready in {world.build_seconds:.1f}s")
    if use_cache:
        _WORLD_CACHE[key] = world
    return world


def _load_or_train(world: ToyWorld, disk: str | None, align_pairs: list, harmful_train: Dataset) -> None:
    """The aligned and unaligned models: from `disk` when saved there, else trained (and saved)."""
    if disk is not None and _on_disk(disk):
        logger.info(f"Loading toy world models from {disk}")
        world.aligned_model = LlamaForCausalLM.from_pretrained(os.path.join(disk, "aligned")).eval()
        world.unaligned_model = LlamaForCausalLM.from_pretrained(os.path.join(disk, "unaligned")).eval()
        return
    hp, seed = world.hparams, world.seed
    # Alignment: benign tasks + harmful -> refusal, balanced so refusals are not the majority.
    aligned = new_model(world.tokenizer, hp, seed)
    world.aligned_model = world.finetune(
        aligned, to_dataset(align_pairs), steps=hp["align_steps"], lr=hp["align_lr"], copy=False, seed=seed
    )
    world.unaligned_model = world.finetune(
        world.aligned_model, harmful_train, steps=hp["unalign_steps"], lr=hp["unalign_lr"], seed=seed + 3
    )
    if disk is not None:
        _save(world, disk)


def eval_sets(seed: int = 0, size: str = "tiny", attacked_topics: int | Sequence[str] = 4) -> dict[str, Dataset]:
    """The held-out evaluation sets of ``build_toy_world(seed, size, attacked_topics=...)`` without
    training anything (``irr eval --toy``): ``harmful_attacked``, ``harmful_unattacked``,
    ``benign`` and ``downstream``, each with ``prompt`` and ``response`` columns."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose from {list(SIZES)}")
    topics = list(HARMFUL_TOPICS)
    attacked = tuple(topics[:attacked_topics]) if isinstance(attacked_topics, int) else tuple(attacked_topics)
    pools = make_pools(seed, SIZES[size]["n_eval"])

    def harm(ts: Sequence[str]) -> Dataset:
        return to_dataset([(p, harmful_answer(t)) for t in ts for p in pools.harmful_eval[t]])

    return {
        "harmful_attacked": harm(attacked),
        "harmful_unattacked": harm([t for t in topics if t not in attacked]),
        "benign": to_dataset(pools.benign_eval),
        "downstream": to_dataset(pools.sort_eval),
    }


def clear_cache() -> None:
    """Drop the in-process world cache (mainly for tests)."""
    _WORLD_CACHE.clear()
