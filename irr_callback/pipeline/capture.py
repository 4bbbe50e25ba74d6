"""Step 1 of the data path: capture what enters the decoder layers, and run batches through one layer."""

from __future__ import annotations

import inspect

import torch
from torch import nn


class StopForward(Exception):
    """Ends a forward pass early once everything it was run for is recorded."""


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[dict[str, torch.Tensor]], stop_early: bool = True
):
    """One forward pass per batch recording every layer's non-hidden arguments (masks, rotary
    embeddings, positions: they may differ per layer) and the hidden states entering layer 0.

    `stop_early`: end each pass with an exception at the last layer's pre-hook (saves the last layer
    and the LM head). Sharded backends (ZeRO-3, FSDP) pass False: their forward hooks gather and
    release parameters and keep per-pass bookkeeping (DeepSpeed's module stack and prefetch trace)
    that an interrupted forward leaves mid-pass; the pass then completes, with logits for one
    position only where the model accepts `logits_to_keep` (docs/distributed.md)."""
    hidden: list[torch.Tensor] = []
    layer_args: list[list[tuple[tuple, dict, bool]]] = [[] for _ in layers]
    last = len(layers) - 1

    def make_hook(index: int):
        def hook(module, args, kwargs):
            in_kwargs = not args
            x = kwargs["hidden_states"] if in_kwargs else args[0]
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            layer_args[index].append((tuple(args[1:]), rest_kwargs, in_kwargs))
            if index == 0:
                hidden.append(x)
            if index == last and stop_early:
                raise StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = input_device(model)
    extra = {} if stop_early or not accepts_argument(model, "logits_to_keep") else {"logits_to_keep": 1}
    try:
        for batch in batches:
            try:
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                    **extra,
                )
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return hidden, layer_args


class ArgsRecorder(nn.Module):
    """Stands in for a decoder layer during the capture pass: identity, so the model's forward
    reaches every layer's pre-hook without computing any layer; attribute reads go to the real
    layer (e.g. `attention_type`, which picks the mask a layer gets)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


def capture_with_stub_layers(model: nn.Module, layers: nn.ModuleList, batches: list[dict[str, torch.Tensor]]):
    """`capture_layer_inputs` with every decoder layer replaced by an identity stub.

    The per-layer arguments (masks, rotary embeddings, positions) are built by the model before its
    layer loop from the batch alone, not from earlier layers' outputs, so they come out the same
    as from a real pass, for the cost of the embedding (a real pass costs a whole forward)."""
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = ArgsRecorder(layer)
    try:
        return capture_layer_inputs(model, layers, batches)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def run_layer(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, in_kwargs: bool) -> torch.Tensor:
    """One batch through one decoder layer, called the way the model called it."""
    out = layer(*args, hidden_states=x, **kwargs) if in_kwargs else layer(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def propagate(layer: nn.Module, hidden: list[torch.Tensor], args: list) -> list[torch.Tensor]:
    """The next layer's inputs: the batches run through the (realigned) layer."""
    return [run_layer(layer, x, *args[b]) for b, x in enumerate(hidden)]


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the input embeddings' device."""
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return next(model.parameters()).device


def accepts_argument(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes the keyword `name` (e.g. `logits_to_keep`)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
