"""Batch runs on Dask distributed: the unit of work is the slide.

Each task receives only paths and plain settings, opens its own slide on the worker, processes it,
writes its output folder (atomically) and closes it: no reader or model object crosses the wire (the
model file is loaded on the worker). A slide's failure is reported, not fatal to the batch; a worker
lost mid-slide leaves no finished-looking output, and the scheduler retries the task elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import make_dirs, remove_made
from .config import RunConfig
from .counts_table import check_counts_table, write_slides_table
from .discovery import SlideInput
from .errors import ClusterStartError, InvalidArgumentError


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
    t0 = time.perf_counter()
    name = Path(out_dir).name
    try:
        bundle = ModelBundle.load(model_path) if model_path else None
        res = process_slide(path, out_dir, RunConfig.model_validate(cfg), model=bundle, mpp=mpp,
                            backend=backend, overwrite=overwrite)  # fmt: skip
    except WsiPsmError as err:
        return SlideOutcome(name, path, out_dir, error=str(err), seconds=time.perf_counter() - t0)
    return SlideOutcome(name, path, out_dir, res.cells, res.counts, time.perf_counter() - t0)


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
    from distributed import Client, LocalCluster, as_completed

    report = report or (lambda line: None)
    out_root = Path(out_root).resolve()
    check_counts_table(out_root)  # a summary.csv that is not ours stops the batch before any work
    outcomes: dict[str, SlideOutcome] = {}
    todo = []
    for s in slides:
        out_dir = out_root / s.name
        if skip_existing and out_dir.exists():
            outcomes[s.name] = SlideOutcome(s.name, str(s.path), str(out_dir), skipped=True)
            report(f"{s.name}: output exists, skipped")
        else:
            todo.append((s, out_dir))
    if todo:
        cluster = None
        if scheduler is None:
            try:
                # the workers' own log lines off (CRITICAL only): a slide's failure comes back
                # with its task and is reported once, and at the cluster's close a heartbeat in
                # flight logged a traceback ("Failed to communicate with scheduler", 1 run in 7)
                cluster = LocalCluster(
                    n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                    dashboard_address=None, silence_logs=logging.CRITICAL,
                )  # fmt: skip
            except (OSError, RuntimeError, TimeoutError) as err:  # e.g. a worker failed to start
                raise ClusterStartError(
                    f"cannot start a local Dask cluster of {n_workers} worker(s): {err}"
                ) from err
        try:
            client = Client(cluster if cluster is not None else scheduler)
        except (OSError, ValueError, TypeError) as err:  # unreachable, or not an address
            if cluster is not None:
                cluster.close()
                raise
            raise InvalidArgumentError(
                f"cannot reach the Dask scheduler at {scheduler!r}: {err}"
            ) from err
        # made once here, not by the first task, so that concurrent slides never race to make it
        # (or to remove it again after a probe: atomic.check_writable); after the connection, so
        # a wrong address leaves no folder behind; removed at the end if no slide wrote into it
        try:
            made = make_dirs(out_root)
        except OSError as err:
            from .atomic import write_error

            client.close()
            if cluster is not None:
                cluster.close()
            raise write_error(err, out_root) from err
        try:
            cfg_dict = cfg.to_dict()
            model = str(Path(model_path).resolve()) if model_path else None
            futures = {
                client.submit(
                    process_slide_task,
                    str(Path(s.path).resolve()),
                    str(out_dir),
                    cfg_dict,
                    model,
                    mpp,
                    backend,
                    overwrite,
                    key=f"slide-{s.name}",
                    retries=retries,
                    pure=False,
                ): s
                for s, out_dir in todo
            }
            for fut in as_completed(futures):
                s = futures[fut]
                try:
                    out = fut.result()
                except (
                    Exception
                ) as err:  # the task itself crashed (worker lost beyond retries, bug)
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
                    report(f"{s.name}: {out.cells} cells in {out.seconds:.0f} s -> {out.out_dir}")
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
            remove_made(made)  # (only where still empty: every slide failed, or was stopped)
    try:  # the cohort table: every slide of the batch with a finished folder, skipped ones too
        write_slides_table(out_root, [s.name for s in slides])
    except OSError as err:
        from .atomic import write_error

        raise write_error(err, out_root) from err
    return [outcomes[s.name] for s in slides]
