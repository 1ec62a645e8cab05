"""Ki-67 positive / negative cell detection on the BCData sample, label-free, at a 10 px radius.

Nuclei are found without labels, the cell classifier (wsi_psm.classes) is fitted once on all the
images' cells (a cohort fit: no annotation is read until scoring), every cell is named through the
pipeline's own path (polygons -> ``CellClassifier.annotate``), and the cell centroids are matched
one-to-one to the annotated points within the radius.

Three views of the result, so detection errors and class errors are not confused:

- per class P/R/F1 and their mean (the issue's number), pooled over images and mean over images,
  count MAE per class and the Ki-67 index error per image;
- class-agnostic detection (every cell against every point): what the nucleus detector gets right;
- classification among matched cells: of the cells matched to a point, how many carry the point's
  class (accuracy and the 2x2 confusion).

Nucleus detector: ``--detector standin`` (default) is the classical stand-in used until the project's
segmenter (wsi_psm.segment) lands: haematoxylin and DAB optical density (colour deconvolution with
the cohort's Macenko stain vectors), Gaussian smoothing, two masks with Otsu thresholds on log OD
fitted on the cohort's pixels (DAB first, then haematoxylin among the non-DAB pixels), each split by
the pipeline's ``split_instances``; DAB nuclei win where the two overlap. ``--detector segment``
uses the downstream network ``segment`` ships (wsi_psm/models/default.pt). ``--detector points`` is a diagnostic that
places a 2 µm disc at every annotated point (perfect detection; the point classes are not used), so
the classifier can be measured alone.

Scale: BCData gives no pixel size. ``--mpp`` (default 0.25 µm/px, i.e. 40x) sets the physical sizes
(nucleus area limits, seed distance, ring width); nearest annotated neighbours are 21 px apart at the
5th percentile and 34 px at the median, consistent with 7-9 µm nuclei at 0.25 µm/px.
``--process-mpp`` resamples the images before detection (e.g. 0.5, the pipeline's default), and the
centroids are mapped back to the image's pixels before matching.

Run from the repository root:

    .venv/bin/python benchmarks/bcdata_detect.py [--data ../shared/data/bcdata-sample] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from wsi_psm.allocator import tune_malloc
from wsi_psm.classes import CellClassifier
from wsi_psm.config import ClassConfig, InstanceConfig, RunConfig
from wsi_psm.groundtruth import BCDATA_CLASSES, bcdata_cases, load_bcdata_points
from wsi_psm.instances import split_instances
from wsi_psm.metrics import detection_scores, match_points
from wsi_psm.polygons import labels_to_polygons
from wsi_psm.stain import estimate_stain_matrix, stain_channels
from wsi_psm.stitching import Candidate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bcdata-sample"
EPS = 0.01  # added to OD before logs


# --------------------------------------------------------------------------- stand-in detector


def _smoothed_channels(
    img: np.ndarray, matrix: np.ndarray, sigma_px: float
) -> tuple[np.ndarray, np.ndarray]:
    ch = stain_channels(img, "ihc-dab", matrix)
    return (
        ndi.gaussian_filter(ch["haematoxylin"], sigma_px),
        ndi.gaussian_filter(ch["dab"], sigma_px),
    )


def standin_thresholds(
    images: list[np.ndarray], matrix: np.ndarray, sigma_px: float, seed: int = 0
) -> tuple[float, float]:
    """(haematoxylin, DAB) OD thresholds, fitted on a pixel sample of the whole cohort (label-free).

    DAB: Otsu on log DAB of all pixels (brown vs not). Haematoxylin: Otsu on log haematoxylin of the
    pixels below the DAB threshold (blue nuclei vs pale cytoplasm and stroma). Logs because stain
    amounts spread multiplicatively; on this sample they land at OD ~0.27 and ~0.13.
    """
    rng = np.random.default_rng(seed)
    hs, ds = [], []
    for img in images:
        h, d = _smoothed_channels(img, matrix, sigma_px)
        pick = rng.choice(h.size, size=min(h.size, 20_000), replace=False)
        hs.append(h.ravel()[pick])
        ds.append(d.ravel()[pick])
    h, d = np.concatenate(hs), np.concatenate(ds)
    t_dab = float(np.exp(threshold_otsu(np.log(d + EPS))) - EPS)
    t_h = float(np.exp(threshold_otsu(np.log(h[d < t_dab] + EPS))) - EPS)
    return t_h, t_dab


def standin_nuclei(
    img: np.ndarray,
    *,
    mpp: float,
    matrix: np.ndarray,
    thresholds: tuple[float, float],
    sigma_um: float = 0.5,
    gap_um: float = 1.5,
    cfg: InstanceConfig | None = None,
) -> np.ndarray:
    """Instance labels: DAB nuclei, then haematoxylin nuclei not within ``gap_um`` of a DAB nucleus.

    Separate masks keep a brown nucleus and a touching blue one apart (one mask merges them, and
    the merged object takes one class); the gap keeps the blue rim of a brown nucleus from becoming
    a second, negative cell.
    """
    t_h, t_dab = thresholds
    h, d = _smoothed_channels(img, matrix, sigma_um / mpp)
    pos = split_instances(d > t_dab, mpp=mpp, cfg=cfg)
    near = ndi.binary_dilation(pos > 0, iterations=max(1, round(gap_um / mpp)))
    neg = split_instances((h > t_h) & ~near, mpp=mpp, cfg=cfg)
    out = np.where(neg > 0, neg + pos.max(), 0)
    return np.where(pos > 0, pos, out).astype(np.int32)


# --------------------------------------------------------------------------- helpers


def _point_discs(shape: tuple[int, int], xy: np.ndarray, r_px: float) -> np.ndarray:
    """Label image with a disc of radius ``r_px`` at each (x, y); overlaps go to the later point."""
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k, (x, y) in enumerate(xy, start=1):
        y0, y1 = max(0, int(y - r_px - 1)), min(shape[0], int(y + r_px + 2))
        x0, x1 = max(0, int(x - r_px - 1)), min(shape[1], int(x + r_px + 2))
        sub = (yy[y0:y1, x0:x1] + 0.5 - y) ** 2 + (xx[y0:y1, x0:x1] + 0.5 - x) ** 2 <= r_px**2
        labels[y0:y1, x0:x1][sub] = k
    # a disc cut in two by a later one keeps only its largest piece downstream; drop the rest here
    return labels


def _resample(img: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1.0) < 1e-9:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def cells_of(
    img: np.ndarray, labels: np.ndarray, clf: CellClassifier, *, scale: float, mpp_l0: float
) -> tuple[np.ndarray, list[str]]:
    """Name the cells of one image through the pipeline's path; centroids (x, y) in image px."""
    polys = labels_to_polygons(labels, scale=scale)
    cands = [
        Candidate(0, p, float(p.centroid.x), float(p.centroid.y), True, label=lab)
        for lab, p in polys
    ]
    clf.annotate(img, labels, cands, mpp_l0)
    xy = np.array([[c.cx, c.cy] for c in cands]).reshape(-1, 2)
    return xy, [c.payload[0] for c in cands]


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
    }


# --------------------------------------------------------------------------- benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = bcdata_cases(args.data)
    images = [np.asarray(Image.open(c.image).convert("RGB")) for c in cases]
    factor = args.mpp / args.process_mpp  # image px -> processing px
    proc = [_resample(im, factor) for im in images]
    t0 = time.perf_counter()

    if args.detector == "standin":
        matrix = estimate_stain_matrix(proc, "ihc-dab", seed=args.seed)
        sigma_px = 0.5 / args.process_mpp
        thr = standin_thresholds(proc, matrix, sigma_px, args.seed)
        labels = [
            standin_nuclei(im, mpp=args.process_mpp, matrix=matrix, thresholds=thr) for im in proc
        ]
        detector_info = {
            "detector": "standin",
            "thresholds_od": {"haematoxylin": thr[0], "dab": thr[1]},
        }
    elif args.detector == "points":
        # diagnostic only: perfect detection (a disc at every annotated point, classes unused), to
        # measure the classifier alone; the classes are still fitted without labels
        r_px = 2.0 / args.process_mpp
        labels = []
        for case, im in zip(cases, proc, strict=True):
            pts = load_bcdata_points(case.annotation, case.stem)
            xy = np.concatenate([pts[k] for k in BCDATA_CLASSES]) * factor
            labels.append(_point_discs(im.shape[:2], xy, r_px))
        detector_info = {"detector": "points (annotation discs, diagnostic)"}
    elif args.detector == "pipeline":
        # what `run` does on an IHC slide: one bundle (activation net + two-stage DAB / haematoxylin
        # clustering) fitted on the images' pixels as if they were one slide, pseudo masks split by
        # the watershed (no downstream network: see networks.attach_segmenter)
        from wsi_psm.inference import make_predictor
        from wsi_psm.model import fit_model

        rc = RunConfig(target_mpp=args.process_mpp, stain=args.stain, seed=args.seed)
        cpu = torch.device("cpu")
        pred, _, _ = make_predictor(fit_model(proc, rc, device=cpu), device=cpu, cfg=rc)
        labels = [pred.labels(im, pred.network(im[None])[0]) for im in proc]
        detector_info = {"detector": "pipeline (PSM pseudo masks + watershed, as run on IHC)"}
    else:
        # the downstream network that `segment` uses by default (the shipped model), read out at
        # the processing resolution with the run's thresholds
        from wsi_psm.networks import default_model
        from wsi_psm.segmenter.predict import predict_maps
        from wsi_psm.segmenter.readout import instances_from_maps

        rc = RunConfig(target_mpp=args.process_mpp, stain=args.stain, seed=args.seed)
        cpu = torch.device("cpu")
        if args.detector == "segment-fit":
            # `segment`'s "fit" default: the whole label-free chain fitted on these images' pixels
            from wsi_psm.networks import fit_on_images, resolve_model

            bundle = fit_on_images(proc, rc, device=cpu)
            net = resolve_model(bundle, paths=[], cfg=rc, mpp=None, device=cpu)
        else:
            net = default_model()
        labels = [
            instances_from_maps(
                predict_maps(net, im, cpu, window=rc.segmenter.window_px, tta=rc.segmenter.tta),
                mpp=args.process_mpp,
                cfg=rc,
            )
            for im in proc
        ]
        detector_info = {"detector": f"{args.detector} (downstream network)"}
    t_detect = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = ClassConfig()
    if args.fit == "cohort":
        clfs = [
            CellClassifier.fit(
                proc, labels, mpp=args.process_mpp, stain=args.stain, cfg=cfg, seed=args.seed
            )
        ]
        clfs *= len(proc)
    else:
        clfs = [
            CellClassifier.fit(
                [im], [lab], mpp=args.process_mpp, stain=args.stain, cfg=cfg, seed=args.seed
            )
            for im, lab in zip(proc, labels, strict=True)
        ]
    t_fit = time.perf_counter() - t0

    per_image: dict[str, Any] = {}
    tot = {k: [0, 0, 0] for k in (*BCDATA_CLASSES, "any")}
    confusion = np.zeros(
        (2, 2), dtype=np.int64
    )  # rows: annotated Positive/Negative; cols: predicted
    abs_count = {k: [] for k in BCDATA_CLASSES}
    index_err = []
    t0 = time.perf_counter()
    for case, im, lab, clf in zip(cases, proc, labels, clfs, strict=True):
        xy, names = cells_of(im, lab, clf, scale=1.0 / factor, mpp_l0=args.mpp)
        gt = {k: v + 0.5 for k, v in load_bcdata_points(case.annotation, case.stem).items()}
        names_arr = np.array(names, dtype=object)
        pred = {k: xy[names_arr == k] for k in BCDATA_CLASSES}
        s = detection_scores(pred, gt, args.radius)
        for k in BCDATA_CLASSES:
            c = s["classes"][k]
            tot[k][0] += c["tp"]
            tot[k][1] += c["fp"]
            tot[k][2] += c["fn"]
            abs_count[k].append(abs(c["n_pred"] - c["n_gt"]))
        # class-agnostic matching, then the class of each matched pair
        all_gt = np.concatenate([gt["Positive"], gt["Negative"]])
        gt_cls = np.r_[np.zeros(len(gt["Positive"]), int), np.ones(len(gt["Negative"]), int)]
        tp, fp, fn, pairs = match_points(xy, all_gt, args.radius)
        tot["any"][0] += tp
        tot["any"][1] += fp
        tot["any"][2] += fn
        pred_cls = np.array([0 if n == "Positive" else 1 for n in names], dtype=int)
        np.add.at(confusion, (gt_cls[pairs[:, 1]], pred_cls[pairs[:, 0]]), 1)
        idx_pred = clf.indices({k: len(pred[k]) for k in BCDATA_CLASSES}).get("ki67_index")
        n_gt = len(all_gt)
        idx_gt = len(gt["Positive"]) / n_gt if n_gt else None
        if idx_pred is not None and idx_gt is not None:
            index_err.append(abs(idx_pred - idx_gt))
        per_image[case.stem] = {
            "mean_f1": s["mean_f1"],
            **{f"{k.lower()}_f1": s["classes"][k]["f1"] for k in BCDATA_CLASSES},
            "detection_f1": _prf(tp, fp, fn)["f1"],
            "ki67_index_pred": idx_pred,
            "ki67_index_gt": idx_gt,
        }
    t_score = time.perf_counter() - t0

    pooled = {k: {"tp": v[0], "fp": v[1], "fn": v[2], **_prf(*v)} for k, v in tot.items()}
    n_matched = int(confusion.sum())
    return {
        "data": str(args.data),
        "n_images": len(cases),
        "mpp": args.mpp,
        "process_mpp": args.process_mpp,
        "radius_px": args.radius,
        "fit": args.fit,
        **detector_info,
        "classifier": clfs[0].to_state() if args.fit == "cohort" else None,
        "classifier_rule": clfs[0].describe() if args.fit == "cohort" else None,
        "pooled": pooled,
        "pooled_mean_f1": float(np.mean([pooled[k]["f1"] for k in BCDATA_CLASSES])),
        "image_mean_f1": float(np.mean([v["mean_f1"] for v in per_image.values()])),
        "image_mean_class_f1": {
            k: float(np.mean([v[f"{k.lower()}_f1"] for v in per_image.values()]))
            for k in BCDATA_CLASSES
        },
        "count_mae": {k: float(np.mean(v)) for k, v in abs_count.items()},
        "ki67_index_mae": float(np.mean(index_err)) if index_err else None,
        "classification": {
            "matched_cells": n_matched,
            "accuracy": float(np.trace(confusion) / n_matched) if n_matched else None,
            "confusion": {
                "annotated_positive": {
                    "Positive": int(confusion[0, 0]),
                    "Negative": int(confusion[0, 1]),
                },
                "annotated_negative": {
                    "Positive": int(confusion[1, 0]),
                    "Negative": int(confusion[1, 1]),
                },
            },
        },
        "images": per_image,
        "timings_s": {"detect": t_detect, "fit_classes": t_fit, "annotate_and_score": t_score},
    }


def report(r: dict[str, Any]) -> None:
    print(
        f"BCData sample: {r['n_images']} images, mpp {r['mpp']} (processed at {r['process_mpp']}), "
        f"radius {r['radius_px']} px, detector {r['detector']}, classes fitted per {r['fit']}"
    )
    if r.get("classifier_rule"):
        print(f"rule: {r['classifier_rule']}")
    print(f"\n{'class':10s} {'P':>6s} {'R':>6s} {'F1':>6s} {'F1/img':>7s} {'count MAE':>10s}")
    for k in BCDATA_CLASSES:
        p = r["pooled"][k]
        print(
            f"{k:10s} {p['precision']:6.3f} {p['recall']:6.3f} {p['f1']:6.3f} "
            f"{r['image_mean_class_f1'][k]:7.3f} {r['count_mae'][k]:10.2f}"
        )
    print(f"{'mean F1':10s} {'':6s} {'':6s} {r['pooled_mean_f1']:6.3f} {r['image_mean_f1']:7.3f}")
    a = r["pooled"]["any"]
    print(
        f"\ndetection, class-agnostic: P {a['precision']:.3f} R {a['recall']:.3f} F1 {a['f1']:.3f} "
        f"(tp {a['tp']}, fp {a['fp']}, fn {a['fn']})"
    )
    c = r["classification"]
    cf = c["confusion"]
    print(
        f"classification among {c['matched_cells']} matched cells: accuracy {c['accuracy']:.3f}; "
        f"annotated Positive -> {cf['annotated_positive']}, annotated Negative -> {cf['annotated_negative']}"
    )
    print(f"Ki-67 index MAE per image: {r['ki67_index_mae']:.3f}")
    t = r["timings_s"]
    print(
        f"time: detect {t['detect']:.1f} s, fit classes {t['fit_classes']:.1f} s, "
        f"annotate+score {t['annotate_and_score']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument(
        "--mpp", type=float, default=0.25, help="µm per pixel of the BCData images (assumed)"
    )
    ap.add_argument(
        "--process-mpp", type=float, default=None, help="resample to this before detection"
    )
    ap.add_argument("--radius", type=float, default=10.0, help="match radius in image pixels")
    ap.add_argument(
        "--detector",
        choices=("standin", "pipeline", "segment", "segment-fit", "points"),
        default="standin",
        help="points: discs at the annotated points (diagnostic: the classifier alone)",
    )
    ap.add_argument(
        "--fit",
        choices=("cohort", "image"),
        default="cohort",
        help="fit the classes once or per image",
    )
    ap.add_argument("--stain", choices=("auto", "ihc-dab"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args(argv)
    tune_malloc()  # as the CLI does
    args.process_mpp = args.process_mpp or args.mpp
    if not args.data.is_dir():
        print(f"BCData folder not found: {args.data}", file=sys.stderr)
        return 2
    r = run(args)
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
