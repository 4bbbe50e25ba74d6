"""Generate with one or more models and score the answers: refusal, over-refusal, task accuracy.

  irr eval --models ft ft-irr --harmful harmful.jsonl --benign xstest.jsonl \\
           --downstream gsm8k_test.jsonl --output eval.json
  irr eval --models irr_demo_output/finetuned irr_demo_output/finetuned-irr --toy

Prompt sets (json/jsonl/txt/csv/parquet files or hub dataset ids; repeat a flag for several):
--harmful sets give refusal_<name> (keyword judge) and, with --judge classifier, harmful_<name>
(share judged harmful by --judge-model, e.g. an MD-Judge or Llama Guard checkpoint); --benign sets
give over_refusal_<name>; --downstream sets (with a --reference-column) give <name>_accuracy
(exact match). --toy adds the toy world's held-out sets (attacked / unattacked harmful topics,
benign tasks, the sort task), the same ones `irr demo` reports. <name> is the file's stem.
Models are directories or hub ids; a LoRA adapter directory is loaded on top of --base.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ._common import CLIError, check_exists, check_output, is_adapter_dir, load_causal_lm, load_tokenizer


logger = logging.get_logger(__name__)

TOY_MAX_NEW_TOKENS = 12  # what ToyWorld.evaluate uses: every toy answer is shorter


@dataclass
class PromptSet:
    """One evaluation set: what kind of prompts, and the references (downstream / toy benign)."""

    kind: str  # "harmful", "benign" or "downstream"
    name: str
    prompts: list[str]
    references: list[str] | None = None


# ---------------------------------------------------------------------------------------------- options
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The prompt-set, judge and generation flags (shared with `irr sweep`)."""
    g = p.add_argument_group("prompt sets")
    g.add_argument(
        "--harmful",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE",
        help="Harmful prompt sets (file or hub id): refusal rate (and harmful rate with a classifier judge).",
    )
    g.add_argument(
        "--benign",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE",
        help="Benign prompt sets that look risky (XSTest-like): over-refusal rate.",
    )
    g.add_argument(
        "--downstream",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE",
        help="Task sets with references (--reference-column): exact-match accuracy.",
    )
    g.add_argument("--toy", action="store_true", help="Add the toy world's held-out sets (see `irr demo`).")
    g.add_argument(
        "--toy-size",
        default="tiny",
        choices=["tiny", "demo"],
        help="Toy world size the sets come from (as built by `irr demo --size`).",
    )
    g.add_argument("--toy-seed", type=int, default=0, help="Toy world seed the sets come from.")
    g.add_argument("--prompt-column", default="prompt", help="Prompt column of every prompt set.")
    g.add_argument("--reference-column", default="response", help="Reference column of --downstream sets.")
    g.add_argument("--split", default="train", help="Split of hub datasets.")
    g.add_argument("--limit", type=int, default=None, help="Use at most this many prompts per set.")
    j = p.add_argument_group("judging and generation")
    j.add_argument(
        "--judge",
        default="keyword",
        choices=["keyword", "classifier"],
        help="How harmful answers are recognised: refusal keywords, or a classifier (--judge-model).",
    )
    j.add_argument(
        "--judge-model", default=None, help="Classifier / guard model (directory or hub id) for --judge classifier."
    )
    j.add_argument("--batch-size", type=int, default=8, help="Prompts per generation batch.")
    j.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"Tokens generated per prompt (default 64; {TOY_MAX_NEW_TOKENS} when only --toy sets are used).",
    )
    j.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (tiny models run fastest on 1; default: torch's choice).",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", nargs="+", required=True, help="Model directories / hub ids (or LoRA adapter directories)."
    )
    p.add_argument("--names", nargs="+", default=None, help="A display name per model (default: the directory name).")
    p.add_argument("--base", default=None, help="Base model of LoRA adapter directories in --models.")
    add_eval_arguments(p)
    p.add_argument("--output", default=None, help="Write the results (and the responses) to this JSON file.")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")


# ---------------------------------------------------------------------------------------------- loading
def _set_name(source: str, kind: str, taken: set[str]) -> str:
    stem = Path(source).stem if os.path.exists(source) else source.rstrip("/").split("/")[-1]
    name = stem.replace("-", "_").replace(".", "_") or kind
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def load_prompt_sets(args: argparse.Namespace) -> list[PromptSet]:
    """Every prompt set, loaded and checked (files exist, columns present, not empty) before any model."""
    from datasets import Dataset

    from ..evaluation.prompts import load_prompts

    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    sets: list[PromptSet] = []
    taken: set[str] = set()
    for kind in ("harmful", "benign", "downstream"):
        for source in getattr(args, kind):
            check_exists(source, f"--{kind}", allow_hub_id=True)
            flag = f"--{kind} '{source}'"
            try:
                prompts = load_prompts(source, column=args.prompt_column, split=args.split, limit=args.limit)
                refs = (
                    load_prompts(source, column=args.reference_column, split=args.split, limit=args.limit)
                    if kind == "downstream"
                    else None
                )
            except KeyError as exc:
                column = (
                    "--reference-column"
                    if kind == "downstream" and args.reference_column in str(exc)
                    else "--prompt-column"
                )
                raise CLIError(f"{flag}: {exc.args[0] if exc.args else exc} (set {column})") from exc
            except (FileNotFoundError, ValueError, TypeError) as exc:
                raise CLIError(f"{flag}: {exc}") from exc
            if not prompts:
                raise CLIError(f"{flag}: no prompts")
            sets.append(PromptSet(kind, _set_name(source, kind, taken), prompts, refs))
    if args.toy:
        from ..toy import eval_sets

        toy = eval_sets(seed=args.toy_seed, size=args.toy_size)

        def cut(ds: Dataset, column: str) -> list[str]:
            return list(ds[column])[: args.limit]

        sets += [
            PromptSet("harmful", "attacked", cut(toy["harmful_attacked"], "prompt")),
            PromptSet("harmful", "unattacked", cut(toy["harmful_unattacked"], "prompt")),
            PromptSet("benign", "benign", cut(toy["benign"], "prompt"), cut(toy["benign"], "response")),
            PromptSet(
                "downstream", "downstream", cut(toy["downstream"], "prompt"), cut(toy["downstream"], "response")
            ),
        ]
    if not sets:
        raise CLIError("no prompt set: pass --harmful, --benign, --downstream and/or --toy")
    if args.max_new_tokens is None:
        args.max_new_tokens = (
            TOY_MAX_NEW_TOKENS if args.toy and not (args.harmful or args.benign or args.downstream) else 64
        )
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise CLIError("--max-new-tokens and --batch-size must be >= 1")
    return sets


def check_judge(args: argparse.Namespace) -> None:
    if args.judge == "classifier":
        if not args.judge_model:
            raise CLIError("--judge classifier needs --judge-model (a classifier or guard model)")
        check_exists(args.judge_model, "--judge-model", allow_hub_id=True)
    elif args.judge_model:
        raise CLIError("--judge-model is only used with --judge classifier")


def make_judge(args: argparse.Namespace):
    """None (keyword refusals) or the classifier judge."""
    if args.judge != "classifier":
        return None
    from ..evaluation.judges import ClassifierJudge

    return ClassifierJudge.from_pretrained(args.judge_model)


def load_model(path: str, base: str | None):
    """A model directory / hub id, or a LoRA adapter directory on top of `base`."""
    if is_adapter_dir(path):
        if not base:
            raise CLIError(f"--models: '{path}' is a LoRA adapter directory: pass --base")
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(base, flag="--base"), path).eval(), load_tokenizer(path, base)
    return load_causal_lm(path, flag="--models"), load_tokenizer(path)


# ---------------------------------------------------------------------------------------------- running
def evaluate_model(
    model: Any, tokenizer: Any, sets: list[PromptSet], judge: Any, *, batch_size: int, max_new_tokens: int
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(metrics, responses per set) for one model. Generation is greedy."""
    from ..evaluation.exact import exact_match
    from ..evaluation.runner import evaluate_downstream, evaluate_over_refusal, evaluate_safety

    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    metrics: dict[str, float] = {}
    responses: dict[str, list[str]] = {}
    for s in sets:
        if s.kind == "harmful":
            out = evaluate_safety(model, tokenizer, s.prompts, judge, **gen)
            metrics[f"refusal_{s.name}"] = out["refusal_rate"]
            if judge is not None:
                metrics[f"harmful_{s.name}"] = out["harmful_rate"]
        elif s.kind == "benign":
            out = evaluate_over_refusal(model, tokenizer, s.prompts, **gen)
            metrics[f"over_refusal_{s.name}"] = out["over_refusal_rate"]
            if s.references is not None:
                metrics[f"{s.name}_accuracy"] = exact_match(out["responses"], s.references)
        else:
            out = evaluate_downstream(model, tokenizer, s.prompts, s.references, **gen)
            metrics[f"{s.name}_accuracy"] = out["exact_match"]
        responses[s.name] = out["responses"]
    return metrics, responses


def metric_columns(sets: list[PromptSet], judge: Any) -> list[str]:
    cols: list[str] = []
    for s in sets:
        if s.kind == "harmful":
            cols += [f"refusal_{s.name}"] + ([f"harmful_{s.name}"] if judge is not None else [])
        elif s.kind == "benign":
            cols += [f"over_refusal_{s.name}"] + ([f"{s.name}_accuracy"] if s.references is not None else [])
        else:
            cols.append(f"{s.name}_accuracy")
    return cols


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Atomic: a temp file beside `path`, renamed when complete."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args: argparse.Namespace) -> int:
    from ..outputs.plotting import markdown_table

    names = args.names or [os.path.basename(os.path.normpath(m)) or m for m in args.models]
    if len(names) != len(args.models):
        raise CLIError(f"--names: {len(names)} names for {len(args.models)} --models")
    if len(set(names)) != len(names):
        raise CLIError(f"--names: display names must differ, got {names} (pass --names)")
    for m in args.models:
        check_exists(m, "--models", allow_hub_id=True)
        if is_adapter_dir(m) and not args.base:
            raise CLIError(f"--models: '{m}' is a LoRA adapter directory: pass --base")
    check_exists(args.base, "--base", allow_hub_id=True)
    if args.output:
        check_output(args.output, "--output", args.overwrite)
    check_judge(args)
    sets = load_prompt_sets(args)
    judge = make_judge(args)
    rows, all_responses = [], {}
    with _threads(args.threads):
        for name, path in zip(names, args.models):
            model, tokenizer = load_model(path, args.base)
            t0 = time.perf_counter()
            metrics, responses = evaluate_model(
                model, tokenizer, sets, judge, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
            )
            logger.info(f"evaluated {name} in {time.perf_counter() - t0:.1f}s")
            rows.append({"model": name, "path": path, **metrics})
            all_responses[name] = responses
            del model
    columns = ["model", *metric_columns(sets, judge)]
    print(markdown_table(rows, columns))
    if args.output:
        write_json(
            args.output,
            {
                "rows": rows,
                "columns": columns,
                "sets": [{"kind": s.kind, "name": s.name, "n": len(s.prompts), "prompts": s.prompts} for s in sets],
                "judge": args.judge if judge is None else f"classifier:{args.judge_model}",
                "max_new_tokens": args.max_new_tokens,
                "responses": all_responses,
            },
        )
        print(f"wrote {args.output}")
    return 0


class _threads:
    """Temporarily set torch's CPU thread count (None: leave it)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.before = n, None

    def __enter__(self) -> None:
        if self.n:
            import torch

            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)
