"""The base weights a full fine-tune started from, kept so IRR can compute Δ = W_SFT − W_A at the end.

Only the target weights are kept, in their own dtype. They live in RAM (`snapshot="cpu"`) or are read
lazily from a safetensors file (`snapshot="disk"`). Because `on_train_begin` fires after a resumed
run has loaded its checkpoint, the base can only be recovered on resume from a copy persisted at the
first start: `RunStore` keeps that copy (and the resolved safety inputs) under
`<output_dir>/_irr_run/` (the leading `_` keeps `Trainer.push_to_hub`, which ignores `_*` and
`checkpoint-*`, from uploading it). The callback removes it when the run ends well.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from transformers.utils import logging

from ..targets import Target
from .irr_files import IRRFileError, fingerprint_id, load_irr_file, same_base, save_irr_file


logger = logging.get_logger(__name__)

RUN_DIR = "_irr_run"
LEGACY_RUN_DIR = "irr_run"  # runs started before the rename still resume


def take_snapshot(targets: list[Target]) -> dict[str, torch.Tensor]:
    """CPU copies of the dense target weights (own dtype); LoRA targets need none (base_layer is frozen)."""
    return {t.name: t.weight.detach().to("cpu", copy=True) for t in targets if t.kind != "lora"}


class RunStore:
    """`<output_dir>/_irr_run/{snapshot,safety_vector,fisher}.safetensors`: what a resumed run reloads."""

    def __init__(self, output_dir: str):
        self.directory = os.path.join(output_dir, RUN_DIR)
        legacy = os.path.join(output_dir, LEGACY_RUN_DIR)
        if not os.path.isdir(self.directory) and os.path.isdir(legacy):
            self.directory = legacy

    def remove(self) -> None:
        """Delete the persisted base and safety inputs (about the size of the targets): the run is over."""
        import shutil

        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
            logger.info(f"IRR: removed {self.directory} (only a resumed run needs it)")

    def path(self, kind: str) -> str:
        return os.path.join(self.directory, f"{kind}.safetensors")

    def save(
        self, kind: str, tensors: Mapping[str, torch.Tensor], *, base_fingerprint: str, base_model: str = ""
    ) -> str:
        path = self.path(kind)
        save_irr_file(path, dict(tensors), kind=kind, base_fingerprint=base_fingerprint, base_model=base_model)
        return path

    def load(self, kind: str, names: list[str], *, base_fingerprint: str | None = None):
        """Reopen a persisted file lazily; check it covers `names` and, when given, was made for that base."""
        path = self.path(kind)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming from a checkpoint but '{path}' does not exist: IRR needs the {kind} persisted at the "
                "first start of this run (the base weights cannot be recovered from a fine-tuned checkpoint). "
                "Start the run with IRRCallback from step 0, or set IRRConfig.snapshot='disk'."
            )
        mapping = load_irr_file(path, kind=kind)
        missing = [n for n in names if n not in mapping]
        if missing:
            raise IRRFileError(
                f"'{path}' lacks target(s) {missing[:3]}: was the run started with other target_modules?"
            )
        recorded = mapping.metadata.get("irr_callback.base_fingerprint")
        if base_fingerprint is not None and not same_base(recorded, base_fingerprint):
            raise IRRFileError(
                f"'{path}' was made for base {fingerprint_id(recorded or '')}, this run's base is "
                f"{fingerprint_id(base_fingerprint)}"
            )
        return mapping
