"""`realign(model, base=..., safety_vector=..., calibration=...)`: IRR on a model in memory, in place.

Checks every input, captures the calibration stream, runs the layer loop (`loop.run_layers`) under
the process-group context the model calls for, and restores every weight on any error.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..distributed import context_for
from ..report import IRRReport
from ..targets import find_targets
from .inputs import SafetyInputs
from .loop import compute_device, run_layers
from .solve import GroupSolver
from .streams import CALIBRATION, Stream, prepare_calibration
from .writing import make_backup


logger = logging.get_logger(__name__)


def realign(
    model: nn.Module,
    *,
    base: Any = None,
    safety_vector: Any,
    calibration: Any,
    importance: Any = None,
    config: IRRConfig | None = None,
    progress: bool = True,
) -> IRRReport:
    """Realign a fine-tuned causal LM in place (identify, remove, recalibrate) and return what was done.

    Per target weight with fine-tuning delta Δ = W_F − W_A, the entries whose sign conflicts with the
    safety vector are removed (ranked by importance when `remove_ratio` < 1), and the remaining
    entries are recalibrated so the layer's outputs on the calibration tokens change the least:
    minimise tr((Δ′ − Δ) H (Δ′ − Δ)ᵀ) with Δ′ = 0 on the removed entries, H = 2XXᵀ/n. The result is
    written as W_A + Δ′. All or nothing: on any error every weight is restored before the error propagates.

    Args:
        model: the fine-tuned model (`PreTrainedModel`, a `PeftModel` with LoRA adapters, or wrapped by
            DDP / FSDP / DeepSpeed inside a process group).
        base: the aligned model (`PreTrainedModel`), a name → tensor mapping or a safetensors path;
            optional only when every target is a LoRA layer (its frozen weight is the base).
        safety_vector: name → tensor mapping (or safetensors path) keyed like `model.named_parameters()`,
            e.g. from `irr_callback.safety_vector`; entries for non-targets are ignored.
        calibration: batches with `input_ids` (+ `attention_mask`), e.g. a DataLoader, or a
            `datasets.Dataset` with `input_ids`.
        importance: like `safety_vector` (e.g. from `irr_callback.fisher`); required when
            `config.remove_ratio` < 1.
        config: the `IRRConfig` (default: the paper's settings).
        progress: show a progress bar over the layers.

    Returns:
        `IRRReport`: per-module statistics and totals.

    Example:

    ```python
    >>> from irr_callback import IRRConfig, realign, safety_vector
    >>> vector = safety_vector(base_model, unaligned_model)
    >>> report = realign(finetuned, base=base_model, safety_vector=vector, calibration=loader,
    ...                  config=IRRConfig(remove_ratio=1.0))
    >>> print(report.summary())
    ```
    """
    config = config or IRRConfig()
    started = time.perf_counter()
    prefix, layers, targets = find_targets(model, config.target_modules)
    inputs = SafetyInputs.resolve(config, base, safety_vector, importance)
    inputs.validate(targets)
    batches, report = prepare_calibration(calibration, config, getattr(model, "config", None), len(layers))
    dist_ctx = context_for(model, targets)  # SingleProcess without a process group: no collectives
    # this rank's share, padded with zero-weight batches
    streams = [Stream(CALIBRATION, dist_ctx.shard_calibration(batches))]
    backup = make_backup(config.backup)
    solver = GroupSolver(inputs, config.realign_settings(), backup, report)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for stream in streams:  # one process: layers stubbed out, the capture costs the embedding only
                stream.capture(model, layers, stubs=dist_ctx.stop_capture_early)
            run_layers(
                prefix, layers, targets, streams, solver, dist_ctx, device=compute_device(config), progress=progress
            )
    except BaseException as exc:
        dist_ctx.restore(backup)
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        backup.close()
        model.train(was_training)
    report.modules = dist_ctx.merge_stats(report.modules, [t.name for t in targets])
    report.seconds = time.perf_counter() - started
    logger.info(report.summary())
    return report
