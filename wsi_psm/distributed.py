"""Batch runs on Dask distributed: the unit of work is the slide.

Each task receives only paths and plain settings, opens its own slide on the worker, processes it,
writes its output folder (atomically) and closes it: no reader or model object crosses the wire (the
model file is loaded on the worker). A slide's failure is reported, not fatal to the batch; a worker
lost mid-slide leaves no finished-looking output, and the scheduler retries the task elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import make_dirs, process_gone, remove_made, remove_stale_temps, write_error
from .config import RunConfig
from .cores import usable_cores
from .counts_table import check_counts_table, finished_output, write_slides_table
from .discovery import SlideInput
from .errors import ClusterStartError, InvalidArgumentError, WsiPsmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOutcome:
    name: str
    path: str
    out_dir: str
    cells: int = 0
    counts: dict[str, int] | None = None
    seconds: float = 0.0
    error: str | None = None
    skipped: bool = False
    device: str = ""  # what the slide ran on (device.device_label)


def process_slide_task(
    path: str,
    out_dir: str,
    cfg: dict[str, Any],
    model_path: str | None,
    mpp: float | None,
    backend: str,
    overwrite: bool,
) -> SlideOutcome:
    """Runs on a worker: one slide from file to finished output folder."""
    import time

    from .allocator import tune_malloc
    from .errors import WsiPsmError
    from .model import ModelBundle
    from .pipeline import process_slide

    tune_malloc()
    _torch_threads()
    t0 = time.perf_counter()
    name = Path(out_dir).name
    try:
        bundle = ModelBundle.load(model_path) if model_path else None
        res = process_slide(path, out_dir, RunConfig.model_validate(cfg), model=bundle, mpp=mpp,
                            backend=backend, overwrite=overwrite)  # fmt: skip
    except WsiPsmError as err:
        return SlideOutcome(name, path, out_dir, error=str(err), seconds=time.perf_counter() - t0)
    return SlideOutcome(
        name, path, out_dir, res.cells, res.counts, time.perf_counter() - t0,
        device=res.summary["model"].get("device", ""),
    )  # fmt: skip


def _torch_threads() -> None:
    """torch's threads = the worker's Dask threads (the cores it was given): Dask starts its
    workers with OMP_NUM_THREADS=1, which left a slide's network on one core whatever the worker's
    size (its slides at once share the one torch pool of the process)."""
    from distributed import get_worker

    try:
        n = get_worker().state.nthreads
    except ValueError:  # not on a worker (called directly)
        return
    import torch

    torch.set_num_threads(max(1, int(n)))


def run_batch(
    slides: Sequence[SlideInput],
    out_root: str | Path,
    cfg: RunConfig,
    *,
    model_path: str | Path | None = None,
    mpp: float | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    skip_existing: bool = False,
    scheduler: str | None = None,
    n_workers: int = 1,
    threads_per_worker: int = 2,
    retries: int = 1,
    report: Callable[[str], None] | None = None,
    report_failures: bool = True,
) -> list[SlideOutcome]:
    """Process ``slides`` on a Dask cluster (``scheduler`` address, or a local cluster of processes).

    Outputs go to ``out_root/<slide name>``. Returns one outcome per slide, in input order.
    ``report`` gets a line per slide as it finishes; ``report_failures`` False leaves failures to
    the caller (the CLI's one-slide batch says its error once, at exit).
    """

    report = report or (lambda line: None)
    out_root = Path(out_root).resolve()
    check_counts_table(out_root)  # a summary.csv that is not ours stops the batch before any work
    outcomes: dict[str, SlideOutcome] = {}
    todo = []
    # left by an earlier run killed outright on this host
    remove_stale_temps(*(out_root / s.name for s in slides))
    for s in slides:
        out_dir = out_root / s.name
        try:
            finished = skip_existing and finished_output(out_dir)
        except WsiPsmError as err:  # something unfinished is there: this slide fails, not the batch
            outcomes[s.name] = SlideOutcome(s.name, str(s.path), str(out_dir), error=str(err))
            if report_failures:
                report(f"{s.name}: error: {err}")
            continue
        if finished:
            outcomes[s.name] = SlideOutcome(s.name, str(s.path), str(out_dir), skipped=True)
            report(f"{s.name}: output exists, skipped")
        else:
            todo.append((s, out_dir))
    completed = False
    try:
        if todo:
            _run_on_cluster(
                todo, out_root, cfg, model_path=model_path, mpp=mpp, backend=backend,
                overwrite=overwrite, scheduler=scheduler, n_workers=n_workers,
                threads_per_worker=threads_per_worker, retries=retries, outcomes=outcomes,
                report=report, report_failures=report_failures,
            )  # fmt: skip
        completed = True
    finally:  # the cohort table: every slide with a finished folder, skipped ones too, also when
        # the batch is stopped (Ctrl-C) or fails
        try:
            with shielded(not completed):
                write_slides_table(out_root, [s.name for s in slides])
        except OSError as err:
            if completed:  # (when stopping, the stop's own error is the one to report)
                raise write_error(err, out_root) from err
    return [outcomes[s.name] for s in slides]


@contextlib.contextmanager
def shielded(on: bool) -> Iterator[None]:
    """While a stopped batch cleans up (``on``), a second Ctrl-C or SIGTERM is ignored, so that the
    cleanup ends: a terminal's Ctrl-C pressed again, or `timeout`, which signals the process and
    then its whole group, stopped it halfway (temporary folders kept, no summary.csv)."""
    if not on or threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = {k: signal.signal(k, signal.SIG_IGN) for k in kinds}
    try:
        yield
    finally:
        for k, handler in before.items():
            if handler is not None:  # (None: set outside Python, cannot be put back)
                signal.signal(k, handler)


WORKER_EXIT_S = 30.0  # s: how long a stopped batch waits for its local workers to exit


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    """Wait until the processes ``pids`` have exited, at most ``timeout`` seconds."""
    import time

    end = time.monotonic() + timeout
    while any(not process_gone(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)


def _connect(scheduler: str | None, n_workers: int, threads_per_worker: int) -> tuple[Any, Any]:
    """A Dask client, and the local cluster it runs on (None with a ``scheduler`` address)."""
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler is None:
        try:
            # the workers' own log lines off (CRITICAL only): a slide's failure comes back with its
            # task and is reported once, and at the cluster's close a heartbeat in flight logged a
            # traceback ("Failed to communicate with scheduler", 1 run in 7)
            cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                dashboard_address=None, silence_logs=logging.CRITICAL,
            )  # fmt: skip
        except (OSError, RuntimeError, TimeoutError) as err:  # e.g. a worker failed to start
            raise ClusterStartError(
                f"cannot start a local Dask cluster of {n_workers} worker(s): {err}"
            ) from err
    try:
        return Client(cluster if cluster is not None else scheduler), cluster
    except (OSError, ValueError, TypeError) as err:  # unreachable, or not an address
        if cluster is not None:
            cluster.close()
            raise
        raise InvalidArgumentError(
            f"cannot reach the Dask scheduler at {scheduler!r}: {err}"
        ) from err


def _run_on_cluster(
    todo: list[tuple[SlideInput, Path]],
    out_root: Path,
    cfg: RunConfig,
    *,
    model_path: str | Path | None,
    mpp: float | None,
    backend: str,
    overwrite: bool,
    scheduler: str | None,
    n_workers: int,
    threads_per_worker: int,
    retries: int,
    outcomes: dict[str, SlideOutcome],
    report: Callable[[str], None],
    report_failures: bool,
) -> None:
    """The slides of ``todo`` as tasks of one cluster; ``outcomes`` gets each as it finishes."""
    from distributed import as_completed

    client, cluster = _connect(scheduler, n_workers, threads_per_worker)
    pids: list[int] = []
    made: list[Path] = []
    stopping = True
    try:
        # a local cluster's worker processes, to wait for at the end: its close() can return
        # while a worker still finishes (and publishes) the slide it was writing
        if cluster is not None:
            pids = list(client.run(os.getpid).values())
        # made once here, not by the first task, so that concurrent slides never race to make it
        # (or to remove it again after a probe: atomic.check_writable); after the connection, so
        # a wrong address leaves no folder behind; removed at the end if no slide wrote into it
        try:
            made = make_dirs(out_root)
        except OSError as err:
            raise write_error(err, out_root) from err
        cfg_dict = cfg.to_dict()
        model = str(Path(model_path).resolve()) if model_path else None
        futures = {
            client.submit(
                process_slide_task, str(Path(s.path).resolve()), str(out_dir), cfg_dict, model,
                mpp, backend, overwrite, key=f"slide-{s.name}", retries=retries, pure=False,
            ): s
            for s, out_dir in todo
        }  # fmt: skip
        if report_failures:  # (not for the CLI's batch of one slide: that is said as `run` says it)
            slots = sum(client.nthreads().values())
            where = "a local cluster" if cluster is not None else scheduler
            report(f"{len(todo)} slide(s) sent to {where}: {slots} at a time")
            cores, at_once = usable_cores(), min(slots, len(todo))
            if cluster is not None and at_once > cores:  # (a remote cluster's cores are its own)
                report(
                    f"warning: {at_once} slides at once on {cores} usable core(s), about 2 GB of "
                    "memory each: fewer at once (--n-workers x --threads-per-worker) is usually "
                    "faster"
                )
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                out = fut.result()
            except Exception as err:  # the task itself crashed (worker lost beyond retries, bug)
                out = SlideOutcome(
                    s.name,
                    str(s.path),
                    str(out_root / s.name),
                    error=f"{type(err).__name__}: {err}",
                )
            outcomes[s.name] = out
            if out.error:
                if report_failures:
                    report(f"{s.name}: error: {out.error.removeprefix(s.name + ': ')}")
            else:
                report(
                    f"{s.name}: {out.cells} cells in {out.seconds:.0f} s on {out.device} "
                    f"-> {out.out_dir}"
                )
        stopping = False
    finally:
        with shielded(stopping):
            _close(client, cluster, pids, stopping)
            # the workers are gone: the folders of the slides they were writing when the batch
            # stopped (or when one was killed and its slide retried) go too (a remote worker's
            # are removed by the next run of that slide on its host)
            if cluster is not None:
                remove_stale_temps(*(out_dir for _, out_dir in todo))
            remove_made(made)  # (only where still empty: every slide failed, or was stopped)


def _close(client: Any, cluster: Any, pids: Sequence[int], stopping: bool) -> None:
    """Close the client and a local cluster, and wait for its workers to exit; when stopping, a
    failure to close (e.g. a timeout) does not replace the stop nor skip the rest of the cleanup."""
    steps = [client.close] + ([cluster.close] if cluster is not None else [])
    for step in steps:
        try:
            step()
        except Exception:
            if not stopping:
                raise
            log.debug("closing the Dask cluster failed while stopping", exc_info=True)
    _wait_gone(pids, WORKER_EXIT_S)
