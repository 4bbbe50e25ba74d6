"""Post-hoc IRR on saved checkpoints.

  irr apply --base ALIGNED --finetuned FT_DIR --unaligned UNALIGNED_DIR \\
            --calibration-data train.jsonl --output FT_DIR-irr                 # the paper's IRR

  irr apply --base ALIGNED --finetuned FT_DIR --safety-data refusals.jsonl \\
            --calibration-data train.jsonl --output FT_DIR-irr                 # the recommended preset

  irr apply --base ALIGNED --finetuned FT_DIR \\
            --calibration-data train.jsonl --output FT_DIR-irr                 # the same, default prompts

`--finetuned` may be a full model directory or a LoRA adapter directory (its base must be
`--base`). The safety vector comes from `--unaligned` (streamed from its safetensors) or from a
file written by `irr safety-vector`; Fisher importance (only for --remove_ratio < 1) from
`--fisher` or `--safety-data`.

With only `--safety-data` (harmful prompts with safe responses; no --unaligned, no --safety-vector)
the preset is the recommended one, `IRRConfig.recommended()`: nothing removed by sign, the deltas
recalibrated with a safety stream and `--safety_weight auto` (λ chosen from held-out calibration and
safety data); no unaligned model is needed. `--preset paper|recommended` chooses explicitly; any
IRRConfig flag given overrides the preset. Without a response column the base model's own answers are
generated. With no safety input at all (no --safety-data, --unaligned or --safety-vector) the preset is
the recommended one and the safety data the default harmful prompts (`safety_prompts.load_default_prompts`:
AdvBench online, the shipped set offline) answered by `--base` (`refusals.safety_dataset_for_run`, the
callback's defaults; the answers cached under the base fingerprint), recorded in the report's
`extra.safety_inputs.safety_data`. `--low-memory` searches `--safety_weight auto` as the in-memory run does, one layer
at a time (embeddings and LM head held during the search). The output directory is
written atomically; its irr_report.json and README.md name the setting and the λ used.
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging

from ..config import IRRConfig
from ..inputs.irr_files import load_irr_file
from ..outputs.realigned_model import save_realigned
from ..saving import atomic_directory, write_output
from ..tensors import SafetensorsMapping, as_tensor_mapping
from ._common import (
    PRESETS,
    CLIError,
    adapter_base_name,
    add_config_arguments,
    check_exists,
    check_output,
    check_same_architecture,
    config_from_args,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    local_or_download,
    target_parameter_names,
)


logger = logging.get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--output", required=True, help="Where the realigned model is written (atomically).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="Checkpoints larger than RAM: load one decoder layer at a time from the safetensors shards "
        "(full fine-tunes in local directories; Fisher only from --fisher).",
    )
    add_config_arguments(p)


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Models, safety inputs and calibration data (shared with `irr sweep`)."""
    p.add_argument("--base", required=True, help="The aligned model the fine-tune started from (directory or hub id).")
    p.add_argument("--finetuned", required=True, help="The fine-tuned model directory, or a LoRA adapter directory.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--unaligned", help="Unaligned model (directory or hub id); v = base - unaligned, streamed.")
    src.add_argument("--safety-vector", help="A safety-vector .safetensors file from `irr safety-vector`.")
    p.add_argument("--fisher", help="A Fisher .safetensors file from `irr fisher` (needed for --remove_ratio < 1).")
    p.add_argument(
        "--safety-data",
        help="Harmful prompts with safe responses (json/jsonl/hub id): the safety stream of --safety_weight "
        "(the recommended preset) and the Fisher when --fisher is not given. Given alone (no --unaligned, "
        "no --safety-vector), it selects the recommended preset: no unaligned model needed. With no safety "
        "input at all (none of --safety-data, --unaligned, --safety-vector): the recommended preset on the "
        "default harmful prompts (AdvBench online, the shipped set offline) answered by --base, cached under "
        "the base fingerprint and named in the report (extra.safety_inputs.safety_data).",
    )
    p.add_argument(
        "--safety-prompt-column", default="prompt", help="Prompt column of --safety-data (default: prompt)."
    )
    p.add_argument(
        "--safety-response-column",
        default="response",
        help="Response column of --safety-data (default: response); if absent, the base model's own answers are "
        "generated (not with --low-memory).",
    )
    p.add_argument(
        "--retain-data",
        help="General prompts with answers (json/jsonl/hub id; columns --retain_prompt_column / "
        "--retain_response_column) for the retain stream of --retain_weight > 0, which keeps what the model could "
        "already do. Without it (and --retain_weight > 0): the shipped general prompts answered by --base, cached "
        "under the base fingerprint. Without a response column the base answers them (not with --low-memory).",
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="'paper': IRRConfig(), the paper's IRR (needs --unaligned or --safety-vector). 'recommended': "
        "IRRConfig.recommended() (identify_mode none, safety_weight auto, safety_term aligned; needs only "
        "--safety-data, or nothing: the default prompts). Default: paper when --unaligned or --safety-vector "
        "is given, else recommended. IRRConfig flags given override the preset.",
    )
    p.add_argument(
        "--calibration-data",
        required=True,
        help="Downstream training data (json/jsonl/hub id): input_ids, a text column, or prompt/response.",
    )
    p.add_argument("--calibration-text-column", default=None, help="Text column of --calibration-data.")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Dtype to load the models in.",
    )
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="Accept a LoRA adapter whose recorded base differs from --base (shapes are still checked).",
    )


@dataclass
class Inputs:
    """Everything `irr apply` / `irr sweep` load once: models, safety inputs, calibration."""

    model: Any  # the fine-tuned model (a PeftModel for an adapter directory)
    base_map: Mapping[str, Any] | None  # the aligned weights (None for LoRA: the frozen weight is the base)
    tokenizer: Any
    lora: bool
    safety_vector: Mapping[str, Any] | None  # None when no config reads it (identify_mode="none")
    importance: Mapping[str, Any] | None
    calibration: list[dict]
    safety_calibration: list[dict] | None = None  # the safety stream's rows, when a safety weight is used
    safety_generated: bool = False  # its responses were generated by the base model
    safety_data: dict | None = None  # the default prompt set used and its answers, when no --safety-data
    retain_calibration: list[dict] | None = None  # the retain stream's rows, when a retain weight is used
    retain_data: dict | None = None  # where they came from (the report's extra.retain_data)


def default_safety_data(args: argparse.Namespace) -> bool:
    """No safety input at all: the default harmful prompts, answered by --base, are the safety data."""
    return not (args.safety_data or args.unaligned or args.safety_vector)


def chosen_preset(args: argparse.Namespace) -> str:
    """--preset, else 'recommended' when only --safety-data names a safety input (or none does: the default
    prompts), else 'paper'."""
    if args.preset:
        return args.preset
    return "paper" if args.unaligned or args.safety_vector else "recommended"


def make_config(args: argparse.Namespace, **overrides: Any) -> IRRConfig:
    """The run's IRRConfig: the flags given on top of the chosen preset."""
    return config_from_args(args, preset=chosen_preset(args), **overrides)


def _any(configs: Sequence[IRRConfig], what: str) -> bool:
    return any(getattr(c, what) for c in configs)


def check_args(args: argparse.Namespace, config: IRRConfig, *, variants: Sequence[IRRConfig] = ()) -> Any:
    """Every check that needs no model, before any heavy work; returns the calibration dataset.

    `variants`: the other configs of the run (a sweep's grid); an input any of them needs is checked."""
    from ..inputs.data import check_calibration_columns, load_examples, require_columns

    check_exists(args.base, "--base", allow_hub_id=True)
    check_exists(args.finetuned, "--finetuned")
    check_exists(args.unaligned, "--unaligned", allow_hub_id=True)
    check_exists(args.safety_vector, "--safety-vector")
    check_exists(args.fisher, "--fisher")
    check_exists(args.safety_data, "--safety-data", allow_hub_id=True)
    check_exists(getattr(args, "retain_data", None), "--retain-data", allow_hub_id=True)
    check_exists(args.calibration_data, "--calibration-data", allow_hub_id=True)
    configs = [config, *variants]
    needs = _any(configs, "needs_importance")
    if _any(configs, "needs_safety_vector") and not (args.unaligned or args.safety_vector):
        raise CLIError(
            f"no safety vector: identify_mode={config.identify_mode!r} (preset {chosen_preset(args)}) needs "
            "--unaligned or --safety-vector; or give only --safety-data for the recommended preset "
            "(--preset recommended), which needs no unaligned model"
        )
    if needs and not (args.fisher or args.safety_data):
        raise CLIError(
            f"--remove_ratio {config.remove_ratio} < 1 ranks by Fisher importance: pass --fisher or --safety-data"
        )
    calibration_data = load_examples(args.calibration_data, what="--calibration-data")
    check_calibration_columns(calibration_data, args.calibration_text_column)
    if _any(configs, "uses_safety_stream"):
        _check_safety_stream(args, configs, len(calibration_data))
    if needs and args.safety_data and not args.fisher:
        require_columns(
            load_examples(args.safety_data, what="--safety-data"),
            [args.safety_prompt_column, args.safety_response_column],
            what="--safety-data",
            fields=["--safety-prompt-column", "--safety-response-column"],
        )
    lora = is_adapter_dir(args.finetuned)
    if lora and not args.allow_base_mismatch:
        recorded = adapter_base_name(args.finetuned)
        if recorded and not _same_model(recorded, args.base):
            raise CLIError(
                f"--finetuned: the LoRA adapter was trained on '{recorded}', not on --base "
                f"'{args.base}' (pass --allow-base-mismatch if it is the same model moved)"
            )
    check_same_architecture(
        ("--base", args.base), ("--finetuned", None if lora else args.finetuned), ("--unaligned", args.unaligned)
    )
    return calibration_data


def _check_safety_stream(args: argparse.Namespace, configs: Sequence[IRRConfig], calibration_rows: int) -> None:
    """A safety weight needs --safety-data with usable rows (and, for 'auto', enough of both data sets
    to hold some out); --low-memory needs a response column. With no safety input at all the
    default prompts stand in (not with --low-memory: nothing to generate their answers with)."""
    from ..inputs.data import load_examples, require_columns

    weights = sorted({str(c.safety_weight) for c in configs if c.uses_safety_stream})
    defaults = default_safety_data(args)
    if not (args.safety_data or defaults):
        raise CLIError(
            f"--safety_weight {', '.join(weights)} needs --safety-data: harmful prompts with safe responses "
            "(json/jsonl/hub id)"
        )
    auto = any(c.safety_weight == "auto" for c in configs)
    low_memory = getattr(args, "low_memory", False)
    if defaults:
        if low_memory:
            raise CLIError(
                "--low-memory cannot generate the base model's answers to the default safety prompts: pass "
                "--safety-data with a response column (harmful prompts with safe responses)"
            )
        n_safety = configs[0].num_safety_samples  # the default prompts: at most that many (140 shipped)
    else:
        rows = load_examples(args.safety_data, what="--safety-data")
        if low_memory and len(rows):
            require_columns(
                rows,
                [args.safety_response_column],
                what="--safety-data (--low-memory cannot generate the base model's answers)",
                fields=["--safety-response-column"],
            )
        n_safety = len(_read_safety_data(args, rows, check_only=True)[0])
    config = configs[0]
    if auto:
        for flag, n, limit in (
            ("--calibration-data", calibration_rows, config.num_calibration_samples),
            (
                "--safety-data" if args.safety_data else "the default safety prompts",
                n_safety,
                config.num_safety_samples,
            ),
        ):
            if min(n, limit) <= config.calibration_batch_size:
                raise CLIError(
                    f"--safety_weight auto holds out part of {flag} to choose λ, but its {min(n, limit)} rows make "
                    f"one batch of --calibration_batch_size {config.calibration_batch_size}: give more rows or "
                    "lower --calibration_batch_size"
                )


def load_inputs(
    args: argparse.Namespace, config: IRRConfig, calibration_data: Any, *, variants: Sequence[IRRConfig] = ()
) -> Inputs:
    """Load the models and resolve the safety vector, the Fisher importance, the calibration and (with a
    safety weight) the safety stream's rows; `variants` as for `check_args`."""
    from ..inputs.data import calibration_examples
    from ..inputs.safety import safety_vector
    from ..targets import find_targets

    lora = is_adapter_dir(args.finetuned)
    tokenizer = load_tokenizer(args.finetuned, args.base)
    base_model = load_causal_lm(args.base, args.dtype, config.device, flag="--base")
    if lora:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base_model, args.finetuned)
        except RuntimeError as exc:  # size mismatch: the adapter does not fit this base
            raise CLIError(f"--finetuned: the LoRA adapter does not fit --base ({exc})") from exc
        except pickle.UnpicklingError as exc:  # adapter_model.bin is read with weights_only=True
            raise CLIError(
                f"--finetuned: the pickled adapter in '{args.finetuned}' holds more than plain tensors "
                "and was refused (nothing executed); convert it to safetensors if you trust it"
            ) from exc
        base_map = None
    else:
        model = load_causal_lm(args.finetuned, args.dtype, config.device, flag="--finetuned")
        base_map = as_tensor_mapping(base_model, what="base")
    _, _, targets = find_targets(model, config.target_modules)
    names = [t.name for t in targets]
    reference = base_map if base_map is not None else as_tensor_mapping(model, what="base")
    configs = [config, *variants]
    v = None
    if args.safety_vector:
        v = load_irr_file(args.safety_vector, kind="safety_vector", base=reference)
    elif _any(configs, "needs_safety_vector"):
        v = safety_vector(reference, local_or_download(args.unaligned, "--unaligned"), names=names, sign_only=True)
    safety_rows, generated, safety_data = None, False, None
    if _any(configs, "uses_safety_stream"):
        safety_rows, generated, safety_data = _safety_rows(
            args, config, base_model if not lora else model, tokenizer, lora
        )
    retain_rows, retain_data = None, None
    if _any(configs, "uses_retain_stream"):
        retain_rows, retain_data = _retain_rows(args, config, base_model if not lora else model, tokenizer)
    importance = None
    if _any(configs, "needs_importance"):
        importance = (
            load_irr_file(args.fisher, kind="fisher", base=reference)
            if args.fisher
            else _fisher_from_data(base_model if not lora else model, tokenizer, args, names, config)
        )
    calib = calibration_examples(
        calibration_data,
        tokenizer,
        num_samples=config.num_calibration_samples,
        max_length=config.calibration_max_length,
        text_column=args.calibration_text_column,
    )
    return Inputs(
        model=model,
        base_map=base_map,
        tokenizer=tokenizer,
        lora=lora,
        safety_vector=v,
        importance=importance,
        calibration=calib,
        safety_calibration=safety_rows,
        safety_generated=generated,
        safety_data=safety_data,
        retain_calibration=retain_rows,
        retain_data=retain_data,
    )


def _retain_rows(args, config: IRRConfig, base_model, tokenizer) -> tuple[list[dict], dict]:
    """--retain-data (or, without it, the shipped general prompts) as the retain stream's rows, tokenized like
    the calibration data; missing answers are written by `base_model` (None with --low-memory: refused)."""
    from ..inputs.data import load_examples
    from ..inputs.refusals import retain_dataset_for_run
    from ..inputs.sources import retain_calibration_examples

    data = load_examples(args.retain_data, what="--retain-data") if args.retain_data else None
    if base_model is None and (data is None or config.retain_response_column not in data.column_names):
        raise CLIError(
            f"--low-memory cannot generate the base model's answers: --retain_weight {config.retain_weight:g} needs "
            f"--retain-data with a '{config.retain_response_column}' column"
        )
    if data is not None and config.retain_response_column in data.column_names:
        info = {
            "source": "retain_dataset",
            "set": args.retain_data,
            "prompts": len(data),
            "generated_responses": False,
        }
    else:
        data, info = retain_dataset_for_run(base_model, tokenizer, config, retain_dataset=data, progress=True)
        if args.retain_data:
            info["set"] = args.retain_data
    rows = retain_calibration_examples(config, data, tokenizer)
    return rows, {**info, "examples": len(rows)}


def _safety_rows(args, config: IRRConfig, base_model, tokenizer, lora: bool) -> tuple[list[dict], bool, dict | None]:
    """--safety-data tokenized like the calibration data (`data.tokenize_pairs`: the chat template when the
    tokenizer has one, labels -100 on the prompt); missing responses are the base model's own answers
    (a LoRA model generates with its adapter disabled). With no safety input at all, the default
    prompts answered by the base (`refusals.safety_dataset_for_run`, cached under the base fingerprint);
    returns (rows, generated, the default set's description or None)."""
    import contextlib

    from ..inputs.data import load_examples, tokenize_pairs

    info = None
    with base_model.disable_adapter() if lora else contextlib.nullcontext():
        if args.safety_data:
            prompts, responses, generated = _read_safety_data(
                args,
                load_examples(args.safety_data, what="--safety-data"),
                model=base_model,
                tokenizer=tokenizer,
                max_new_tokens=config.safety_max_new_tokens,
                max_samples=config.num_safety_samples,
            )
        else:
            from ..inputs.refusals import safety_dataset_for_run

            data, info = safety_dataset_for_run(base_model, tokenizer, config, progress=True)
            prompts, responses = data[config.safety_prompt_column], data[config.safety_response_column]
            generated = True
    rows = tokenize_pairs(tokenizer, prompts, responses, max_length=config.calibration_max_length)
    return rows, generated, info


def _read_safety_data(args, rows, **kwargs):
    """`data.safety_pairs` on --safety-data, its errors naming the flags."""
    from ..inputs.data import safety_pairs

    return safety_pairs(
        rows,
        prompt_column=args.safety_prompt_column,
        response_column=args.safety_response_column,
        what="--safety-data",
        fields=("--safety-prompt-column", "--safety-response-column"),
        **kwargs,
    )


def realign_inputs(inputs: Inputs, config: IRRConfig, *, copy_model: bool = False, progress: bool = True):
    """IRR on `inputs.model` (or a copy of it); returns (plain realigned model, report). LoRA is merged."""
    from .. import realign

    model = copy.deepcopy(inputs.model) if copy_model else inputs.model
    report = realign(
        model,
        base=inputs.base_map,
        safety_vector=inputs.safety_vector,
        calibration=inputs.calibration,
        safety_calibration=inputs.safety_calibration,
        retain_calibration=inputs.retain_calibration,
        importance=inputs.importance,
        config=config,
        progress=progress,
    )
    if inputs.lora:
        model = model.merge_and_unload()
    return model, report


def run(args: argparse.Namespace) -> int:
    config = make_config(args)
    check_output(args.output, "--output", args.overwrite)
    calibration_data = check_args(args, config)
    if args.low_memory:
        return _run_low_memory(args, config, calibration_data)
    inputs = load_inputs(args, config, calibration_data)
    model, report = realign_inputs(inputs, config)
    _record(args, report, lora=inputs.lora, generated=inputs.safety_generated, safety_data=inputs.safety_data)
    if inputs.retain_data is not None:
        report.extra["retain_data"] = inputs.retain_data
    card = _card(args, report, generated=inputs.safety_generated, safety_data=inputs.safety_data)
    save_realigned(model, args.output, processing_class=inputs.tokenizer, report=report, card=card)
    print(report.summary())
    print(f"wrote {args.output}")
    return 0


def _record(args, report, *, lora: bool, generated: bool = False, safety_data: dict | None = None) -> None:
    """What `irr apply` adds to the report's `extra`: its inputs, the preset and the safety-input sources."""
    report.extra.update(
        {
            "base_model": args.base,
            "finetuned": args.finetuned,
            "lora": lora,
            "preset": chosen_preset(args),
            "safety_inputs": _sources(args, report, generated=generated, safety_data=safety_data),
        }
    )


def _run_low_memory(args: argparse.Namespace, config: IRRConfig, calibration_data: Any) -> int:
    """`irr apply --low-memory`: sequential onloading through `irr_callback.realign_checkpoint`."""
    from ..inputs.data import calibration_examples
    from ..pipeline import realign_checkpoint

    if is_adapter_dir(args.finetuned):
        raise CLIError("--low-memory: --finetuned is a LoRA adapter; adapters are small, run without --low-memory")
    if config.needs_importance and not args.fisher:
        raise CLIError(
            "--low-memory: Fisher from --safety-data needs the whole model; compute it once with "
            "`irr fisher` and pass --fisher"
        )
    for flag, path in (("--base", args.base), ("--finetuned", args.finetuned)):
        if not os.path.isdir(path):
            raise CLIError(f"--low-memory: {flag} must be a local directory with safetensors shards, got '{path}'")
    base = SafetensorsMapping(args.base)
    v = None
    if args.safety_vector:
        v = load_irr_file(args.safety_vector, kind="safety_vector", base=base)
    elif config.needs_safety_vector:
        from ..inputs.safety import safety_vector as make_vector

        unaligned = local_or_download(args.unaligned, "--unaligned")
        v = make_vector(
            base, unaligned, names=target_parameter_names(args.finetuned, config.target_modules), sign_only=True
        )
    importance = load_irr_file(args.fisher, kind="fisher", base=base) if config.needs_importance else None
    tokenizer = load_tokenizer(args.finetuned, args.base)
    calibration = calibration_examples(
        calibration_data,
        tokenizer,
        num_samples=config.num_calibration_samples,
        max_length=config.calibration_max_length,
        text_column=args.calibration_text_column,
    )
    safety_rows = None
    if config.uses_safety_stream:  # responses from the file only (checked): nothing to generate with
        safety_rows, _, _ = _safety_rows(args, config, None, tokenizer, False)
    retain_rows, retain_data = None, None
    if config.uses_retain_stream and args.retain_data:  # answers from the file only: nothing to generate with
        retain_rows, retain_data = _retain_rows(args, config, None, tokenizer)  # (without it: the term is off)
    with atomic_directory(args.output) as tmp:
        os.rmdir(tmp)  # realign_checkpoint writes (atomically) into a fresh directory of its own
        report = realign_checkpoint(
            args.finetuned,
            base=base,
            safety_vector=v,
            calibration=calibration,
            output_dir=tmp,
            safety_calibration=safety_rows,
            retain_calibration=retain_rows,
            importance=importance,
            config=config,
        )
        _record(args, report, lora=False)
        if retain_data is not None:
            report.extra["retain_data"] = retain_data
        write_output(tmp, processing_class=tokenizer, report=report, card=_card(args, report))
    print(report.summary())
    print(f"wrote {args.output} (one layer at a time)")
    return 0


def _same_model(recorded: str, given: str) -> bool:
    norm = lambda s: os.path.normpath(os.path.abspath(s)) if os.path.exists(s) else s.rstrip("/")  # noqa: E731
    return norm(recorded) == norm(given) or os.path.basename(recorded.rstrip("/")) == os.path.basename(
        given.rstrip("/")
    )


def _fisher_from_data(model, tokenizer, args, names, config):
    from ..inputs.data import load_examples, require_columns
    from ..inputs.safety import fisher_from_pairs

    rows = load_examples(args.safety_data, what="--safety-data")
    require_columns(
        rows,
        [args.safety_prompt_column, args.safety_response_column],
        what="--safety-data",
        fields=["--safety-prompt-column", "--safety-response-column"],
    )
    scores, _ = fisher_from_pairs(
        model,
        tokenizer,
        rows[args.safety_prompt_column],
        rows[args.safety_response_column],
        max_length=config.calibration_max_length,
        batch_size=config.fisher_batch_size,
        names=names,
    )
    return scores


def _sources(
    args, report, *, generated: bool = False, safety_data: dict | None = None, name=str
) -> dict[str, dict[str, Any]]:
    """Where each safety input came from, for the report (paths as given) and the model card (`name`:
    `model_card.display_name`, a hub id or a path's last component)."""
    config = report.config
    sources: dict[str, dict[str, Any]] = {}
    if config.get("identify_mode") == "none":
        sources["safety_vector"] = {"source": "none (identify_mode='none': nothing removed by sign)"}
    else:
        given = name(args.safety_vector) if args.safety_vector else f"unaligned model {name(args.unaligned)}"
        sources["safety_vector"] = {"source": given}
    if config.get("remove_ratio", 1.0) < 1 and config.get("identify_mode") not in ("none", "random"):
        sources["fisher"] = {"source": name(args.fisher) if args.fisher else f"--safety-data {name(args.safety_data)}"}
    if report.safety_sequences:
        answers = ", responses generated by the base model" if generated else ""
        data = f"--safety-data {name(args.safety_data)}" if args.safety_data else "the default safety prompts"
        sources["safety_calibration"] = {"source": f"{data} ({report.safety_sequences} sequences{answers})"}
    if safety_data is not None:
        sources["safety_data"] = safety_data  # as the callback records it: the set, its answers, the cache
    return sources


def _card(args, report, *, generated: bool = False, safety_data: dict | None = None):
    """The model card of `irr apply`'s output: the callback's card, saying how this one was made."""
    from ..outputs.model_card import build_model_card, display_name

    return build_model_card(
        report,
        base_model=args.base,
        sources=_sources(args, report, generated=generated, safety_data=safety_data, name=display_name),
        applied_by=f"`irr apply` to the fine-tuned model `{display_name(args.finetuned)}`",
        calibration="the calibration data",
    )
