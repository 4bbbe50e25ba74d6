"""`IRRConfig`: every knob of identify-remove-recalibrate, readable by `HfArgumentParser`.

Defaults follow what the IRR authors actually ran (remove every sign conflict, recalibrate,
128-column blocks, 1% relative damping), not the reference script's argparse defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

IDENTIFY_MODES = ("sign", "no_sign", "random")
LORA_OUTPUTS = ("merged", "adapter", "both")
ON_ERROR = ("raise", "warn")
SNAPSHOT_LOCATIONS = ("cpu", "disk")
BACKUP_LOCATIONS = ("disk", "cpu")


class IRRConfigError(ValueError):
    """A configuration field has an invalid value; the message names the field."""


@dataclass
class IRRConfig:
    """Settings for `irr_callback.realign`, `IRRCallback` and the `irr` CLI.

    Field names double as command-line flags (`--remove_ratio 0.5`) through `HfArgumentParser`.
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
            "importance) or 'random' (ablation: remove a random `remove_ratio` share of all entries)."
        },
    )
    irr_seed: int = field(
        default=0,
        metadata={"help": "Seed for identify_mode='random' (named irr_seed so it never clashes with TrainingArguments.seed)."},
    )
    recalibrate: bool = field(
        default=True,
        metadata={"help": "Compensate removals with the OBS update on the kept deltas (False: plain removal)."},
    )
    blocksize: int = field(
        default=128,
        metadata={"help": "Input columns per block for ranking, the adaptive mask and the lazy OBS update."},
    )
    percdamp: float = field(
        default=0.01, metadata={"help": "Hessian damping as a fraction of the mean of diag(H)."}
    )
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
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules to realign: names (e.g. q_proj v_proj, matched as a dotted suffix) or regular "
            "expressions matched against the full module name. Default: every Linear/Conv1D in the decoder layers."
        },
    )
    # ---- calibration ---------------------------------------------------------------------
    num_calibration_samples: int = field(
        default=128, metadata={"help": "Calibration sequences (the first ones of the downstream training set)."}
    )
    calibration_max_length: int = field(
        default=512, metadata={"help": "Calibration sequences are truncated to this many tokens."}
    )
    calibration_batch_size: int = field(
        default=4,
        metadata={"help": "Sequences per layer forward pass (Hessian and propagation passes). Peak memory grows "
                          "with it (one batch's activations through one layer); on CPU 2-8 ran equally fast, "
                          "so 4 (2048 tokens at the default length). Raise it on a GPU with room to spare."},
    )
    device: Optional[str] = field(
        default=None,
        metadata={"help": "Device for the IRR math (default: the device of each decoder layer)."},
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
    safety_vector: Optional[str] = field(
        default=None, metadata={"help": "A safety-vector safetensors file written by `irr safety-vector`."}
    )
    unaligned_model: Optional[str] = field(
        default=None, metadata={"help": "Local directory or hub id of the unaligned model (v = W_aligned - W_unaligned)."}
    )
    harmful_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Harmful prompt/answer pairs (hub id or json/jsonl) to build the unaligned model by a short fine-tune."},
    )
    harmful_prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of harmful_dataset."})
    harmful_response_column: str = field(default="response", metadata={"help": "Answer column of harmful_dataset."})
    unaligned_steps: int = field(default=100, metadata={"help": "Optimizer steps of the harmful fine-tune."})
    unaligned_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the harmful fine-tune."})
    unaligned_lora_rank: int = field(
        default=16, metadata={"help": "LoRA rank of the harmful fine-tune (0: full fine-tuning)."}
    )
    unaligned_batch_size: int = field(default=8, metadata={"help": "Sequences per step of the harmful fine-tune."})
    fisher: Optional[str] = field(
        default=None, metadata={"help": "A Fisher-importance safetensors file written by `irr fisher`."}
    )
    safety_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Harmful prompts with safe responses (hub id or json/jsonl) for the Fisher importance."},
    )
    safety_prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of safety_dataset."})
    safety_response_column: str = field(
        default="response",
        metadata={"help": "Response column of safety_dataset; if absent, the base model's own responses are generated."},
    )
    safety_max_new_tokens: int = field(
        default=128,
        metadata={"help": "Tokens generated per prompt when safety_dataset has no response column (the base model's "
                  "own answers are used, as in the paper)."},
    )
    fisher_batch_size: int = field(default=8, metadata={"help": "Mini-batch size of the Fisher estimate."})
    fisher_max_samples: Optional[int] = field(
        default=None, metadata={"help": "Use at most this many safety examples for the Fisher estimate."}
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where computed safety vectors and Fisher scores are cached (default: ~/.cache/irr_callback)."},
    )
    # ---- callback behaviour ----------------------------------------------------------------
    snapshot: str = field(
        default="cpu",
        metadata={"help": "Where the base weights are kept during training: 'cpu' (RAM) or 'disk' (safetensors under output_dir)."},
    )
    irr_output_dir: Optional[str] = field(
        default=None, metadata={"help": "Where the realigned model is saved (default: <output_dir>/irr)."}
    )
    save_realigned: bool = field(default=True, metadata={"help": "Save the realigned model at train end."})
    lora_output: str = field(
        default="both",
        metadata={"help": "LoRA runs: save a 'merged' model, a re-factored 'adapter' (truncated SVD), or 'both'."},
    )
    lora_refactor_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Rank of the re-factored adapter (default: 4x the training adapter's rank)."},
    )
    realign_checkpoints: bool = field(
        default=False, metadata={"help": "Also write a realigned copy into every checkpoint-N/irr as training goes."}
    )
    on_error: str = field(
        default="raise",
        metadata={"help": "If IRR fails at train end: 'raise' the error or only 'warn'. A failed realignment "
                          "leaves the fine-tuned model; if only saving fails afterwards, the live model is "
                          "realigned (report status 'save_failed')."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `IRRConfigError` naming the first invalid field."""
        _check(isinstance(self.remove_ratio, (int, float)) and math.isfinite(self.remove_ratio)
               and 0.0 <= self.remove_ratio <= 1.0,
               "remove_ratio", self.remove_ratio, "a number in [0, 1]")
        _check(self.identify_mode in IDENTIFY_MODES, "identify_mode", self.identify_mode, f"one of {IDENTIFY_MODES}")
        _check(isinstance(self.blocksize, int) and self.blocksize >= 1, "blocksize", self.blocksize, "an integer >= 1")
        _check(isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp >= 0,
               "percdamp", self.percdamp, "a finite number >= 0")
        _check(isinstance(self.max_damping_retries, int) and self.max_damping_retries >= 0,
               "max_damping_retries", self.max_damping_retries, "an integer >= 0")
        for name in ("num_calibration_samples", "calibration_max_length", "calibration_batch_size",
                     "fisher_batch_size", "unaligned_batch_size", "safety_max_new_tokens"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _check(self.fisher_max_samples is None or (isinstance(self.fisher_max_samples, int)
                                                   and self.fisher_max_samples >= 1),
               "fisher_max_samples", self.fisher_max_samples, "None or an integer >= 1")
        _check(isinstance(self.unaligned_steps, int) and self.unaligned_steps >= 1,
               "unaligned_steps", self.unaligned_steps, "an integer >= 1")
        _check(isinstance(self.unaligned_lora_rank, int) and self.unaligned_lora_rank >= 0,
               "unaligned_lora_rank", self.unaligned_lora_rank, "an integer >= 0")
        _check(self.unaligned_learning_rate > 0, "unaligned_learning_rate", self.unaligned_learning_rate, "> 0")
        _check(self.snapshot in SNAPSHOT_LOCATIONS, "snapshot", self.snapshot, f"one of {SNAPSHOT_LOCATIONS}")
        _check(self.backup in BACKUP_LOCATIONS, "backup", self.backup, f"one of {BACKUP_LOCATIONS}")
        _check(self.lora_output in LORA_OUTPUTS, "lora_output", self.lora_output, f"one of {LORA_OUTPUTS}")
        _check(self.lora_refactor_rank is None or (isinstance(self.lora_refactor_rank, int)
                                                   and self.lora_refactor_rank >= 1),
               "lora_refactor_rank", self.lora_refactor_rank, "None or an integer >= 1")
        _check(self.on_error in ON_ERROR, "on_error", self.on_error, f"one of {ON_ERROR}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            _check(len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
                   "target_modules", self.target_modules, "None or a non-empty list of non-empty strings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "IRRConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise IRRConfigError(f"Unknown IRRConfig field(s): {unknown}")
        return cls(**values)

    @property
    def needs_importance(self) -> bool:
        """Importance only matters when a ranking decides what is removed."""
        return self.identify_mode != "random" and self.remove_ratio < 1.0


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise IRRConfigError(f"IRRConfig.{name} must be {expected}, got {value!r}")

