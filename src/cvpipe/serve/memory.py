"""Give decoded images' memory back to the system (glibc's malloc keeps it otherwise).

A 40-megapixel image is a few hundred MB of short-lived buffers (Pillow's 16 MB blocks, the
NumPy copy). glibc's malloc serves blocks under its *dynamic* mmap threshold from per-thread
arenas, raises that threshold each time a large mmapped block is freed, and keeps freed arena
memory for reuse: after a burst of large uploads over several worker threads the server kept
5.2 GB it no longer used (issue #15).

* :func:`tune_malloc` (at start-up, before the worker threads exist): at most two arenas, so
  freed image memory is not spread over (and kept by) one arena per thread. The container sets
  ``MALLOC_ARENA_MAX=2`` as well (app/Dockerfile), which also covers threads started earlier.
* :func:`trim`: ``malloc_trim(0)`` after a large image, returning the free pages the arenas
  hold to the system (it releases free memory inside the heap too, not only at its top).

The mmap threshold is left dynamic on purpose: fixed at 1 MiB it made every torch activation
a fresh mapping, and CPU inference of a resnet18 about three times slower.

Both are no-ops where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Optional

log = logging.getLogger("cvpipe.serve")

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
ARENA_MAX = 2

_libc: Optional[ctypes.CDLL] = None
_loaded = False
_trim_lock = threading.Lock()


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
        except OSError:
            _libc = None
    return _libc


def tune_malloc() -> bool:
    """At most two malloc arenas for this process; False where that is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    if not ok:  # pragma: no cover - glibc refuses only out-of-range values
        log.warning("mallopt refused the serving settings; freed image memory may be kept")
    return ok


def trim() -> None:
    """Return the arenas' free memory to the system (one thread at a time; skipped if one is trimming)."""
    libc = _glibc()
    if libc is not None and _trim_lock.acquire(blocking=False):
        try:
            libc.malloc_trim(0)
        finally:
            _trim_lock.release()
