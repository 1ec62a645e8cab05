"""``summary.csv``, the cohort table: rows merged by name, class columns in a fixed order, the
Positive index and density worked out by hand, and someone else's file never replaced."""

from __future__ import annotations

import csv

import pytest

from wsi_psm.classes import positive_index
from wsi_psm.counts_table import (
    CountsRow,
    check_counts_table,
    class_columns,
    natural_key,
    read_counts_table,
    write_counts_table,
)
from wsi_psm.errors import OutputExistsError, OutputWriteError


def _rows(folder):
    with (folder / "summary.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_ihc_row_by_hand(tmp_path) -> None:
    # 30 positive, 90 negative on 0.5 mm²: index 0.25, 240 cells per mm²
    write_counts_table(
        tmp_path, [CountsRow("t1", "ihc-dab", 0.25, 0.5, {"Negative": 90, "Positive": 30})]
    )
    cols, (row,) = _rows(tmp_path)
    assert cols == ["name", "stain", "mpp", "area_mm2", "cells", "Positive", "Negative",
                    "positive_index", "cells_per_mm2"]  # fmt: skip
    assert row == {"name": "t1", "stain": "ihc-dab", "mpp": "0.25", "area_mm2": "0.5",
                   "cells": "120", "Positive": "30", "Negative": "90", "positive_index": "0.25",
                   "cells_per_mm2": "240"}  # fmt: skip


def test_rows_of_earlier_calls_are_kept_and_classes_union(tmp_path) -> None:
    he = {"Large nucleus": 5, "Medium nucleus": 0, "Small nucleus": 7}
    write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, he)])
    # an IHC image without a single Negative cell: its count is 0, not blank
    write_counts_table(tmp_path, [CountsRow("b", "ihc-dab", 0.5, 2.0, {"Positive": 4})])
    cols, rows = _rows(tmp_path)
    assert cols[5:-2] == [
        "Positive",
        "Negative",
        "Small nucleus",
        "Medium nucleus",
        "Large nucleus",
    ]
    a, b = rows
    # a class of the row's own fit is counted (0 included); another fit's class is blank
    assert (a["name"], a["Positive"], a["Medium nucleus"], a["positive_index"]) == (
        "a",
        "",
        "0",
        "",
    )
    assert (b["Negative"], b["Small nucleus"], b["positive_index"]) == ("0", "", "1")
    # the same name again replaces its row, in place
    write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Small nucleus": 2})])
    _, rows = _rows(tmp_path)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert (rows[0]["cells"], rows[0]["Large nucleus"], rows[0]["cells_per_mm2"]) == ("2", "", "2")
    assert not [p for p in tmp_path.iterdir() if p.name != "summary.csv"]  # no temporary left


def test_no_cells_and_no_area(tmp_path) -> None:
    write_counts_table(tmp_path, [CountsRow("empty", "he", 0.5, 0.0, {})])
    _, (row,) = _rows(tmp_path)
    assert (row["cells"], row["positive_index"], row["cells_per_mm2"]) == ("0", "", "")


def test_someone_elses_csv_is_refused_not_replaced(tmp_path) -> None:
    theirs = "patient,score\nP1,3\n"
    (tmp_path / "summary.csv").write_text(theirs)
    with pytest.raises(OutputExistsError, match="not a wsi-psm cell-count table"):
        check_counts_table(tmp_path)
    with pytest.raises(OutputExistsError):
        write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Nucleus": 1})])
    assert (tmp_path / "summary.csv").read_text() == theirs
    (tmp_path / "summary.csv").write_bytes(b"name,stain\n\xff\xfe\n")  # not UTF-8
    with pytest.raises(OutputExistsError, match="unreadable"):
        check_counts_table(tmp_path)
    (tmp_path / "summary.csv").unlink()
    (tmp_path / "summary.csv").mkdir()
    with pytest.raises(OutputWriteError, match="is a folder"):
        check_counts_table(tmp_path)


def test_semicolons_and_empty_files(tmp_path) -> None:
    write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Nucleus": 3})])
    text = (tmp_path / "summary.csv").read_text()
    (tmp_path / "summary.csv").write_text(text.replace(",", ";"))  # a European spreadsheet's save
    with pytest.raises(OutputExistsError, match="semicolon-separated"):
        check_counts_table(tmp_path)
    (tmp_path / "summary.csv").write_text("")  # an empty file: nothing in it to lose
    write_counts_table(tmp_path, [CountsRow("b", "he", 0.5, 1.0, {"Nucleus": 1})])
    assert [r["name"] for r in _rows(tmp_path)[1]] == ["b"]


def test_a_table_saved_by_a_spreadsheet_is_merged(tmp_path) -> None:
    """Excel's "CSV UTF-8" adds a byte-order mark and CRLF line ends; a stray extra field is
    dropped, the rows are kept."""
    write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Nucleus": 3})])
    text = (tmp_path / "summary.csv").read_text().replace("\n", "\r\n")
    text = text.rstrip("\r\n") + ",EXTRA\r\n"  # a stray field on the row
    (tmp_path / "summary.csv").write_bytes("\ufeff".encode() + text.encode())
    assert [r["name"] for r in read_counts_table(tmp_path / "summary.csv")] == ["a"]
    write_counts_table(tmp_path, [CountsRow("b", "he", 0.5, 1.0, {"Nucleus": 1})])
    cols, rows = _rows(tmp_path)
    assert cols[0] == "name" and None not in cols and [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["Nucleus"] == "3"


def test_index_order_and_natural_sort() -> None:
    assert positive_index({"Positive": 1, "Negative": 3}) == pytest.approx(0.25)
    assert positive_index({"Positive": 2}) == 1.0
    assert positive_index({"Nucleus": 4}) is None
    assert class_columns(["Zeta", "Nucleus", "Negative", "Medium nucleus", "Alpha"]) == [
        "Negative", "Medium nucleus", "Nucleus", "Alpha", "Zeta"]  # fmt: skip
    assert sorted(["10", "2", "b1", "a", "1"], key=natural_key) == ["1", "2", "10", "a", "b1"]


def _write_many(folder: str, prefix: str, barrier) -> None:
    from pathlib import Path

    barrier.wait()  # both processes write at the same moment
    for i in range(100):
        write_counts_table(
            Path(folder), [CountsRow(f"{prefix}{i}", "he", 0.5, 1.0, {"Nucleus": i})]
        )


def test_two_calls_at_once_keep_each_others_rows(tmp_path) -> None:
    """Two processes updating one folder's table (an array job's slides) take turns."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), p, barrier)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _, rows = _rows(tmp_path)
    assert len(rows) == 200 and not [p for p in tmp_path.iterdir() if p.name != "summary.csv"]


def test_rows_follow_their_own_classes_and_natural_order(tmp_path) -> None:
    # an IHC image named without its IHC classes (classes off): no invented Positive / Negative
    write_counts_table(tmp_path, [CountsRow("10", "ihc-dab", 0.5, 1.0, {"Nucleus": 5})])
    write_counts_table(tmp_path, [CountsRow("2", "ihc-dab", 0.5, 1.0, {"Negative": 4})])
    _, rows = _rows(tmp_path)
    assert [r["name"] for r in rows] == ["2", "10"]  # across calls too
    assert (rows[1]["Positive"], rows[1]["Nucleus"], rows[1]["positive_index"]) == ("", "5", "")
    assert (rows[0]["Positive"], rows[0]["positive_index"]) == ("0", "0")
    # a header written with spaces after the commas reads as ours, its rows kept
    text = (tmp_path / "summary.csv").read_text().splitlines()
    (tmp_path / "summary.csv").write_text("\n".join([", ".join(text[0].split(",")), *text[1:]]))
    assert [r["name"] for r in read_counts_table(tmp_path / "summary.csv")] == ["2", "10"]
    assert natural_key("tile1².png")  # a non-decimal digit is text, not a crash


def test_a_lock_held_too_long_does_not_hang_the_run(tmp_path, monkeypatch, caplog) -> None:
    """A lock that is never released (a stuck process, a network file system's lock service)
    delays the update by LOCK_WAIT_S at most; the table is still written, with a warning."""
    fcntl = pytest.importorskip("fcntl")
    import os

    import wsi_psm.counts_table

    monkeypatch.setattr(wsi_psm.counts_table, "LOCK_WAIT_S", 0.2)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (another open file description: it conflicts)
        with caplog.at_level("WARNING", logger="wsi_psm.counts_table"):
            write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Nucleus": 1})])
    finally:
        os.close(fd)
    assert "without its lock" in caplog.text and [r["name"] for r in _rows(tmp_path)[1]] == ["a"]
