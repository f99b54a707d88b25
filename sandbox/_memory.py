"""Giving the memory of evicted isolates back to the operating system.

A QuickJS context is hundreds of small allocations. When an evicted one is freed, glibc keeps the
pages in its arenas for reuse, so the process's resident size does not shrink: with hundreds
of runs parked, that is most of the service's memory. ``malloc_trim`` hands free pages back.
It takes milliseconds for a large heap, so call it from a worker thread, after evictions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from functools import cache

__all__ = ["evictions_total", "note_eviction", "release_freed_memory"]

_lock = threading.Lock()
_evictions = 0


def note_eviction() -> None:
    global _evictions
    with _lock:
        _evictions += 1


def evictions_total() -> int:
    """Isolates evicted in this process so far."""
    return _evictions


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (blocking). False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
