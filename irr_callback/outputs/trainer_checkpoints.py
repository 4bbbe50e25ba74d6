"""Realigned copies of the Trainer's checkpoints (`IRRConfig(realign_checkpoints=True)`), made from their files.

`Trainer._save_checkpoint` has written `checkpoint-N` when `on_save` fires, so the copy is realigned from
disk by `realign_checkpoint`, one decoder layer in memory at a time (on `IRRConfig.device`, default CPU):
no second model in memory, and the live model is only read, so training goes on bit-identical. A LoRA
checkpoint holds the adapter alone: `MergedLora` presents the fine-tuned weights W_A + scaling·B·A per
target (A and B from the checkpoint's adapter file, W_A and every other tensor from the live model's frozen
base, one tensor at a time), so `checkpoint-N/irr` is a merged realigned model.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import IRRConfig
from ..peft_utils import is_peft_model
from ..pipeline import realign_checkpoint
from ..report import IRRReport
from ..targets import Target, find_targets
from ..tensors import PEFT_PREFIX, SafetensorsMapping, canonical_name


logger = logging.get_logger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"


def realign_saved_checkpoint(
    checkpoint: str,
    model: nn.Module,
    *,
    base: Mapping[str, torch.Tensor] | None,
    safety_vector: Mapping[str, torch.Tensor] | None,
    importance: Mapping[str, torch.Tensor] | None,
    calibration: Any,
    safety_calibration: Any,
    config: IRRConfig,
    progress: bool,
    card: Callable[[IRRReport], Any] | None = None,
    retain_calibration: Any = None,
) -> IRRReport:
    """Realign the saved `checkpoint` into `checkpoint/irr` with the inputs of the train-end realignment.

    `model` is the live model, read only: for a PeftModel it gives the frozen base and the LoRA scaling
    (`base` is then ignored). A `checkpoint/irr` left from an earlier save of the same step is stale (the
    Trainer rewrote the checkpoint) and is replaced. `card`: as `realign_checkpoint`'s (the model card)."""
    output = os.path.join(checkpoint, "irr")
    kwargs: dict[str, Any] = {}
    if is_peft_model(model):
        _, _, targets = find_targets(model, config.target_modules)
        merged = MergedLora(model, checkpoint, [t for t in targets if t.kind == "lora"])
        model_config = copy.deepcopy(model.get_base_model().config)  # the skeleton built from it shares it
        base, kwargs = merged.bases(), {"weights": merged, "model_config": model_config}
    if os.path.lexists(output):
        logger.info(f"IRR: replacing {output} (made from an earlier save of this checkpoint)")
        if os.path.isdir(output):
            shutil.rmtree(output)
        else:
            os.remove(output)
    return realign_checkpoint(
        checkpoint,
        base=base,
        safety_vector=safety_vector,
        importance=importance,
        calibration=calibration,
        safety_calibration=safety_calibration,
        retain_calibration=retain_calibration,
        output_dir=output,
        config=config,
        progress=progress,
        card=card,
        **kwargs,
    )


class LiveTensors(Mapping):
    """name → a CPU copy of one of the live model's tensors, made on access: the offline path realigns the
    layers it loads in place, and the live model must never see that."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach().to("cpu", copy=True)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors


class MergedLora(LiveTensors):
    """A LoRA checkpoint's fine-tuned model, keyed like the base model's own checkpoint: W_A + scaling·B·A
    for every LoRA target (as `merge_and_unload` computes it, in float32 cast once), the live frozen tensor
    for everything else (LoRA training leaves it unchanged; `modules_to_save` is refused at train begin)."""

    def __init__(self, model: nn.Module, checkpoint: str, targets: list[Target]) -> None:
        seen, tensors = set(), {}
        for name, tensor in model.get_base_model().state_dict(keep_vars=True).items():
            if (
                "lora_" not in name and id(tensor) not in seen
            ):  # a tied LM head is written once, as save_pretrained does
                seen.add(id(tensor))
                tensors[canonical_name(name)] = tensor
        super().__init__(tensors)
        path = os.path.join(checkpoint, ADAPTER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"'{path}' does not exist: the checkpoint holds no LoRA adapter in safetensors")
        self.adapter = SafetensorsMapping(path)
        self.targets = {t.name: t for t in targets}

    def bases(self) -> LiveTensors:
        """W_A of every target: the live frozen base layers (read per tensor, copied)."""
        return LiveTensors({name: t.weight for name, t in self.targets.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        target = self.targets.get(key)
        if target is None:
            return super().__getitem__(key)
        module = f"{PEFT_PREFIX}{key.rsplit('.', 1)[0]}"
        factors = []
        for part in ("lora_A", "lora_B"):
            name = f"{module}.{part}.weight"
            if name not in self.adapter:
                raise KeyError(f"'{self.adapter.path}' has no tensor '{name}' (saved from another adapter?)")
            factors.append(self.adapter[name].float())
        delta = (factors[1] @ factors[0]) * target.module.scaling[target.adapter]
        if getattr(target.module, "fan_in_fan_out", False):
            delta = delta.t()
        weight = target.weight.detach()
        return (weight.to("cpu", torch.float32) + delta).to(weight.dtype)
