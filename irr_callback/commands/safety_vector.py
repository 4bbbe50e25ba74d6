"""Write a safety vector v = W_aligned - W_unaligned as a safetensors file with metadata.

  irr safety-vector --base ALIGNED --unaligned UNALIGNED --output v.safetensors
  irr safety-vector --base ALIGNED --harmful-data harmful.jsonl --output v.safetensors

Without an unaligned model, --harmful-data builds one the way the IRR authors did: a short
fine-tune of the base on harmful prompt -> harmful answer pairs (LoRA by default: a temporary
adapter on the loaded model, no second copy of it; --steps, --learning-rate, --lora-rank), and
v = -(that fine-tune's delta) (signs only).

Tensors are streamed one at a time from the safetensors files. By default only the signs are
kept (int8, 1 byte per entry: all IRR uses); pass --values to keep values (RESTA, Safe LoRA).
The file records a fingerprint of the base, so it is refused later against another base.
"""

from __future__ import annotations

import argparse

from ..config import IRRConfig, IRRConfigError
from ..inputs.irr_files import fingerprint, save_irr_file
from ..inputs.safety import safety_vector
from ._common import (
    CLIError,
    check_exists,
    check_output,
    check_same_architecture,
    local_or_download,
    target_parameter_names,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="The aligned model (directory with safetensors, or hub id).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--unaligned", help="The unaligned model (directory with safetensors, or hub id).")
    src.add_argument(
        "--harmful-data",
        help="Harmful prompt/answer pairs (json/jsonl/hub id): build the unaligned model by a short fine-tune.",
    )
    p.add_argument("--output", required=True, help="The .safetensors file to write.")
    p.add_argument("--values", action="store_true", help="Keep values (dtype of the base) instead of int8 signs.")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="Only parameters of these modules (names or regexes; default: the decoder layers' linears).",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    hf = p.add_argument_group("harmful fine-tune (--harmful-data)")
    hf.add_argument("--prompt-column", default="prompt", help="Prompt column of --harmful-data.")
    hf.add_argument("--response-column", default="response", help="Harmful answer column of --harmful-data.")
    hf.add_argument("--steps", type=int, default=IRRConfig.unaligned_steps, help="Optimizer steps.")
    hf.add_argument("--learning-rate", type=float, default=IRRConfig.unaligned_learning_rate, help="Learning rate.")
    hf.add_argument(
        "--lora-rank", type=int, default=IRRConfig.unaligned_lora_rank, help="LoRA rank (0: full fine-tune)."
    )
    hf.add_argument("--batch-size", type=int, default=IRRConfig.unaligned_batch_size, help="Sequences per step.")
    hf.add_argument("--max-length", type=int, default=512, help="Truncate examples to this many tokens.")
    hf.add_argument("--seed", type=int, default=0, help="Seed of the harmful fine-tune.")


def run(args: argparse.Namespace) -> int:

    check_exists(args.base, "--base", allow_hub_id=True)
    check_exists(args.unaligned, "--unaligned", allow_hub_id=True)
    check_exists(args.harmful_data, "--harmful-data", allow_hub_id=True)
    if not args.output.endswith(".safetensors"):
        raise CLIError("--output must end with .safetensors")
    check_output(args.output, "--output", args.overwrite)
    # reads --base's config (naming --base if it cannot be found) and refuses an --unaligned of another architecture
    check_same_architecture(("--base", args.base), ("--unaligned", args.unaligned))
    if args.harmful_data:
        return _from_harmful_data(args)
    base = local_or_download(args.base, "--base")
    names = target_parameter_names(args.base, args.target_modules)
    v = safety_vector(base, local_or_download(args.unaligned, "--unaligned"), names=names, sign_only=not args.values)
    save_irr_file(
        args.output, v, kind="safety_vector", base_fingerprint=fingerprint(base, v.keys()), base_model=args.base
    )
    print(f"wrote {args.output}: {len(v)} tensors, {'values' if args.values else 'int8 signs'}")
    return 0


_FLAGS = {
    "unaligned_steps": "--steps",
    "unaligned_learning_rate": "--learning-rate",
    "unaligned_lora_rank": "--lora-rank",
    "unaligned_batch_size": "--batch-size",
    "calibration_max_length": "--max-length",
}


def _from_harmful_data(args: argparse.Namespace) -> int:
    """The short harmful fine-tune of `irr_callback.inputs.unaligned` (the callback's `harmful_dataset` path)."""
    from ..inputs.data import DataError, load_examples, padding_id, require_columns, tokenize_pairs
    from ..inputs.unaligned import harmful_finetune_vector
    from ..targets import find_targets
    from ..tensors import as_tensor_mapping
    from ._common import load_causal_lm, load_tokenizer

    if args.values:
        raise CLIError("--values needs --unaligned: the harmful fine-tune gives the signs of v only")
    try:  # the settings are validated (and named) by IRRConfig before any data or model is loaded
        config = IRRConfig(
            unaligned_steps=args.steps,
            unaligned_learning_rate=args.learning_rate,
            unaligned_lora_rank=args.lora_rank,
            unaligned_batch_size=args.batch_size,
            calibration_max_length=args.max_length,
            irr_seed=args.seed,
        )
    except IRRConfigError as exc:
        message = str(exc)
        for field, flag in _FLAGS.items():
            message = message.replace(f"IRRConfig.{field} ", f"{flag} ")
        raise CLIError(message) from exc
    rows = load_examples(args.harmful_data, what="--harmful-data")
    require_columns(
        rows,
        [args.prompt_column, args.response_column],
        what="--harmful-data",
        fields=["--prompt-column", "--response-column"],
    )
    tokenizer = load_tokenizer(args.base)
    model = load_causal_lm(args.base, "float32", flag="--base")
    targets = find_targets(model, args.target_modules)[2]
    try:
        examples = tokenize_pairs(
            tokenizer, rows[args.prompt_column], rows[args.response_column], max_length=args.max_length
        )
    except DataError as exc:
        raise CLIError(f"--harmful-data: {exc}") from exc
    v = harmful_finetune_vector(model, examples, targets, config, pad_token_id=padding_id(tokenizer))
    base = as_tensor_mapping(model, what="base")
    save_irr_file(
        args.output,
        v,
        kind="safety_vector",
        base_fingerprint=fingerprint(base, v.keys()),
        base_model=args.base,
        extra={
            "irr_callback.source": "harmful_data",
            "irr_callback.harmful_data": str(args.harmful_data),
            "irr_callback.steps": str(args.steps),
        },
    )
    print(
        f"wrote {args.output}: {len(v)} tensors, int8 signs, from a {args.steps}-step "
        f"{'LoRA' if args.lora_rank else 'full'} harmful fine-tune on {len(examples)} examples"
    )
    return 0
