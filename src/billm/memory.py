"""Handing freed host memory back to the operating system.

glibc keeps the pages of freed heap chunks below its top; a long loop of temporaries of varying sizes (a
block-by-block run, the OBC loop over a wide layer) then grows the resident memory by memory it no longer
uses. :func:`return_freed_memory` gives those pages back (``malloc_trim``); elsewhere it does nothing.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional


def return_freed_memory() -> None:
    """Hand the host memory freed so far back to the operating system (glibc's ``malloc_trim``; a no-op where the
    C library has none)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
