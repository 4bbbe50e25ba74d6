"""irr-callback: post-hoc safety re-alignment (IRR) for Hugging Face fine-tuning jobs.

`realign` repairs a fine-tuned model in place; `IRRCallback` does it at the end of a Trainer run.
"""

from . import logs  # noqa: F401  (IRR's loggers follow transformers' verbosity; first, before any logger exists)
from ._version import __version__
from .config import IRRConfig, IRRConfigError
from .inputs.safety import fisher, safety_vector
from .pipeline import realign, realign_checkpoint
from .report import IRRReport, ModuleStats


__all__ = [
    "IRRCallback",
    "IRRConfig",
    "IRRConfigError",
    "IRRReport",
    "ModuleStats",
    "__version__",
    "fisher",
    "realign",
    "realign_checkpoint",
    "safety_vector",
]


def __getattr__(name: str):
    # IRRCallback imports transformers' Trainer machinery: load it only when asked for
    if name == "IRRCallback":
        from .callback import IRRCallback

        return IRRCallback
    raise AttributeError(f"module 'irr_callback' has no attribute {name!r}")
