"""The CLI's progress bars end as what happened: a stage stopped early shows what it did."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from wsi_psm.cli.progress import RichProgress


def test_bars_end_at_what_was_done() -> None:
    p = Progress(MofNCompleteColumn(), console=Console(file=io.StringIO()), auto_refresh=False)
    bars = RichProgress(p)
    bars.start("magnification check", 8)  # stops after 4 tiles: 4/4, not 8/8
    bars.advance("magnification check", 4)
    bars.done("magnification check")
    bars.start("tiles", 3)
    bars.advance("tiles", 3)
    bars.done("tiles")
    bars.start("fit", None)  # unknown length
    bars.done("fit")
    p.stop()
    got = {t.description: (t.completed, t.total) for t in p.tasks}
    assert got == {"magnification check": (4, 4), "tiles": (3, 3), "fit": (1, 1)}
