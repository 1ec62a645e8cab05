"""Rich progress bars behind the library's small progress protocol (the library never imports rich)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap: a result line stays one line when stderr is a file or pipe (80 columns otherwise)
console = Console(stderr=True, soft_wrap=True)


class RichProgress:
    """Implements ``wsi_psm.progress.ProgressHook``: one bar per stage."""

    def __init__(self, progress: Progress, prefix: str = "") -> None:
        self._p = progress
        self._prefix = prefix
        self._tasks: dict[str, int] = {}

    def start(self, stage: str, total: int | None) -> None:
        if not self._p.live.is_started:  # shown from the first stage on: an error that comes
            self._p.start()  # before any stage is one line, not one after a blank bar area
        label = f"{self._prefix}{stage}"
        self._tasks[stage] = self._p.add_task(label, total=total)

    def advance(self, stage: str, n: int = 1) -> None:
        if stage in self._tasks:
            self._p.advance(self._tasks[stage], n)

    def done(self, stage: str) -> None:
        task = self._tasks.pop(stage, None)
        if task is not None:
            t = self._p.tasks[task]
            if t.total is None:  # a stage of unknown length ends as a full bar, 1/1 (not 0/?)
                self._p.update(task, total=max(t.completed, 1), completed=max(t.completed, 1))
            elif 0 < t.completed < t.total:  # stopped early (the magnification check): 4/4, not 8/8
                self._p.update(task, total=t.completed)
            else:
                self._p.update(task, completed=t.total)
            self._p.stop_task(task)


class PlainProgress:
    """``ProgressHook`` as plain lines, for stderr that is a file or pipe (a cluster job's log,
    ``nohup``), where bars would show nothing until the end: each stage's start and end, and each
    tenth of a counted stage, with the time so far."""

    def __init__(self, prefix: str = "", out: Console | None = None) -> None:
        self._prefix = prefix
        self._out = out or console
        self._stages: dict[str, list[float]] = {}  # stage -> [t0, total or 0, done, next mark]

    def _say(self, stage: str, what: str) -> None:
        self._out.print(f"{self._prefix}{stage}: {what}", highlight=False, markup=False)

    def start(self, stage: str, total: int | None) -> None:
        self._stages[stage] = [time.perf_counter(), float(total or 0), 0.0, (total or 0) / 10]
        self._say(stage, f"started ({total})" if total else "started")

    def advance(self, stage: str, n: int = 1) -> None:
        s = self._stages.get(stage)
        if s is None:
            return
        s[2] += n
        if s[1] and s[2] >= s[3] and s[2] < s[1]:
            s[3] = s[2] + s[1] / 10
            self._say(stage, f"{s[2]:.0f}/{s[1]:.0f} ({time.perf_counter() - s[0]:.0f} s)")

    def done(self, stage: str) -> None:
        s = self._stages.pop(stage, None)
        if s is not None:
            n = f"{s[2]:.0f}/{s[1]:.0f}, " if s[1] else ""
            self._say(stage, f"done ({n}{time.perf_counter() - s[0]:.0f} s)")


@contextmanager
def progress_bars(
    enabled: bool = True, prefix: str = ""
) -> Iterator[RichProgress | PlainProgress | None]:
    if not enabled:
        yield None
        return
    if not console.is_terminal:  # a log file: lines, not bars that draw only at the end
        yield PlainProgress(prefix)
        return
    p = Progress(
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    try:
        yield RichProgress(p, prefix)
    finally:
        if p.live.is_started:
            p.stop()
