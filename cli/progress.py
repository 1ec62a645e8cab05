"""Rich progress bars behind the library's small progress protocol (the library never imports rich)."""

from __future__ import annotations

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


@contextmanager
def progress_bars(enabled: bool = True, prefix: str = "") -> Iterator[RichProgress | None]:
    if not enabled:
        yield None
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
