"""glibc malloc settings (wsi_psm.allocator): freed activation-sized blocks are reused, not unmapped
and faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from wsi_psm.allocator import tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# six 16 MiB arrays alive at once, then all freed (a forward's activations); minor page faults per
# repetition after the first
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from wsi_psm.allocator import tune_malloc
    assert tune_malloc()
def layer_round():
    arrs = [np.ones(4 * 2**20, np.float32) for _ in range(6)]
    del arrs
layer_round()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    layer_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


def _faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt settings exist only in glibc")
def test_tuned_process_reuses_freed_blocks() -> None:
    # 16 MiB is 4,096 pages: untuned, glibc trims the freed heap top and faults much of it in again
    untuned, tuned = _faults_per_round("plain"), _faults_per_round("tuned")
    assert tuned < 100
    assert untuned > 10 * max(tuned, 100)


def test_tune_malloc_is_a_quiet_no_op_off_glibc() -> None:
    assert tune_malloc() is GLIBC
    assert tune_malloc() is GLIBC  # idempotent (cached)
