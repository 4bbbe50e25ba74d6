"""The `irr` console script: one subcommand per module in `irr_callback.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging as pylogging
import sys
from collections.abc import Sequence

from transformers.utils import logging

from .commands._common import CLIError, HelpFormatter


COMMANDS = {
    "apply": "Post-hoc IRR on saved checkpoints (full model or LoRA adapter directory).",
    "safety-vector": "Write a safety vector (aligned minus unaligned) as a safetensors file.",
    "fisher": "Write the Fisher importance of the base model on safety data as a safetensors file.",
    "demo": "IRR end to end on the built-in toy world (CPU, about a minute): before/after table and plot.",
    "eval": "Generate and score one or more models: refusal, over-refusal, downstream accuracy.",
    "sweep": "IRR over a range of --remove-ratios on saved checkpoints, each evaluated: table and Pareto plot.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irr",
        description="IRR post-hoc safety re-alignment for fine-tuned language models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Show IRR's own progress lines (INFO); other libraries stay at WARNING.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = _command_module(name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _command_module(name: str):
    return importlib.import_module(f"irr_callback.commands.{name.replace('-', '_')}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import level

    logging.set_verbosity_warning()  # transformers, datasets, ...: warnings only, with or without -v
    try:
        with level(pylogging.INFO if args.verbose else None):
            return int(args._run(args) or 0)
    except (CLIError, ValueError, KeyError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"irr {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
