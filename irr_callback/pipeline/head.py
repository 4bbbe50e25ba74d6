"""The model's own head on a stream's recorded last-layer outputs: the logits at the scored tokens.

The `safety_weight="auto"` search (held-out losses) and the calibration filter (does the aligned reference
refuse this prompt?) both judge next-token predictions after a layer-by-layer pass. Running the model with
every decoder layer stubbed out and the last one returning the recorded states keeps whatever follows the
layer loop (final norm, LM head, soft-capping) the model's own, under every backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .capture import ArgsRecorder, accepts_argument
from .streams import Stream


def scored_logits(
    model: nn.Module, layers: nn.ModuleList, stream: Stream
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of `stream` (its `hidden` being the last layer's outputs, its batches carrying
    `irr_loss_mask`): (scored [B, P] bool, logits [B, P, V] float, targets [B, P]) where position p predicts
    `targets[:, p]` and `scored` marks the predictions of scored tokens. Where the model takes
    `logits_to_keep`, P holds only the positions some row scores (the rest never reach the LM head)."""
    originals = list(layers)
    device = next(model.parameters()).device
    select = accepts_argument(model, "logits_to_keep")
    try:
        for final, batch in zip(stream.hidden, stream.batches):
            scored = batch["irr_loss_mask"][:, 1:].bool()  # position t predicts token t + 1
            targets = batch["input_ids"][:, 1:]
            extra = {}
            if select:
                keep = scored.any(dim=0).nonzero().flatten()  # the positions any row scores
                keep = keep if keep.numel() else torch.zeros(1, dtype=torch.long)  # every rank runs every batch
                extra["logits_to_keep"] = keep.to(device)
                scored, targets = scored[:, keep], targets[:, keep]
            for i, layer in enumerate(originals):
                layers[i] = _Replay(layer, final if i == len(originals) - 1 else None)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
                **extra,
            ).logits.float()
            logits = logits if select else logits[:, :-1]
            for i, layer in enumerate(originals):
                layers[i] = layer
            yield scored.to(logits.device), logits, targets.to(logits.device)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class _Replay(ArgsRecorder):
    """`ArgsRecorder`'s identity stand-in, except that the last layer returns the recorded output."""

    def __init__(self, layer: nn.Module, output: torch.Tensor | None):
        super().__init__(layer)
        object.__setattr__(self, "_output", output)

    def forward(self, hidden_states, *args, **kwargs):
        out = object.__getattribute__(self, "_output")
        return hidden_states if out is None else out.to(hidden_states.device, hidden_states.dtype)
