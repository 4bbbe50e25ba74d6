"""IRR's own log lines (`irr_callback.*` loggers) follow transformers' verbosity, which a `Trainer` sets from
`TrainingArguments.log_level` and `transformers.logging.set_verbosity_info()` sets directly; `irr -v` (or
`set_level`) sets IRR's level alone, without the rest of transformers' output.

Records still propagate to the root logger, so `logging.basicConfig` and pytest's `caplog` see them; IRR's own
stderr handler only prints when the root logger has no handler (no line is printed twice).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


NAME = "irr_callback"


class _FollowTransformers(logging.Logger):
    """The package logger: its level, unless set explicitly, is transformers' current verbosity.

    `level` is what `Logger.getEffectiveLevel` of the child loggers reads, and transformers' `set_verbosity`
    calls `setLevel`, which clears every logger's level cache, so a change takes effect at once."""

    _explicit: int = logging.NOTSET

    @property  # type: ignore[override]
    def level(self) -> int:
        if self._explicit:
            return self._explicit
        from transformers.utils import logging as hf_logging

        return _Following(hf_logging.get_verbosity())

    @level.setter
    def level(self, value: int) -> None:
        # a level read while following and set back (pytest's caplog.at_level does that) keeps following
        self._explicit = logging.NOTSET if isinstance(value, _Following) else value


class _Following(int):
    """The level the package logger reports while it follows transformers (not an explicit setting)."""


class _WhenRootIsSilent(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


def _package_logger() -> logging.Logger:
    existing = logging.Logger.manager.loggerDict.get(NAME)
    if isinstance(existing, logging.Logger):
        return existing
    previous = logging.getLoggerClass()
    logging.setLoggerClass(_FollowTransformers)
    try:
        logger = logging.getLogger(NAME)
    finally:
        logging.setLoggerClass(previous)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_WhenRootIsSilent())
    logger.addHandler(handler)
    return logger


LOGGER = _package_logger()


def set_level(level: int | None) -> None:
    """IRR's log level alone (None: follow transformers' verbosity again)."""
    LOGGER.setLevel(level or logging.NOTSET)


@contextlib.contextmanager
def level(value: int | None) -> Iterator[None]:
    """`set_level(value)` for the duration of a block (the `irr` command), then back to what it was."""
    before = getattr(LOGGER, "_explicit", logging.NOTSET)
    set_level(value)
    try:
        yield
    finally:
        set_level(before)
