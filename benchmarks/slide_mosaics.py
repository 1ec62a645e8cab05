"""Slide cells against tile cells: MoNuSeg images tiled into slides, run through `wsi-psm run`'s
route (process_slide, default options), scored per image against their instance labels.

    .venv/bin/python benchmarks/slide_mosaics.py [--sets crowded,ordinary,xml] [--no-check] [--json F]

Sets (1000x1000 crops at 0.25 µm/px, three per row, white fill):
  crowded   the 5 mask-only images of small crowded nuclei (HE-7128/7129/7130, KB, RD)
  ordinary  6 of the other 12 mask-only images
  xml       the 13 images with XML annotations (the test set of monuseg_segment.py)
The mask-only images are the shipped model's unlabelled training pixels (their scores are
optimistic); annotations are read only for scoring. Prints per image AJI and the mean pixel F1 /
object Dice / AJI / PQ, and the slide's magnification check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import tifffile
from rasterio.features import rasterize

from wsi_psm.allocator import tune_malloc
from wsi_psm.config import RunConfig
from wsi_psm.groundtruth import load_monuseg_labels, monuseg_cases
from wsi_psm.metrics import segmentation_scores
from wsi_psm.pipeline import process_slide

ROOT = Path(__file__).resolve().parents[1]
MONUSEG = ROOT.parent / "shared" / "data" / "monuseg-train"
CROWDED = ("TCGA-HE-7128", "TCGA-HE-7129", "TCGA-HE-7130", "TCGA-KB-A93J", "TCGA-RD-A8N9")
SIDE, PER_ROW = 1000, 3
KEYS = ("pixel_f1", "object_dice", "aji", "pq")


def pick(name: str) -> list:
    cases = monuseg_cases(MONUSEG)
    crowded = [c for c in cases if c.stem[:12] in CROWDED]
    if name == "crowded":
        return crowded
    if name == "ordinary":
        return [c for c in cases if not c.has_xml and c not in crowded][:6]
    return [c for c in cases if c.has_xml]


def write_mosaic(cases: list, path: Path) -> np.ndarray:
    """The images three per row as one tiled TIFF at 0.25 µm/px; returns the instance labels."""
    imgs, gts, n = [], [], 0
    for c in cases:
        imgs.append(tifffile.imread(c.image)[:SIDE, :SIDE, :3])
        g = load_monuseg_labels(c)[:SIDE, :SIDE].astype(np.int32)
        gts.append(np.where(g > 0, g + n, 0))
        n += int(g.max())
    while len(imgs) % PER_ROW:
        imgs.append(np.full((SIDE, SIDE, 3), 240, np.uint8))
        gts.append(np.zeros((SIDE, SIDE), np.int32))
    rows = range(0, len(imgs), PER_ROW)
    rgb = np.concatenate([np.concatenate(imgs[i : i + PER_ROW], axis=1) for i in rows])
    gt = np.concatenate([np.concatenate(gts[i : i + PER_ROW], axis=1) for i in rows])
    res = 1e4 / 0.25  # px per cm
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level = rgb
        for i in range(3):
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      subfiletype=0 if i == 0 else 1, resolution=(res / 2**i, res / 2**i),
                      resolutionunit="CENTIMETER")  # fmt: skip
            level = level[::2, ::2]
    return gt


def score(out: Path, gt: np.ndarray, cases: list) -> dict[str, dict[str, float]]:
    cells = gpd.read_parquet(out / "cells.parquet")
    labels = rasterize(((g, i + 1) for i, g in enumerate(cells.geometry)), out_shape=gt.shape,
                       dtype="int32")  # fmt: skip
    rows = {}
    for k, c in enumerate(cases):
        r, q = divmod(k, PER_ROW)
        box = np.s_[r * SIDE : (r + 1) * SIDE, q * SIDE : (q + 1) * SIDE]
        s = segmentation_scores(labels[box], gt[box])
        rows[c.stem] = {key: float(s[key]) for key in KEYS}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="crowded,ordinary")
    ap.add_argument("--no-check", action="store_true", help="segmenter.zoom_check = false")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tune_malloc()  # as the CLI does
    cfg = RunConfig().with_updates(**{"segmenter.zoom_check": not args.no_check})
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            cases = pick(name)
            slide = Path(tmp) / f"{name}.tiff"
            gt = write_mosaic(cases, slide)
            t = time.perf_counter()
            run = process_slide(slide, Path(tmp) / name, cfg, overwrite=True)
            wall = time.perf_counter() - t
            rows = score(run.out_dir, gt, cases)
            mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in KEYS}
            mag = run.summary["model"].get("magnification", {})
            mag = {k: v for k, v in mag.items() if k != "classes"}
            report[name] = {"per_image": rows, "mean": mean, "cells": run.cells, "wall_s": wall,
                            "magnification": mag}  # fmt: skip
            print(f"{name}: {run.cells} cells, {wall:.0f} s; magnification {mag}")
            for stem, r in rows.items():
                print(f"  {stem:26s} " + " ".join(f"{r[k]:.3f}" for k in KEYS))
            print(f"  {'mean':26s} " + " ".join(f"{mean[k]:.3f}" for k in KEYS), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
