"""Hand freed heap back to the OS between the phases of the layer loop."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim): called after each layer's H pass, after
    each group's solve and at the end of each layer.

    Each of those phases frees tens to hundreds of MB (activations, solver buffers); glibc keeps
    freed blocks below its (self-raising) mmap threshold in the heap, where fragmentation makes the
    next phase grow the process instead of reusing them. Costs milliseconds; a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
