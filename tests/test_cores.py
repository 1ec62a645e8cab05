"""Pool sizes follow the cores this process may use (wsi_psm.cores), not the machine's count."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import wsi_psm.pipeline as pipeline
from wsi_psm.config import RunConfig


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_usable_cores_follow_the_affinity_mask() -> None:
    """A process pinned to one core (as a SLURM job or `taskset` pins it) is told one core,
    whatever the machine has."""
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from wsi_psm.cores import usable_cores; print(usable_cores(), os.cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    usable, machine = map(int, out.stdout.split())
    assert usable == 1 and machine >= 1


@pytest.mark.parametrize(("cores", "decode", "post"), [(16, 4, 11), (8, 2, 5), (2, 2, 1)])
def test_gpu_run_pools_are_sized_from_the_usable_cores(monkeypatch, cores, decode, post) -> None:
    """Beside a GPU: a quarter of the usable cores decode (2 to 8), the rest but one post-process
    in worker processes (at most 12)."""
    monkeypatch.setattr(pipeline, "usable_cores", lambda: cores)
    cfg = RunConfig()
    assert pipeline.decode_workers(cfg, on_gpu=True) == decode
    pool, n, processes = pipeline._post_pool(cfg, None, on_gpu=True)  # type: ignore[arg-type]
    try:
        assert (n, processes) == (post, True)
    finally:
        pool.shutdown()


def test_torch_threads_capped_at_the_usable_cores(monkeypatch) -> None:
    """A container's CPU quota (which torch does not read) caps torch's threads when a command
    picks its device; a larger count never raises them."""
    import torch

    import wsi_psm.device as device

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(device, "usable_cores", lambda: 1)
        device.select_device("cpu")
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(device, "usable_cores", lambda: 64)
        device.select_device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_usable_cores_do_not_depend_on_joblib_multiprocessing() -> None:
    """joblib.cpu_count says 1 wherever joblib's multiprocessing is off; the count used here does
    not."""
    env = {**os.environ, "JOBLIB_MULTIPROCESSING": "0"}
    code = "from wsi_psm.cores import usable_cores; print(usable_cores())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert int(out.stdout) == len(os.sched_getaffinity(0))
