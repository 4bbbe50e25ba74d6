"""Named input streams of the layer loop, and the calibration stream built from `IRRConfig`.

A `Stream` is one named input stream ("calibration"; the safety-regularised recalibration adds
"safety", the retain term "retain"): its batches, the hidden states entering the current layer, every layer's non-hidden
arguments (masks, rotary embeddings, positions) and the token masks that exclude padding. Every
stream is captured, propagated through the already realigned layers and gets its own H per group.
A stream may carry an aligned `twin`: the same batches travelling through the aligned weights
(the aligned-target safety term pairs each token's two inputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import NO_RETAIN_OBJECTIVE, RECOMMENDED_RETAIN_OBJECTIVE, IRRConfig
from ..report import IRRReport
from .calibration import CalibrationError, calibration_batches, unbatch
from .capture import capture_layer_inputs, capture_with_stub_layers, propagate


#: The stream every run has: the downstream calibration data.
CALIBRATION = "calibration"
#: Harmful prompts with safe responses (safety_weight != 0), and its aligned twin's suffixes in
#: `GroupHessians`: H_A of the twin's inputs and the cross Gram C = 2·Σ x_A x_rᵀ / n.
SAFETY = "safety"
ALIGNED, CROSS = "_aligned", "_cross"
#: General prompts with answers (retain_weight > 0): their H_r joins the task metric, H_d + ρH_r.
RETAIN = "retain"

WeightsContext = Callable[[int], AbstractContextManager]


@dataclass
class Stream:
    """One named input stream through the layer loop.

    `hidden[b]`: batch b's hidden states entering the current layer; `args[layer][b]`: (args, kwargs,
    in_kwargs) of that layer's call on batch b; `masks[b]`: which positions are real tokens (zero for a
    process's padding batches)."""

    name: str
    batches: list[dict[str, torch.Tensor]]
    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[tuple[tuple, dict, bool]]] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    weights: WeightsContext | None = None  # runs of layer `index` use other weights (the aligned twin)
    twin: Stream | None = None  # the same batches through the aligned weights (or, `entry`, the fine-tuned ones)
    entry: bool = False  # a twin that runs through each layer as it entered the loop: propagated before the solve

    def capture(self, model: nn.Module, layers: nn.ModuleList, *, stubs: bool) -> None:
        """Record the layer-0 inputs and every layer's arguments (`stubs`: layers replaced by identities)."""
        with self.embedding_context(model):
            if stubs:
                self.hidden, self.args = capture_with_stub_layers(model, layers, self.batches)
            else:
                self.hidden, self.args = capture_layer_inputs(model, layers, self.batches, stop_early=False)
        self.masks = [b.get("irr_token_mask", b["attention_mask"]) for b in self.batches]
        if self.twin is not None:
            self.twin.capture(model, layers, stubs=stubs)

    def embedding_context(self, model: nn.Module) -> AbstractContextManager:
        """Where the stream's layer-0 inputs come from (the twin: the aligned embedding, when known)."""
        return self.weights(-1) if self.weights is not None else contextlib.nullcontext()

    def layer_context(self, index: int) -> AbstractContextManager:
        """The weights this stream's batches see at layer `index`."""
        return self.weights(index) if self.weights is not None else contextlib.nullcontext()

    def propagate(self, layer: nn.Module, index: int, *, twin: bool = True) -> None:
        """The next layer's inputs: this stream's batches run through the (realigned) layer `index`, and
        (`twin`) its aligned twin's through the aligned weights."""
        with self.layer_context(index):
            self.hidden = propagate(layer, self.hidden, self.args[index])
        if twin and self.twin is not None and not self.twin.entry:
            self.twin.propagate(layer, index)

    def propagate_entry_twin(self, layer: nn.Module, index: int) -> None:
        """A fine-tuned twin's next inputs: its batches through layer `index` as it entered the loop (call it
        before the layer's solve writes)."""
        if self.twin is not None and self.twin.entry:
            self.twin.propagate(layer, index)

    def release(self) -> None:
        """Drop the captured hidden states (and the twin's): a run on subsets then frees each layer's inputs as it
        goes. `capture` makes them again."""
        self.hidden = []
        if self.twin is not None:
            self.twin.release()

    def copy(self, *, share_twin: bool = False) -> Stream:
        """A stream with its own hidden-state list (tensors shared until replaced): for trial runs.
        `share_twin`: the copy keeps the same twin object (its states do not depend on the trial)."""
        twin = self.twin if share_twin or self.twin is None else self.twin.copy()
        return Stream(
            self.name, self.batches, list(self.hidden), self.args, self.masks, self.weights, twin, self.entry
        )

    def subset(self, indices: list[int]) -> Stream:
        """The batches at `indices` only (their hidden states, arguments and masks)."""
        twin = self.twin.subset(indices) if self.twin is not None else None
        return Stream(
            self.name,
            [self.batches[i] for i in indices],
            [self.hidden[i] for i in indices],
            [[layer_args[i] for i in indices] for layer_args in self.args],
            [self.masks[i] for i in indices],
            self.weights,
            twin,
            self.entry,
        )


def prepare_calibration(
    calibration: Any, config: IRRConfig, model_config: Any, num_layers: int
) -> tuple[list[dict[str, torch.Tensor]], IRRReport]:
    """Padded calibration batches, and the report that will record what is done with them.
    With `safety_weight="auto"` or a `calibration_filter` the batches carry `irr_loss_mask` (the response
    tokens: the held-out part is scored, the filter tells prompt from response); with
    `calibration_loss_tokens_only` an `irr_token_mask` lets only the tokens with labels (!= -100) into H."""
    batches = _calibration_batches(calibration, config, model_config)
    report = IRRReport(
        config=config.to_dict(),
        num_layers=num_layers,
        setting=config.setting_name,
        safety_weight=None if config.safety_weight == "auto" else float(config.safety_weight) or None,
    )
    _count_calibration(batches, config, report)
    return batches, report


def keep_calibration_rows(
    batches: list[dict[str, torch.Tensor]], keep: list[bool], config: IRRConfig, model_config: Any, report: IRRReport
) -> list[dict[str, torch.Tensor]]:
    """The calibration batches rebuilt from the rows `keep` marks (`calibration_filter`), as `prepare_calibration`
    would have built them from those rows alone; the report's counts updated. Raises `CalibrationError` when no
    row is left, or too few for `safety_weight="auto"` (nothing has been modified yet)."""
    rows = [row for row, kept in zip(unbatch(batches), keep) if kept]
    if not rows:
        raise CalibrationError(
            f"IRRConfig.calibration_filter={config.calibration_filter!r} dropped all {len(keep)} calibration rows: the "
            "aligned model refuses every calibration prompt. Check the calibration data (harmful requests?), or set "
            "calibration_filter='none'"
        )
    data = [
        {
            "input_ids": row["input_ids"],
            "attention_mask": row["attention_mask"],
            "labels": torch.where(row["irr_loss_mask"].bool(), row["input_ids"], -100),
        }
        for row in rows
    ]
    given, batches = len(batches), _calibration_batches(data, config, model_config)
    if config.safety_weight == "auto" and len(batches) < 2 <= given:  # the filter, not the data, left one batch
        raise CalibrationError(
            f"IRRConfig.calibration_filter={config.calibration_filter!r} dropped {len(keep) - len(rows)} of {len(keep)} "
            f"calibration rows; the {len(rows)} left make one batch, and safety_weight='auto' holds out part of the "
            "calibration data to choose λ: give more calibration rows, a smaller calibration_batch_size, a number for "
            "safety_weight, or calibration_filter='none'"
        )
    _count_calibration(batches, config, report)
    return batches


def _calibration_batches(calibration: Any, config: IRRConfig, model_config: Any) -> list[dict[str, torch.Tensor]]:
    selection = "response" if config.calibration_loss_tokens_only else None
    return _padded_batches(
        calibration,
        config,
        model_config,
        config.num_calibration_samples,
        token_selection=selection,
        answer_weight=config.calibration_answer_weight,
    )


def _count_calibration(batches: list[dict[str, torch.Tensor]], config: IRRConfig, report: IRRReport) -> None:
    key = "irr_token_mask" if "irr_token_mask" in batches[0] else "attention_mask"
    report.calibration_sequences = sum(b["input_ids"].shape[0] for b in batches)
    report.calibration_tokens = sum(int(b[key].bool().sum()) for b in batches)


def prepare_safety(
    safety_calibration: Any, config: IRRConfig, model_config: Any, report: IRRReport
) -> list[dict[str, torch.Tensor]]:
    """Padded safety-stream batches (harmful prompts with safe responses) when the safety weight is not
    0, with `irr_token_mask` selecting the tokens `config.safety_tokens` names (never padding); [] else."""
    if not config.uses_safety_stream:
        return []
    if safety_calibration is None:
        raise ValueError(
            f"IRRConfig.safety_weight={config.safety_weight!r} needs safety_calibration: harmful prompts with safe "
            "responses, tokenized like the calibration data (labels -100 on prompt tokens)"
        )
    batches = _padded_batches(
        safety_calibration,
        config,
        model_config,
        config.num_safety_samples,
        token_selection=config.safety_tokens,
        what="safety_calibration",
    )
    report.safety_sequences = sum(b["input_ids"].shape[0] for b in batches)
    report.safety_tokens = sum(int(b["irr_token_mask"].sum()) for b in batches)
    return batches


def retain_or_off(config: IRRConfig, retain_calibration: Any) -> IRRConfig:
    """`config`, or (a retain weight but no retain data) `config` with the retain term off and a warning: a call
    written before the retain stream, given a config with a retain weight, stays valid. The recommended preset's
    objective for the retain term (`RECOMMENDED_RETAIN_OBJECTIVE`, whatever λ) becomes the one chosen without it
    (`NO_RETAIN_OBJECTIVE`): its small ridge without the retain term lost old tasks on the dev worlds."""
    if not config.uses_retain_stream or retain_calibration is not None:
        return config
    from dataclasses import replace

    from transformers.utils import logging

    changes: dict[str, Any] = {"retain_weight": 0.0}
    preset = all(getattr(config, k) == v for k, v in RECOMMENDED_RETAIN_OBJECTIVE.items())
    if preset:
        changes.update(NO_RETAIN_OBJECTIVE)
    objective = ", ".join(f"{k}={v!r}" for k, v in NO_RETAIN_OBJECTIVE.items())
    logging.get_logger(__name__).warning(
        f"IRR: IRRConfig.retain_weight={config.retain_weight:g} but no retain_calibration was given: the retain term "
        "is off for this run (retain_weight 0 in the report)"
        + (f", and the recommended objective without it is used ({objective})" if preset else "")
        + ". Pass general prompts with answers to keep what the model could already do (docs/safety-weight.md)."
    )
    return replace(config, **changes)


def prepare_retain(
    retain_calibration: Any, config: IRRConfig, model_config: Any, report: IRRReport
) -> list[dict[str, torch.Tensor]]:
    """Padded retain-stream batches (general prompts with answers; every real token feeds H_r) when the
    retain weight is > 0; [] else (the data is then ignored: the run is bit for bit as without it)."""
    if not config.uses_retain_stream:
        return []
    if retain_calibration is None:
        raise ValueError(
            f"IRRConfig.retain_weight={config.retain_weight!r} needs retain_calibration: general prompts with "
            "answers, tokenized like the calibration data (labels -100 on prompt tokens)"
        )
    batches = _padded_batches(
        retain_calibration,
        config,
        model_config,
        config.num_retain_samples,
        token_selection="all",
        what="retain_calibration",
    )
    report.retain_sequences = sum(b["input_ids"].shape[0] for b in batches)
    report.retain_tokens = sum(int(b["irr_token_mask"].sum()) for b in batches)
    return batches


def _padded_batches(data: Any, config: IRRConfig, model_config: Any, samples: int, **kwargs: Any) -> list[dict]:
    """`calibration_batches` with the config's length and batch size, the model's pad id (else 0), and
    `irr_loss_mask` (the response tokens) when `safety_weight="auto"` scores the held-out part or the
    calibration filter looks for the prompts."""
    pad = getattr(model_config, "pad_token_id", None)
    return calibration_batches(
        data,
        max_samples=samples,
        max_length=config.calibration_max_length,
        batch_size=config.calibration_batch_size,
        pad_token_id=pad if isinstance(pad, int) else 0,
        loss_mask=config.safety_weight == "auto" or config.calibration_filter != "none",
        **kwargs,
    )
