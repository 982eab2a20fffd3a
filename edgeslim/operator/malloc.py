"""glibc malloc tuning for the operator process.

The operator runs its sync handlers on kopf's thread pool (16 threads). glibc
gives each thread that allocates concurrently its own malloc arena (up to 8
per core), and memory freed in one arena is never reused by another nor
returned while anything near its top is live: after a burst of events (1,000
objects changing at once) every arena keeps its high-water mark. Two arenas
(the same as MALLOC_ARENA_MAX=2, the usual fix for many-threaded Python)
share the freed memory; a periodic malloc_trim hands whole free pages back.

Applied from inside the process so that it holds however the operator is
started (chart, `edgeslim operator` on a laptop, the scale bench); an explicit
MALLOC_ARENA_MAX in the environment wins. No-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

M_ARENA_MAX = -8  # from glibc's malloc.h
ARENAS = 2
TRIM_SECONDS = 10.0
log = logging.getLogger("edgeslim.operator")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only: musl has neither mallopt nor malloc_trim)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> None:
    """Caps the arenas (before kopf starts its threads) and trims in the background."""
    libc = _libc()
    if libc is None:
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, ARENAS)
    threading.Thread(target=_trim_loop, args=(libc,), name="malloc-trim", daemon=True).start()


def _trim_loop(libc: ctypes.CDLL) -> None:
    while True:
        time.sleep(TRIM_SECONDS)
        libc.malloc_trim(0)
