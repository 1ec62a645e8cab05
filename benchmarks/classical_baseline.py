"""Classical floor on MoNuSeg: haematoxylin channel (rgb2hed) + Otsu + ``split_instances``.

No learning and no per-image tuning: one Otsu threshold per image on the haematoxylin channel, then
the pipeline's own instance separation with the default ``InstanceConfig``. It checks the metrics and
the annotation readers against the floor in PSM-METHOD.md (tuned there: pixel F1 0.741, object Dice
0.663, AJI 0.441, PQ 0.395 on the 13 images with XML) and is the bar the label-free network must clear.

Three blocks are printed: the 13 images with XML (the reference), the 17 images that only have the
third-party colour masks (approximate ground truth, read with their overlap colours merged back,
see ``groundtruth.merge_overlap_fragments``), and the 13 XML images scored against their colour masks
read the same way, which shows how much that ground truth alone moves the numbers.

Run from the repository root:

    .venv/bin/python benchmarks/classical_baseline.py [--data ../shared/data/monuseg-train] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from wsi_psm.config import InstanceConfig
from wsi_psm.groundtruth import (
    Case,
    load_instance_png,
    load_monuseg_labels,
    monuseg_cases,
    monuseg_mpp,
)
from wsi_psm.instances import split_instances
from wsi_psm.metrics import segmentation_scores

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg-train"
MONUSEG_MPP = 0.25  # 40x; the XML of TCGA-NH-A8F7 and all mask-only images lack a value
KEYS = ("pixel_f1", "object_dice", "aji", "pq", "dq", "sq")


def segment(rgb: np.ndarray, mpp: float, cfg: InstanceConfig) -> np.ndarray:
    """Instance labels of one H&E image: Otsu on the haematoxylin optical density, then watershed."""
    hema = rgb2hed(rgb[..., :3])[..., 0]
    return split_instances(hema > threshold_otsu(hema), mpp=mpp, cfg=cfg)


def run_block(title: str, cases: list[Case], gt_of, cfg: InstanceConfig) -> dict[str, object]:
    print(f"\n{title} ({len(cases)} images)")
    print(
        f"{'image':26s} "
        + " ".join(f"{k:>11s}" for k in KEYS)
        + f" {'n_pred':>7s} {'n_gt':>6s} {'s':>6s}"
    )
    rows = {}
    for case in cases:
        rgb = tifffile.imread(case.image)
        mpp = (monuseg_mpp(case.annotation) if case.has_xml else None) or MONUSEG_MPP
        t0 = time.perf_counter()
        pred = segment(rgb, mpp, cfg)
        secs = time.perf_counter() - t0
        gt = gt_of(case)
        scores = segmentation_scores(pred, gt)
        rows[case.stem] = {
            **scores,
            "n_pred": int(pred.max()),
            "n_gt": len(np.unique(gt)) - 1,
            "seconds": secs,
        }
        print(
            f"{case.stem:26s} "
            + " ".join(f"{scores[k]:11.3f}" for k in KEYS)
            + f" {pred.max():7d} {rows[case.stem]['n_gt']:6d} {secs:6.2f}"
        )
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in (*KEYS, "seconds")}
    print(
        f"{'MEAN':26s} "
        + " ".join(f"{mean[k]:11.3f}" for k in KEYS)
        + f" {'':7s} {'':6s} {mean['seconds']:6.2f}"
    )
    return {"images": rows, "mean": mean}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the monuseg-train folder")
    ap.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"MoNuSeg data not found: {args.data}", file=sys.stderr)
        return 2
    cfg = InstanceConfig()
    cases = monuseg_cases(args.data)
    with_xml = [c for c in cases if c.has_xml]
    mask_only = [c for c in cases if not c.has_xml]
    mask_dir = args.data / "derived_instance_color_masks_ykrmm"
    print(
        f"haematoxylin (rgb2hed) + Otsu + split_instances; {cfg!r}; mpp from the XML, else {MONUSEG_MPP}"
    )
    report = {
        "config": cfg.model_dump(),
        "xml": run_block(
            "MoNuSeg images with XML ground truth", with_xml, load_monuseg_labels, cfg
        ),
        "mask_only": run_block(
            "MoNuSeg images with derived colour masks only", mask_only, load_monuseg_labels, cfg
        ),
        "xml_images_vs_masks": run_block(
            "the XML images scored against their derived colour masks instead",
            with_xml,
            lambda c: load_instance_png(mask_dir / f"{c.stem}.png", merge_overlaps=True),
            cfg,
        ),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
