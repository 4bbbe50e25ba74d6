"""`IRRCallback`: any `transformers.Trainer` run ends with a safety-realigned model.

    trainer = Trainer(model, args, train_dataset=..., processing_class=tok,
                      callbacks=[IRRCallback(IRRConfig(harmful_dataset="harmful.jsonl"))])
    trainer.train()          # the live model is realigned at the end; <output_dir>/irr holds the result

At train begin the base weights of the targets are snapshotted and the safety inputs resolved (see
`sources`); at train end the first training examples calibrate `irr_callback.realign`, the live
model is realigned in place, and `irr_output_dir` is written atomically. The heavy lifting lives in
`snapshot`, `sources`, `peft_utils`, `saving` and `model_card`: this module only sequences them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .config import IRRConfig
from .data import calibration_examples
from .driver import realign
from .io import fingerprint, fingerprint_id
from .model_card import build_model_card
from .peft_utils import (LoraBackup, check_supported, default_refactor_rank, is_peft_model, lora_module_names,
                         refactor_lora)
from .report import IRRReport
from .saving import atomic_directory
from .snapshot import RunStore, take_snapshot
from .sources import BaseContext, Resolved, resolve_fisher, resolve_safety_vector
from .targets import find_targets, unwrap
from .tensors import SafetensorsMapping, canonical_name

logger = logging.get_logger(__name__)


def _partial_state():
    from accelerate import PartialState

    return PartialState()


class IRRCallback(TrainerCallback):
    """Realign the model at the end of training (and, optionally, at every checkpoint).

    `harmful_dataset` / `safety_dataset` may be given here as `datasets.Dataset` objects; they take
    precedence over the same-named `IRRConfig` fields (which hold paths or hub ids).
    After `on_train_end`, `report` holds the `IRRReport` and `output_path` the saved directory.
    """

    def __init__(self, config: Optional[IRRConfig] = None, *, harmful_dataset: Any = None,
                 safety_dataset: Any = None):
        self.config = config or IRRConfig()
        self.harmful_dataset = harmful_dataset
        self.safety_dataset = safety_dataset
        self.report: Optional[IRRReport] = None
        self.output_path: Optional[str] = None
        self.sources: dict[str, dict[str, Any]] = {}
        self._trainer = None
        self._prepared = False
        self._run_config: Optional[IRRConfig] = None  # config with the resolved target_modules
        self._snapshot: Optional[Mapping[str, torch.Tensor]] = None
        self._safety: Optional[Mapping[str, torch.Tensor]] = None
        self._importance: Optional[Mapping[str, torch.Tensor]] = None
        self._base_fingerprint: Optional[str] = None

    def bind(self, trainer) -> "IRRCallback":
        """Attach to a Trainer explicitly: its train_dataset and processing_class are then used, and
        the callback is added to it if it is not already."""
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------------------ train begin
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._prepared:  # auto_find_batch_size restarts the loop: the base was captured already
            logger.info("IRR: base snapshot already taken; keeping it")
            return
        model = self._model(model)
        tokenizer = self._tokenizer(processing_class)
        check_supported(model)
        run_config, targets = self._targets(model)
        names = [t.name for t in targets]
        store = RunStore(args.output_dir)
        if state.global_step > 0:
            self._reload(store, targets, run_config)
        else:
            self._prepare(args, model, tokenizer, targets, run_config, store)
        self._run_config = run_config
        self._prepared = True
        logger.info(f"IRR: ready to realign {len(names)} target weights at train end "
                    f"(safety vector: {self.sources['safety_vector']['source']})")

    def _targets(self, model: nn.Module):
        """The weights to realign: every LoRA layer of a PeftModel, else `config.target_modules`."""
        _, _, targets = find_targets(model, self.config.target_modules)
        run_config = self.config
        if is_peft_model(model):
            targets = [t for t in targets if t.kind == "lora"]
            if not targets:
                raise ValueError("the PeftModel has no LoRA layer inside its decoder layers matching "
                                 f"IRRConfig.target_modules={self.config.target_modules}")
            run_config = dataclasses.replace(self.config, target_modules=lora_module_names(targets))
        return run_config, targets

    def _prepare(self, args, model, tokenizer, targets, run_config, store: RunStore) -> None:
        dense = [t for t in targets if t.kind != "lora"]
        names = [t.name for t in targets]
        live = {canonical_name(n): p.detach() for n, p in unwrap_peft(model).named_parameters()}
        self._base_fingerprint = fingerprint(live, names)
        snapshot = take_snapshot(dense) if dense else None
        ctx = BaseContext(model=model, targets=targets, base=live, fingerprint=self._base_fingerprint,
                          name=_model_name(model), tokenizer=tokenizer, progress=_show_progress(args))
        harmful = run_config.harmful_dataset if self.harmful_dataset is None else self.harmful_dataset
        config = dataclasses.replace(run_config, harmful_dataset=harmful)  # an empty Dataset is refused, not skipped
        state = _partial_state()
        with state.main_process_first():  # the main process computes; the others then hit the cache
            safety = resolve_safety_vector(config, ctx)
        # the Fisher is sharded over the processes (collectives inside): every rank at once, not main first
        importance = resolve_fisher(config, ctx, safety_dataset=self.safety_dataset)
        self.sources = {"safety_vector": safety.describe(), "importance": importance.describe()}
        persist = self.config.snapshot == "disk" or str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        if persist:  # resume could matter: keep the base and the safety inputs under output_dir
            if state.is_main_process:
                if snapshot:
                    store.save("snapshot", snapshot, base_fingerprint=self._base_fingerprint, base_model=ctx.name)
                store.save("safety_vector", {n: safety.tensors[n] for n in names},
                           base_fingerprint=self._base_fingerprint, base_model=ctx.name)
                if importance.tensors is not None:
                    store.save("fisher", {n: importance.tensors[n] for n in names},
                               base_fingerprint=self._base_fingerprint, base_model=ctx.name)
            state.wait_for_everyone()
        if snapshot and self.config.snapshot == "disk":
            snapshot = SafetensorsMapping(store.path("snapshot"))
        self._snapshot, self._safety, self._importance = snapshot, safety.tensors, importance.tensors

    def _reload(self, store: RunStore, targets, run_config) -> None:
        dense = [t.name for t in targets if t.kind != "lora"]
        names = [t.name for t in targets]
        fp = None
        if dense:
            self._snapshot = store.load("snapshot", dense)
            fp = self._snapshot.metadata["irr_callback.base_fingerprint"]
            if self.config.snapshot == "cpu":
                self._snapshot = {n: self._snapshot[n] for n in dense}
        self._safety = store.load("safety_vector", names, base_fingerprint=fp)
        self._base_fingerprint = self._safety.metadata["irr_callback.base_fingerprint"]
        self._importance = store.load("fisher", names, base_fingerprint=self._base_fingerprint) \
            if run_config.needs_importance else None
        self.sources = {"safety_vector": Resolved(None, "resumed", path=store.path("safety_vector")).describe(),
                        "importance": Resolved(None, "resumed" if self._importance is not None else "none").describe()}
        logger.info(f"IRR: resumed run, base snapshot and safety inputs reloaded from {store.directory}")

    # ------------------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not (self.config.realign_checkpoints and self._prepared):
            return
        self._dataloader = kwargs.get("train_dataloader")
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        clone = copy.deepcopy(self._model(model))  # the live model keeps training untouched
        try:
            self._realign_and_save(clone, args, processing_class, os.path.join(checkpoint, "irr"), live=False)
        except Exception as exc:
            exc = exc.__cause__ if isinstance(exc, _SaveFailed) else exc
            logger.warning(f"IRR: realigned copy of {checkpoint} failed ({type(exc).__name__}: {exc}); "
                           "training continues")
        finally:
            del clone

    # ------------------------------------------------------------------------------ train end
    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self._prepared:
            logger.warning("IRR: on_train_end without on_train_begin; nothing to realign")
            return
        self._dataloader = kwargs.get("train_dataloader")
        target = self.config.irr_output_dir or os.path.join(args.output_dir, "irr")
        try:
            self.report = self._realign_and_save(self._model(model), args, processing_class, target, live=True)
            self.output_path = target if self.config.save_realigned else None
        except _SaveFailed as exc:  # the live model IS realigned; only writing `target` failed
            cause = exc.__cause__
            self.report = exc.report
            self.report.status = "save_failed"
            self.report.error = f"{type(cause).__name__}: {cause}"
            self._write_run_report(args)
            if self.config.on_error == "raise":
                raise cause from None
            logger.warning(f"IRR realigned the model ({self.report.totals['modules']} modules), but saving it to "
                           f"{target} failed: {self.report.error}. The live model (trainer.model) IS realigned: "
                           "save it with trainer.save_model()")
            return
        except Exception as exc:
            self.report = IRRReport(config=self._run_config.to_dict())
            self.report.status, self.report.error = "failed", f"{type(exc).__name__}: {exc}"
            self.report.extra["safety_inputs"] = self.sources
            self._write_run_report(args)
            if self.config.on_error == "raise":
                raise
            logger.warning(f"IRR failed; the model stays the fine-tuned model: {self.report.error}")
            return
        self._write_run_report(args)
        self._end_run(args)

    def _end_run(self, args) -> None:
        """The run ended well: `<output_dir>/_irr_run/` (a copy of the base's targets, for resuming) is not needed
        any more. A later `train()` with this callback starts a new IRR run from the model as it is then."""
        state = _partial_state()
        state.wait_for_everyone()  # no rank still reads the disk snapshot
        if state.is_main_process:
            RunStore(args.output_dir).remove()
        self._snapshot = self._safety = self._importance = None
        self._prepared = False

    def _realign_and_save(self, model: nn.Module, args, processing_class, target: str, *, live: bool) -> IRRReport:
        """Realign `model` in place (all or nothing, LoRA refactor included) and save it atomically."""
        tokenizer = self._tokenizer(processing_class)
        config = self._run_config
        calibration = calibration_examples(self._train_dataset(), tokenizer,
                                           num_samples=config.num_calibration_samples,
                                           max_length=config.calibration_max_length)
        peft = is_peft_model(model)
        _, _, targets = find_targets(model, config.target_modules)
        backup = LoraBackup(model, targets) if peft else None
        try:
            report = realign(model, base=self._snapshot, safety_vector=self._safety, importance=self._importance,
                             calibration=calibration, config=config, progress=_show_progress(args))
            report.extra["safety_inputs"] = self.sources
            report.extra["base_fingerprint"] = fingerprint_id(self._base_fingerprint)
            merged = None
            if peft:
                merged = self._merged_copy(model) if self._wants_merged() else None
                bases = backup.base_weights()
                deltas = {t.name: t.weight.detach().float() - bases[t.name].to(t.weight.device).float()
                          for t in targets}
                rank = default_refactor_rank(model, self.config.lora_refactor_rank)
                refactor = refactor_lora(model, targets, deltas, bases, rank)
                report.extra["lora_refactor"] = refactor.to_dict()
                logger.info(f"IRR: live adapter re-factored at rank {refactor.rank} "
                            f"(max relative error {refactor.max_error:.3g})")
        except Exception:
            if backup is not None:
                backup.restore()
            raise
        if self.config.save_realigned:
            try:
                self._save(model, merged, tokenizer, report, target)
            except Exception as exc:
                raise _SaveFailed(report) from exc
        return report

    def _wants_merged(self) -> bool:
        return self.config.save_realigned and self.config.lora_output in ("merged", "both") and \
            _partial_state().is_main_process

    @staticmethod
    def _merged_copy(model: nn.Module) -> nn.Module:
        """After `realign`, lora_B is zero and base_layer holds W_A + Δ': merging gives the exact model."""
        return copy.deepcopy(model).merge_and_unload()

    def _save(self, model, merged, tokenizer, report: IRRReport, target: str) -> None:
        state = _partial_state()
        state.wait_for_everyone()
        try:
            if state.is_main_process:
                with atomic_directory(target) as tmp:
                    lora = report.extra.get("lora_refactor")
                    if merged is None and not is_peft_model(model):
                        unwrap(model).save_pretrained(tmp)
                    if merged is not None:
                        merged.save_pretrained(tmp)
                    if is_peft_model(model) and self.config.lora_output in ("adapter", "both"):
                        model.save_pretrained(tmp if self.config.lora_output == "adapter" else os.path.join(tmp, "adapter"))
                    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                        tokenizer.save_pretrained(tmp)
                    report.save(os.path.join(tmp, "irr_report.json"))
                    build_model_card(report, base_model=_model_name(model), sources=self.sources,
                                     lora=lora).save(os.path.join(tmp, "README.md"))
                logger.info(f"IRR: realigned model saved to {target}")
        finally:
            state.wait_for_everyone()

    def _write_run_report(self, args) -> None:
        if self.report is not None and _partial_state().is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            self.report.save(os.path.join(args.output_dir, "irr_report.json"))

    # ------------------------------------------------------------------------------ helpers
    def _model(self, model):
        if model is None and self._trainer is not None:
            model = self._trainer.model
        if model is None:
            raise ValueError("IRRCallback got no model from the Trainer")
        return model

    def _tokenizer(self, processing_class):
        if processing_class is None and self._trainer is not None:
            processing_class = self._trainer.processing_class
        return getattr(processing_class, "tokenizer", processing_class)  # processors wrap a tokenizer

    def _train_dataset(self):
        if self._trainer is not None and self._trainer.train_dataset is not None:
            return self._trainer.train_dataset
        loader = getattr(self, "_dataloader", None)
        return getattr(loader, "dataset", None)


class _SaveFailed(Exception):
    """Realignment succeeded (the model is realigned in place) but writing its directory failed."""

    def __init__(self, report: IRRReport) -> None:
        super().__init__("saving the realigned model failed")
        self.report = report


def _show_progress(args) -> bool:
    """Progress bars as the Trainer shows its own: not with disable_tqdm, and on the local main process only."""
    return not args.disable_tqdm and _partial_state().is_local_main_process


def unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft_model(model) else unwrap(model)


def _model_name(model: nn.Module) -> str:
    if is_peft_model(model):
        cfg = next(iter(model.peft_config.values()))
        if getattr(cfg, "base_model_name_or_path", None):
            return str(cfg.base_model_name_or_path)
    inner = unwrap(model)
    return str(getattr(getattr(inner, "config", None), "_name_or_path", "") or getattr(inner, "name_or_path", ""))
