"""Post-hoc IRR on saved checkpoints.

  irr apply --base ALIGNED --finetuned FT_DIR --unaligned UNALIGNED_DIR \\
            --calibration-data train.jsonl --output FT_DIR-irr

`--finetuned` may be a full model directory or a LoRA adapter directory (its base must be
`--base`). The safety vector comes from `--unaligned` (streamed from its safetensors) or from a
file written by `irr safety-vector`; Fisher importance (only for --remove_ratio < 1) from
`--fisher` or `--safety-data`. The output directory is written atomically.
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from transformers.utils import logging

from ..config import IRRConfig
from ..io import load_irr_file
from ..saving import atomic_directory
from ..tensors import SafetensorsMapping, as_tensor_mapping
from ._common import (
    CLIError,
    add_config_arguments,
    adapter_base_name,
    check_exists,
    check_output,
    check_same_architecture,
    config_from_args,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
)

logger = logging.get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--output", required=True, help="Where the realigned model is written (atomically).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    p.add_argument("--low-memory", action="store_true",
                   help="Checkpoints larger than RAM: load one decoder layer at a time from the safetensors shards "
                        "(full fine-tunes in local directories; Fisher only from --fisher).")
    add_config_arguments(p)


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Models, safety inputs and calibration data (shared with `irr sweep`)."""
    p.add_argument("--base", required=True, help="The aligned model the fine-tune started from (directory or hub id).")
    p.add_argument("--finetuned", required=True, help="The fine-tuned model directory, or a LoRA adapter directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--unaligned", help="Unaligned model (directory or hub id); v = base - unaligned, streamed.")
    src.add_argument("--safety-vector", help="A safety-vector .safetensors file from `irr safety-vector`.")
    imp = p.add_mutually_exclusive_group()
    imp.add_argument("--fisher", help="A Fisher .safetensors file from `irr fisher` (needed for --remove_ratio < 1).")
    imp.add_argument("--safety-data", help="Harmful prompts with safe responses (json/jsonl/hub id) to compute Fisher.")
    p.add_argument("--safety-prompt-column", default="prompt", help="Prompt column of --safety-data.")
    p.add_argument("--safety-response-column", default="response", help="Response column of --safety-data.")
    p.add_argument("--calibration-data", required=True,
                   help="Downstream training data (json/jsonl/hub id): input_ids, a text column, or prompt/response.")
    p.add_argument("--calibration-text-column", default=None, help="Text column of --calibration-data.")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Dtype to load the models in.")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="Accept a LoRA adapter whose recorded base differs from --base (shapes are still checked).")


@dataclass
class Inputs:
    """Everything `irr apply` / `irr sweep` load once: models, safety inputs, calibration."""

    model: Any  # the fine-tuned model (a PeftModel for an adapter directory)
    base_map: Optional[Mapping[str, Any]]  # the aligned weights (None for LoRA: the frozen weight is the base)
    tokenizer: Any
    lora: bool
    safety_vector: Mapping[str, Any]
    importance: Optional[Mapping[str, Any]]
    calibration: list[dict]


def check_args(args: argparse.Namespace, config: IRRConfig, *, needs_importance: Optional[bool] = None) -> Any:
    """Every check that needs no model, before any heavy work; returns the calibration dataset.

    `needs_importance` overrides `config.needs_importance` (a sweep needs Fisher if any ratio < 1)."""
    from ..data import check_calibration_columns, load_examples, require_columns

    check_exists(args.base, "--base", allow_hub_id=True)
    check_exists(args.finetuned, "--finetuned")
    check_exists(args.unaligned, "--unaligned", allow_hub_id=True)
    check_exists(args.safety_vector, "--safety-vector")
    check_exists(args.fisher, "--fisher")
    check_exists(args.safety_data, "--safety-data", allow_hub_id=True)
    check_exists(args.calibration_data, "--calibration-data", allow_hub_id=True)
    needs = config.needs_importance if needs_importance is None else needs_importance
    if needs and not (args.fisher or args.safety_data):
        raise CLIError(f"--remove_ratio {config.remove_ratio} < 1 ranks by Fisher importance: pass --fisher or "
                       "--safety-data")
    calibration_data = load_examples(args.calibration_data, what="--calibration-data")
    check_calibration_columns(calibration_data, args.calibration_text_column)
    if needs and args.safety_data:
        require_columns(load_examples(args.safety_data, what="--safety-data"),
                        [args.safety_prompt_column, args.safety_response_column], what="--safety-data",
                        fields=["--safety-prompt-column", "--safety-response-column"])
    lora = is_adapter_dir(args.finetuned)
    if lora and not args.allow_base_mismatch:
        recorded = adapter_base_name(args.finetuned)
        if recorded and not _same_model(recorded, args.base):
            raise CLIError(f"--finetuned: the LoRA adapter was trained on '{recorded}', not on --base "
                           f"'{args.base}' (pass --allow-base-mismatch if it is the same model moved)")
    check_same_architecture(("--base", args.base), ("--finetuned", None if lora else args.finetuned),
                            ("--unaligned", args.unaligned))
    return calibration_data


def load_inputs(args: argparse.Namespace, config: IRRConfig, calibration_data: Any, *,
                needs_importance: Optional[bool] = None) -> Inputs:
    """Load the models and resolve the safety vector, the Fisher importance and the calibration."""
    from ..data import calibration_examples
    from ..safety import safety_vector
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
            raise CLIError(f"--finetuned: the pickled adapter in '{args.finetuned}' holds more than plain tensors "
                           "and was refused (nothing executed); convert it to safetensors if you trust it") from exc
        base_map = None
    else:
        model = load_causal_lm(args.finetuned, args.dtype, config.device, flag="--finetuned")
        base_map = as_tensor_mapping(base_model, what="base")
    _, _, targets = find_targets(model, config.target_modules)
    names = [t.name for t in targets]
    reference = base_map if base_map is not None else as_tensor_mapping(model, what="base")
    if args.safety_vector:
        v = load_irr_file(args.safety_vector, kind="safety_vector", base=reference)
    else:
        v = safety_vector(reference, local_or_download(args.unaligned), names=names, sign_only=True)
    importance = None
    if config.needs_importance if needs_importance is None else needs_importance:
        importance = (load_irr_file(args.fisher, kind="fisher", base=reference) if args.fisher
                      else _fisher_from_data(base_model if not lora else model, tokenizer, args, names, config))
    calib = calibration_examples(calibration_data, tokenizer,
                                 num_samples=config.num_calibration_samples,
                                 max_length=config.calibration_max_length, text_column=args.calibration_text_column)
    return Inputs(model=model, base_map=base_map, tokenizer=tokenizer, lora=lora, safety_vector=v,
                  importance=importance, calibration=calib)


def realign_inputs(inputs: Inputs, config: IRRConfig, *, copy_model: bool = False, progress: bool = True):
    """IRR on `inputs.model` (or a copy of it); returns (plain realigned model, report). LoRA is merged."""
    from .. import realign

    model = copy.deepcopy(inputs.model) if copy_model else inputs.model
    report = realign(model, base=inputs.base_map, safety_vector=inputs.safety_vector, calibration=inputs.calibration,
                     importance=inputs.importance, config=config, progress=progress)
    if inputs.lora:
        model = model.merge_and_unload()
    return model, report


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_output(args.output, "--output", args.overwrite)
    calibration_data = check_args(args, config)
    if args.low_memory:
        return _run_low_memory(args, config, calibration_data)
    inputs = load_inputs(args, config, calibration_data)
    model, report = realign_inputs(inputs, config)
    with atomic_directory(args.output) as tmp:
        model.save_pretrained(tmp)
        inputs.tokenizer.save_pretrained(tmp)
        report.extra.update({"base_model": args.base, "finetuned": args.finetuned, "lora": inputs.lora})
        report.save(os.path.join(tmp, "irr_report.json"))
        _write_card(tmp, args, report)
    print(report.summary())
    print(f"wrote {args.output}")
    return 0


def _run_low_memory(args: argparse.Namespace, config: IRRConfig, calibration_data: Any) -> int:
    """`irr apply --low-memory`: sequential onloading through `irr_callback.offline.realign_checkpoint`."""
    from ..data import calibration_examples
    from ..offline import realign_checkpoint

    if is_adapter_dir(args.finetuned):
        raise CLIError("--low-memory: --finetuned is a LoRA adapter; adapters are small, run without --low-memory")
    if args.safety_data:
        raise CLIError("--low-memory: Fisher from --safety-data needs the whole model; compute it once with "
                       "`irr fisher` and pass --fisher")
    for flag, path in (("--base", args.base), ("--finetuned", args.finetuned)):
        if not os.path.isdir(path):
            raise CLIError(f"--low-memory: {flag} must be a local directory with safetensors shards, got '{path}'")
    base = SafetensorsMapping(args.base)
    v = (load_irr_file(args.safety_vector, kind="safety_vector", base=base) if args.safety_vector
         else local_or_download(args.unaligned))
    if not args.safety_vector:
        from ..safety import safety_vector as make_vector
        from .safety_vector import target_parameter_names

        v = make_vector(base, v, names=target_parameter_names(args.finetuned, config.target_modules), sign_only=True)
    importance = load_irr_file(args.fisher, kind="fisher", base=base) if config.needs_importance else None
    tokenizer = load_tokenizer(args.finetuned, args.base)
    calibration = calibration_examples(calibration_data, tokenizer, num_samples=config.num_calibration_samples,
                                       max_length=config.calibration_max_length,
                                       text_column=args.calibration_text_column)
    with atomic_directory(args.output) as tmp:
        os.rmdir(tmp)  # realign_checkpoint writes (atomically) into a fresh directory of its own
        report = realign_checkpoint(args.finetuned, base=base, safety_vector=v, calibration=calibration,
                                    output_dir=tmp, importance=importance, config=config)
        tokenizer.save_pretrained(tmp)
        _write_card(tmp, args, report)
    print(report.summary())
    print(f"wrote {args.output} (one layer at a time)")
    return 0


def _same_model(recorded: str, given: str) -> bool:
    norm = lambda s: os.path.normpath(os.path.abspath(s)) if os.path.exists(s) else s.rstrip("/")  # noqa: E731
    return norm(recorded) == norm(given) or os.path.basename(recorded.rstrip("/")) == os.path.basename(given.rstrip("/"))


def local_or_download(path: str, flag: str = "model"):
    """Tensors of a local model directory or of a hub model's safetensors, streamed."""
    if os.path.isdir(path):
        return SafetensorsMapping(path)
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    except Exception as exc:  # not found, not reachable, offline: name the flag, not just the hub's words
        raise CLIError(f"{flag}: cannot load '{path}' ({type(exc).__name__}: {exc})") from exc
    return SafetensorsMapping(directory)


def _fisher_from_data(model, tokenizer, args, names, config):
    from ..data import batches, load_examples, require_columns, tokenize_pairs
    from ..safety import fisher

    rows = load_examples(args.safety_data, what="--safety-data")
    require_columns(rows, [args.safety_prompt_column, args.safety_response_column], what="--safety-data",
                    fields=["--safety-prompt-column", "--safety-response-column"])
    pairs = tokenize_pairs(tokenizer, rows[args.safety_prompt_column], rows[args.safety_response_column],
                           max_length=config.calibration_max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return fisher(model, batches(pairs, 8, pad), names=names)


def _write_card(directory: str, args, report) -> None:
    from huggingface_hub import ModelCard

    from ..model_card import count, display_name, hub_id, method_text

    t = report.totals
    base_id = hub_id(args.base)  # a local path is not a hub id: no base_model line then
    header = f"base_model: {base_id}\n" if base_id else ""
    text = (f"---\n{header}tags:\n- irr\n- safety-realignment\n---\n\n"
            f"# {os.path.basename(os.path.abspath(args.output))}\n\n"
            f"`{display_name(args.finetuned)}` realigned with IRR (identify, remove, recalibrate) against the aligned "
            f"base `{display_name(args.base)}` using irr-callback. {method_text(report.config)}\n\n"
            f"- removed {t['removed']:,} of {t['entries']:,} fine-tuning deltas ({100 * t['removed_fraction']:.2f}%) "
            f"in {count(t['modules'], 'module')}\n- settings: remove_ratio={report.config['remove_ratio']}, "
            f"recalibrate={report.config['recalibrate']}, blocksize={report.config['blocksize']}\n"
            f"- per-module statistics: `irr_report.json`\n")
    ModelCard(text).save(os.path.join(directory, "README.md"))
