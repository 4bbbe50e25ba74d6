"""irr-callback: post-hoc safety re-alignment (IRR) for Hugging Face fine-tuning jobs.

`realign` repairs a fine-tuned model in place; `IRRCallback` does it at the end of a Trainer run.
"""

from .config import IRRConfig, IRRConfigError
from .driver import realign
from .report import IRRReport, ModuleStats
from .safety import fisher, safety_vector

__version__ = "0.1.0"

__all__ = ["IRRConfig", "IRRConfigError", "IRRReport", "ModuleStats", "fisher", "realign", "safety_vector"]
