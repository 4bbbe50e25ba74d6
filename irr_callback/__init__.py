"""irr-callback: post-hoc safety re-alignment (IRR) for Hugging Face fine-tuning jobs."""

__version__ = "0.1.0"
