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


def test_plain_lines_when_stderr_is_a_log() -> None:
    from wsi_psm.cli.progress import PlainProgress

    buf = io.StringIO()
    lines = PlainProgress("s1: ", Console(file=buf, width=200))
    lines.start("tiles", 20)
    lines.advance("tiles", 1)  # under a tenth: nothing said
    for _ in range(19):
        lines.advance("tiles", 1)
    lines.done("tiles")
    lines.start("fit", None)
    lines.advance("fit", 5)
    lines.done("fit")
    got = [ln.split(" (")[0] for ln in buf.getvalue().splitlines()]
    assert got[0] == "s1: tiles: started" and got[-2] == "s1: fit: started"
    # a line per tenth of the counted stage (2/20, 4/20, ... 18/20), then its end
    assert got[1:10] == [f"s1: tiles: {k}/20" for k in range(2, 20, 2)]
    assert buf.getvalue().splitlines()[10].startswith("s1: tiles: done (20/20, ")
    assert got[-1] == "s1: fit: done"
