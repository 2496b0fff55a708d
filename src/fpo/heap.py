"""Handing the memory the C heap holds freed back to the operating system (glibc only).

On the CPU, tensors below glibc's mmap threshold (which grows to 32 MiB as large blocks are
freed) come from malloc's heap. What backward frees there (the activations) stays resident
until malloc reuses it; ``malloc_trim(0)`` returns its free pages (``madvise``), so a large
allocation made right after does not stack on top of them in the resident set.

``FPO_RELEASE_FREE_HEAP=0`` in the environment turns it off (to measure what it saves and
costs: ``python -m benchmarks.memory_phases --keep-heap``).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable


@functools.cache
def c_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS,
    Windows, where ``CDLL(None)`` itself fails)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; True when memory was released."""
    if os.environ.get("FPO_RELEASE_FREE_HEAP", "1") == "0":
        return False
    trim = c_malloc_trim()
    return bool(trim(0)) if trim is not None else False
