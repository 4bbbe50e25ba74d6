"""`IRRConfig`: every knob of identify-remove-recalibrate, readable by `HfArgumentParser`.

Defaults follow what the IRR authors actually ran (remove every sign conflict, recalibrate,
128-column blocks, 1% relative damping), not the reference script's argparse defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .core.settings import RealignSettings


IDENTIFY_MODES = ("sign", "no_sign", "random", "none")
SAFETY_TOKENS = ("all", "response", "prompt", "answer")
CALIBRATION_FILTERS = ("none", "refused")
SAFETY_TERMS = ("aligned", "delta")
TASK_TERMS = ("delta", "fine-tuned")
LORA_OUTPUTS = ("merged", "adapter", "both")
LORA_RANK_MULTIPLE = 2  # the realigned adapter's rank / the trained rank (docs/lora.md, bench_lora_adapter)
ON_ERROR = ("raise", "warn")
SNAPSHOT_LOCATIONS = ("cpu", "disk")
BACKUP_LOCATIONS = ("disk", "cpu")


class IRRConfigError(ValueError):
    """A configuration field has an invalid value; the message names the field."""


@dataclass
class IRRConfig:
    """Settings for `irr_callback.realign`, `IRRCallback` and the `irr` CLI.

    Field names double as command-line flags (`--remove_ratio 0.5`) through `HfArgumentParser`; each
    field's `help` says more. `realign_settings()` turns the first group into the solver's settings.

    Args (identify / remove / recalibrate):
        remove_ratio, remove_more, identify_mode, irr_seed: which deltas are removed.
        recalibrate, blocksize, percdamp, max_damping_retries, fallback_to_removal: the OBS recalibration.
        target_modules: which weight matrices are realigned (default: every linear layer of the decoder).

    Args (safety-regularised recalibration, beyond the paper; `IRRConfig.recommended()`):
        safety_weight ("auto" or λ >= 0; 0 is the paper's IRR), safety_term, safety_ridge, safety_tokens,
        num_safety_samples: the safety stream and how strongly it holds harmful prompts at the aligned model.
        calibration_filter: drop the calibration rows whose prompt the aligned model refuses.
        retain_weight, retain_dataset (+ columns, num_retain_samples, retain_max_new_tokens): the retain stream
        of general prompts that keeps what the model could already do.
        true_sequential, task_term: options of the layer loop and the task term, off by default
        (docs/safety-weight.md, "Round 9").

    Args (calibration):
        num_calibration_samples, calibration_max_length, calibration_loss_tokens_only, calibration_answer_weight,
            calibration_batch_size: the data H is built from (packed rows are split into their sequences; a sample
            is one sequence).
        device: where the math runs. backup: where originals are kept for the all-or-nothing restore.

    Args (safety inputs, for the callback and the CLI):
        safety_vector, unaligned_model, harmful_dataset (+ columns, unaligned_*): the safety vector.
        fisher, safety_dataset (+ columns, safety_max_new_tokens, fisher_*): the importance.
        cache_dir: where computed safety inputs are kept for the next run.

    Args (callback behaviour):
        snapshot, irr_output_dir, save_realigned, lora_output, lora_rank_multiple, lora_refactor_rank,
        lora_adapter_tolerance, realign_checkpoints, on_error. Where each file goes (docs/trl.md): the realigned
        model is the live model, which `trainer.save_model()` writes into `output_dir`; `irr_report.json` and the
        model card's IRR section go there at train end; IRR's own copy only into `irr_output_dir` (opt-in; a name
        starting with `_` inside `output_dir` keeps it out of `push_to_hub`); `checkpoint-N/irr` with
        `realign_checkpoints`; `output_dir/_irr_run/` while a run may be resumed; computed safety inputs under
        `cache_dir`.

    Example:

    ```python
    >>> from irr_callback import IRRConfig
    >>> config = IRRConfig(remove_ratio=0.5, fisher="fisher.safetensors", calibration_batch_size=8)
    >>> config.realign_settings().remove_ratio
    0.5
    >>> IRRConfig.recommended().safety_weight  # the setting the README recommends
    'auto'
    ```
    """

    # ---- identify / remove / recalibrate -------------------------------------------------
    remove_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Share of the sign-conflicting deltas to remove, highest Fisher importance first. "
            "1.0 (the paper's default) removes every conflict and needs no importance scores."
        },
    )
    remove_more: bool = field(
        default=False,
        metadata={
            "help": "IRR_more: rank ALL entries (score +F if conflicting, -F otherwise) and remove the top "
            "`remove_ratio` share of each block. With remove_ratio=1 the matrix reverts to the base."
        },
    )
    identify_mode: str = field(
        default="sign",
        metadata={
            "help": "How candidates are chosen: 'sign' (IRR), 'no_sign' (ablation: rank all entries by "
            "importance), 'random' (ablation: remove a random `remove_ratio` share of all entries) or 'none' "
            "(remove nothing: the safety-regularised recalibration alone, no safety vector needed)."
        },
    )
    irr_seed: int = field(
        default=0,
        metadata={
            "help": "Seed for identify_mode='random' (named irr_seed so it never clashes with TrainingArguments.seed)."
        },
    )
    recalibrate: bool = field(
        default=True,
        metadata={"help": "Compensate removals with the OBS update on the kept deltas (False: plain removal)."},
    )
    blocksize: int = field(
        default=128,
        metadata={"help": "Input columns per block for ranking, the adaptive mask and the lazy OBS update."},
    )
    percdamp: float = field(default=0.01, metadata={"help": "Hessian damping as a fraction of the mean of diag(H)."})
    max_damping_retries: int = field(
        default=6,
        metadata={"help": "When the Cholesky factorisation fails, retry this many times with 10x more damping."},
    )
    fallback_to_removal: bool = field(
        default=True,
        metadata={
            "help": "Per module, keep plain removal when recalibration gives a larger layer-output error "
            "(costs one extra matrix product per module; the report says where it happened)."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to realign: names (e.g. q_proj v_proj, matched as a dotted suffix) or regular "
            "expressions matched against the full module name. Default: every Linear/Conv1D in the decoder layers."
        },
    )
    # ---- safety-regularised recalibration (beyond the paper) -------------------------------
    safety_weight: str = field(  # str for HfArgumentParser ('auto' or a number); stored as a float or 'auto'
        default="0",
        metadata={
            "help": "λ of the safety-regularised recalibration: minimise |Δ'-Δ|²_{H_d} + λ·(safety term) on a "
            "safety stream (harmful prompts with safe responses) that travels through the layers beside the "
            "calibration data. 0 (default) is the paper's IRR exactly; a number > 0 fixes λ; 'auto' picks λ "
            "from held-out splits of the calibration and safety data (docs/safety-weight.md)."
        },
    )
    safety_term: str = field(
        default="aligned",
        metadata={
            "help": "With safety_weight != 0: 'aligned' asks each layer for the aligned model's outputs on the "
            "aligned model's own activations, |W'X_r - W_A X_A|² (a second copy of the safety stream travels "
            "through the base weights; this also undoes drift from earlier layers and untouched weights), or "
            "'delta' for |Δ'X_r|², one stream only."
        },
    )
    true_sequential: bool = field(
        default=False,
        metadata={
            "help": "Solve a layer's groups of targets one at a time, in the order the layer calls them, each from a "
            "pass of the layer with the groups before it already realigned (GPTQ's true-sequential): o_proj then "
            "sees the realigned q/k/v's attention. False (default, the paper's code): one pass of the unmodified "
            "layer for every group."
        },
    )
    task_term: str = field(
        default="delta",
        metadata={
            "help": "With safety_weight != 0: 'delta' (default) keeps each layer's outputs on the calibration (and "
            "retain) tokens at the fine-tuned layer's on the realigned model's inputs, |(Δ'-Δ)X_d|²; 'fine-tuned' "
            "asks for the fine-tuned model's outputs on its own activations, |W'X_d - W_F X_F|² (a copy of each "
            "stream travels through the fine-tuned layers; this also undoes the drift that earlier layers' safety "
            "changes leave in the task's inputs)."
        },
    )
    safety_ridge: float = field(
        default=0.1,
        metadata={
            "help": "With safety_weight != 0: ridge toward the fine-tuned delta, as a fraction of mean(diag H_d); "
            "it decides input directions neither stream excites."
        },
    )
    safety_tokens: str = field(
        default="all",
        metadata={
            "help": "Tokens of the safety stream that feed its Hessians: 'all' (prompt and response), 'response' "
            "(labels != -100), 'prompt' (labels == -100) or 'answer' (the positions that predict a response token: "
            "the last prompt token and the response but its last token)."
        },
    )
    num_safety_samples: int = field(
        default=128, metadata={"help": "Safety-stream sequences (harmful prompts with safe responses) used."}
    )
    calibration_filter: str = field(
        default="none",
        metadata={
            "help": "'refused': before anything else, drop the calibration rows whose prompt the aligned reference "
            "(every target at its base value) refuses: greedily, its answer would open with one of the safety "
            "stream's refusals (harmful requests answered in the fine-tuning data would otherwise be protected as "
            "the task). Needs the safety stream (safety_weight != 0) and labels (-100 on prompt tokens). "
            "'none' (default): every row is used, as in the paper."
        },
    )
    # ---- retain stream (beyond the paper; docs/safety-weight.md) ----------------------------
    retain_weight: float = field(
        default=0.0,
        metadata={
            "help": "ρ of the retain term ρ·|(Δ'-Δ)X_r|²: a third input stream of general prompts with answers "
            "keeps each layer's outputs on them at the fine-tuned model's, protecting what the model could "
            "already do (the task metric becomes H_d + ρH_r). 0 (default): no retain stream, bit for bit as without."
        },
    )
    retain_dataset: str | None = field(
        default=None,
        metadata={
            "help": "General (benign) prompts with answers (hub id or json/jsonl) for the retain stream; without a "
            "response column the base model writes the answers. Not set and needed (retain_weight > 0): "
            "num_retain_samples prompts shipped in irr_callback/resources/general_prompts.jsonl (Apache-2.0), "
            "answered by the base model and cached like the safety answers."
        },
    )
    retain_prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of retain_dataset."})
    retain_response_column: str = field(
        default="response",
        metadata={"help": "Response column of retain_dataset; if absent, the base model's own answers are generated."},
    )
    num_retain_samples: int = field(default=64, metadata={"help": "Retain-stream sequences used."})
    retain_max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens the base model generates per retain prompt without responses."}
    )
    # ---- calibration ---------------------------------------------------------------------
    num_calibration_samples: int = field(
        default=128,
        metadata={
            "help": "Calibration sequences (the first ones of the downstream training set; a packed row counts as "
            "the sequences it holds)."
        },
    )
    calibration_max_length: int = field(
        default=512, metadata={"help": "Calibration sequences are truncated to this many tokens."}
    )
    calibration_loss_tokens_only: bool = field(
        default=False,
        metadata={
            "help": "Which calibration tokens enter H: False (default) every real token, prompt included (a prompt's "
            "keys and values shape the completion); True only the tokens the training loss saw (labels != -100, "
            "e.g. TRL's completion_only_loss / assistant_only_loss). Every token still runs through the layers. "
            "Measured on the toy world: docs/trl.md."
        },
    )
    calibration_answer_weight: int = field(
        default=1,
        metadata={
            "help": "How many times each answer position of a calibration row counts in H_d: the positions that predict "
            "a response token (the last prompt token, where the answer is decided, and the response but its last "
            "token). 1 (default): every token once, as in the paper. k > 1 protects the task where its prompts share "
            "inputs with the safety stream's; an experiment that met fewer of the suite's dev worlds (k = 4 and 16, "
            "docs/safety-weight.md), kept so that result can be reproduced."
        },
    )
    calibration_batch_size: int = field(
        default=4,
        metadata={
            "help": "Sequences per layer forward pass (Hessian and propagation passes). Peak memory grows "
            "with it (one batch's activations through one layer); on CPU 2-8 ran equally fast, "
            "so 4 (2048 tokens at the default length). Raise it on a GPU with room to spare."
        },
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for the IRR math (default: the device of each decoder layer; for `realign_checkpoint`, "
            "`irr apply --low-memory` and `realign_checkpoints`: where each loaded layer lives, default CPU)."
        },
    )
    backup: str = field(
        default="disk",
        metadata={
            "help": "Where `realign` keeps the original of every weight it writes, to restore all of them on "
            "failure: 'disk' (a temp file under $TMPDIR, deleted at the end; no RAM) or 'cpu' (RAM: model-size "
            "extra memory, no disk writes)."
        },
    )
    # ---- safety inputs (used by the callback and the CLI) -----------------------------------
    safety_vector: str | None = field(
        default=None, metadata={"help": "A safety-vector safetensors file written by `irr safety-vector`."}
    )
    unaligned_model: str | None = field(
        default=None,
        metadata={"help": "Local directory or hub id of the unaligned model (v = W_aligned - W_unaligned)."},
    )
    harmful_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Harmful prompt/answer pairs (hub id or json/jsonl) to build the unaligned model by a short fine-tune."
        },
    )
    harmful_prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of harmful_dataset."})
    harmful_response_column: str = field(default="response", metadata={"help": "Answer column of harmful_dataset."})
    unaligned_steps: int = field(default=100, metadata={"help": "Optimizer steps of the harmful fine-tune."})
    unaligned_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the harmful fine-tune."})
    unaligned_lora_rank: int = field(
        default=16,
        metadata={
            "help": "LoRA rank of the harmful fine-tune: a temporary adapter on the live model, no copy of it. "
            "0: full fine-tuning, in place, restored from a CPU copy of every weight (host memory: one model; "
            "AdamW's two states per weight on the device)."
        },
    )
    unaligned_batch_size: int = field(default=8, metadata={"help": "Sequences per step of the harmful fine-tune."})
    fisher: str | None = field(
        default=None, metadata={"help": "A Fisher-importance safetensors file written by `irr fisher`."}
    )
    safety_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Harmful prompts with safe responses (hub id or json/jsonl): the safety stream of safety_weight "
            "(IRRConfig.recommended()) and the Fisher importance; without a response column the base model writes "
            "its own answers. Not set and needed (safety_weight != 0): num_safety_samples default harmful prompts, "
            "AdvBench's harmful behaviours (hub id walledai/AdvBench, MIT) online, else the 140 requests shipped in "
            "irr_callback/resources (Apache-2.0), answered by the base model at train begin (docs/defaults.md)."
        },
    )
    safety_prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of safety_dataset."})
    safety_response_column: str = field(
        default="response",
        metadata={
            "help": "Response column of safety_dataset; if absent, the base model's own responses are generated."
        },
    )
    safety_max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Tokens generated per prompt when safety_dataset has no response column (the base model's "
            "own answers are used, as in the paper)."
        },
    )
    fisher_batch_size: int = field(default=8, metadata={"help": "Mini-batch size of the Fisher estimate."})
    fisher_max_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many safety examples for the Fisher estimate."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where computed safety vectors and Fisher scores are cached (default: ~/.cache/irr_callback)."
        },
    )
    # ---- callback behaviour ----------------------------------------------------------------
    snapshot: str = field(
        default="cpu",
        metadata={
            "help": "Where the base weights are kept during training: 'cpu' (RAM) or 'disk' (safetensors under output_dir)."
        },
    )
    irr_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Callback: where IRR writes its own copy of the realigned output at train end (model, tokenizer, "
            "irr_report.json, IRR's model card; LoRA: see lora_output). Default None: no copy; the live model is "
            "realigned, trainer.save_model() writes it into output_dir, where irr_report.json and the card's IRR "
            "section already are. Use a name starting with '_' inside output_dir (e.g. <output_dir>/_irr) to keep "
            "the copy out of push_to_hub's upload. (Until issue 23 the default was <output_dir>/irr: docs/trl.md.)"
        },
    )
    save_realigned: bool = field(
        default=True,
        metadata={
            "help": "Callback: write IRR's copy at irr_output_dir (False: never, even if irr_output_dir is set)."
        },
    )
    lora_output: str = field(
        default="both",
        metadata={
            "help": "LoRA runs with irr_output_dir: IRR's copy holds the exact 'merged' model (W_A + Δ′, no rank "
            "limit), the realigned 'adapter', or 'both' (the adapter in adapter/). Whatever it says, the live "
            "PeftModel is the realigned adapter: what trainer.save_model() and push_to_hub() write."
        },
    )
    lora_rank_multiple: int = field(
        default=LORA_RANK_MULTIPLE,
        metadata={
            "help": "LoRA runs: each module's realigned adapter has this many times the rank it was trained at "
            "(the rank-constrained optimum of the recalibration objective; 2: chosen on the toy LoRA worlds, "
            "docs/lora.md)."
        },
    )
    lora_refactor_rank: int | None = field(
        default=None,
        metadata={"help": "LoRA runs: one adapter rank for every module instead of lora_rank_multiple."},
    )
    lora_adapter_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "LoRA runs: instead of a rank, each module at the smallest rank whose objective gap is at most "
            "tolerance² of the realigned delta's own output energy ‖Δ′‖²_H (may exceed the trained rank)."
        },
    )
    realign_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Also write a realigned copy into every checkpoint-N/irr as training goes, realigned from the "
            "checkpoint's files one decoder layer at a time on `device` (default CPU; no model copy, training "
            "untouched). LoRA: a merged realigned model. Not with ZeRO-3 / FSDP sharded weights."
        },
    )
    on_error: str = field(
        default="raise",
        metadata={
            "help": "If IRR fails at train end: 'raise' the error or only 'warn'. A failed realignment "
            "leaves the fine-tuned model; if only saving fails afterwards, the live model is "
            "realigned (report status 'save_failed')."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `IRRConfigError` naming the first invalid field."""
        _check(
            isinstance(self.remove_ratio, (int, float))
            and math.isfinite(self.remove_ratio)
            and 0.0 <= self.remove_ratio <= 1.0,
            "remove_ratio",
            self.remove_ratio,
            "a number in [0, 1]",
        )
        _check(self.identify_mode in IDENTIFY_MODES, "identify_mode", self.identify_mode, f"one of {IDENTIFY_MODES}")
        _check(isinstance(self.blocksize, int) and self.blocksize >= 1, "blocksize", self.blocksize, "an integer >= 1")
        self.safety_weight = _safety_weight(self.safety_weight)
        _check(
            isinstance(self.safety_ridge, (int, float))
            and math.isfinite(self.safety_ridge)
            and self.safety_ridge >= 0,
            "safety_ridge",
            self.safety_ridge,
            "a finite number >= 0",
        )
        _check(
            isinstance(self.retain_weight, (int, float))
            and not isinstance(self.retain_weight, bool)
            and math.isfinite(self.retain_weight)
            and self.retain_weight >= 0,
            "retain_weight",
            self.retain_weight,
            "a finite number >= 0",
        )
        _check(
            self.retain_weight == 0 or self.recalibrate,
            "recalibrate",
            self.recalibrate,
            "True when retain_weight > 0 (the retain term is part of the recalibration)",
        )
        _check(self.safety_term in SAFETY_TERMS, "safety_term", self.safety_term, f"one of {SAFETY_TERMS}")
        _check(self.task_term in TASK_TERMS, "task_term", self.task_term, f"one of {TASK_TERMS}")
        _check(isinstance(self.true_sequential, bool), "true_sequential", self.true_sequential, "True or False")
        _check(
            self.task_term == "delta" or self.safety_weight != 0,
            "task_term",
            self.task_term,
            "'delta' when safety_weight is 0 (the fine-tuned target is part of the safety-regularised recalibration)",
        )
        _check(
            self.task_term == "delta" or not self.true_sequential,
            "task_term",
            self.task_term,
            "'delta' with true_sequential (the fine-tuned twin runs each layer as it entered the loop)",
        )
        _check(self.safety_tokens in SAFETY_TOKENS, "safety_tokens", self.safety_tokens, f"one of {SAFETY_TOKENS}")
        _check(
            self.calibration_filter in CALIBRATION_FILTERS,
            "calibration_filter",
            self.calibration_filter,
            f"one of {CALIBRATION_FILTERS}",
        )
        _check(
            self.calibration_filter == "none" or self.safety_weight != 0,
            "calibration_filter",
            self.calibration_filter,
            "'none' when safety_weight is 0 (the filter looks for the safety stream's refusals)",
        )
        _check(
            self.safety_weight == 0 or self.recalibrate,
            "recalibrate",
            self.recalibrate,
            "True when safety_weight != 0 (the safety term is part of the recalibration)",
        )
        _check(
            isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp >= 0,
            "percdamp",
            self.percdamp,
            "a finite number >= 0",
        )
        _check(
            isinstance(self.max_damping_retries, int) and self.max_damping_retries >= 0,
            "max_damping_retries",
            self.max_damping_retries,
            "an integer >= 0",
        )
        for name in (
            "num_calibration_samples",
            "num_safety_samples",
            "calibration_answer_weight",
            "calibration_max_length",
            "calibration_batch_size",
            "fisher_batch_size",
            "unaligned_batch_size",
            "safety_max_new_tokens",
            "num_retain_samples",
            "retain_max_new_tokens",
        ):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _check(
            self.fisher_max_samples is None
            or (isinstance(self.fisher_max_samples, int) and self.fisher_max_samples >= 1),
            "fisher_max_samples",
            self.fisher_max_samples,
            "None or an integer >= 1",
        )
        _check(
            isinstance(self.unaligned_steps, int) and self.unaligned_steps >= 1,
            "unaligned_steps",
            self.unaligned_steps,
            "an integer >= 1",
        )
        _check(
            isinstance(self.unaligned_lora_rank, int) and self.unaligned_lora_rank >= 0,
            "unaligned_lora_rank",
            self.unaligned_lora_rank,
            "an integer >= 0",
        )
        _check(self.unaligned_learning_rate > 0, "unaligned_learning_rate", self.unaligned_learning_rate, "> 0")
        _check(self.snapshot in SNAPSHOT_LOCATIONS, "snapshot", self.snapshot, f"one of {SNAPSHOT_LOCATIONS}")
        _check(self.backup in BACKUP_LOCATIONS, "backup", self.backup, f"one of {BACKUP_LOCATIONS}")
        _check(self.lora_output in LORA_OUTPUTS, "lora_output", self.lora_output, f"one of {LORA_OUTPUTS}")
        _check(
            self.lora_adapter_tolerance is None
            or (
                isinstance(self.lora_adapter_tolerance, (int, float))
                and not isinstance(self.lora_adapter_tolerance, bool)
                and 0 <= self.lora_adapter_tolerance < 1
            ),
            "lora_adapter_tolerance",
            self.lora_adapter_tolerance,
            "None or a number in [0, 1)",
        )
        _check(
            isinstance(self.lora_rank_multiple, int)
            and not isinstance(self.lora_rank_multiple, bool)
            and self.lora_rank_multiple >= 1,
            "lora_rank_multiple",
            self.lora_rank_multiple,
            "an integer >= 1",
        )
        _check(
            self.lora_refactor_rank is None
            or (isinstance(self.lora_refactor_rank, int) and self.lora_refactor_rank >= 1),
            "lora_refactor_rank",
            self.lora_refactor_rank,
            "None or an integer >= 1",
        )
        _check(self.on_error in ON_ERROR, "on_error", self.on_error, f"one of {ON_ERROR}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            _check(
                len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                "target_modules",
                self.target_modules,
                "None or a non-empty list of non-empty strings",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IRRConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise IRRConfigError(f"Unknown IRRConfig field(s): {unknown}")
        return cls(**values)

    def realign_settings(self) -> RealignSettings:
        """The settings `core/` solves with: the one place where config fields become solver settings."""
        return RealignSettings(
            remove_ratio=self.remove_ratio,
            remove_more=self.remove_more,
            recalibrate=self.recalibrate,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            mode=self.identify_mode,
            seed=self.irr_seed,
            max_damping_retries=self.max_damping_retries,
            fallback_to_removal=self.fallback_to_removal,
            removal_error=self.fallback_to_removal,
            safety_weight=0.0 if self.safety_weight == "auto" else float(self.safety_weight),
            ridge=float(self.safety_ridge),
            retain_weight=float(self.retain_weight),
        )

    @classmethod
    def recommended(cls, **overrides: Any) -> IRRConfig:
        """The setting the README recommends: safety-regularised recalibration with the aligned-target
        safety term, λ chosen by `safety_weight="auto"`, and no removal by sign (`identify_mode="none"`),
        so it needs safety data (harmful prompts with safe responses) but no safety vector, no unaligned
        model and no Fisher; the calibration filter (the rows whose prompt the aligned model refuses are
        dropped) is on, and the retain term holds general prompts' outputs (ρ = 0.3, with its objective: the
        safety stream's answer tokens and a small ridge, `RECOMMENDED_RETAIN_OBJECTIVE`). `retain_weight=0`
        gives the preset without the retain stream, with the objective chosen for it (`NO_RETAIN_OBJECTIVE`).
        Chosen on the suite's dev worlds (docs/safety-weight.md, "Round 7"). `overrides` are any other
        `IRRConfig` fields and win over what the preset derives from them.

        Example:

        ```python
        >>> IRRConfig.recommended(calibration_batch_size=8).identify_mode
        'none'
        ```
        """
        values = {**RECOMMENDED, "retain_weight": RECOMMENDED_RETAIN_WEIGHT, **overrides}
        if "calibration_filter" not in overrides:  # the filter reads the safety stream's refusals
            values["calibration_filter"] = (
                RECOMMENDED_CALIBRATION_FILTER if _safety_weight(values["safety_weight"]) != 0 else "none"
            )
        objective = RECOMMENDED_RETAIN_OBJECTIVE if _positive(values["retain_weight"]) else NO_RETAIN_OBJECTIVE
        values.update({k: v for k, v in objective.items() if k not in overrides})
        return cls(**values)

    @property
    def setting_name(self) -> str:
        """'recommended' (the preset's solver fields), 'safety-regularised' (another λ) or 'irr' (the paper's)."""
        if all(getattr(self, k) == v for k, v in RECOMMENDED.items()):
            return "recommended"
        return "irr" if self.safety_weight == 0 else "safety-regularised"

    @property
    def needs_importance(self) -> bool:
        """Importance only matters when a ranking decides what is removed."""
        return self.identify_mode not in ("random", "none") and self.remove_ratio < 1.0

    @property
    def uses_safety_stream(self) -> bool:
        """A safety weight (a number > 0 or 'auto') needs harmful prompts with safe responses."""
        return self.safety_weight != 0

    @property
    def uses_retain_stream(self) -> bool:
        """A retain weight > 0 needs general prompts with answers (the retain stream)."""
        return self.retain_weight > 0

    @property
    def needs_safety_vector(self) -> bool:
        """Every identify mode but 'none' reads the safety vector."""
        return self.identify_mode != "none"


#: `IRRConfig.recommended()`: the solver fields of the setting the README recommends
RECOMMENDED: dict[str, Any] = {"identify_mode": "none", "safety_weight": "auto", "safety_term": "aligned"}
#: `IRRConfig.recommended()`'s retain weight ρ, chosen with `RECOMMENDED_RETAIN_OBJECTIVE` on the suite's dev worlds
#: (docs/safety-weight.md, rounds 6 and 7: a check written down before a fourth build of the dev worlds existed)
RECOMMENDED_RETAIN_WEIGHT = 0.3
#: the safety stream's tokens and ridge of `IRRConfig.recommended()` when the retain term is on: the answer positions
#: and a small ridge raise the dev oracle, and the retain term (with the auto rule's downward fallback) keeps the old
#: tasks the small ridge alone lets the safety term reach
RECOMMENDED_RETAIN_OBJECTIVE: dict[str, Any] = {"safety_tokens": "answer", "safety_ridge": 0.01}
#: ... and without it (`recommended(retain_weight=0)`, or no retain data given to `realign`): the fields' defaults,
#: the preset of issue 19's rounds 5 and 6 (the small ridge without the retain term lost old tasks on dev worlds)
NO_RETAIN_OBJECTIVE: dict[str, Any] = {"safety_tokens": "all", "safety_ridge": 0.1}
#: `IRRConfig.recommended()`'s calibration filter, chosen on the suite's dev worlds (docs/safety-weight.md); 'none'
#: when the preset is asked for safety_weight=0 (no safety stream to read refusals from)
RECOMMENDED_CALIBRATION_FILTER = "refused"


def _safety_weight(value: Any) -> Any:
    """A finite number >= 0 or 'auto' (strings from the command line are parsed)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise IRRConfigError(f"IRRConfig.safety_weight must be a number >= 0 or 'auto', got {value!r}") from None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    _check(ok, "safety_weight", value, "a number >= 0 or 'auto'")
    return float(value)


def _positive(value: Any) -> bool:
    """Whether an override of a number field is a number > 0 (a bad value is left for the field's own check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise IRRConfigError(f"IRRConfig.{name} must be {expected}, got {value!r}")
