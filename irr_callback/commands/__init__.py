"""Subcommands of the `irr` console script; each module has `add_arguments(parser)` and `run(args)`."""
