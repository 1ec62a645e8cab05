"""``segment`` + ``eval`` on MoNuSeg: the accuracy of wsi-psm's default label-free nuclei.

Runs :func:`wsi_psm.segment.segment_images` with the default options (``RunConfig()``, no model:
the model shipped in the package) and ``--mpp 0.25`` on the MoNuSeg training images, then
:func:`wsi_psm.evaluation.evaluate_segmentation` against the annotations. Prints per-image and mean
pixel F1 / object Dice / AJI / PQ for the 13 images with XML ground truth and, separately, for the 17
images that only have derived colour masks (approximate ground truth; note that the shipped model
was trained, label-free, on those 17 images' pixels), plus wall time.

Ablation (the method's question "does the downstream network improve on the pseudo masks it was
trained on?"): the same images through the pseudo-mask stage of the model (PSM + stain clustering,
split into nuclei by the same distance watershed), scored the same way.

Run from the repository root (2 CPU cores: about 3 minutes, plus about 1 minute for the ablation):

    .venv/bin/python benchmarks/monuseg_segment.py [--data ../shared/data/monuseg-train]
        [--model FILE] [--target-mpp MPP] [--dev-only] [--out DIR] [--json out.json] [--no-ablation]

``--target-mpp`` (processing resolution) defaults to the one the model was trained at (recorded in
its segmenter meta), else ``RunConfig().target_mpp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_psm.allocator import tune_malloc
from wsi_psm.config import RunConfig
from wsi_psm.evaluation import SEGMENTATION_KEYS, evaluate_segmentation
from wsi_psm.groundtruth import load_monuseg_labels, monuseg_cases
from wsi_psm.instances import split_instances
from wsi_psm.metrics import segmentation_scores
from wsi_psm.networks import DEFAULT_MODEL, model_mpp, pseudo_masks_per_image
from wsi_psm.segment import segment_images
from wsi_psm.slide import Slide

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg-train"
MONUSEG_MPP = 0.25
KEYS = ("pixel_f1", "object_dice", "aji", "pq")


def print_block(title: str, rows: dict[str, dict[str, float]], seconds: dict[str, float]) -> dict:
    print(f"\n{title} ({len(rows)} images)")
    print(
        f"{'image':26s} "
        + " ".join(f"{k:>11s}" for k in KEYS)
        + f" {'n_pred':>7s} {'n_gt':>6s} {'s':>6s}"
    )
    for stem, r in rows.items():
        print(
            f"{stem:26s} " + " ".join(f"{r[k]:11.3f}" for k in KEYS)
            + f" {r.get('n_pred', 0):7d} {r.get('n_gt', 0):6d} {seconds.get(stem, float('nan')):6.2f}"
        )  # fmt: skip
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in SEGMENTATION_KEYS}
    print(f"{'MEAN':26s} " + " ".join(f"{mean[k]:11.3f}" for k in KEYS))
    return {"images": rows, "mean": mean}


def pseudo_mask_ablation(model_path: Path, cases: list, cfg: RunConfig) -> dict[str, dict]:
    """Scores of the pseudo masks the model's segmenter was trained on, made the same way (the
    bundle's PSM, one clustering per image, split into nuclei by ``split_instances``), per image."""
    from wsi_psm.model import ModelBundle

    bundle = ModelBundle.load(model_path)
    dev = torch.device("cpu")
    rows = {}
    for c in cases:
        with Slide.open(c.image, mpp=MONUSEG_MPP) as s:
            rgb = s.read_at_mpp(0, 0, s.width, s.height, cfg.target_mpp)
            shape = (s.height, s.width)
        mask = pseudo_masks_per_image(bundle, [rgb], cfg, device=dev)[0]
        lab = split_instances(mask, mpp=cfg.target_mpp, cfg=cfg.instances)
        # nearest resampling to the image's pixels (same area)
        rr = np.minimum(
            ((np.arange(shape[0]) + 0.5) * lab.shape[0] / shape[0]).astype(int), lab.shape[0] - 1
        )
        cc = np.minimum(
            ((np.arange(shape[1]) + 0.5) * lab.shape[1] / shape[1]).astype(int), lab.shape[1] - 1
        )
        pred = lab[rr[:, None], cc[None, :]]
        gt = load_monuseg_labels(c)
        rows[c.stem] = {
            **segmentation_scores(pred, gt),
            "n_pred": int(pred.max()),
            "n_gt": int(len(np.unique(gt)) - 1),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the monuseg-train folder")
    ap.add_argument("--model", type=Path, help="segment with this model instead of the default")
    ap.add_argument("--out", type=Path, help="keep the outputs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    ap.add_argument("--no-ablation", action="store_true", help="skip the pseudo-mask ablation")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--fit", action="store_true",
        help="instead of the shipped model, fit on the images segmented (segmenter.default_model=fit)",
    )  # fmt: skip
    ap.add_argument("--xml-only", action="store_true", help="segment only the 13 images with XML")
    ap.add_argument(
        "--dev-only", action="store_true",
        help="segment only the 17 mask-only images (the dev set; the XML test set stays unscored)",
    )  # fmt: skip
    ap.add_argument(
        "--target-mpp", type=float,
        help="processing resolution, µm/px (default: the model's recorded one, else RunConfig's)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    tune_malloc()  # as the CLI does
    if not args.data.is_dir():
        print(f"MoNuSeg data not found: {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    mpp = args.target_mpp
    if mpp is None and not args.fit:
        mpp = model_mpp(args.model or DEFAULT_MODEL)
    cfg = RunConfig().with_updates(target_mpp=mpp)
    if args.fit:
        cfg = cfg.with_updates(**{"segmenter.default_model": "fit"})
    cases = monuseg_cases(args.data)
    if args.xml_only:
        cases = [c for c in cases if c.has_xml]
    if args.dev_only:
        cases = [c for c in cases if not c.has_xml]
    xml = [c for c in cases if c.has_xml]
    mask_only = [c for c in cases if not c.has_xml]
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="wsi-psm-monuseg-")
        out = Path(tmp.name) / "segment"
    seconds: dict[str, float] = {}
    model = args.model
    what = "fitted on the images segmented" if args.fit else (model or DEFAULT_MODEL)
    print(f"segment: default options, mpp {MONUSEG_MPP}, processing at {cfg.target_mpp} µm/px, "
          f"model {what}, device {cfg.device}")  # fmt: skip
    t0 = time.perf_counter()
    segment_images(
        [c.image for c in cases], out, cfg, model=model, mpp=MONUSEG_MPP, overwrite=True,
        on_image=lambda p, n, s: seconds.__setitem__(Path(p).stem, s),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    print(f"segment wall time: {wall:.1f} s for {len(cases)} images ({wall / len(cases):.2f} s/image, "
          f"{torch.get_num_threads()} torch threads)")  # fmt: skip
    ev = evaluate_segmentation(out, args.data)
    rows = ev["images"]
    report = {"config": cfg.to_dict(), "model": str(what), "wall_seconds": wall}
    if xml:
        report["xml"] = print_block(
            "MoNuSeg images with XML ground truth", {c.stem: rows[c.stem] for c in xml}, seconds
        )
    if mask_only:
        report["mask_only"] = print_block(
            "MoNuSeg images with derived colour masks only (the default model's unlabelled training images)",
            {c.stem: rows[c.stem] for c in mask_only}, seconds,
        )  # fmt: skip
    if not args.no_ablation and not args.fit and not args.xml_only:
        try:
            abl = pseudo_mask_ablation(model or DEFAULT_MODEL, cases, cfg)
        except Exception as err:  # a stand-alone segmenter file carries no pseudo-mask model
            print(f"\n(ablation skipped: {err})")
        else:
            blocks = {}
            if xml:
                blocks["xml"] = print_block(
                    "ablation: the pseudo masks the network was trained on, XML images",
                    {c.stem: abl[c.stem] for c in xml}, {},
                )  # fmt: skip
            blocks["mask_only"] = print_block("ablation: pseudo masks, mask-only images",
                                              {c.stem: abl[c.stem] for c in mask_only}, {})  # fmt: skip
            report["ablation_pseudo_masks"] = blocks
            print("\nnetwork minus pseudo masks (mean):")
            for key, name in (("xml", "XML"), ("mask_only", "mask-only")):
                if key not in blocks:
                    continue
                net_b, ps_b = report[key], blocks[key]
                print(f"  {name:10s} " + " ".join(
                    f"{k} {net_b['mean'][k] - ps_b['mean'][k]:+.3f}" for k in KEYS))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
