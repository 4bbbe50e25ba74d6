"""Step 1b of the data path (`IRRConfig.calibration_filter="refused"`): drop the calibration rows whose
prompt the aligned reference refuses, before the streams are built (so the auto search's held-out task
measure never sees them either).

Fine-tuning data can hold harmful requests answered (an attack, or a careless data mix). As calibration rows
they make the recalibration keep, and the auto search reward, exactly the deltas that undo refusals
(docs/safety-weight.md, the calibration-filter experiments). A row is judged by the aligned reference: every
target at W_A (a LoRA target with its adapter off) and every other tensor the base holds at its base value (the
auto search's λ = ∞ reference, plus the head where the base has it). It is dropped when, teacher-forced after the
row's prompt, each of the first `REFUSAL_PREFIX_TOKENS` tokens of one of the safety stream's refusals is the
reference's argmax: greedy decoding would begin the answer with that refusal. No tokenizer and no generation:
layer-by-layer passes of probe sequences (the prompts alone, then prompt + refusal opening where the first answer
token is a refusal's) through the same aligned context as the safety stream's twin, so it runs wherever `realign`
runs (one process, DDP, FSDP, ZeRO-3, the offline path).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..report import IRRReport
from .aligned import AlignedWeights
from .calibration import unbatch
from .head import scored_logits
from .loop import LayerHook
from .streams import Stream, keep_calibration_rows


logger = logging.get_logger(__name__)

#: how many leading tokens of a refusal the aligned reference must reproduce greedily
REFUSAL_PREFIX_TOKENS = 4
#: the most common distinct refusal prefixes of the safety stream that are tried per row
MAX_REFUSALS = 4
#: a warning fires when more than this share of the calibration rows is dropped
LARGE_DROP_SHARE = 0.25


def refusal_prefixes(safety_batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The safety stream's distinct refusal openings (first `REFUSAL_PREFIX_TOKENS` response tokens), most
    common first, at most `MAX_REFUSALS`."""
    counts: Counter[tuple[int, ...]] = Counter()
    for batch in safety_batches:
        for ids, scored in zip(batch["input_ids"], batch["irr_loss_mask"]):
            opening = ids[scored.bool()][:REFUSAL_PREFIX_TOKENS]
            if opening.numel():
                counts[tuple(opening.tolist())] += 1
    return [torch.tensor(p, dtype=torch.long) for p, _ in counts.most_common(MAX_REFUSALS)]


def row_prompts(rows: list[dict[str, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """(row index, prompt) of every row with a prompt: the tokens before its first response token. Rows with no
    prompt (no labels) or no response left after truncation cannot be judged (they are kept)."""
    out = []
    for index, row in enumerate(rows):
        response = row["irr_loss_mask"].bool().nonzero()
        if len(response) and int(response[0]) > 0:
            out.append((index, row["input_ids"][: int(response[0])]))
    return out


def probe_batches(
    probes: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompt + continuation, `irr_loss_mask` on the continuation."""
    batches = []
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        width = max(len(prompt) + len(more) for prompt, more in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (prompt, more) in enumerate(chunk):
            end = len(prompt) + len(more)
            input_ids[r, :end] = torch.cat([prompt, more])
            attention[r, :end] = 1
            scored[r, len(prompt) : end] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention, "irr_loss_mask": scored})
    return batches


@torch.no_grad()
def greedy_tokens(
    model: nn.Module,
    layers: nn.ModuleList,
    probes: list[dict[str, torch.Tensor]],
    aligned: AlignedWeights,
    capture: Callable[[Stream], None],
    hooks: tuple[LayerHook | None, LayerHook | None] = (None, None),
    progress: bool = True,
) -> list[list[int]]:
    """Per probe sequence: the aligned reference's argmax at each scored position (teacher-forced: what greedy
    decoding says there, given the tokens before it).

    `capture(stream)` records the probes' layer-0 inputs as the run captures its streams; `hooks`: the offline
    path's per-layer load and drop. Every process runs every probe (the same collectives under sharded weights).
    Nothing is written: the aligned weights are swapped in per layer and for the head, and back."""
    stream = Stream("calibration filter", probes, weights=aligned)
    capture(stream)
    load_layer, drop_layer = hooks
    for index in logging.tqdm(range(len(layers)), desc="IRR calibration filter", disable=not progress):
        if load_layer is not None:
            load_layer(index, layers[index])
        stream.propagate(layers[index], index)
        if drop_layer is not None:
            drop_layer(index, layers[index])
    out = []
    with aligned.head():
        for scored, logits, _ in scored_logits(model, layers, stream):
            best = logits.argmax(dim=-1).cpu()
            out.extend(best[r][scored[r].cpu()].tolist() for r in range(best.shape[0]))
    return out


def record_filter(report: IRRReport, summary: dict[str, Any]) -> None:
    """Write the filter's summary into the report, and warn where it could not judge or dropped much."""
    report.calibration_filter = summary
    rows, judged, dropped = summary["rows"], summary["judged"], summary["dropped"]
    if judged == 0:
        logger.warning(
            "IRR calibration_filter='refused' judged no calibration row: rows need labels (-100 on prompt tokens) "
            "to tell the prompt from the response; nothing was dropped."
        )
    elif dropped > LARGE_DROP_SHARE * rows:
        logger.warning(
            f"IRR calibration_filter='refused': the aligned model refuses {dropped} of the {rows} calibration prompts; "
            "they were dropped. Check the fine-tuning data for harmful requests answered."
        )
    else:
        logger.info(f"IRR calibration_filter='refused': dropped {dropped} of {rows} calibration rows")


def filter_calibration(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: list[dict[str, torch.Tensor]],
    safety_batches: list[dict[str, torch.Tensor]],
    aligned: AlignedWeights,
    dist_ctx: Any,
    config: IRRConfig,
    model_config: Any,
    report: IRRReport,
    *,
    capture: Callable[[Stream], None],
    progress: bool = True,
    hooks: tuple[LayerHook | None, LayerHook | None] = (None, None),
) -> list[dict[str, torch.Tensor]]:
    """`config.calibration_filter` applied: the calibration batches without the rows whose prompt the aligned
    reference refuses, rebuilt as `prepare_calibration` builds them, with the filter's summary in `report`.

    Two passes of `greedy_tokens`: the prompts alone give the reference's first answer token; only where it is a
    refusal opening's first token does the whole opening run after the prompt (most rows are never refused, so
    the cost is about one pass over the prompts). Rank 0's first tokens and the summed verdicts are every rank's,
    so every rank drops the same rows. `capture`, `hooks`: as `greedy_tokens`'."""
    started = time.perf_counter()
    pad = getattr(model_config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    rows = unbatch(batches)
    refusals = refusal_prefixes(safety_batches)
    prompts = row_prompts(rows)
    refused = torch.zeros(len(rows), dtype=torch.float64)
    probed = 0
    if prompts and refusals:
        judge = functools.partial(
            greedy_tokens, model, layers, aligned=aligned, capture=capture, hooks=hooks, progress=progress
        )
        # pass 1, the prompts alone: the reference's first answer token (one token scored per row)
        probes = [(prompt, refusals[0][:1]) for _, prompt in prompts]
        first = torch.tensor(
            [tokens[0] for tokens in judge(probe_batches(probes, config.calibration_batch_size, pad))]
        )
        if dist_ctx.kind != "single":  # every rank builds the same second pass (the same collectives)
            from ..distributed import broadcast_

            broadcast_(first, src=0)
        # pass 2, only where that token opens a refusal: the whole opening, teacher-forced
        pairs = [
            (i, prompt, r) for (i, prompt), token in zip(prompts, first.tolist()) for r in refusals if r[0] == token
        ]
        probed = len(pairs)
        if pairs:
            probes = [(prompt, opening) for _, prompt, opening in pairs]
            answers = judge(probe_batches(probes, config.calibration_batch_size, pad))
            for (index, _, opening), tokens in zip(pairs, answers):
                refused[index] += float(tokens == opening.tolist())
    if dist_ctx.kind != "single":
        from ..distributed import all_reduce_sum_

        all_reduce_sum_(refused)
    flags = [bool(v > 0) for v in refused.tolist()]
    record_filter(
        report,
        {
            "filter": config.calibration_filter,
            "rows": len(rows),
            "judged": len(prompts) if refusals else 0,
            "refusal_openings": len(refusals),
            "second_pass_probes": probed,
            "dropped": sum(flags),
            "dropped_rows": [i for i, f in enumerate(flags) if f],
            "seconds": time.perf_counter() - started,
        },
    )
    return keep_calibration_rows(batches, [not f for f in flags], config, model_config, report)
