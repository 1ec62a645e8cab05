"""Rendering ``wsi-psm eval`` reports as tables (and JSON)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SEG_COLS = ("pixel_f1", "object_dice", "aji", "pq")


GT_KINDS = {
    "xml": "XML annotations",
    "mask": "derived colour masks",
    "labels": "label images",
    "geojson": "GeoJSON outlines",
}


def _seg_table(report: dict[str, Any]) -> Table:
    kinds = Counter(row["gt_kind"] for row in report["images"].values())
    against = ", ".join(f"{n} {GT_KINDS.get(k, k)}" for k, n in sorted(kinds.items()))
    t = Table(title=f"segmentation: {report['n_images']} images (against {against})")
    t.add_column("image")
    for c in SEG_COLS:
        t.add_column(c, justify="right")
    t.add_column("cells pred/gt", justify="right")
    for stem, row in report["images"].items():
        t.add_row(stem, *(f"{row[c]:.3f}" for c in SEG_COLS), f"{row['n_pred']}/{row['n_gt']}")
    t.add_row("mean", *(f"{report['mean'][c]:.3f}" for c in SEG_COLS), "", style="bold")
    return t


def _det_table(report: dict[str, Any]) -> Table:
    pooled = report["pooled"]
    t = Table(
        title=f"detection at {report['radius_px']:g} px: {report['n_images']} images (counts pooled; per-image means at the end)"
    )
    for c in ("class", "precision", "recall", "F1", "pred", "gt", "count error"):
        t.add_column(c, justify="left" if c == "class" else "right")
    for name, s in pooled.items():
        if not isinstance(s, dict):
            continue
        t.add_row(name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}",
                  str(s["n_pred"]), str(s["n_gt"]), f"{s['count_error']:+d}")  # fmt: skip
    t.add_row("mean F1 (classes)", "", "", f"{pooled['mean_f1']:.3f}", "", "", "", style="bold")
    t.add_row("mean F1 (per image)", "", "", f"{report['mean']['mean_f1']:.3f}", "", "", "")
    err = report["mean"].get("positive_index_abs_error")
    if err is not None:  # (the Ki-67 index on a Ki-67 stain)
        t.add_row("Positive index error (per image)", "", "", f"{err:.3f}", "", "", "")
    return t


def print_eval(
    pred: Path, gt: Path, *, radius: float | None, json_out: Path | None
) -> dict[str, Any]:
    """Evaluate ``pred`` against ``gt`` (segmentation, or detection when ``gt`` holds BCData .h5 files)."""
    from wsi_psm.atomic import check_writable, write_error
    from wsi_psm.errors import OutputWriteError, WsiPsmError
    from wsi_psm.evaluation import evaluate_detection, evaluate_segmentation, is_detection_gt

    if json_out is not None:  # before the scoring, not after it
        if json_out.is_dir():
            raise OutputWriteError(
                f"--json {json_out} is a folder: give a file, e.g. {json_out / 'eval.json'}"
            )
        check_writable(json_out)
    if is_detection_gt(gt):
        report = evaluate_detection(pred, gt, radius_px=10.0 if radius is None else radius)
        table = _det_table(report)
    else:
        if radius is not None:
            raise WsiPsmError("a match radius is for detection (points), not for outlines")
        report = evaluate_segmentation(pred, gt)
        table = _seg_table(report)
    # piped or redirected output is not cut at 80 columns (image names would lose their ends)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    for key, what in (("unmatched_gt", "annotated images had no prediction"),
                      ("unmatched_pred", "predictions had no annotation")):  # fmt: skip
        if report.get(key):
            Console(stderr=True, soft_wrap=True).print(
                f"note: {len(report[key])} {what}", highlight=False
            )
    note = Console(stderr=True, soft_wrap=True)  # (one line each, also in a log file)
    if report.get("ignored_gt_points"):
        seen = ", ".join(f"{k} {v}" for k, v in sorted(report["ignored_gt_classes"].items()))
        note.print(
            f"note: {report['ignored_gt_points']} annotated points were not scored ({seen}): "
            "only Positive and Negative are",
            highlight=False,
            markup=False,
        )
    if report.get("images_without_points"):
        empty = report["images_without_points"]
        note.print(
            f"note: {len(empty)} annotation files hold no points ({', '.join(empty[:3])}"
            f"{', ...' if len(empty) > 3 else ''}): their predictions all count as false",
            highlight=False,
            markup=False,
        )
    if report.get("ignored_gt_regions"):
        note.print(
            f"note: {report['ignored_gt_regions']} annotated outlines holding other outlines "
            "(regions, not nuclei) were left out",
            highlight=False,
            markup=False,
        )
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            raise write_error(err, json_out) from err
    return report
