"""glibc malloc settings for this workload: tens of MiB allocated and freed per network layer.

glibc serves a block over its mmap threshold (dynamic, 128 KiB up to 32 MiB) with a fresh mapping
and unmaps it at free, and trims the heap's free top past twice that threshold. A CPU forward of
the segmenter allocates and frees each layer's activations (16 MiB per 512² tile at width 16), so
every forward faulted its activations in again page by page: on the 2-core dev host a 1000² image
took about 2.6 million minor page faults and as much kernel time as compute (benchmarks/README.md,
"CPU inference"). A fixed mmap threshold at glibc's maximum, a trim threshold and a top pad keep
those blocks in the heap for reuse; the resident size stays bounded by the peak, as before.

Two arenas at most (``M_ARENA_MAX``): glibc gives threads up to 8 per core, each growing and
fragmenting on its own, and the peak of a run then varied with the thread timing
(`memory_scaling.py`, 9x the area: 1.17-1.24x the peak, one run of the older code 2.55 GB; with two
arenas 1.01-1.10x).

Process-wide and idempotent; a no-op off glibc (macOS, musl). Called by the CLI, the pipeline's
worker processes and the Dask slide task; Python API users call :func:`tune_malloc` themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from collections.abc import Iterator

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
DEFAULT_MMAP_MAX = 65536  # glibc's

MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 64 * 2**20
ARENA_MAX = 2


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def tune_malloc() -> bool:
    """Apply the settings above to this process; True where they took (glibc), else False."""
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
        (_M_ARENA_MAX, ARENA_MAX),
    ):
        ok &= libc.mallopt(param, value) == 1  # mallopt returns 1 on success
    return ok


_scope_lock = threading.Lock()
_scope_depth = 0


@contextlib.contextmanager
def large_blocks_reused() -> Iterator[None]:
    """Within: no block is served by a fresh mapping, and the heap keeps what is freed, so that
    forwards on large images (a 2x tile: activations of 90-270 MiB, over the 32 MiB a threshold
    can be) reuse their blocks instead of faulting new ones in (on the 2-core host one 1184²
    forward: 5.3-6.2 s -> 2.9 s). On leaving the outermost scope, the settings of
    :func:`tune_malloc` come back and the heap's free memory goes back to the system
    (``malloc_trim``): kept for a whole run, the heap grew with the slide (benchmarks/README.md).
    Re-entrant and thread-safe (the settings are process-wide: the first scope in sets them, the
    last one out restores them); a no-op off glibc."""
    global _scope_depth
    libc = _glibc() if tune_malloc() else None
    if libc is None:
        yield
        return
    with _scope_lock:
        _scope_depth += 1
        if _scope_depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                libc.mallopt(_M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                libc.malloc_trim(0)
