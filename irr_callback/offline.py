"""IRR on a saved checkpoint larger than RAM: one decoder layer in memory at a time.

`realign_checkpoint(finetuned_dir, base=..., safety_vector=..., calibration=..., output_dir=...)`
builds the model skeleton on the meta device, materialises the input embeddings to capture the
layer-0 inputs, then for each decoder layer: loads that layer from the fine-tuned safetensors
shards, runs the driver's per-layer step (H collection, identify/remove/recalibrate, propagation),
writes the realigned layer as its own safetensors shard and drops it. Base weights, safety vector
and importance are read lazily per tensor. Peak memory is about one layer plus the calibration
activations. Everything is written into a temp directory next to `output_dir` and renamed at the
end, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn
from transformers.utils import logging

from .config import IRRConfig
from .driver import (capture_with_stub_layers, check_entry, make_backup, prepare_calibration, propagate, realign_layer,
                     resolve_inputs, validate_inputs)
from .report import IRRReport
from .targets import Target, find_targets
from .tensors import SafetensorsMapping, tensor_shape

logger = logging.get_logger(__name__)

# files of a Trainer checkpoint that are training state, not part of the model
_TRAINING_STATE = {"trainer_state.json", "model.safetensors.index.json"}
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken")


def realign_checkpoint(
    finetuned_dir: str,
    *,
    base: Any,
    safety_vector: Any,
    calibration: Any,
    output_dir: str,
    importance: Any = None,
    config: Optional[IRRConfig] = None,
    progress: bool = True,
) -> IRRReport:
    """Realign the fine-tuned checkpoint in `finetuned_dir` (safetensors) into `output_dir`.

    `base` / `safety_vector` / `importance`: safetensors paths or name → tensor mappings (read per
    tensor). Gives the same weights as loading the model and calling `realign` (same config), without
    ever holding more than one decoder layer. Config, generation and tokenizer files are copied; the
    report is saved as `output_dir/irr_report.json`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or IRRConfig()
    started = time.perf_counter()
    finetuned_dir = os.fspath(finetuned_dir)
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(finetuned_dir):
        raise FileNotFoundError(f"finetuned_dir '{finetuned_dir}' is not a directory")
    if os.path.exists(os.path.join(finetuned_dir, "adapter_config.json")) and not _has_weights(finetuned_dir):
        raise ValueError(f"finetuned_dir '{finetuned_dir}' holds a PEFT adapter, not a full model: merge it "
                         "(model.merge_and_unload(); save_pretrained) or use `realign` on the live PeftModel")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"output_dir '{output_dir}' already exists and is not an empty directory")
    weights = SafetensorsMapping(finetuned_dir)
    model_config = AutoConfig.from_pretrained(finetuned_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=_checkpoint_dtype(weights))
    model.eval()
    prefix, layers, targets = find_targets(model, config.target_modules)
    if base is None:
        raise ValueError("base is required: the offline path realigns full fine-tunes")
    base_map, safety_map, importance_map = resolve_inputs(config, base, safety_vector, importance)
    _check_sources(model, prefix, len(layers), targets, weights, base_map, safety_map,
                   importance_map if config.needs_importance else None)
    batches, report = prepare_calibration(calibration, config, model_config, len(layers))
    report.extra["offline"] = {"finetuned_dir": finetuned_dir}
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    device = torch.device(config.device) if config.device else torch.device("cpu")

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.irr-tmp-", dir=parent)
    try:
        writer = _ShardWriter(tmp)
        with torch.no_grad():
            embeddings = model.get_input_embeddings()
            emb_name = _module_name(model, embeddings)
            _materialise(embeddings, emb_name, weights, device)
            hidden, layer_args = capture_with_stub_layers(model, layers, batches)
            embeddings.to("meta")
            masks = [b["attention_mask"] for b in batches]
            backup = make_backup("none")  # a failure discards the temp directory instead
            stop_plan: dict = {}
            for index in logging.tqdm(range(len(layers)), desc="IRR layers (offline)", disable=not progress):
                layer = layers[index]
                layer_prefix = f"{prefix}.{index}"
                _materialise(layer, layer_prefix, weights, device)
                layer_targets = by_layer.get(index, [])
                validate_inputs(layer_targets, base_map, safety_map,
                                importance_map if config.needs_importance else None)
                realign_layer(layer, layer_targets, hidden, layer_args[index], masks, base_map, safety_map,
                              importance_map, config, backup, report, stop_plan=stop_plan)
                if index + 1 < len(layers):
                    hidden = propagate(layer, hidden, layer_args[index])
                writer.write({f"{layer_prefix}.{k}": v for k, v in _persistent_state(layer).items()})
                layer.to("meta")
            del hidden
            layer_keys = {k for k in weights if _in_layers(k, prefix)}
            writer.write_streamed((k for k in weights if k not in layer_keys), weights)
        writer.finish()
        _copy_side_files(finetuned_dir, tmp)
        report.seconds = time.perf_counter() - started
        report.save(os.path.join(tmp, "irr_report.json"))
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        os.replace(tmp, output_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    logger.info(report.summary())
    return report


# ------------------------------------------------------------------------------------------------
def _has_weights(path: str) -> bool:
    return any(f.endswith(".safetensors") and not f.startswith("adapter_") for f in os.listdir(path))


def _checkpoint_dtype(weights: SafetensorsMapping) -> torch.dtype:
    """The floating dtype of the stored weights (the model skeleton is built in it)."""
    for key in weights:
        t = weights[key]
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("the input embeddings are not a submodule of the model")


def _in_layers(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".") and key[len(prefix) + 1:].split(".", 1)[0].isdigit()


def _persistent_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def _materialise(module: nn.Module, prefix: str, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Replace the module's meta parameters/persistent buffers by the checkpoint's tensors."""
    for key in module.state_dict():
        full = f"{prefix}.{key}" if prefix else key
        if full not in weights:
            raise KeyError(f"the fine-tuned checkpoint has no tensor '{full}' (saved with another "
                           "architecture or renamed keys?)")
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = weights[full].to(device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value


def _check_sources(model: nn.Module, prefix: str, num_layers: int, targets: list[Target], weights: Mapping,
                   base: Mapping, safety: Mapping, importance: Optional[Mapping]) -> None:
    """Before anything is computed: every tensor the model needs exists in the checkpoint, and every
    target has a base, a safety vector (and importance) entry of its shape (shapes read from headers)."""
    for key, value in model.state_dict().items():
        if _in_layers(key, prefix) or key.startswith(_module_name(model, model.get_input_embeddings())):
            if key not in weights:
                raise KeyError(f"the fine-tuned checkpoint has no tensor '{key}' (saved with another "
                               "architecture or renamed keys?)")
            got = tensor_shape(weights, key)
            if got != tuple(value.shape):
                raise ValueError(f"fine-tuned checkpoint tensor '{key}' has shape {got}, the config says "
                                 f"{tuple(value.shape)}")
    sources = [("base", base), ("safety_vector", safety)] + ([("importance", importance)] if importance else [])
    for t in targets:
        shape = tuple(t.weight.shape)
        for label, mapping in sources:
            check_entry(label, mapping, t.name, shape)


class _ShardWriter:
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


def _copy_side_files(source: str, target: str) -> None:
    """Config, generation config, tokenizer and chat-template files; never training state or pickles."""
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name.endswith(_COPIED_SUFFIXES) and name not in _TRAINING_STATE:
            shutil.copy2(path, os.path.join(target, name))
