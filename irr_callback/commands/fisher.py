"""Write the diagonal Fisher importance of the aligned model on safety data.

  irr fisher --base ALIGNED --safety-data harmful_with_refusals.jsonl --output fisher.safetensors

The safety data holds harmful prompts with safe responses (columns --prompt-column and
--response-column); the loss is on the response tokens only. Needed for --remove_ratio < 1.
Compute it once per base model and reuse it for every fine-tune of that base.
"""

from __future__ import annotations

import argparse

import torch

from ..inputs.irr_files import fingerprint, save_irr_file
from ._common import CLIError, check_exists, check_output, load_causal_lm, load_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="The aligned model (directory or hub id).")
    p.add_argument("--safety-data", required=True, help="Harmful prompts with safe responses (json/jsonl/hub id).")
    p.add_argument("--prompt-column", default="prompt", help="Prompt column of --safety-data.")
    p.add_argument("--response-column", default="response", help="Response column of --safety-data.")
    p.add_argument("--output", required=True, help="The .safetensors file to write.")
    p.add_argument("--batch-size", type=int, default=8, help="Mini-batch size (the reference uses 8).")
    p.add_argument("--max-samples", type=int, default=None, help="Use at most this many examples.")
    p.add_argument("--max-length", type=int, default=512, help="Truncate examples to this many tokens.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Dtype of the stored scores.")
    p.add_argument("--target-modules", nargs="+", default=None, help="Only parameters of these modules.")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")


def run(args: argparse.Namespace) -> int:
    from ..inputs.data import DataError, load_examples, require_columns
    from ..inputs.safety import fisher_from_pairs
    from ..targets import find_targets
    from ..tensors import as_tensor_mapping

    check_exists(args.base, "--base", allow_hub_id=True)
    check_exists(args.safety_data, "--safety-data", allow_hub_id=True)
    if not args.output.endswith(".safetensors"):
        raise CLIError("--output must end with .safetensors")
    check_output(args.output, "--output", args.overwrite)
    rows = load_examples(args.safety_data, what="--safety-data")
    require_columns(
        rows,
        [args.prompt_column, args.response_column],
        what="--safety-data",
        fields=["--prompt-column", "--response-column"],
    )
    if args.max_samples:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    model = load_causal_lm(args.base, flag="--base")
    tokenizer = load_tokenizer(args.base)
    names = [t.name for t in find_targets(model, args.target_modules)[2]]
    try:
        scores, used = fisher_from_pairs(
            model,
            tokenizer,
            rows[args.prompt_column],
            rows[args.response_column],
            max_length=args.max_length,
            batch_size=args.batch_size,
            names=names,
            dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16,
        )
    except DataError as exc:
        raise CLIError(f"--safety-data: {exc}") from exc
    base = as_tensor_mapping(model, what="base")
    save_irr_file(
        args.output,
        scores,
        kind="fisher",
        base_fingerprint=fingerprint(base, scores.keys()),
        base_model=args.base,
        extra={"irr_callback.samples": str(used)},
    )
    print(f"wrote {args.output}: Fisher of {len(scores)} tensors from {used} examples")
    return 0
