"""`realign(model, base=..., safety_vector=..., calibration=...)`: IRR on a model in memory, in place.

Checks every input, captures the calibration stream, runs the layer loop (`loop.run_layers`) under
the process-group context the model calls for, and restores every weight on any error.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..distributed import context_for
from ..report import IRRReport
from ..targets import find_targets
from .aligned import AlignedWeights
from .auto_weight import AUTO_SHARES, resolve_auto_weight, split_held_out
from .calibration_filter import filter_calibration
from .inputs import SafetyInputs
from .loop import compute_device, run_layers
from .lowrank import AdapterFactors
from .solve import GroupSolver
from .streams import (
    CALIBRATION,
    RETAIN,
    SAFETY,
    Stream,
    prepare_calibration,
    prepare_retain,
    prepare_safety,
    retain_or_off,
)
from .writing import make_backup


logger = logging.get_logger(__name__)


def realign(
    model: nn.Module,
    *,
    base: Any = None,
    safety_vector: Any = None,
    calibration: Any,
    safety_calibration: Any = None,
    importance: Any = None,
    config: IRRConfig | None = None,
    progress: bool = True,
    lowrank: AdapterFactors | None = None,
    retain_calibration: Any = None,
) -> IRRReport:
    """Realign a fine-tuned causal LM in place (identify, remove, recalibrate) and return what was done.

    Per target weight with fine-tuning delta Δ = W_F − W_A, the entries whose sign conflicts with the
    safety vector are removed (ranked by importance when `remove_ratio` < 1), and the remaining
    entries are recalibrated so the layer's outputs on the calibration tokens change the least:
    minimise tr((Δ′ − Δ) H (Δ′ − Δ)ᵀ) with Δ′ = 0 on the removed entries, H = 2XXᵀ/n. The result is
    written as W_A + Δ′. All or nothing: on any error every weight is restored before the error propagates.

    Beyond the paper, with `config.safety_weight` λ != 0 (e.g. `IRRConfig.recommended()`), a safety
    stream of harmful prompts with safe responses travels through the layers beside the calibration
    data and the recalibration minimises ‖Δ′ − Δ‖²_{H_d} + λ·‖W′X_r − W_A X_A‖² (the aligned model's
    outputs on its own activations; `safety_term="delta"`: λ‖Δ′X_r‖²); `safety_weight="auto"` picks λ
    from held-out data. With `identify_mode="none"` nothing is removed by sign and no safety vector is needed.
    With `calibration_filter="refused"` (in `IRRConfig.recommended()`) the calibration rows whose prompt the aligned
    model refuses (harmful requests the fine-tuning data answered) are dropped first; the report lists them.

    Args:
        model: the fine-tuned model (`PreTrainedModel`, a `PeftModel` with LoRA adapters, or wrapped by
            DDP / FSDP / DeepSpeed inside a process group).
        base: the aligned model (`PreTrainedModel`), a name → tensor mapping or a safetensors path;
            optional only when every target is a LoRA layer (its frozen weight is the base).
        safety_vector: name → tensor mapping (or safetensors path) keyed like `model.named_parameters()`,
            e.g. from `irr_callback.safety_vector`; entries for non-targets are ignored. Not needed (and
            ignored) with `identify_mode="none"`.
        calibration: batches with `input_ids` (+ `attention_mask`), e.g. a DataLoader, or a
            `datasets.Dataset` with `input_ids`.
        safety_calibration: harmful prompts with safe responses in the same forms, plus optional `labels`
            (-100 on prompt tokens); needed when `config.safety_weight != 0`, ignored otherwise.
        importance: like `safety_vector` (e.g. from `irr_callback.fisher`); required when
            `config.remove_ratio` < 1.
        config: the `IRRConfig` (default: the paper's settings).
        progress: show a progress bar over the layers.
        lowrank: LoRA runs (`IRRCallback`): an `AdapterFactors` that collects, layer by layer, the
            H-weighted low-rank factors of each LoRA target's Δ′ for a realigned adapter. The model
            itself is realigned exactly either way.
        retain_calibration: general prompts with answers in the same forms (labels -100 on prompt tokens);
            needed when `config.retain_weight` > 0, ignored otherwise. A third stream: the recalibration
            also keeps each layer's outputs on these tokens at the fine-tuned model's, ρ‖(Δ′ − Δ)X_r‖²
            (H_d + ρH_r in place of H_d), protecting what the model could already do.

    Returns:
        `IRRReport`: per-module statistics and totals.

    Example:

    ```python
    >>> from irr_callback import IRRConfig, realign, safety_vector
    >>> vector = safety_vector(base_model, unaligned_model)
    >>> report = realign(finetuned, base=base_model, safety_vector=vector, calibration=loader,
    ...                  config=IRRConfig(remove_ratio=1.0))
    >>> print(report.summary())
    >>> # the recommended setting: no safety vector, a safety stream, λ chosen from held-out data
    >>> report = realign(finetuned, base=base_model, calibration=loader, safety_calibration=refusals,
    ...                  config=IRRConfig.recommended())
    ```
    """
    config = retain_or_off(config or IRRConfig(), retain_calibration)
    started = time.perf_counter()
    prefix, layers, targets = find_targets(model, config.target_modules)
    inputs = SafetyInputs.resolve(config, base, safety_vector, importance)
    inputs.validate(targets)
    batches, report = prepare_calibration(calibration, config, getattr(model, "config", None), len(layers))
    safety_batches = prepare_safety(safety_calibration, config, getattr(model, "config", None), report)
    retain_batches = prepare_retain(retain_calibration, config, getattr(model, "config", None), report)
    dist_ctx = context_for(model, targets)  # SingleProcess without a process group: no collectives
    aligned = AlignedWeights(model, layers, prefix, targets, inputs.base, dist_ctx)
    backups = [make_backup(config.backup)]  # the last one holds what the run wrote (a put-back candidate's: closed)
    was_training = model.training
    model.eval()

    def capture(stream: Stream) -> None:  # one process: layers stubbed out, the capture costs the embedding only
        stream.capture(model, layers, stubs=dist_ctx.stop_capture_early)

    try:
        with torch.no_grad():
            if config.calibration_filter != "none":  # before the held-out split: no measure sees the dropped rows
                batches = filter_calibration(
                    model, layers, batches, safety_batches, aligned, dist_ctx, config,
                    getattr(model, "config", None), report, capture=capture, progress=progress,
                )  # fmt: skip
            streams, held_out = build_streams(batches, safety_batches, config, dist_ctx, aligned, retain_batches)
            for stream in streams:
                capture(stream)

            def realign_layers(weight: Any, run_streams: list[Stream], rider: Any = None) -> None:
                solver = GroupSolver(
                    inputs, replace(config, safety_weight=weight).realign_settings(), backups[-1], report
                )
                run_layers(
                    prefix, layers, targets, run_streams, solver, dist_ctx,
                    device=compute_device(config), progress=progress, lowrank=lowrank, rider=rider,
                    sequential=config.true_sequential,
                )  # fmt: skip

            def put_back() -> None:
                """The kept-first candidate was not chosen: the fine-tuned weights and the streams again."""
                dist_ctx.restore(backups[-1])
                backups.append(make_backup(config.backup))
                report.modules = []
                if lowrank is not None:
                    lowrank.factors.clear()
                for stream in streams:
                    capture(stream)

            written = False
            if held_out:  # safety_weight="auto": choose λ on held-out batches (the smallest candidate may be the run)
                config, written = resolve_auto_weight(
                    model, layers, targets, streams, held_out, inputs, config, dist_ctx, report,
                    device=compute_device(config), progress=progress, first_run=realign_layers, undo_first=put_back,
                )  # fmt: skip
            if not written:  # every batch, the held-out ones included
                realign_layers(config.safety_weight, streams)
    except BaseException as exc:
        dist_ctx.restore(backups[-1])
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        backups[-1].close()
        model.train(was_training)
    report.modules = dist_ctx.merge_stats(report.modules, [t.name for t in targets])
    report.seconds = time.perf_counter() - started
    logger.info(report.summary())
    return report


def build_streams(
    batches: list,
    safety_batches: list,
    config: IRRConfig,
    dist_ctx: Any,
    aligned: AlignedWeights,
    retain_batches: list | None = None,
) -> tuple[list[Stream], dict[str, int]]:
    """The run's streams (calibration; safety with its aligned twin when the safety weight is not 0; retain
    when the retain weight is > 0), each this rank's share padded with zero-weight batches, and (auto) how
    many of each stream's last batches are held out to choose λ and how many first ones feed the candidates'
    Hessians ({} otherwise). The aligned twin only with `safety_term="aligned"`."""
    retain_batches = retain_batches or []
    if not safety_batches:
        streams = [Stream(CALIBRATION, dist_ctx.shard_calibration(batches))]
        if retain_batches:
            streams.append(Stream(RETAIN, dist_ctx.shard_calibration(retain_batches)))
        return streams, {}
    held_out: dict[str, int] = {}
    given = {CALIBRATION: batches, SAFETY: safety_batches, RETAIN: retain_batches}
    given = {name: part for name, part in given.items() if part}
    parts = {name: [part] for name, part in given.items()}
    if config.safety_weight == "auto":  # split before sharding: every process count sees the same parts
        what = {CALIBRATION: "calibration", SAFETY: "safety_calibration", RETAIN: "retain_calibration"}
        parts = {}
        for name, part in given.items():
            train, held = split_held_out(part, what[name])
            share = max(1, math.ceil(len(train) * AUTO_SHARES[name]))
            parts[name] = [train[:share], train[share:], held]
    sharded = {name: [dist_ctx.shard_calibration(part) for part in split if part] for name, split in parts.items()}
    if config.safety_weight == "auto":
        for name in sharded:
            held_out[name] = len(sharded[name][-1])
            held_out[f"{name}_share"] = len(sharded[name][0])
    joined = {name: [b for part in split for b in part] for name, split in sharded.items()}
    twin = Stream(SAFETY + "(aligned)", joined[SAFETY], weights=aligned) if config.safety_term == "aligned" else None
    streams = [Stream(CALIBRATION, joined[CALIBRATION]), Stream(SAFETY, joined[SAFETY], twin=twin)]
    if RETAIN in joined:
        streams.append(Stream(RETAIN, joined[RETAIN]))
    if config.task_term == "fine-tuned":  # each task-side stream's copy through the fine-tuned layers
        for stream in streams:
            if stream.name != SAFETY:
                stream.twin = Stream(stream.name + "(fine-tuned)", stream.batches, entry=True)
    return streams, held_out
