"""glibc malloc settings (wsi_psm.allocator): freed activation-sized blocks are reused, not unmapped
and faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from wsi_psm.allocator import tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# six blocks of N MiB alive at once, then all freed (a forward's activations); minor page faults
# per repetition after the first, and (scoped mode) the resident MiB once the scope is left
PROBE = """
import contextlib, resource, sys
import numpy as np
from wsi_psm.allocator import large_blocks_reused, tune_malloc
mode, mib = sys.argv[1], int(sys.argv[2])
if mode != "plain":
    assert tune_malloc()
def layer_round():
    arrs = [np.ones(mib * 2**18, np.float32) for _ in range(6)]
    del arrs
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
with large_blocks_reused() if mode in ("scoped", "nested") else contextlib.nullcontext():
    if mode == "nested":  # an inner scope left early must not end the outer one
        with large_blocks_reused():
            pass
    layer_round()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        layer_round()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(faults, rss_mib())
"""


def _probe(mode: str, mib: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(mib)], capture_output=True, text=True, check=True
    )
    faults, rss = out.stdout.split()
    return float(faults), float(rss)


@pytest.mark.skipif(not GLIBC, reason="mallopt settings exist only in glibc")
def test_tuned_process_reuses_freed_blocks() -> None:
    # 16 MiB is 4,096 pages: untuned, glibc trims the freed heap top and faults much of it in again
    (untuned, _), (tuned, _) = _probe("plain", 16), _probe("tuned", 16)
    assert tuned < 100
    assert untuned > 10 * max(tuned, 100)


@pytest.mark.skipif(not GLIBC, reason="mallopt settings exist only in glibc")
def test_large_blocks_are_reused_within_the_scope_and_returned_after() -> None:
    # 96 MiB blocks are over the largest mmap threshold: tuned alone, each is a fresh mapping
    (tuned, _), (scoped, rss) = _probe("tuned", 96), _probe("scoped", 96)
    assert scoped < 100
    assert tuned > 10 * max(scoped, 100)
    assert rss < 6 * 96  # the 576 MiB kept for reuse went back to the system on leaving
    nested, rss = _probe("nested", 96)
    assert nested < 100 and rss < 6 * 96


def test_tune_malloc_is_a_quiet_no_op_off_glibc() -> None:
    assert tune_malloc() is GLIBC
    assert tune_malloc() is GLIBC  # idempotent (cached)
