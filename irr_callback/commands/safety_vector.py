"""Write a safety vector v = W_aligned - W_unaligned as a safetensors file with metadata.

  irr safety-vector --base ALIGNED --unaligned UNALIGNED --output v.safetensors

Tensors are streamed one at a time from the safetensors files. By default only the signs are
kept (int8, 1 byte per entry: all IRR uses); pass --values to keep values (RESTA, Safe LoRA).
The file records a fingerprint of the base, so it is refused later against another base.
"""

from __future__ import annotations

import argparse

from ..io import fingerprint, save_irr_file
from ..safety import safety_vector
from ._common import CLIError, check_exists, check_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="The aligned model (directory with safetensors, or hub id).")
    p.add_argument("--unaligned", required=True, help="The unaligned model (directory with safetensors, or hub id).")
    p.add_argument("--output", required=True, help="The .safetensors file to write.")
    p.add_argument("--values", action="store_true", help="Keep values (dtype of the base) instead of int8 signs.")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="Only parameters of these modules (names or regexes; default: the decoder layers' linears).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")


def run(args: argparse.Namespace) -> int:
    from .apply import _local_or_download

    check_exists(args.base, "--base", allow_hub_id=True)
    check_exists(args.unaligned, "--unaligned", allow_hub_id=True)
    if not args.output.endswith(".safetensors"):
        raise CLIError("--output must end with .safetensors")
    check_output(args.output, "--output", args.overwrite)
    base = _local_or_download(args.base)
    names = target_parameter_names(args.base, args.target_modules)
    v = safety_vector(base, _local_or_download(args.unaligned), names=names, sign_only=not args.values)
    save_irr_file(args.output, v, kind="safety_vector", base_fingerprint=fingerprint(base, v.keys()),
                  base_model=args.base)
    print(f"wrote {args.output}: {len(v)} tensors, {'values' if args.values else 'int8 signs'}")
    return 0


def target_parameter_names(model_path: str, target_modules=None) -> list[str]:
    """Target parameter names from the model's config alone (an empty model on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..targets import find_targets

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return [t.name for t in find_targets(model, target_modules)[2]]
