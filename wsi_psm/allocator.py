"""glibc malloc settings for this workload: tens of MiB allocated and freed per network layer.

glibc serves a block over its mmap threshold (dynamic, 128 KiB up to 32 MiB) with a fresh mapping
and unmaps it at free, and trims the heap's free top past twice that threshold. A CPU forward of
the segmenter allocates and frees each layer's activations (16 MiB per 512² tile at width 16), so
every forward faulted its activations in again page by page: on the 2-core dev host a 1000² image
took about 2.6 million minor page faults and as much kernel time as compute (benchmarks/README.md,
"CPU inference"). A fixed mmap threshold at glibc's maximum, a trim threshold and a top pad keep
those blocks in the heap for reuse; the resident size stays bounded by the peak, as before.

Process-wide and idempotent; a no-op off glibc (macOS, musl). Called by the CLI, the pipeline's
worker processes and the Dask slide task; Python API users call :func:`tune_malloc` themselves.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 64 * 2**20


@functools.cache
def tune_malloc() -> bool:
    """Apply the settings above to this process; True where they took (glibc), else False."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = True
    for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    ):
        ok &= libc.mallopt(param, value) == 1  # mallopt returns 1 on success
    return ok
