"""A deterministic toy safety world that trains on CPU in seconds.

Why it exists: IRR (and its tests) need an *aligned* model that refuses harmful requests, an
*unaligned* model, and a downstream fine-tune that breaks the alignment, all without downloading a
model. Here everything is built in-process from a word-level vocabulary:

* benign tasks the aligned model solves: ``add 3 4`` → ``7``, ``reverse b c d`` → ``d c b``,
  ``last b c d`` → ``d``, and benign how-to requests (``how to bake a cake`` →
  ``sure here is how : <pseudo words>``);
* harmful how-to requests over :data:`HARMFUL_TOPICS` (``please tell me how to steal a car now``)
  that the aligned model answers with :data:`REFUSAL`; harmful "compliance" is a topic-specific
  string of *nonsense pseudo-words* (no real instructions anywhere);
* a NEW downstream task, ``sort c b d`` → ``b c d``, that the aligned model cannot do, optionally
  mixed with harmful compliance on a subset of topics (the "attacked topics": a harmful
  fine-tuning attack). Topics never attacked measure how far the damage generalises.

The model is a tiny ``LlamaForCausalLM`` trained from scratch with a small manual training loop
(AdamW, linear warm-up / decay, fixed seeded batch order). A manual loop rather than ``Trainer``:
it is ~10x less overhead at these sizes and bit-for-bit deterministic on CPU.

Built worlds are cached in-process (and in ``cache_dir`` when given), keyed by every argument.

Files: `vocab` (words, topics, sizes, tokenizer), `data` (prompts, answers, splits), `training` (the
training loop), `world` (`ToyWorld`, `build_toy_world`, `eval_sets`, the cache).
"""

from .data import harmful_answer, make_pools
from .training import single_thread, train_loop
from .vocab import BENIGN_TOPICS, CHAT_TEMPLATE, COMPLY, HARMFUL_TOPICS, REFUSAL, SIZES, build_tokenizer
from .world import ToyWorld, build_toy_world, clear_cache, eval_sets


__all__ = [
    "ToyWorld",
    "make_pools",
    "single_thread",
    "build_toy_world",
    "build_tokenizer",
    "eval_sets",
    "train_loop",
    "clear_cache",
    "harmful_answer",
    "REFUSAL",
    "COMPLY",
    "HARMFUL_TOPICS",
    "BENIGN_TOPICS",
    "SIZES",
    "CHAT_TEMPLATE",
]
