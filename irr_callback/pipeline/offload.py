"""Layers on and off the checkpoint: what the offline path adds to the layer loop.

`LayerStorage` materialises one decoder layer from the fine-tuned safetensors shards before the loop
uses it (`load`) and writes it as its own shard and drops it afterwards (`store`); `ShardWriter`
names the shards and writes the index at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..tensors import SafetensorsMapping, tensor_shape


# files of a Trainer checkpoint that are training state, not part of the model
_TRAINING_STATE = {"trainer_state.json", "model.safetensors.index.json"}
_ADAPTER_FILES = {"adapter_config.json", "README.md"}  # a PEFT checkpoint's: they describe the adapter
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken")


class LayerStorage:
    """`load_layer` / `store_layer` of the layer loop for a checkpoint on disk.

    Args:
        weights: the fine-tuned checkpoint's tensors (read per tensor).
        prefix: the decoder layers' module path, e.g. "model.layers".
        writer: where realigned layers go.
        device: where a loaded layer lives while it is realigned.
        on_load: called with the layer index once the layer is materialised (e.g. to check its targets).
    """

    def __init__(
        self, weights: Mapping[str, torch.Tensor], prefix: str, writer: ShardWriter, device: torch.device, on_load=None
    ) -> None:
        self.weights, self.prefix, self.writer, self.device, self.on_load = weights, prefix, writer, device, on_load

    def load(self, index: int, layer: nn.Module) -> None:
        materialise(layer, f"{self.prefix}.{index}", self.weights, self.device)
        if self.on_load is not None:
            self.on_load(index)

    def store(self, index: int, layer: nn.Module) -> None:
        self.writer.write({f"{self.prefix}.{index}.{k}": v for k, v in persistent_state(layer).items()})
        layer.to("meta")

    def store_rest(self) -> None:
        """Every tensor outside the decoder layers, copied unchanged."""
        layer_keys = {k for k in self.weights if in_layers(k, self.prefix)}
        self.writer.write_streamed((k for k in self.weights if k not in layer_keys), self.weights)


def has_weights(path: str) -> bool:
    return any(f.endswith(".safetensors") and not f.startswith("adapter_") for f in os.listdir(path))


def checkpoint_dtype(weights: SafetensorsMapping) -> torch.dtype:
    """The floating dtype of the stored weights (the model skeleton is built in it)."""
    for key in weights:
        t = weights[key]
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("the input embeddings are not a submodule of the model")


def in_layers(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".") and key[len(prefix) + 1 :].split(".", 1)[0].isdigit()


def persistent_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def materialise(module: nn.Module, prefix: str, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Replace the module's meta parameters/persistent buffers by the checkpoint's tensors."""
    for key in module.state_dict():
        full = f"{prefix}.{key}" if prefix else key
        if full not in weights:
            raise KeyError(
                f"the fine-tuned checkpoint has no tensor '{full}' (saved with another architecture or renamed keys?)"
            )
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = weights[full].to(device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value


@contextlib.contextmanager
def outside_layers(
    model: nn.Module, prefix: str, weights: Mapping[str, torch.Tensor], device: torch.device
) -> Iterator[None]:
    """Every tensor outside the decoder layers (embeddings, final norm, LM head) materialised for the
    context, then put back on meta: `safety_weight="auto"` scores its candidates with the model's own head.
    An LM head tied to the embeddings (absent from the checkpoint) shares the embeddings' tensor."""
    head = model.get_output_embeddings()
    embeddings = f"{module_name(model, model.get_input_embeddings())}.weight"
    tied = {f"{module_name(model, head)}.weight": embeddings} if head is not None else {}
    values: dict[str, nn.Parameter] = {}
    saved = []
    try:
        for key in model.state_dict():
            if in_layers(key, prefix):
                continue
            stored = key if key in weights else tied.get(key)
            if stored not in weights:
                raise KeyError(f"the fine-tuned checkpoint has no tensor '{key}' (saved with another architecture?)")
            if stored not in values:
                values[stored] = nn.Parameter(weights[stored].to(device), requires_grad=False)
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            slots = owner._parameters if attr in owner._parameters else owner._buffers
            saved.append((slots, attr, slots[attr]))
            slots[attr] = values[stored] if slots is owner._parameters else values[stored].data
        yield
    finally:
        for slots, attr, original in reversed(saved):
            slots[attr] = original


def check_checkpoint(model: nn.Module, prefix: str, weights: Mapping) -> None:
    """Before anything is computed: every tensor the decoder layers and the input embeddings need
    exists in the checkpoint with the shape the config gives (shapes read from headers)."""
    embeddings = module_name(model, model.get_input_embeddings())
    for key, value in model.state_dict().items():
        if in_layers(key, prefix) or key.startswith(embeddings):
            if key not in weights:
                raise KeyError(
                    f"the fine-tuned checkpoint has no tensor '{key}' (saved with another "
                    "architecture or renamed keys?)"
                )
            got = tensor_shape(weights, key)
            if got != tuple(value.shape):
                raise ValueError(
                    f"fine-tuned checkpoint tensor '{key}' has shape {got}, the config says {tuple(value.shape)}"
                )


class ShardWriter:
    """Writes safetensors shards one at a time, then names them model-0000i-of-0000N and writes the index."""

    def __init__(self, directory: str):
        self.directory = directory
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0
        self.largest = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(self.directory, name), metadata={"format": "pt"})
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        self.total += size
        self.largest = max(self.largest, size)
        self.shards.append((name, list(tensors)))

    def write_streamed(self, keys: Iterator[str], weights: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors unchanged, packed into shards no larger than the largest layer shard."""
        pending: dict[str, torch.Tensor] = {}
        size = 0
        for key in keys:
            t = weights[key]
            nbytes = t.numel() * t.element_size()
            if pending and size + nbytes > max(self.largest, 1):
                self.write(pending)
                pending, size = {}, 0
            pending[key] = t
            size += nbytes
        self.write(pending)

    def discard(self) -> None:
        """Delete every shard written so far (a realignment that was put back), to start again."""
        for name, _ in self.shards:
            os.remove(os.path.join(self.directory, name))
        self.shards, self.total, self.largest = [], 0, 0

    def finish(self) -> None:
        n = len(self.shards)
        weight_map = {}
        for i, (name, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, name), os.path.join(self.directory, final))
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)


def copy_side_files(source: str, target: str, *, adapter: bool = False) -> None:
    """Config, generation config, tokenizer and chat-template files; never training state or pickles.
    `adapter`: `source` is a LoRA checkpoint whose merged weights are written: not its adapter config or card."""
    skipped = _TRAINING_STATE | (_ADAPTER_FILES if adapter else set())
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name.endswith(_COPIED_SUFFIXES) and name not in skipped:
            shutil.copy2(path, os.path.join(target, name))
