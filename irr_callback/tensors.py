"""Name-keyed tensor sources: a model, a dict, or safetensors files read lazily.

Everything IRR consumes (base weights, safety vector, importance) is a mapping from the
parameter name as `model.named_parameters()` spells it to a tensor. PEFT wrappers are stripped so
a LoRA model and its merged counterpart use the same keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


PEFT_PREFIX = "base_model.model."


#: module names FSDP1 (`FullyShardedDataParallel`) and activation checkpointing insert between a model's own
FSDP1_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """`base_model.model.x.q_proj.base_layer.weight` → `x.q_proj.weight` (PEFT and FSDP1 wrappers removed)."""
    for wrapper in FSDP1_WRAPPERS:
        name = name.replace(wrapper, "")
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


class SafetensorsMapping(Mapping):
    """Read-only mapping over one `.safetensors` file or a directory of shards; loads on access.

    Only safetensors are read: nothing is ever unpickled. Tensors are loaded one at a time, so a
    checkpoint larger than RAM can be streamed.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from safetensors import safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index, encoding="utf-8") as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
                files = [os.path.join(path, f) for f in shards]
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no .safetensors files (pickled .bin checkpoints are not read)")
        elif os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path}: only .safetensors files are read (never pickle)")
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        self.path = path
        self.device = device
        self._where: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as fh:
                    self.metadata.update(fh.metadata() or {})
                    for key in fh.keys():
                        self._where[key] = f
            except Exception as exc:  # safetensors raises its own error types
                raise ValueError(f"{f}: not a valid safetensors file ({exc})") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt", device=self.device) as fh:
            return fh.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as fh:
            return tuple(fh.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where


def as_tensor_mapping(source: Any, *, what: str) -> Mapping[str, torch.Tensor]:
    """Turn a model, a mapping or a safetensors path into a name → tensor mapping."""
    if source is None:
        raise ValueError(f"{what} is required")
    if isinstance(source, nn.Module):
        return {canonical_name(n): p.detach() for n, p in source.named_parameters()}
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        return SafetensorsMapping(source)
    raise TypeError(
        f"{what}: expected a model, a mapping of name -> tensor, or a safetensors path; got {type(source).__name__}"
    )


def tensor_shape(mapping: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """Shape without loading the tensor when the mapping can tell it (a `shape(key)` method)."""
    shape = getattr(mapping, "shape", None)
    if callable(shape):
        return tuple(shape(key))
    return tuple(mapping[key].shape)
