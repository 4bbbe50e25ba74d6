"""Named input streams of the layer loop, and the calibration stream built from `IRRConfig`.

A `Stream` is one named input stream (today "calibration"; the safety-regularised recalibration adds
"safety"): its batches, the hidden states entering the current layer, every layer's non-hidden
arguments (masks, rotary embeddings, positions) and the token masks that exclude padding. Every
stream is captured, propagated through the already realigned layers and gets its own H per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration import calibration_batches
from ..config import IRRConfig
from ..report import IRRReport
from .capture import capture_layer_inputs, capture_with_stub_layers, propagate


#: The stream every run has: the downstream calibration data.
CALIBRATION = "calibration"


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

    def capture(self, model: nn.Module, layers: nn.ModuleList, *, stubs: bool) -> None:
        """Record the layer-0 inputs and every layer's arguments (`stubs`: layers replaced by identities)."""
        if stubs:
            self.hidden, self.args = capture_with_stub_layers(model, layers, self.batches)
        else:
            self.hidden, self.args = capture_layer_inputs(model, layers, self.batches, stop_early=False)
        self.masks = [b.get("irr_token_mask", b["attention_mask"]) for b in self.batches]

    def propagate(self, layer: nn.Module, index: int) -> None:
        """The next layer's inputs: this stream's batches run through the (realigned) layer `index`."""
        self.hidden = propagate(layer, self.hidden, self.args[index])


def prepare_calibration(
    calibration: Any, config: IRRConfig, model_config: Any, num_layers: int
) -> tuple[list[dict[str, torch.Tensor]], IRRReport]:
    """Padded calibration batches, and the report that will record what is done with them."""
    pad = getattr(model_config, "pad_token_id", None)
    batches = calibration_batches(
        calibration,
        max_samples=config.num_calibration_samples,
        max_length=config.calibration_max_length,
        batch_size=config.calibration_batch_size,
        pad_token_id=pad if isinstance(pad, int) else 0,
    )
    report = IRRReport(
        config=config.to_dict(),
        num_layers=num_layers,
        calibration_sequences=sum(b["input_ids"].shape[0] for b in batches),
        calibration_tokens=sum(int(b["attention_mask"].sum()) for b in batches),
    )
    return batches, report
