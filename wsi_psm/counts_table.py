"""The cohort table, ``summary.csv``: one row per slide (``run``, ``batch``) or image tile
(``segment``) with its cells per class, the Positive (Ki-67) index and the cell density, for a
spreadsheet or ``pandas.read_csv``.

The table is rewritten after each call (atomically: a reader sees the old or the new table, never
part), its rows keyed by name (a slide's output folder, an image's output stem): rows of earlier
calls into the same folder are kept, a name processed again gets its new row. Class columns are the
union over the rows, in a fixed order (IHC classes, H&E groups by size, ``Nucleus``, then any other
name alphabetically); a row's own classes are counted, 0 included (an IHC row always has Positive
and Negative), and a class the row's fit did not have is left blank. An existing ``summary.csv``
that is not such a table is refused before any work (:func:`check_counts_table`), never replaced.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .atomic import remove_stale_temps, temp_path
from .classes import GROUP_NAMES, NEGATIVE, NUCLEUS, POSITIVE, positive_index
from .errors import OutputExistsError, OutputWriteError

log = logging.getLogger(__name__)

TABLE_NAME = "summary.csv"
LOCK_WAIT_S = 60.0
HEAD = ("name", "stain", "mpp", "area_mm2", "cells")
TAIL = ("positive_index", "cells_per_mm2")
CLASS_ORDER = (POSITIVE[0], NEGATIVE[0], *GROUP_NAMES[4], NUCLEUS[0])


@dataclass(frozen=True)
class CountsRow:
    """One slide or image: ``area_mm2`` is the tissue area for a slide, the whole image's area for
    a tile (a tile has no tissue mask: its density counts the glass too)."""

    name: str
    stain: str
    mpp: float
    area_mm2: float
    counts: Mapping[str, int] = field(default_factory=dict)


def row_from_summary(path: str | os.PathLike[str]) -> CountsRow:
    """The row of a slide from its ``summary.json`` (as ``run`` writes it)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return CountsRow(
        name=data["slide"]["name"],
        stain=data.get("model", {}).get("provenance", {}).get("stain", ""),
        mpp=float(data["slide"]["mpp"]),
        area_mm2=float(data["tissue_area_mm2"]),
        counts={k: int(v["count"]) for k, v in data["class_counts"].items()},
    )


def finished_output(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` is a finished slide output, for ``--skip-existing``: False when nothing
    is there, True for a folder whose ``summary.json`` (written last) names outputs that are all
    present. Anything else at that path (a file, a folder made by hand, a copy cut short) is not
    taken for finished, nor silently replaced: OutputExistsError, naming what to do."""
    out_dir = Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        return False
    why = "it is not a folder"
    if out_dir.is_dir():
        try:
            summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
            # (outputs from before summary.json listed them: at least the cells)
            names = summary.get("outputs") or [_cells_file(out_dir)]
            missing = [n for n in names if not (out_dir / n).is_file()]
        except FileNotFoundError:
            why = "it holds no summary.json"
        except (OSError, ValueError, AttributeError, TypeError):
            why = "its summary.json cannot be read"
        else:
            if not missing:
                return True
            why = f"{', '.join(missing)} missing"
    raise OutputExistsError(
        f"{out_dir} exists but is not a finished wsi-psm output ({why}): remove it and rerun"
    )


def _cells_file(out_dir: Path) -> str:
    gz = "cells.geojson.gz"
    return gz if (out_dir / gz).is_file() else "cells.geojson"


def write_slides_table(out_root: str | os.PathLike[str], names: Iterable[str]) -> Path | None:
    """Update ``out_root/summary.csv`` with the slides ``names`` whose ``out_root/<name>`` is a
    finished output (:func:`finished_output`: processed now or skipped as finished); a summary that
    cannot be read as a row is left out with a warning (its slide's folder is the truth). None
    when there is no row."""
    rows = []
    for name in names:
        path = Path(out_root) / name / "summary.json"
        try:  # (an unfinished folder is not a row: `--skip-existing` refuses it too)
            if not finished_output(path.parent):
                continue
        except OutputExistsError:
            continue
        try:
            rows.append(replace(row_from_summary(path), name=name))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s left out of %s: cannot read it (%s)", path, TABLE_NAME, err)
    return write_counts_table(out_root, rows) if rows else None


def class_columns(names: Iterable[str]) -> list[str]:
    """Class names in the table's fixed order."""
    names = set(names)
    known = [n for n in CLASS_ORDER if n in names]
    return known + sorted(names - set(known))


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _record(row: CountsRow) -> dict[str, str]:
    counts = dict(row.counts)
    if {POSITIVE[0], NEGATIVE[0]} & set(counts):  # IHC classes: no Positive cell is a count of 0
        counts = {POSITIVE[0]: 0, NEGATIVE[0]: 0, **counts}
    cells = sum(counts.values())
    index = positive_index(counts)
    return {
        "name": row.name,
        "stain": row.stain,
        "mpp": _fmt(row.mpp, 6),
        "area_mm2": _fmt(row.area_mm2, 6),
        "cells": str(cells),
        **{k: str(int(v)) for k, v in counts.items()},
        "positive_index": _fmt(index, 4),
        "cells_per_mm2": _fmt(cells / row.area_mm2 if row.area_mm2 > 0 else None, 6),
    }


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``2.png`` before ``10.png``."""
    return [int(t) if t.isdecimal() else t.lower() for t in re.split(r"(\d+)", name)]


def read_counts_table(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of an existing table as strings ("" = no such class); [] when there is none.
    A file that is not such a table (another header, not UTF-8) raises OutputExistsError: it is
    someone's file, not ours to replace. A byte-order mark (a spreadsheet's "CSV UTF-8") is fine."""
    p = Path(path)
    if p.is_dir():
        raise OutputWriteError(f"cannot write {p}: it is a folder")
    if not p.is_file() or p.stat().st_size == 0:  # (an empty file holds nothing to lose)
        return []
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            head = [h.strip() for h in reader.fieldnames or []]
            rows = [{k.strip(): v for k, v in r.items() if isinstance(k, str)} for r in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise _not_ours(p, f"unreadable: {err}") from err
    except OSError as err:
        raise OutputWriteError(f"cannot read {p}: {err.strerror or err}") from err
    if head[: len(HEAD)] != list(HEAD):
        if head and head[0].startswith(f"{HEAD[0]};"):  # ours, re-saved by a spreadsheet
            raise _not_ours(p, "it is semicolon-separated: save it as comma-separated CSV")
        raise _not_ours(p, f"its header is {', '.join(head[:5]) or 'empty'}")
    return rows


def _not_ours(path: Path, why: str) -> OutputExistsError:
    return OutputExistsError(
        f"{path} is not a wsi-psm cell-count table ({why}): move it away, or give another output "
        "folder, so it is not overwritten"
    )


def check_counts_table(folder: str | os.PathLike[str]) -> None:
    """Before any work: the table in ``folder`` can be updated (absent, or ours, readable, and
    not held open for writing elsewhere, e.g. by a spreadsheet on Windows)."""
    path = Path(folder) / TABLE_NAME
    read_counts_table(path)
    if path.is_file():
        try:
            with path.open("r+b"):
                pass
        except OSError as err:
            raise OutputWriteError(f"cannot write {path}: {err.strerror or err}") from err


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Two calls updating one folder's table at once (an array job's slides) take turns, so
    neither drops the other's rows. A lock on the folder itself (POSIX ``flock``: nothing is left
    behind); where there is none (Windows, a file system without locks) the update goes unlocked,
    and so it does after LOCK_WAIT_S (a network file system whose lock service hangs must not
    hang the run: an update takes milliseconds)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("%s: updating %s without its lock", folder, TABLE_NAME)
                    break
                time.sleep(0.01)
            except OSError:  # no locks on this file system
                break
        yield
    finally:
        os.close(fd)  # (releases the lock)


def write_counts_table(folder: str | os.PathLike[str], rows: Iterable[CountsRow]) -> Path:
    """Write (or update) ``folder/summary.csv`` with ``rows``; returns its path."""
    path = Path(folder) / TABLE_NAME
    rows = list(rows)
    if not rows:
        return path
    with _locked(path.parent):
        records = {r["name"]: r for r in read_counts_table(path)}
        for row in rows:
            records[row.name] = _record(row)
        _write(path, [records[k] for k in sorted(records, key=natural_key)])
    return path


def _write(path: Path, records: list[dict[str, str]]) -> None:
    fixed = set(HEAD) | set(TAIL)
    classes = class_columns(k for r in records for k in r if k not in fixed)
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=[*HEAD, *classes, *TAIL], lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(records)
    remove_stale_temps(path)  # left by a call killed outright on this host
    tmp = temp_path(path)
    try:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = [
    "TABLE_NAME",
    "CountsRow",
    "check_counts_table",
    "class_columns",
    "natural_key",
    "read_counts_table",
    "row_from_summary",
    "write_counts_table",
    "write_slides_table",
]
