"""``summary.csv``, the cohort table: rows merged by name, class columns in a fixed order, the
Positive index and density worked out by hand."""

from __future__ import annotations

import csv

import pytest

from wsi_psm.counts_table import (
    CountsRow,
    class_columns,
    positive_index,
    read_counts_table,
    write_counts_table,
)


def _rows(folder):
    with (folder / "summary.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_ihc_row_by_hand(tmp_path) -> None:
    # 30 positive, 90 negative on 0.5 mm²: index 0.25, 240 cells per mm²
    write_counts_table(
        tmp_path, [CountsRow("t1.png", "ihc-dab", 0.25, 0.5, {"Negative": 90, "Positive": 30})]
    )
    cols, (row,) = _rows(tmp_path)
    assert cols == ["name", "stain", "mpp", "area_mm2", "cells", "Positive", "Negative",
                    "positive_index", "cells_per_mm2"]  # fmt: skip
    assert row == {"name": "t1.png", "stain": "ihc-dab", "mpp": "0.25", "area_mm2": "0.5",
                   "cells": "120", "Positive": "30", "Negative": "90", "positive_index": "0.25",
                   "cells_per_mm2": "240"}  # fmt: skip


def test_rows_of_earlier_calls_are_kept_and_classes_union(tmp_path) -> None:
    write_counts_table(
        tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Large nucleus": 5, "Small nucleus": 7})]
    )
    write_counts_table(
        tmp_path, [CountsRow("b", "ihc-dab", 0.5, 2.0, {"Positive": 1, "Negative": 3})]
    )
    cols, rows = _rows(tmp_path)
    assert cols[5:-2] == ["Positive", "Negative", "Small nucleus", "Large nucleus"]
    a, b = rows
    assert (a["name"], a["Positive"], a["Small nucleus"], a["positive_index"]) == (
        "a",
        "0",
        "7",
        "",
    )
    assert (b["name"], b["Small nucleus"], b["positive_index"]) == ("b", "0", "0.25")
    # the same name again replaces its row, in place
    write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Small nucleus": 2})])
    _, rows = _rows(tmp_path)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert (rows[0]["cells"], rows[0]["Large nucleus"], rows[0]["cells_per_mm2"]) == ("2", "0", "2")
    assert not [p for p in tmp_path.iterdir() if p.name != "summary.csv"]  # no temporary left


def test_no_cells_and_no_area(tmp_path) -> None:
    write_counts_table(tmp_path, [CountsRow("empty", "he", 0.5, 0.0, {})])
    _, (row,) = _rows(tmp_path)
    assert (row["cells"], row["positive_index"], row["cells_per_mm2"]) == ("0", "", "")


def test_a_foreign_csv_is_replaced_not_merged(tmp_path) -> None:
    (tmp_path / "summary.csv").write_text("x,y\n1,2\n")
    assert read_counts_table(tmp_path / "summary.csv") == []
    write_counts_table(tmp_path, [CountsRow("a", "he", 0.5, 1.0, {"Nucleus": 1})])
    cols, rows = _rows(tmp_path)
    assert cols[0] == "name" and [r["name"] for r in rows] == ["a"]


def test_index_and_order() -> None:
    assert positive_index({"Positive": 1, "Negative": 3}) == pytest.approx(0.25)
    assert positive_index({"Positive": 2}) == 1.0
    assert positive_index({"Nucleus": 4}) is None
    assert class_columns(["Zeta", "Nucleus", "Negative", "Medium nucleus", "Alpha"]) == [
        "Negative", "Medium nucleus", "Nucleus", "Alpha", "Zeta"]  # fmt: skip
