"""`IRRCallback`: any `transformers.Trainer` run ends with a safety-realigned model.

    trainer = Trainer(model, args, train_dataset=..., processing_class=tok,
                      callbacks=[IRRCallback(IRRConfig(harmful_dataset="harmful.jsonl"))])
    trainer.train()          # the live model is realigned at the end
    trainer.save_model()     # output_dir holds the realigned model once (and push_to_hub uploads it)

At train begin the base weights of the targets are snapshotted and the safety inputs resolved (see
`sources`); at train end the first training examples calibrate `irr_callback.realign` and the live
model is realigned in place. Into `output_dir` go `irr_report.json` and an IRR section in the model
card (the Trainer's / TRL's card keeps it: `create_model_card` is wrapped); IRR's own copy of the
output is written atomically only where `irr_output_dir` says (docs/trl.md: where each file goes). The
heavy lifting lives in `snapshot`, `sources`, `peft_utils`, `saving` and `model_card`: this module only
sequences them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from . import distributed
from .config import IRRConfig, IRRConfigError
from .inputs.data import calibration_examples
from .inputs.irr_files import fingerprint, fingerprint_id, same_base
from .inputs.refusals import retain_dataset_for_run, safety_dataset_for_run
from .inputs.snapshot import RunStore, take_snapshot
from .inputs.sources import (
    BaseContext,
    Resolved,
    load_safety_pairs,
    resolve_fisher,
    resolve_safety_vector,
    retain_calibration_examples,
    safety_calibration_examples,
    safety_source,
)
from .outputs.model_card import adapter_note, build_model_card, realigned_note
from .outputs.realigned_model import save_realigned
from .outputs.trainer_checkpoints import realign_saved_checkpoint
from .paths import portable_paths
from .peft_utils import (
    REALIGNED_TAG,
    AdapterPlan,
    LoraBackup,
    append_note,
    check_supported,
    install_factors,
    is_peft_model,
    lora_module_names,
    mark_realigned,
    merged_state_dict,
)
from .pipeline import realign
from .pipeline.lowrank import AdapterFactors
from .report import IRRReport
from .targets import find_targets, unwrap
from .tensors import SafetensorsMapping, canonical_name


logger = logging.get_logger(__name__)


def _partial_state():
    from accelerate import PartialState

    return PartialState()


class IRRCallback(TrainerCallback):
    """A [`TrainerCallback`] that realigns the model at the end of training (and, optionally, at every checkpoint).

    At train begin it snapshots the base (aligned) weights of the targets and resolves the safety vector
    (and the Fisher importance when `remove_ratio` < 1). At train end it runs `irr_callback.realign`:
    per target, the fine-tuning deltas Δ = W_F − W_A whose sign conflicts with the safety vector are
    removed and the rest recalibrated to keep the layer's outputs on the training data,
    minimise tr((Δ′ − Δ) H (Δ′ − Δ)ᵀ) with Δ′ = 0 on the removed entries, H = 2XXᵀ/n. The live model
    is then the realigned model: `trainer.save_model()` writes it into `output_dir` (a LoRA run: the
    realigned adapter), where the callback has put `irr_report.json` and the IRR section of the model
    card. After `on_train_end`, `report` holds the `IRRReport` and `output_path` IRR's own copy of the
    output (None unless `IRRConfig.irr_output_dir` asks for one).

    Args:
        config: the `IRRConfig` (safety inputs, calibration, callback behaviour); default
            `IRRConfig.recommended()`: with no safety input given, the base model answers default harmful
            prompts at train begin (`refusals.safety_dataset_for_run`, docs/defaults.md).
        harmful_dataset: a `datasets.Dataset` of harmful prompt/response pairs for the safety vector;
            takes precedence over `IRRConfig.harmful_dataset` (a path or hub id).
        safety_dataset: a `datasets.Dataset` of harmful prompts with safe responses, for the Fisher and,
            when the config uses a safety weight (e.g. `IRRConfig.recommended()`), the safety stream;
            takes precedence over `IRRConfig.safety_dataset`. Without a response column the base
            model's own answers are generated at train begin.
        retain_dataset: a `datasets.Dataset` of general prompts (with or without answers) for the retain
            stream, when `IRRConfig.retain_weight` > 0; takes precedence over `IRRConfig.retain_dataset`.
            Without one, the shipped general prompts (the hub set online), answered by the base model at
            train begin and cached under the base fingerprint (docs/safety-weight.md).

    Example:

    ```python
    >>> from irr_callback import IRRCallback, IRRConfig
    >>> callback = IRRCallback(IRRConfig(unaligned_model="org/llama-unaligned"))
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    >>> trainer.train()  # the live model is realigned at the end
    >>> trainer.save_model()  # output_dir: the realigned weights, irr_report.json, the card's IRR section
    >>> print(callback.report.summary())
    >>> # the recommended setting: no unaligned model, only harmful prompts (+ safe responses)
    >>> callback = IRRCallback(IRRConfig.recommended(), safety_dataset=refusals)
    ```
    """

    def __init__(
        self,
        config: IRRConfig | None = None,
        *,
        harmful_dataset: Any = None,
        safety_dataset: Any = None,
        retain_dataset: Any = None,
    ):
        self.config = config or IRRConfig.recommended()
        self.harmful_dataset = harmful_dataset
        self.safety_dataset = safety_dataset
        self.retain_dataset = retain_dataset
        self.report: IRRReport | None = None
        self.output_path: str | None = None
        self.sources: dict[str, dict[str, Any]] = {}
        self._trainer = None
        self._prepared = False
        self._run_config: IRRConfig | None = None  # config with the resolved target_modules
        self._snapshot: Mapping[str, torch.Tensor] | None = None
        self._safety: Mapping[str, torch.Tensor] | None = None
        self._importance: Mapping[str, torch.Tensor] | None = None
        self._safety_calibration: list[dict] | None = None  # the safety stream's tokenized rows
        self._retain_calibration: list[dict] | None = None  # the retain stream's tokenized rows
        self._base_fingerprint: str | None = None
        self._resumed_rows_sources: dict[str, dict] = {}
        self._card_note: str | None = None  # what the output's model card says about IRR (set at train end)

    def bind(self, trainer) -> IRRCallback:
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
        self._card_note = None  # a new run: cards written before its end describe the fine-tune only
        check_supported(model)
        self._check_safety_inputs()
        run_config, targets = self._targets(model)
        self._check_checkpoints(model, targets)
        names = [t.name for t in targets]
        store = RunStore(args.output_dir)
        if state.global_step > 0:
            self._reload(model, store, targets, run_config)
        else:
            self._prepare(args, model, tokenizer, targets, run_config, store)
        self._run_config = run_config
        self._prepared = True
        stream = self.sources.get("safety_calibration")
        logger.info(
            f"IRR: ready to realign {len(names)} target weights at train end "
            f"(setting: {run_config.setting_name}, safety_weight={run_config.safety_weight!r}; "
            f"safety vector: {self.sources['safety_vector']['source']}"
            + (f"; safety stream: {stream['examples']} sequences" if stream else "")
            + ")"
        )

    def _check_safety_inputs(self) -> None:
        """Before any heavy work: enough of the training data for `safety_weight='auto'` to hold some out.
        (No safety data given is no error: the default harmful prompts, answered by the base, stand in;
        the safety vector's sources are checked by `resolve_safety_vector`.)"""
        config = self.config
        if not config.uses_safety_stream:
            return
        train = self._train_dataset()
        if config.safety_weight == "auto" and train is not None and hasattr(train, "__len__"):
            n = min(len(train), config.num_calibration_samples)
            if n <= config.calibration_batch_size:
                raise IRRConfigError(
                    f"IRRConfig.safety_weight='auto' holds out part of the calibration data to choose λ, but "
                    f"{n} training examples make one batch of calibration_batch_size={config.calibration_batch_size}: "
                    "raise num_calibration_samples or lower calibration_batch_size"
                )

    def _targets(self, model: nn.Module):
        """The weights to realign: every LoRA layer of a PeftModel, else `config.target_modules`."""
        _, _, targets = find_targets(model, self.config.target_modules)
        run_config = self.config
        if is_peft_model(model):
            targets = [t for t in targets if t.kind == "lora"]
            if not targets:
                raise ValueError(
                    "the PeftModel has no LoRA layer inside its decoder layers matching "
                    f"IRRConfig.target_modules={self.config.target_modules}"
                )
            run_config = dataclasses.replace(self.config, target_modules=lora_module_names(targets))
        return run_config, targets

    def _prepare(self, args, model, tokenizer, targets, run_config, store: RunStore) -> None:
        dense = [t for t in targets if t.kind != "lora"]
        names = [t.name for t in targets]
        live = {canonical_name(n): p.detach() for n, p in unwrap(model).named_parameters()}
        sharded = distributed.sharding_kind(model, targets)
        if sharded:  # every rank keeps its part of the base; the fingerprint gathers one weight at a time
            if self.config.snapshot == "disk":
                raise IRRConfigError(
                    f"IRRConfig.snapshot='disk' is not supported with weights sharded by {sharded}: each rank keeps "
                    "its own part of the base in RAM (1/world of the targets); set snapshot='cpu'"
                )
            live = distributed.GatheredWeights(model, {t.name: t.weight for t in targets})
        self._base_fingerprint = fingerprint(live, names)
        if sharded:
            snapshot = distributed.ShardedSnapshot.take(model, {t.name: t.weight for t in dense}) if dense else None
        else:
            snapshot = take_snapshot(dense) if dense else None
        ctx = BaseContext(
            model=model,
            targets=targets,
            base=live,
            fingerprint=self._base_fingerprint,
            name=_model_name(model),
            tokenizer=tokenizer,
            progress=_show_progress(args),
        )
        harmful = run_config.harmful_dataset if self.harmful_dataset is None else self.harmful_dataset
        config = dataclasses.replace(run_config, harmful_dataset=harmful)  # an empty Dataset is refused, not skipped
        state = _partial_state()
        pairs = None
        safety_data = None
        if config.uses_safety_stream:  # read once (the base answers now, before training), Fisher reuses it
            # default prompts when none given; the base writes missing answers: the main process first, the others
            # then read its cache; sharded weights: every rank generates in step (a forward is a collective)
            with contextlib.nullcontext() if sharded else state.main_process_first():
                self.safety_dataset, safety_data = safety_dataset_for_run(
                    model,
                    tokenizer,
                    config,
                    safety_dataset=self.safety_dataset,
                    base_fingerprint=ctx.fingerprint,
                    progress=ctx.progress,
                    collective=bool(sharded),
                )
            pairs = load_safety_pairs(config, ctx, safety_source(config, self.safety_dataset))
            # the rows are the run's safety data: described as `safety_data` says (the set it came from, and
            # whether the base wrote the answers), not as the in-memory Dataset that carries them now
            pairs = dataclasses.replace(
                pairs,
                label=safety_data.get("set", pairs.label),
                generated=bool(safety_data.get("generated_responses")),
            )
            self._safety_calibration = safety_calibration_examples(config, pairs, tokenizer)
            self._check_auto_rows(config, len(self._safety_calibration))
        retain_data = None
        if config.uses_retain_stream:  # general prompts, answered by the base now (before training) when needed
            with contextlib.nullcontext() if sharded else state.main_process_first():  # as the safety data
                self.retain_dataset, retain_data = retain_dataset_for_run(
                    model,
                    tokenizer,
                    config,
                    retain_dataset=self.retain_dataset,
                    base_fingerprint=ctx.fingerprint,
                    progress=ctx.progress,
                    collective=bool(sharded),
                )
            self._retain_calibration = retain_calibration_examples(config, self.retain_dataset, tokenizer)
        if config.needs_safety_vector:
            with state.main_process_first():  # the main process computes; the others then hit the cache
                safety = resolve_safety_vector(config, ctx)
        else:  # identify_mode='none': no unaligned model, no harmful fine-tune
            safety = Resolved(None, "none")
        # the Fisher is sharded over the processes (collectives inside): every rank at once, not main first
        importance = resolve_fisher(config, ctx, safety_dataset=self.safety_dataset, pairs=pairs)
        self.sources = {"safety_vector": safety.describe(), "importance": importance.describe()}
        if pairs is not None:  # the stream's rows come from `safety_data`: described by reference, not twice
            self.sources["safety_calibration"] = {
                "source": "safety_data",
                "safety_dataset": pairs.label,
                "examples": len(self._safety_calibration),
                "generated_responses": pairs.generated,
            }
        if safety_data is not None:
            self.sources["safety_data"] = safety_data
        if retain_data is not None:
            self.sources["retain_data"] = {**retain_data, "examples": len(self._retain_calibration)}
        persist = (
            self.config.snapshot == "disk" or str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        )
        if persist:  # resume could matter: keep the base and the safety inputs under output_dir
            if state.is_main_process:
                if snapshot and not sharded:  # sharded: no rank holds the whole base (a resumed run says so)
                    store.save("snapshot", snapshot, base_fingerprint=self._base_fingerprint, base_model=ctx.name)
                for kind, tensors in (("safety_vector", safety.tensors), ("fisher", importance.tensors)):
                    if tensors is not None:  # no safety vector with identify_mode='none'
                        store.save(
                            kind,
                            {n: tensors[n] for n in names},
                            base_fingerprint=self._base_fingerprint,
                            base_model=ctx.name,
                        )
                if self._safety_calibration is not None:
                    _save_rows(store, self._safety_calibration, self._base_fingerprint, self.sources)
                if self._retain_calibration is not None:
                    _save_rows(store, self._retain_calibration, self._base_fingerprint, self.sources, _RETAIN_FILE)
            state.wait_for_everyone()
        if snapshot and self.config.snapshot == "disk":
            snapshot = SafetensorsMapping(store.path("snapshot"))
        self._snapshot, self._safety, self._importance = snapshot, safety.tensors, importance.tensors

    def _reload(self, model, store: RunStore, targets, run_config) -> None:
        dense = [t.name for t in targets if t.kind != "lora"]
        sharded = distributed.sharding_kind(model, targets) if dense else None
        if sharded:
            raise IRRConfigError(
                f"resuming an IRRCallback run with weights sharded by {sharded} is not supported: the base weights "
                "are kept in shards in each rank's RAM, not persisted. Restart from step 0, or realign the fine-tuned "
                "model afterwards from its consolidated checkpoint (irr apply)"
            )
        names = [t.name for t in targets]
        fp = None
        if dense:
            self._snapshot = store.load("snapshot", dense)
            fp = self._snapshot.metadata["irr_callback.base_fingerprint"]
            if self.config.snapshot == "cpu":
                self._snapshot = {n: self._snapshot[n] for n in dense}
        self._safety = None
        if run_config.needs_safety_vector:
            self._safety = store.load("safety_vector", names, base_fingerprint=fp)
            fp = self._safety.metadata["irr_callback.base_fingerprint"]
        if run_config.uses_safety_stream:
            self._safety_calibration, fp, self._resumed_rows_sources = _load_rows(store, fp)
        retain_sources = {}
        if run_config.uses_retain_stream:
            self._retain_calibration, fp, retain_sources = _load_rows(store, fp, _RETAIN_FILE)
        self._base_fingerprint = fp
        self._importance = (
            store.load("fisher", names, base_fingerprint=self._base_fingerprint)
            if run_config.needs_importance
            else None
        )
        self.sources = {
            "safety_vector": (
                Resolved(None, "resumed", path=store.path("safety_vector"))
                if self._safety is not None
                else Resolved(None, "none")
            ).describe(),
            "importance": Resolved(None, "resumed" if self._importance is not None else "none").describe(),
        }
        if self._safety_calibration is not None:
            self.sources.update(self._resumed_rows_sources)
        if self._retain_calibration is not None:
            self.sources.update(retain_sources)
        logger.info(f"IRR: resumed run, base snapshot and safety inputs reloaded from {store.directory}")

    # ------------------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        """`checkpoint-N` is on disk already (`Trainer._save_checkpoint` runs first): realign it from its files,
        one layer at a time, on the main process (the offline path is single-process); the others wait."""
        if not (self.config.realign_checkpoints and self._prepared):
            return
        self._dataloader = kwargs.get("train_dataloader")
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        partial = _partial_state()
        if partial.is_main_process:
            try:
                report = realign_saved_checkpoint(
                    checkpoint,
                    self._model(model),
                    base=self._snapshot,
                    safety_vector=self._safety,
                    importance=self._importance,
                    calibration=self._calibration(processing_class),
                    safety_calibration=self._safety_calibration,
                    retain_calibration=self._retain_calibration,
                    config=self._run_config,
                    progress=_show_progress(args),
                    card=lambda report: self._card(report, self._model(model)),
                )
                logger.info(
                    f"IRR: realigned copy of {checkpoint} written to {checkpoint}/irr ({report.setting_line()})"
                )
            except Exception as exc:
                logger.warning(
                    f"IRR: realigned copy of {checkpoint} failed ({type(exc).__name__}: {exc}); training continues"
                )
        partial.wait_for_everyone()

    def _calibration(self, processing_class) -> list[dict]:
        """The calibration rows the train-end realignment uses: the first training examples."""
        config = self._run_config
        return calibration_examples(
            self._train_dataset(),
            self._tokenizer(processing_class),
            num_samples=config.num_calibration_samples,
            max_length=config.calibration_max_length,
        )

    def _check_checkpoints(self, model: nn.Module, targets) -> None:
        """Sharded weights: every rank keeps its part of the base. What needs the whole base on one process is
        refused before anything runs: the safety vector / Fisher (identify_mode != 'none'), and realigning
        checkpoints from their files on the main process."""
        sharded = distributed.sharding_kind(model, targets)
        if sharded and self.config.realign_checkpoints:
            raise IRRConfigError(
                f"IRRConfig.realign_checkpoints=True is not supported with weights sharded by {sharded}: a checkpoint "
                "is realigned from its files on one process, against the whole base, which no rank holds (each keeps "
                "its part). Set realign_checkpoints=False; to realign a checkpoint, save it consolidated (FSDP: "
                "fsdp_state_dict_type FULL_STATE_DICT; ZeRO-3: zero3_save_16bit_model) and run "
                "`irr apply --low-memory` on it with the base model"
            )
        if sharded and self.config.needs_safety_vector:
            raise IRRConfigError(
                f"IRRConfig.identify_mode={self.config.identify_mode!r} (the paper's setting) is not supported by "
                f"IRRCallback with weights sharded by {sharded}: the safety vector (and Fisher) are resolved on one "
                "process against the whole base, which no rank holds. Use the default recommended setting "
                "(IRRCallback()), or realign the saved model with `irr apply` on one process"
            )

    # ------------------------------------------------------------------------------ train end
    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self._prepared:
            logger.warning("IRR: on_train_end without on_train_begin; nothing to realign")
            return
        self._dataloader = kwargs.get("train_dataloader")
        self.output_path = None
        target = self.config.irr_output_dir if self.config.save_realigned else None
        try:
            self.report = self._realign_and_save(self._model(model), args, processing_class, target)
        except _SaveFailed as exc:  # the live model IS realigned; only writing IRR's copy failed
            cause = exc.__cause__
            self.report = exc.report
            self.report.status = "save_failed"
            self.report.error = f"{type(cause).__name__}: {cause}"
            self._write_run_report(args)
            self._mark_output(args, self._model(model), self.report)
            if self.config.on_error == "raise":
                raise cause from None
            logger.warning(
                f"IRR realigned the model ({self.report.totals['modules']} modules), but saving its copy to "
                f"{exc.target} failed: {self.report.error}. The live model (trainer.model) IS realigned: "
                "save it with trainer.save_model()"
            )
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
        self._mark_output(args, self._model(model), self.report)
        if self.output_path is None:
            logger.info(
                f"IRR: the live model is realigned; trainer.save_model() writes it into {args.output_dir} "
                "(irr_report.json and the model card's IRR section are there already)"
            )
        self._end_run(args)

    def _mark_output(self, args, model: nn.Module, report: IRRReport) -> None:
        """Make `output_dir`'s model card say that its weights are the realigned ones, and keep saying it: the
        section goes into the card there now (or IRR's card, when there is none yet), and after every
        `create_model_card` of the Trainer that runs this callback (transformers' and TRL's rewrite README.md
        at `push_to_hub` and, TRL, at every checkpoint). A full fine-tune's model also gets the `irr-realigned`
        tag (a LoRA run's: `peft_utils.mark_realigned`), which both cards list."""
        if self._card_note is None:  # a full fine-tune (a LoRA run's note is set by `_finish_adapter`)
            copy_at = portable_paths(os.path.abspath(self.output_path), args.output_dir) if self.output_path else None
            self._card_note = realigned_note(report, sources=self.sources, copy_at=copy_at)
            inner = unwrap(model)
            if hasattr(inner, "add_model_tags"):
                inner.add_model_tags([REALIGNED_TAG])
        trainer = self._trainer or _calling_trainer(self)
        if trainer is not None and not getattr(trainer, "_irr_card_hook", False):
            trainer.create_model_card = _card_hook(trainer.create_model_card, self, args.output_dir)
            trainer._irr_card_hook = True
        if not _partial_state().is_main_process:
            return
        readme = os.path.join(args.output_dir, "README.md")
        try:
            if os.path.isfile(readme):
                append_note(readme, self._card_note)
            else:
                self._card(report, model).save(readme)
        except Exception as exc:  # the model and the report are what matter; a card can be written again
            logger.warning(f"IRR: the model card's IRR section could not be written to {readme}: {exc}")

    def _end_run(self, args) -> None:
        """The run ended well: `<output_dir>/_irr_run/` (a copy of the base's targets, for resuming) is not needed
        any more. A later `train()` with this callback starts a new IRR run from the model as it is then."""
        state = _partial_state()
        state.wait_for_everyone()  # no rank still reads the disk snapshot
        if state.is_main_process:
            RunStore(args.output_dir).remove()
        self._snapshot = self._safety = self._importance = self._safety_calibration = None
        self._retain_calibration = None
        self._prepared = False

    def _realign_and_save(self, model: nn.Module, args, processing_class, target: str | None) -> IRRReport:
        """Realign `model` in place (all or nothing, LoRA adapter included) and, when `target` is set, save
        IRR's copy of the output there atomically (`self.output_path`)."""
        tokenizer = self._tokenizer(processing_class)
        config = self._run_config
        calibration = calibration_examples(
            self._train_dataset(),
            tokenizer,
            num_samples=config.num_calibration_samples,
            max_length=config.calibration_max_length,
        )
        peft = is_peft_model(model)
        _, _, targets = find_targets(model, config.target_modules)
        backup = LoraBackup(model, targets, config.backup) if peft else None
        lowrank = None
        if peft:  # the adapter at its rank, layer by layer, from each layer's H (W_A cloned one layer at a time)
            lowrank = AdapterFactors(
                rank=self.config.lora_refactor_rank,
                tolerance=self.config.lora_adapter_tolerance,
                multiple=self.config.lora_rank_multiple,
            )
        plan = None
        try:
            report = realign(
                model,
                base=self._snapshot,
                safety_vector=self._safety,
                importance=self._importance,
                calibration=calibration,
                safety_calibration=self._safety_calibration,
                retain_calibration=self._retain_calibration,
                config=config,
                progress=_show_progress(args),
                lowrank=lowrank,
            )
            self._describe(report)
            if peft:
                plan = AdapterPlan.build(targets, lowrank.factors, rule=_rank_rule(self.config))
                report.extra["lora_adapter"] = plan.to_dict()
                install_factors(model, targets, plan)  # the frozen weights keep W_A + Δ′ until the merged save
        except Exception:
            if backup is not None:
                backup.restore()
            raise
        merged_at = None
        try:
            if target is not None:
                self._save(model, tokenizer, report, target, plan)
                self.output_path = target
                merged = plan is not None and self.config.lora_output in ("merged", "both")
                merged_at = portable_paths(os.path.abspath(target), args.output_dir) if merged else None
        except Exception as exc:
            raise _SaveFailed(report, target) from exc
        finally:
            if plan is not None:
                self._finish_adapter(model, targets, backup, plan, merged_at)
        return report

    def _finish_adapter(self, model, targets, backup: LoraBackup, plan: AdapterPlan, merged_at: str | None) -> None:
        """The live PeftModel after a LoRA run, on every path (a failed save included): the realigned adapter
        on W_A. `merged_at`: where the exact merged model was saved, relative to output_dir (None: it was not)."""
        backup.restore_bases()
        logger.info(
            f"IRR: the live adapter is the realigned model ({plan.rule}; ranks up to {plan.max_rank}, "
            f"largest objective gap {plan.max_relative_gap:.3g} of the realigned delta's output energy"
            + ("" if plan.exact else ", truncation of the masked solution")
            + "): trainer.save_model() writes it"
        )
        self._card_note = adapter_note(plan.to_dict(), merged_at)
        if not plan.exact:
            logger.warning(
                "IRR: with a removal mask (this setting) the realigned delta is not low rank and the adapter is a "
                "truncation of it: on the toy LoRA worlds it refused up to 0.71 differently from the exact merged "
                "model at the trained rank (docs/lora.md). Prefer IRRConfig.recommended() (no mask: the adapter is "
                "the exact rank-constrained optimum), or use the merged copy (irr_output_dir, lora_output='merged')"
            )
        mark_realigned(model, self._card_note)

    def _describe(self, report: IRRReport) -> None:
        """What every realigned output's report records beyond the realignment: the safety inputs and the base."""
        report.extra["safety_inputs"] = self.sources
        report.extra["base_fingerprint"] = fingerprint_id(self._base_fingerprint)

    def _card(self, report: IRRReport, model: nn.Module):
        """The model card of a realigned output (the train-end one or a checkpoint's copy)."""
        self._describe(report)
        return build_model_card(
            report, base_model=_model_name(model), sources=self.sources, lora=report.extra.get("lora_adapter")
        )

    def _save(self, model, tokenizer, report: IRRReport, target: str, plan: AdapterPlan | None) -> None:
        """Every rank: the one sharding-aware writer (`output.save_realigned`) gathers and writes on the main
        process. A LoRA run's merged model is the realigned frozen weights under the plain names (no copy); the
        adapter (`lora_output` 'adapter' or 'both') is the live one."""
        card = self._card(report, model)
        if plan is None:
            save_realigned(model, target, processing_class=tokenizer, report=report, card=card)
            logger.info(f"IRR: realigned model saved to {target} ({report.setting_line()})")
            return
        output = self.config.lora_output
        merged = output in ("merged", "both")

        def adapter(tmp: str) -> None:
            if output in ("adapter", "both"):
                model.save_pretrained(tmp if output == "adapter" else os.path.join(tmp, "adapter"))

        save_realigned(
            model if merged else None,
            target,
            processing_class=tokenizer,
            report=report,
            card=card,
            extra=adapter,
            rename=merged_state_dict if merged else None,
        )
        logger.info(f"IRR: realigned model saved to {target} ({report.setting_line()}; LoRA output: {output})")

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

    def _check_auto_rows(self, config: IRRConfig, rows: int) -> None:
        if config.safety_weight == "auto" and min(rows, config.num_safety_samples) <= config.calibration_batch_size:
            raise IRRConfigError(
                f"IRRConfig.safety_weight='auto' holds out part of the safety data to choose λ, but safety_dataset "
                f"gave {rows} usable rows, one batch of calibration_batch_size={config.calibration_batch_size}: "
                "give more rows or lower calibration_batch_size"
            )


_ROWS_FILE = "safety_calibration.json"
_RETAIN_FILE = "retain_calibration.json"


def _rows_path(store: RunStore, file: str = _ROWS_FILE) -> str:
    return os.path.join(store.directory, file)


def _save_rows(
    store: RunStore, rows: list[dict], base_fingerprint: str, sources: dict, file: str = _ROWS_FILE
) -> None:
    """A stream's tokenized rows (the base model's generated answers included) for a resumed run: the safety
    stream's (`_ROWS_FILE`) or the retain stream's (`_RETAIN_FILE`)."""
    from .saving import atomic_file

    os.makedirs(store.directory, exist_ok=True)
    kinds = ("safety_calibration", "safety_data") if file == _ROWS_FILE else ("retain_data",)
    payload = {
        "base_fingerprint": base_fingerprint,
        "sources": {k: sources[k] for k in kinds if k in sources},
        "rows": rows,
    }
    with atomic_file(_rows_path(store, file), suffix=".json.tmp") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)


def _load_rows(
    store: RunStore, fingerprint: str | None, file: str = _ROWS_FILE
) -> tuple[list[dict], str, dict[str, dict]]:
    """The persisted rows (`file`: the safety stream's or the retain stream's), the base they were made for,
    and their description at the run's first start (marked `resumed`), so that a resumed run's report
    describes the same data."""
    path = _rows_path(store, file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"resuming from a checkpoint but '{path}' does not exist: the safety and retain streams' rows are persisted at "
            "the first start of the run (the base model's answers cannot be regenerated after fine-tuning). "
            "Start the run with IRRCallback from step 0."
        )
    with open(path, encoding="utf-8") as fh:
        payload = json.load(fh)
    recorded = payload.get("base_fingerprint")
    if fingerprint is not None and not same_base(recorded, fingerprint):
        raise ValueError(
            f"'{path}' was made for base {fingerprint_id(recorded or '')}, this run's base is "
            f"{fingerprint_id(fingerprint)}"
        )
    described = {kind: {**info, "resumed": True} for kind, info in (payload.get("sources") or {}).items() if info}
    kind = "safety_calibration" if file == _ROWS_FILE else "retain_data"
    described.setdefault(kind, {"source": "resumed", "examples": len(payload["rows"])})
    return payload["rows"], recorded, described


class _SaveFailed(Exception):
    """Realignment succeeded (the model is realigned in place) but writing IRR's copy at `target` failed."""

    def __init__(self, report: IRRReport, target: str) -> None:
        super().__init__("saving the realigned model failed")
        self.report = report
        self.target = target


def _calling_trainer(callback: IRRCallback):
    """The Trainer whose event `callback` is handling, found on the call stack (events get the model, not
    the trainer; `IRRCallback.bind` names it explicitly). None when called some other way."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _card_hook(create_model_card, callback: IRRCallback, output_dir: str):
    """`trainer.create_model_card` that then appends the callback's current note to the card it wrote."""

    def wrapped(*args, **kwargs):
        result = create_model_card(*args, **kwargs)
        readme = os.path.join(output_dir, "README.md")
        if callback._card_note is not None and _partial_state().is_main_process and os.path.isfile(readme):
            append_note(readme, callback._card_note)
        return result

    wrapped.__wrapped__ = create_model_card
    return wrapped


def _show_progress(args) -> bool:
    """Progress bars as the Trainer shows its own: not with disable_tqdm, and on the local main process only."""
    return not args.disable_tqdm and _partial_state().is_local_main_process


def _rank_rule(config: IRRConfig) -> str:
    """How the realigned adapter's ranks were chosen, in words (report and cards)."""
    if config.lora_refactor_rank is not None:
        return f"rank {config.lora_refactor_rank} for every module (lora_refactor_rank)"
    if config.lora_adapter_tolerance is not None:
        return f"the smallest rank within lora_adapter_tolerance={config.lora_adapter_tolerance}"
    if config.lora_rank_multiple == 1:
        return "the rank each module was trained at"
    return f"{config.lora_rank_multiple}x the rank each module was trained at (lora_rank_multiple)"


def _model_name(model: nn.Module) -> str:
    if is_peft_model(model):
        cfg = next(iter(model.peft_config.values()))
        if getattr(cfg, "base_model_name_or_path", None):
            return str(cfg.base_model_name_or_path)
    inner = unwrap(model)
    return str(getattr(getattr(inner, "config", None), "_name_or_path", "") or getattr(inner, "name_or_path", ""))
