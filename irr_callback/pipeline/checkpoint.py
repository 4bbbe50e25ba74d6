"""IRR on a saved checkpoint larger than RAM: one decoder layer in memory at a time.

`realign_checkpoint(finetuned_dir, base=..., safety_vector=..., calibration=..., output_dir=...)`
builds the model skeleton on the meta device, materialises the input embeddings to capture the
layer-0 inputs, then runs the same layer loop as `realign` with two options: each layer is loaded
from the fine-tuned safetensors shards before it is used and written as its own safetensors shard
(then dropped) after. Base weights, safety vector and importance are read lazily per tensor. Peak
memory is about one layer plus the calibration activations. Everything is written into a temp
directory next to `output_dir` and renamed at the end, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from transformers.utils import logging

from ..config import IRRConfig
from ..distributed import SingleProcess
from ..report import IRRReport
from ..saving import atomic_directory, write_output
from ..targets import find_targets
from ..tensors import SafetensorsMapping
from .aligned import AlignedWeights
from .auto_weight import resolve_auto_weight
from .calibration_filter import filter_calibration
from .in_memory import build_streams
from .inputs import SafetyInputs
from .loop import compute_device, run_layers
from .offload import (
    LayerStorage,
    ShardWriter,
    check_checkpoint,
    checkpoint_dtype,
    copy_side_files,
    has_weights,
    materialise,
    module_name,
    outside_layers,
)
from .solve import GroupSolver
from .streams import prepare_calibration, prepare_retain, prepare_safety, retain_or_off
from .writing import make_backup


logger = logging.get_logger(__name__)


def realign_checkpoint(
    finetuned_dir: str,
    *,
    base: Any,
    safety_vector: Any = None,
    calibration: Any,
    output_dir: str,
    safety_calibration: Any = None,
    importance: Any = None,
    config: IRRConfig | None = None,
    progress: bool = True,
    weights: Mapping[str, torch.Tensor] | None = None,
    retain_calibration: Any = None,
    model_config: Any = None,
    card: Callable[[IRRReport], Any] | None = None,
) -> IRRReport:
    """Realign the fine-tuned checkpoint in `finetuned_dir` (safetensors) into `output_dir`.

    Gives the same weights as loading the model and calling `realign` with the same config, without
    ever holding more than one decoder layer. Config, generation and tokenizer files are copied; the
    report is saved as `output_dir/irr_report.json`.

    Args:
        finetuned_dir: a `save_pretrained` directory of a full fine-tune (safetensors; no PEFT adapter).
        base: the aligned weights: a safetensors path (file or directory) or a name → tensor mapping.
        safety_vector: like `base` (read per tensor); not needed with `identify_mode="none"`.
        calibration: batches with `input_ids` (+ `attention_mask`), or a `datasets.Dataset`.
        output_dir: where the realigned model goes; must not exist or be empty.
        safety_calibration: harmful prompts with safe responses, as for `realign`, when
            `config.safety_weight` is not 0 (its aligned twin runs through the base weights, read
            per layer). With `safety_weight="auto"` λ is chosen as `realign` chooses it: the smallest
            candidate is the run itself (its shards are deleted if it is not chosen), further candidates take
            extra layer-by-layer passes over the checkpoint; the embeddings, final norm and LM head stay in
            memory during those passes, the kept run's included (the candidates are scored with the model's own
            head).
        importance: like `base`; required when `config.remove_ratio` < 1.
        config: the `IRRConfig` (default: the paper's settings).
        progress: show a progress bar over the layers.
        weights: the fine-tuned tensors as a name → tensor mapping read per tensor (e.g. a LoRA checkpoint's
            merged weights, as `IRRCallback` passes them) instead of `finetuned_dir`'s safetensors;
            `finetuned_dir` then only gives the side files (tokenizer; never an adapter's config or card).
            Each access must return a tensor of its own: layers are realigned in place.
        model_config: the model's `PretrainedConfig` (default: `finetuned_dir`'s config.json); written to
            `output_dir` when given.
        card: called with the finished report before it is written (it may add to `report.extra`); the
            model card it returns is written as `output_dir/README.md`, inside the same atomic write.
        retain_calibration: general prompts with answers, as for `realign`, when `config.retain_weight` > 0.

    Returns:
        `IRRReport`, also saved as `output_dir/irr_report.json`.

    Example:

    ```python
    >>> from irr_callback import realign_checkpoint
    >>> report = realign_checkpoint("out/finetuned", base="meta-llama/base/model.safetensors",
    ...                             safety_vector="safety_vector.safetensors", calibration=dataset,
    ...                             output_dir="out/realigned")
    ```
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = retain_or_off(config or IRRConfig(), retain_calibration)
    started = time.perf_counter()
    finetuned_dir, output_dir = os.fspath(finetuned_dir), os.fspath(output_dir)
    from_mapping = weights is not None
    _check_directories(finetuned_dir, output_dir, adapter_ok=from_mapping)
    weights = weights if from_mapping else SafetensorsMapping(finetuned_dir)
    given_config = model_config is not None
    model_config = AutoConfig.from_pretrained(finetuned_dir) if model_config is None else model_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=checkpoint_dtype(weights))
    model.eval()
    prefix, layers, targets = find_targets(model, config.target_modules)
    if base is None:
        raise ValueError("base is required: the offline path realigns full fine-tunes")
    inputs = SafetyInputs.resolve(config, base, safety_vector, importance)
    check_checkpoint(model, prefix, weights)
    inputs.check_shapes(targets)
    batches, report = prepare_calibration(calibration, config, model_config, len(layers))
    safety_batches = prepare_safety(safety_calibration, config, model_config, report)
    retain_batches = prepare_retain(retain_calibration, config, model_config, report)
    report.extra["offline"] = {"finetuned_dir": finetuned_dir}
    device = torch.device(config.device) if config.device else torch.device("cpu")

    try:
        with atomic_directory(output_dir) as tmp:  # a failure leaves no output
            writer = ShardWriter(tmp)
            storage = LayerStorage(
                weights,
                prefix,
                writer,
                device,
                on_load=lambda index: inputs.validate([t for t in targets if t.layer == index]),
            )
            with torch.no_grad():
                aligned = AlignedWeights(model, layers, prefix, targets, inputs.base)
                if config.calibration_filter != "none":  # one more layer-by-layer pass, the head in memory
                    with outside_layers(model, prefix, weights, device):
                        batches = filter_calibration(
                            model, layers, batches, safety_batches, aligned, SingleProcess(), config, model_config,
                            report, capture=lambda stream: stream.capture(model, layers, stubs=True),
                            progress=progress, hooks=(storage.load, lambda index, layer: layer.to("meta")),
                        )  # fmt: skip
                streams, held_out = build_streams(
                    batches, safety_batches, config, SingleProcess(), aligned, retain_batches
                )
                embeddings = model.get_input_embeddings()
                materialise(embeddings, module_name(model, embeddings), weights, device)
                for stream in streams:
                    stream.capture(model, layers, stubs=True)
                embeddings.to("meta")

                def realign_layers(weight: Any, run_streams: list, rider: Any = None) -> None:
                    # no backup: a failure drops the temp dir
                    settings = replace(config, safety_weight=weight).realign_settings()
                    run_layers(
                        prefix, layers, targets, run_streams, GroupSolver(inputs, settings, make_backup("none"), report),
                        SingleProcess(), device=compute_device(config), load_layer=storage.load,
                        store_layer=storage.store, progress=progress, desc="IRR layers (offline)", rider=rider,
                        sequential=config.true_sequential,
                    )  # fmt: skip

                def put_back() -> None:  # the kept-first candidate was not chosen: its shards go, the streams again
                    writer.discard()
                    report.modules = []
                    for stream in streams:  # inside `outside_layers`: the embeddings are in memory
                        stream.capture(model, layers, stubs=True)

                written = False
                if held_out:  # safety_weight="auto": the same search as `realign`, one layer loaded at a time
                    with outside_layers(model, prefix, weights, device):
                        config, written = resolve_auto_weight(
                            model, layers, targets, streams, held_out, inputs, config,
                            SingleProcess(), report, device=compute_device(config), progress=progress,
                            load_layer=storage.load, drop_layer=lambda index, layer: layer.to("meta"),
                            first_run=realign_layers, undo_first=put_back,
                        )  # fmt: skip
                if not written:
                    realign_layers(config.safety_weight, streams)
                streams.clear()  # the last layer's states
                storage.store_rest()
            writer.finish()
            copy_side_files(finetuned_dir, tmp, adapter=from_mapping)
            if given_config:
                model_config.save_pretrained(tmp)
            report.seconds = time.perf_counter() - started
            write_output(tmp, report=report, card=card(report) if card is not None else None)
    except BaseException as exc:
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    logger.info(report.summary())
    return report


def _check_directories(finetuned_dir: str, output_dir: str, *, adapter_ok: bool = False) -> None:
    if not os.path.isdir(finetuned_dir):
        raise FileNotFoundError(f"finetuned_dir '{finetuned_dir}' is not a directory")
    if (
        not adapter_ok
        and os.path.exists(os.path.join(finetuned_dir, "adapter_config.json"))
        and not has_weights(finetuned_dir)
    ):
        raise ValueError(
            f"finetuned_dir '{finetuned_dir}' holds a PEFT adapter, not a full model: merge it "
            "(model.merge_and_unload(); save_pretrained) or use `realign` on the live PeftModel"
        )
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"output_dir '{output_dir}' already exists and is not an empty directory")
