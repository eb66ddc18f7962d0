"""Giving freed memory back to the operating system after a large transient job.

glibc's allocator keeps freed memory in its heaps (one per thread that allocated, up to
eight per core) and returns to the system only what is free at a heap's top. After a
replay (run in a worker thread) or a checkpoint (hundreds of MB encoded and written),
the process would keep that memory resident although nothing uses it:
``malloc_trim(0)`` releases every free page of every heap. Elsewhere than on glibc
this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

__all__ = ["release_free_memory"]

log = logging.getLogger("sessionbus.coordinator.memory")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def release_free_memory() -> None:
    """Return freed heap memory to the operating system (glibc), else do nothing."""
    trim = _malloc_trim()
    if trim is not None:
        try:
            trim(0)
        except OSError as exc:  # pragma: no cover - defensive
            log.debug("malloc_trim failed: %s", exc)
