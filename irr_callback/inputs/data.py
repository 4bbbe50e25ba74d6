"""Prompt/response data for the callback: load it from wherever the user points, tokenize it for
SFT-style losses (loss on the response only), and take the first training examples for calibration.

The callback needs data in three places (harmful fine-tune, Fisher on safety data, calibration);
one loader and one tokenizer keep their conventions identical.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers.utils import logging

from ..paths import looks_like_local_path


logger = logging.get_logger(__name__)


class DataError(ValueError):
    """A dataset cannot be used; the message names the parameter, file or column."""


def check_local_path(path: Any, what: str, error: type | None = None) -> None:
    """Raise `error` (DataError by default) with "<what>: '<path>' does not exist" for a missing local path, before
    anything would look it up on the Hub; hub-id-like names pass."""
    text = os.fspath(path)
    if not os.path.exists(os.path.expanduser(text)) and looks_like_local_path(text):
        raise (error or DataError)(f"{what}: '{text}' does not exist")


def _empty_file(path: str) -> bool:
    with open(path, "rb") as fh:
        return not fh.read(1 << 16).strip()


def load_examples(source: Any, *, what: str):
    """A `datasets.Dataset` from a Dataset, a list of dicts, a local json/jsonl file or a hub id.

    An empty source raises DataError naming `what` and saying that it is empty; a missing local path
    raises "does not exist" (never a hub lookup)."""
    import datasets

    dataset = None
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise DataError(f"{what}: the DatasetDict has no 'train' split (splits: {list(source)})")
        dataset = source["train"]
    elif isinstance(source, list):
        dataset = datasets.Dataset.from_list(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        check_local_path(path, what)
        if os.path.isfile(path):
            if not path.endswith((".json", ".jsonl")):
                raise DataError(f"{what}: '{path}' must be a .json or .jsonl file")
            if _empty_file(path):
                raise DataError(f"{what}: '{path}' is empty (no examples)")
            try:
                dataset = datasets.load_dataset("json", data_files=path, split="train")
            except StopIteration:  # what `datasets` raises for a file with no rows
                raise DataError(f"{what}: '{path}' is empty (no examples)") from None
            except ValueError as exc:  # `[]`: "Instruction 'train' corresponds to no data!"
                if "corresponds to no data" not in str(exc):
                    raise
                raise DataError(f"{what}: '{path}' is empty (no examples)") from None
        else:
            dataset = datasets.load_dataset(path, split="train")  # a dataset directory or a hub id
    else:
        raise DataError(
            f"{what}: expected a datasets.Dataset, a list of dicts, a json/jsonl path or a hub id; "
            f"got {type(source).__name__}"
        )
    if len(dataset) == 0:
        label = f"'{os.fspath(source)}'" if isinstance(source, (str, os.PathLike)) else f"the {type(source).__name__}"
        raise DataError(f"{what}: {label} is empty (no examples)")
    return dataset


def data_fingerprint(source: Any, dataset) -> str:
    """Identifies the data for cache keys: the file's bytes, or the Dataset's own fingerprint."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(os.fspath(source)):
        digest = hashlib.sha256()
        with open(os.fspath(source), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:32]
    fp = getattr(dataset, "_fingerprint", None)
    if fp:
        return str(fp)
    return hashlib.sha256(repr(dataset[:]).encode()).hexdigest()[:32]


def require_columns(dataset, columns: list[str], *, what: str, fields: list[str] | None = None) -> None:
    """Raise naming the missing column and the option (`fields`) that chose it."""
    for k, column in enumerate(columns):
        if column not in dataset.column_names:
            option = f" ({fields[k]})" if fields else ""
            raise DataError(f"{what} has no column '{column}'{option}; its columns are {dataset.column_names}")


def _chat_ids(tokenizer, prompt: str, response: str | None) -> tuple[list[int], list[int]]:
    """(prompt ids, full ids) with the tokenizer's chat template, or plain text when it has none."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, Mapping):
            prompt_ids = prompt_ids["input_ids"]
        if response is None:
            return list(prompt_ids), list(prompt_ids)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=True)
        if isinstance(full, Mapping):
            full = full["input_ids"]
        return list(prompt_ids), list(full)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if response is None:
        return list(prompt_ids), list(prompt_ids)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(prompt_ids) + list(response_ids)


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], *, max_length: int) -> list[dict]:
    """SFT examples: `input_ids`, `attention_mask`, `labels` (-100 on the prompt), EOS appended."""
    if tokenizer is None:
        raise DataError(
            "a tokenizer is needed to tokenize prompt/response data: pass processing_class to the "
            "Trainer (or to IRRCallback.bind)"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    out, given = [], 0
    for prompt, response in zip(prompts, responses):
        given += 1
        prompt_ids, ids = _chat_ids(tokenizer, str(prompt), str(response))
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        ids = ids[:max_length]
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        if all(label == -100 for label in labels):
            continue  # the response was truncated away: no loss to take
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not out:
        raise DataError(
            f"none of the {given} prompt/response examples kept a response token after truncation "
            "(empty data, or raise calibration_max_length)"
        )
    return out


def padding_id(tokenizer, default: int | None = 0) -> int | None:
    """The id that pads batches: the tokenizer's pad token, else its EOS token, else `default`.

    The one rule everywhere: padded positions are masked (attention mask 0, labels -100), so any id
    gives the same results; generation needs a real token (`default=None` tells the caller there is none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else default


def collate(examples: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into one batch (labels padded with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.full((len(examples), width), -100, dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.as_tensor(e.get("labels", e["input_ids"]))
    return batch


def batches(examples: list[dict], batch_size: int, pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    return [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def generate_responses(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, progress: bool = True
) -> list[str]:
    """The base model's own greedy answers (how the IRR authors built Fisher data), one prompt at a time
    so no padding side matters; the model's train/eval mode is restored. `progress`: a progress bar."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for prompt in logging.tqdm(prompts, desc="IRR safety responses", disable=not progress):
                prompt_ids, _ = _chat_ids(tokenizer, str(prompt), None)
                ids = torch.tensor([prompt_ids], device=device)
                pad = padding_id(tokenizer, default=None)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                )
                answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def safety_pairs(
    dataset,
    *,
    prompt_column: str,
    response_column: str,
    what: str,
    fields: tuple[str, str] = ("safety_prompt_column", "safety_response_column"),
    model=None,
    tokenizer=None,
    max_new_tokens: int = 128,
    max_samples: int | None = None,
    check_only: bool = False,
    progress: bool = True,
) -> tuple[list[str], list[str], bool]:
    """(prompts, responses, generated) of a safety dataset (harmful prompts with safe responses): the one
    reader of safety data (Fisher importance and the safety stream alike).

    Rows with an empty prompt (or an empty response, when the column exists) are dropped; without the
    response column the base `model`'s own greedy answers are generated (as the IRR authors built their
    Fisher data). Errors name the dataset (`what`) and the option that chose the column (`fields`).
    `check_only`: the checks that need no model (responses not generated, [] when the column is missing).
    `progress`: a progress bar while responses are generated."""
    if len(dataset) == 0:
        raise DataError(f"{what} is empty: it needs harmful prompts with safe responses")
    require_columns(dataset, [prompt_column], what=what, fields=[fields[0]])
    has_response = response_column in dataset.column_names
    prompts = list(dataset[prompt_column])
    responses = list(dataset[response_column]) if has_response else [None] * len(prompts)
    keep = [
        k
        for k, (p, r) in enumerate(zip(prompts, responses))
        if isinstance(p, str) and p.strip() and (not has_response or (isinstance(r, str) and r.strip()))
    ]
    if not keep:
        columns = f"'{prompt_column}'" + (f" and '{response_column}'" if has_response else "")
        raise DataError(
            f"{what} has no usable row: every one of its {len(prompts)} rows has an empty {columns} "
            f"({fields[0]}{', ' + fields[1] if has_response else ''})"
        )
    if len(keep) < len(prompts):
        logger.warning(f"IRR: {what}: {len(prompts) - len(keep)} rows with an empty prompt or response dropped")
    if max_samples is not None:
        keep = keep[:max_samples]
    prompts = [prompts[k] for k in keep]
    if has_response:
        return prompts, [responses[k] for k in keep], False
    if check_only:
        return prompts, [], False
    if model is None or tokenizer is None:
        raise DataError(
            f"{what} has no response column '{response_column}' ({fields[1]}), so the base model's own "
            "responses would be generated, which needs the base model and its tokenizer here: add the "
            "column or name it"
        )
    logger.info(f"IRR: generating the base model's responses to {len(prompts)} prompts of {what}")
    return (
        prompts,
        generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=progress),
        True,
    )


def check_calibration_columns(dataset, text_column: str | None = None) -> None:
    """Fail early (before any model is loaded) when no column can feed calibration."""
    columns = list(getattr(dataset, "column_names", None) or [])
    usable = [text_column] if text_column else ["input_ids", "text", "prompt", "messages"]
    if not any(c in columns for c in usable):
        raise DataError(
            f"calibration data has no usable column (columns: {columns}); expected "
            + (f"'{text_column}'" if text_column else "'input_ids', 'text', 'prompt' or 'messages'")
        )


def calibration_examples(
    dataset: Any, tokenizer, *, num_samples: int, max_length: int, text_column: str | None = None
) -> list[dict]:
    """The first `num_samples` training examples as token ids, each as training saw it: pre-tokenized
    (`input_ids`) rows keep their loss mask (`labels`, or TRL's `completion_mask` / `assistant_masks`) and a
    packed row (TRL `packing=True`: `seq_lengths` or restarting `position_ids`) is split into the sequences
    it holds, which training kept apart (padding-free packing): a sample is one sequence, never a packed
    row. Otherwise tokenized from `text_column`, or a `text`, `prompt`/`completion|response` or `messages`
    column."""
    if dataset is None:
        raise DataError(
            "no training dataset for IRR calibration: call IRRCallback.bind(trainer) or train with a train_dataset"
        )
    iterator = iter(dataset)
    first = next(iterator, None)
    if first is None:
        raise DataError("the training dataset is empty: IRR calibration needs at least one example")
    if not isinstance(first, Mapping):
        raise DataError(f"training examples are {type(first).__name__}, expected dicts with 'input_ids' or text")
    if text_column is not None and text_column not in first:
        raise DataError(f"calibration data has no column '{text_column}'; its columns are {list(first)}")
    if "input_ids" in first and text_column is None:
        out: list[dict] = []
        for row in _chain(first, iterator):
            out.extend(trained_sequences(row))
            if len(out) >= num_samples:
                break
        return out[:num_samples]
    rows = [first]
    for item in iterator:
        if len(rows) >= num_samples:
            break
        rows.append(item)
    rows = rows[:num_samples]
    if tokenizer is None:
        raise DataError(
            f"training examples are not tokenized (keys {list(first)}) and no processing_class "
            "was given to tokenize them"
        )
    out = []
    for r in rows:
        if text_column is not None:
            ids = tokenizer(str(r[text_column]))["input_ids"]
        elif "messages" in r and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(r["messages"], tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        elif "text" in r:
            ids = tokenizer(r["text"])["input_ids"]
        elif "prompt" in r:
            answer = r.get("completion", r.get("response"))
            ids = _chat_ids(tokenizer, str(r["prompt"]), None if answer is None else str(answer))[1]
        else:
            raise DataError(
                f"calibration data has no usable column (columns: {list(r)}); expected 'input_ids', "
                "'text', 'prompt'(+'completion'/'response') or 'messages'"
            )
        out.append({"input_ids": list(ids)[:max_length]})
    return out


def _chain(first: Any, rest: Any):
    yield first
    yield from rest


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def trained_sequences(row: Mapping[str, Any]) -> list[dict]:
    """One pre-tokenized training row as the sequences training saw: `input_ids`, `attention_mask` (when
    given) and `labels` (-100 where the loss was masked: given `labels`, else TRL's `completion_mask` /
    `assistant_masks` (0 = masked)), split at the boundaries of a packed row (`seq_lengths`, else every
    `position_ids` restart at 0). A row that is not packed is one sequence."""
    ids = _as_list(row["input_ids"])
    if ids and isinstance(ids[0], list):
        raise DataError("training rows hold a batch of input_ids (2-D); IRR calibration reads one row per example")
    seq = {"input_ids": ids}
    if row.get("attention_mask") is not None:
        seq["attention_mask"] = _as_list(row["attention_mask"])
    labels = _as_list(row["labels"]) if row.get("labels") is not None else None
    for column in ("completion_mask", "assistant_masks"):
        if labels is None and row.get(column) is not None:
            keep = _as_list(row[column])
            labels = [t if k else -100 for t, k in zip(ids, keep)]
        elif labels is not None and row.get(column) is not None:  # both: a token is trained when both say so
            labels = [t if k else -100 for t, k in zip(labels, _as_list(row[column]))]
    if labels is not None:
        seq["labels"] = labels
    for key, values in seq.items():
        if len(values) != len(ids):
            raise DataError(f"a training row's {key} has {len(values)} entries, its input_ids {len(ids)}")
    lengths = _packed_lengths(row, len(ids))
    if lengths is None:
        return [seq]
    out, start = [], 0
    for n in lengths:
        out.append({k: v[start : start + n] for k, v in seq.items()})
        start += n
    return [s for s in out if s["input_ids"]]


def _packed_lengths(row: Mapping[str, Any], total: int) -> list[int] | None:
    """The lengths of the sequences in a packed row, None when it is not packed."""
    if row.get("seq_lengths") is not None:
        lengths = [int(n) for n in _as_list(row["seq_lengths"])]
        if sum(lengths) != total or any(n < 0 for n in lengths):
            raise DataError(f"a packed training row's seq_lengths {lengths} do not add up to its {total} tokens")
        return lengths if len(lengths) > 1 else None
    if row.get("position_ids") is not None:
        positions = [int(p) for p in _as_list(row["position_ids"])]
        starts = [k for k, p in enumerate(positions) if p == 0 or k == 0]
        if len(starts) <= 1:
            return None
        return [b - a for a, b in zip(starts, starts[1:] + [total])]
    return None
