"""Shared pieces of the subcommands: IRRConfig flags, path checks, model loading, atomic output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any

import torch

from ..config import RECOMMENDED, RECOMMENDED_RETAIN_OBJECTIVE, IRRConfig
from ..tensors import SafetensorsMapping


# IRRConfig fields that make sense on the command line of `irr apply` / `irr sweep`; the
# callback-only fields (snapshot, realign_checkpoints, ...) and the safety-input paths, which
# have their own --dashed flags, are left out. The safety_* fields drive the safety stream
# (safety-regularised recalibration, `IRRConfig.recommended()`), read from --safety-data.
CORE_FIELDS = (
    "remove_ratio",
    "remove_more",
    "identify_mode",
    "irr_seed",
    "recalibrate",
    "blocksize",
    "percdamp",
    "max_damping_retries",
    "fallback_to_removal",
    "target_modules",
    "num_calibration_samples",
    "calibration_max_length",
    "calibration_batch_size",
    "device",
    "safety_weight",
    "safety_term",
    "task_term",
    "true_sequential",
    "safety_ridge",
    "safety_tokens",
    "num_safety_samples",
    "calibration_filter",
    "safety_max_new_tokens",
    "retain_weight",
    "num_retain_samples",
    "retain_max_new_tokens",
    "retain_prompt_column",
    "retain_response_column",
)

#: --preset values: the paper's IRR (`IRRConfig()`) or the recommended setting (`IRRConfig.recommended()`)
PRESETS = ("paper", "recommended")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Usage examples in the description kept as written (line breaks, shell continuations); "(default: X)"
    only where it tells something: not for required flags, switches, None, or a help text that names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.required
            or action.default is None
            or action.default is argparse.SUPPRESS
            or "default" in text.lower()
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        ):
            return text
        return super()._get_help_string(action)


class CLIError(Exception):
    """Printed as `irr <command>: error: ...` with exit status 2."""


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y", "t"):
        return True
    if lowered in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One `--field` flag per core IRRConfig field, typed and documented from the dataclass.

    A flag left out stays out of the namespace (`argparse.SUPPRESS`), so `config_from_args` can tell
    what the user set: the preset (`--preset`) fills the rest."""
    group = parser.add_argument_group(
        "IRR settings (IRRConfig; the defaults shown are IRRConfig()'s, --preset recommended changes "
        f"{', '.join(sorted(RECOMMENDED))}, calibration_filter, retain_weight and with it "
        f"{', '.join(sorted(RECOMMENDED_RETAIN_OBJECTIVE))} unless given)"
    )
    hints = typing.get_type_hints(IRRConfig)
    for f in dataclasses.fields(IRRConfig):
        if f.name not in CORE_FIELDS or f.name in exclude:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        if default is not None and "default:" not in text.lower():  # not "(default: None)", not a second default
            text = f"{text} (default: {default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if hint is bool:
            kwargs.update(type=_to_bool, metavar="BOOL")
        elif hint in (int, float, str):
            kwargs["type"] = hint
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
            if typing.get_origin(inner) is list:
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = inner
        flags = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])  # one flag when the two are equal
        group.add_argument(*flags, dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace, *, preset: str = "paper", **overrides: Any) -> IRRConfig:
    """The IRRConfig of the flags given (and `overrides`) on top of the preset: `IRRConfig()` ('paper')
    or `IRRConfig.recommended()` ('recommended')."""
    values = {name: getattr(args, name) for name in CORE_FIELDS if hasattr(args, name)}
    values.update(overrides)
    return IRRConfig.recommended(**values) if preset == "recommended" else IRRConfig(**values)


def check_exists(path: str | None, flag: str, *, allow_hub_id: bool = False) -> None:
    """Refuse a missing local path early, naming the flag; a hub id (`org/name`) is passed through."""
    from ..paths import looks_like_local_path

    if path is None or os.path.exists(os.path.expanduser(path)):
        return
    if allow_hub_id and not looks_like_local_path(path):
        return
    raise CLIError(f"{flag}: '{path}' does not exist")


def check_output(path: str, flag: str, overwrite: bool) -> None:
    from ..saving import recover_interrupted

    recover_interrupted(path)  # a previous run killed mid-save: put its predecessor back, drop its temp dir
    if os.path.exists(path) and not overwrite:
        raise CLIError(f"{flag}: '{path}' already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise CLIError(f"{flag}: cannot write into '{parent}'")


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_base_name(path: str) -> str | None:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh).get("base_model_name_or_path")


def check_same_architecture(reference: tuple[str, str], *others: tuple[str, str | None]) -> None:
    """Compare the config.json of (flag, path) pairs with the reference's before any weight is loaded."""
    from ..inputs.architecture import check_same_architecture as check

    ref_flag, ref_path = reference
    ref = _config_dict(ref_path, ref_flag)
    for flag, path in others:
        if path is not None:
            check((f"{ref_flag} '{ref_path}'", ref), (f"{flag} '{path}'", _config_dict(path, flag)), CLIError)


def _config_dict(path: str, flag: str) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except Exception as exc:  # missing/invalid config.json, unknown model_type, hub unreachable
        raise CLIError(f"{flag}: cannot read the model config of '{path}' ({type(exc).__name__}: {exc})") from exc


def load_causal_lm(path: str, dtype: str = "auto", device: str | None = None, *, flag: str | None = None):
    """safetensors checkpoints, or .bin ones through torch.load(weights_only=True): a pickle that
    would run code is refused, never executed. A model that cannot be found is an error naming `flag`."""
    import pickle

    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], weights_only=True)
    except OSError as exc:  # not a local directory, and not found (or not reachable) on the Hub
        raise CLIError(f"{flag or 'model'}: cannot load '{path}' ({exc})") from exc
    except pickle.UnpicklingError as exc:
        raise CLIError(
            f"'{path}': its pickled checkpoint (.bin) holds more than plain tensors and was refused "
            "(loaded with weights_only=True, nothing executed). If you trust it, convert it to "
            "safetensors yourself; irr never unpickles arbitrary objects"
        ) from exc
    if device:
        model.to(device)
    return model.eval()


def load_tokenizer(*paths: str | None):
    from transformers import AutoTokenizer

    errors = []
    for path in paths:
        if not path:
            continue
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # a model dir without tokenizer files: try the next one
            errors.append(f"{path}: {exc}")
    raise CLIError("no tokenizer found in " + "; ".join(errors or ["(no path)"]))


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


def target_parameter_names(model_path: str, target_modules=None) -> list[str]:
    """Target parameter names from the model's config alone (an empty model on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..targets import find_targets

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return [t.name for t in find_targets(model, target_modules)[2]]
