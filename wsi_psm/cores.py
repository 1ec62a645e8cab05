"""How many CPU cores this process may use, for sizing its thread and process pools."""

from __future__ import annotations


def usable_cores() -> int:
    """The cores this process may run on: the CPU affinity mask and a container's CPU quota, not
    the machine's count. A SLURM job given 8 cores of a 128-core node, or a container limited to 4
    CPUs, gets 8 or 4 where ``os.cpu_count()`` says 128, so pools sized from it do not put 20
    workers on 8 cores. loky (vendored by joblib, scikit-learn's dependency) reads both, and
    honours ``LOKY_MAX_CPU_COUNT``; ``joblib.cpu_count`` itself says 1 wherever joblib's
    multiprocessing is off (``JOBLIB_MULTIPROCESSING=0``, no usable /dev/shm)."""
    # imported here: 0.15 s that spawned tile workers never need
    from joblib.externals.loky import cpu_count

    return max(1, int(cpu_count()))
