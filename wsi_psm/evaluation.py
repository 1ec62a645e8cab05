"""``wsi-psm eval``: score a folder of predictions against a folder of annotations, matched by name.

Segmentation (MoNuSeg-style): predictions are ``<stem>_labels.tif`` integer label images, or cell
polygons in image pixels (``<stem>.geojson``, ``<stem>.geojson.gz`` or a run folder
``<stem>/cells.geojson[.gz]``), rasterised with the pixel-centre rule of DESIGN.md's pixel-corner
convention (later features win where they overlap). Ground truth is a MoNuSeg folder (XML where
present, else the derived colour mask), or a folder of ``<stem>.xml`` / label images / colour PNGs /
``<stem>.geojson`` outlines (as QuPath exports nucleus annotations).

Detection (BCData-style): prediction polygons (or points) reduced to centroids, matched one-to-one to
the annotated points within a radius, per class (Positive / Negative). Points come from BCData's
``.h5`` files, or from ``<stem>.geojson`` (QuPath point annotations) / ``<stem>.csv`` /
``<stem>.json`` (SHIDC-B-Ki-67's point records) files.

Both return plain dicts (the CLI renders them); annotations are only ever read here, for measuring.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsi_psm.classes import positive_index
from wsi_psm.discovery import TILE_SUFFIXES
from wsi_psm.errors import WsiPsmError
from wsi_psm.groundtruth import (
    BCDATA_CLASSES,
    POINT_SUFFIXES,
    AnnotationError,
    is_point_csv,
    is_point_list,
    load_bcdata_points,
    load_instance_png,
    load_label_image,
    load_monuseg_xml,
    load_point_annotations,
    monuseg_cases,
    point_list,
    read_geojson_features,
)
from wsi_psm.metrics import detection_scores, prf, segmentation_scores

SEGMENTATION_KEYS = ("pixel_f1", "object_dice", "aji", "pq", "dq", "sq")
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".mat")


class EvaluationError(WsiPsmError):
    """The prediction or ground-truth folder is missing, empty, unreadable, or nothing matches."""


# --------------------------------------------------------------------------- finding files


def _strip_labels(stem: str) -> str:
    return stem[: -len("_labels")] if stem.endswith("_labels") else stem


def _geojson_stem(path: Path) -> str | None:
    name = path.name
    for ext in (".geojson.gz", ".geojson"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _require_folder(path: Path, what: str) -> None:
    """EvaluationError (one line) unless ``path`` is a folder; a file there is named as such."""
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "folder not found"
        raise EvaluationError(f"{what} {state}: {path}")


def _find_predictions(folder: Path, *, labels: bool = True) -> dict[str, Path]:
    """stem -> prediction file; a label image wins over polygons of the same stem."""
    _require_folder(folder, "prediction")
    found: dict[str, Path] = {}
    for sub in sorted(
        p for p in folder.iterdir() if p.is_dir()
    ):  # run folders: <stem>/cells.geojson
        for name in ("cells.geojson", "cells.geojson.gz"):
            if (sub / name).is_file():
                found.setdefault(sub.name, sub / name)
    for p in sorted(folder.iterdir()):
        stem = _geojson_stem(p)
        if stem is not None and p.is_file():
            found[stem] = p
    if labels:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in (".tif", ".tiff") and p.stem.endswith("_labels"):
                found[_strip_labels(p.stem)] = p
    return found


def _find_segmentation_gt(folder: Path) -> dict[str, tuple[Path, str]]:
    """stem -> (annotation file, kind) with kind one of "xml", "mask", "labels", "geojson"."""
    _require_folder(folder, "ground-truth")
    if (folder / "images").is_dir() and (folder / "annotations").is_dir():
        try:
            cases = monuseg_cases(folder)
        except AnnotationError as err:
            raise EvaluationError(str(err)) from err
        return {c.stem: (c.annotation, "xml" if c.has_xml else "mask") for c in cases}
    found: dict[str, tuple[Path, str]] = {}
    # a folder of a MoNuSeg root (its derived colour masks, given directly): read as the root
    # reads them, so a score does not depend on which of the two paths was given
    parent = folder.resolve().parent
    in_monuseg = (parent / "images").is_dir() and (parent / "annotations").is_dir()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES:
            kind = "mask" if in_monuseg and p.suffix.lower() == ".png" else "labels"
            found.setdefault(_strip_labels(p.stem), (p, kind))
    for stem, p in _point_files(folder).items():  # outlines exported from QuPath (beside their
        if p.suffix.lower() == ".geojson":  # tiles, perhaps: the GeoJSON is the annotation)
            found[stem] = (p, "geojson")
    for p in sorted(folder.iterdir()):  # XML wins over an image of the same stem
        if p.is_file() and p.suffix.lower() == ".xml":
            found[p.stem] = (p, "xml")
    return found


def _match(
    pred: dict[str, Any], gt: dict[str, Any], pred_dir: Path, gt_dir: Path, *, labels: bool = True
) -> list[str]:
    if not pred:
        expected = "<stem>_labels.tif, " if labels else "for detection, with cell classes: "
        raise EvaluationError(
            f"no predictions in {pred_dir} (expected {expected}<stem>.geojson[.gz] "
            "or <stem>/cells.geojson)"
        )
    if not gt:
        raise EvaluationError(
            f"no ground truth in {gt_dir}"
            + _csv_hint(gt_dir, " (expected MoNuSeg XML, label images, QuPath GeoJSON, "
                        "<stem>.csv / <stem>.json points or BCData)")
        )  # fmt: skip
    common = sorted(set(pred) & set(gt))
    if not common:

        def few(names: Any) -> str:
            names = sorted(names)
            return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

        raise EvaluationError(
            f"no prediction matches a ground truth by name: {len(pred)} predictions in {pred_dir} "
            f"({few(pred)}), {len(gt)} ground truths in {gt_dir} ({few(gt)})"
        )
    return common


# --------------------------------------------------------------------------- reading predictions


def _read_features(path: Path) -> list[dict[str, Any]]:
    try:
        return read_geojson_features(path)
    except AnnotationError as err:
        raise EvaluationError(str(err)) from err


def rasterise_features(features: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Polygons in image px -> int32 labels (feature i -> i + 1); a pixel belongs to a polygon when its
    centre (c + 0.5, r + 0.5) lies inside. Non-polygon features are ignored."""
    from rasterio.features import rasterize

    shapes = [
        (f["geometry"], i)
        for i, f in enumerate(features, start=1)
        if f["geometry"].get("type") in ("Polygon", "MultiPolygon")
    ]
    if not shapes:
        return np.zeros(shape, dtype=np.int32)
    return rasterize(shapes, out_shape=shape, fill=0, dtype="int32")


def _check_inside(features: list[dict[str, Any]], shape: tuple[int, int], path: Path) -> None:
    """Polygons that reach past the ground truth image are another image's (or scale's): scored,
    they would be cut off silently (a label image of another shape is refused the same way)."""
    import shapely.geometry

    polys = [
        shapely.geometry.shape(f["geometry"])
        for f in features
        if f["geometry"].get("type") in ("Polygon", "MultiPolygon")
    ]
    if not polys:
        return
    x1 = max(p.bounds[2] for p in polys)
    y1 = max(p.bounds[3] for p in polys)
    h, w = shape
    if x1 > w + 1 or y1 > h + 1:  # (1 px of slack for outlines along the image's edge)
        raise EvaluationError(
            f"{path}: cells reach x {x1:.0f}, y {y1:.0f} px, outside the ground truth image "
            f"({w} x {h} px): predictions of another image, or at another scale?"
        )


def load_prediction_labels(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Prediction instance labels of one image, from a label TIFF or a GeoJSON of polygons."""
    if _geojson_stem(path) is not None:
        feats = _read_features(path)
        if feats and not any(
            f["geometry"].get("type") in ("Polygon", "MultiPolygon") for f in feats
        ):
            raise EvaluationError(f"{path} holds no polygons (points? use detection evaluation)")
        _check_inside(feats, shape, path)
        return rasterise_features(feats, shape)
    try:
        labels = load_label_image(path)
    except AnnotationError as err:
        raise EvaluationError(str(err)) from err
    if labels.shape != tuple(shape):
        raise EvaluationError(
            f"{path.name}: prediction shape {labels.shape} != ground truth shape {tuple(shape)}"
        )
    return labels


def _centroids_by_class(path: Path, class_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Centroid (x, y) of every polygon or point, grouped by classification name.

    Names equal to a ground-truth class up to case take that class's spelling; others are kept.
    """
    import shapely.geometry

    canon = {c.lower(): c for c in class_names}
    points: dict[str, list[tuple[float, float]]] = {c: [] for c in class_names}
    for f in _read_features(path):
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else cls
        name = canon.get(str(name).lower(), str(name)) if name is not None else "Unclassified"
        try:
            geom = shapely.geometry.shape(f["geometry"])
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise EvaluationError(f"{path}: bad geometry: {err}") from err
        if geom.is_empty:
            continue
        c = geom.centroid
        points.setdefault(name, []).append((c.x, c.y))
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 2) for k, v in points.items()}


# --------------------------------------------------------------------------- segmentation


def _load_gt_labels(path: Path, kind: str, merge_colour_overlaps: bool) -> np.ndarray:
    try:
        if kind == "xml":
            return load_monuseg_xml(path)
        if kind == "mask":  # a derived MoNuSeg mask: its overlap colours are not nuclei
            return load_instance_png(path, merge_overlaps=True)
        if path.suffix.lower() == ".png" and merge_colour_overlaps:
            return load_instance_png(path, merge_overlaps=True)
        return load_label_image(path)
    except AnnotationError as err:
        raise EvaluationError(str(err)) from err


def _image_shape(gt_labels_dir: Path, stem: str) -> tuple[int, int] | None:
    """The image size for a raster of outlines (XML, GeoJSON), when the image sits next to them
    (or in ``../images``, MoNuSeg's layout)."""
    from PIL import Image

    for folder in (gt_labels_dir.parent / "images", gt_labels_dir):
        for suffix in (".tif", ".tiff", ".png", ".jpg", ".jpeg"):
            cand = folder / f"{stem}{suffix}"
            if not cand.is_file():
                continue
            if suffix in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(cand) as tf:
                    page = tf.pages[0]
                    return int(page.shape[0]), int(page.shape[1])
            with Image.open(cand) as im:  # (reads the header only)
                return im.height, im.width
    return None


def _mean(rows: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}


def evaluate_segmentation(
    pred: str | Path, gt: str | Path, *, merge_colour_overlaps: bool = False
) -> dict[str, Any]:
    """Per-image and mean pixel F1, object Dice, AJI and PQ (with DQ, SQ) of predictions matched by stem.

    An XML is rasterised at the size of its image when the image is found (MoNuSeg layout), else at
    the size of a label-image prediction, else at MoNuSeg's 1000 x 1000. ``merge_colour_overlaps``
    reads colour PNGs of a plain folder like the derived MoNuSeg masks (always done for a MoNuSeg
    root folder); see ``groundtruth.merge_overlap_fragments``.

    Returns ``{"task": "segmentation", "pred", "gt", "n_images", "images": {stem: {metric: value,
    "n_pred", "n_gt", "gt_kind", "pred_file"}}, "mean": {metric: value}, "unmatched_pred",
    "unmatched_gt"}``. Raises :class:`EvaluationError` when a folder is missing or nothing matches.
    """
    pred_dir, gt_dir = Path(pred), Path(gt)
    preds = _find_predictions(pred_dir)
    gts = _find_segmentation_gt(gt_dir)
    common = _match(preds, gts, pred_dir, gt_dir)
    rows: dict[str, dict[str, Any]] = {}
    for stem in common:
        gt_path, kind = gts[stem]
        regions = 0
        if kind == "xml":
            shape = _image_shape(gt_path.parent, stem)
            if shape is None:  # no image beside the XML: take the size from a label prediction
                shape = _prediction_shape(preds[stem])
            gt_labels = (
                load_monuseg_xml(gt_path, shape=shape)
                if shape
                else _load_gt_labels(gt_path, kind, merge_colour_overlaps)
            )
        elif kind == "geojson":
            gt_labels, regions = _outline_labels(gt_path, preds[stem], stem)
        else:
            gt_labels = _load_gt_labels(gt_path, kind, merge_colour_overlaps)
        pred_labels = load_prediction_labels(preds[stem], gt_labels.shape)
        scores = segmentation_scores(pred_labels, gt_labels)
        rows[stem] = {
            **{k: float(scores[k]) for k in SEGMENTATION_KEYS},
            "n_pred": int(len(np.unique(pred_labels)) - (1 if (pred_labels == 0).any() else 0)),
            "n_gt": int(len(np.unique(gt_labels)) - (1 if (gt_labels == 0).any() else 0)),
            "gt_kind": kind,
            "ignored_gt_regions": regions,
            "pred_file": preds[stem].name
            if preds[stem].parent == pred_dir
            else str(preds[stem].relative_to(pred_dir)),
        }
    return {
        "task": "segmentation",
        "pred": str(pred_dir),
        "gt": str(gt_dir),
        "n_images": len(rows),
        "images": rows,
        "mean": _mean(rows, SEGMENTATION_KEYS),
        "unmatched_pred": sorted(set(preds) - set(gts)),
        "unmatched_gt": sorted(set(gts) - set(preds)),
        "ignored_gt_regions": sum(r["ignored_gt_regions"] for r in rows.values()),
    }


def _outline_labels(gt_path: Path, pred_path: Path, stem: str) -> tuple[np.ndarray, int]:
    """Ground-truth outlines of a GeoJSON (QuPath's export of nucleus annotations) as labels, at
    the size of a label-image prediction, else of the image beside them, else of the extent of both
    (a prediction of polygons: nothing beyond either is scored); and the number of region outlines
    left out. A file without outlines is an image without nuclei."""
    import shapely
    import shapely.geometry

    feats = [
        f
        for f in _read_features(gt_path)
        if f["geometry"].get("type") in ("Polygon", "MultiPolygon")
    ]
    # a region drawn around the nuclei (QuPath's annotated field) is no nucleus: an outline that
    # holds two or more other outlines' centres is left out
    regions = 0
    if len(feats) > 2:
        geoms = np.array([shapely.geometry.shape(f["geometry"]) for f in feats], dtype=object)
        inside = shapely.STRtree(shapely.point_on_surface(geoms)).query(geoms, "contains")
        holds = np.bincount(inside[0], minlength=len(geoms)) - 1  # (each holds its own point)
        regions = int((holds >= 2).sum())
        feats = [f for f, n in zip(feats, holds, strict=True) if n < 2]
    shape = _prediction_shape(pred_path) or _image_shape(gt_path.parent, stem)
    if shape is None:
        both = feats + _read_features(pred_path)
        bounds = [shapely.geometry.shape(f["geometry"]).bounds for f in both] or [(0, 0, 1, 1)]
        shape = (
            int(np.ceil(max(b[3] for b in bounds))),
            int(np.ceil(max(b[2] for b in bounds))),
        )
    return rasterise_features(feats, shape), regions


def _prediction_shape(path: Path) -> tuple[int, int] | None:
    if _geojson_stem(path) is not None:
        return None
    try:
        arr = load_label_image(path)
    except AnnotationError:
        return None
    return int(arr.shape[0]), int(arr.shape[1])


# --------------------------------------------------------------------------- detection


def _bcdata_dir(gt_dir: Path) -> Path | None:
    for cand in (gt_dir, gt_dir / "test", gt_dir / "annotations" / "test"):
        if (cand / "positive").is_dir():
            return cand
    return None


def _point_files(gt_dir: Path) -> dict[str, Path]:
    """stem -> ``<stem>.geojson`` / ``.csv`` / ``.json`` point annotations (GeoJSON wins) in ``gt_dir``;
    a file named after the whole image name (``<stem>.png.geojson``) counts as ``<stem>``."""
    found: dict[str, Path] = {}
    for p in sorted(gt_dir.iterdir(), key=lambda p: (p.suffix.lower() == ".geojson", p.name)):
        if p.is_file() and p.suffix.lower() in POINT_SUFFIXES and _may_hold_points(p):
            stem = Path(p.stem)
            found[stem.stem if stem.suffix.lower() in TILE_SUFFIXES else p.stem] = p
    return found


def _csv_hint(gt_dir: Path, otherwise: str) -> str:
    """Why a folder with CSVs held no ground truth: the first CSV is no point table."""
    csvs = sorted(p.name for p in gt_dir.glob("*.csv")) if gt_dir.is_dir() else []
    if csvs:
        return f": {csvs[0]} is not a point table (expected comma-separated columns x, y, class)"
    return otherwise


def _may_hold_points(path: Path) -> bool:
    """A GeoJSON, a CSV whose header names x, y and class (a dataset's manifest.csv does not), or
    a .json point list or GeoJSON (not, e.g., a COCO file or a config)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return is_point_csv(path)
    if suffix == ".json":  # (one that cannot be read is kept: its loader says why, in one line)
        try:
            return point_list(path) is not None or _geometry_kind(path) is not None
        except AnnotationError:
            return True
    return True


def is_detection_gt(gt_dir: str | Path) -> bool:
    """Whether ``gt_dir`` holds points (BCData ``.h5`` files, or point files beside no label
    image or XML) rather than outlines."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        return False
    if _bcdata_dir(gt_dir) is not None or any(gt_dir.rglob("*.h5")):
        return True
    if (gt_dir / "images").is_dir():  # another dataset root (MoNuSeg's: its manifest is no points)
        return False
    files = _point_files(gt_dir)
    # (an image named like a point file is its tile, beside it: not an annotation)
    outlines = any(
        p.suffix.lower() in (*LABEL_SUFFIXES, ".xml") and p.stem not in files
        for p in gt_dir.iterdir()
        if p.is_file()
    )
    if outlines or not files:
        return False
    # GeoJSON holds either: the first file with any geometry says which (points, or outlines)
    for path in files.values():
        listed = path.suffix.lower() == ".csv" or (
            path.suffix.lower() == ".json" and is_point_list(path)
        )
        kind = "points" if listed else _geometry_kind(path)
        if kind is not None:
            return kind == "points"
    return True  # (only empty files: nothing to outline)


def _geometry_kind(path: Path) -> str | None:
    """ "points" or "outlines" for a GeoJSON's features; None when it has none (or is unreadable:
    the reader of either kind says why)."""
    try:
        kinds = {f["geometry"].get("type") for f in _read_features(path)}
    except EvaluationError:
        return None
    if kinds & {"Point", "MultiPoint"}:
        return "points"
    return "outlines" if kinds else None


PointLoader = Callable[[], tuple[dict[str, np.ndarray], dict[str, int]]]


def _detection_gt(gt_dir: Path) -> dict[str, PointLoader]:
    """stem -> loader of its annotated points per class (continuous pixel coordinates) and the
    points not scored, by class name."""
    ann_dir = _bcdata_dir(gt_dir)
    if ann_dir is not None:

        def bcdata(stem: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
            # BCData's points are pixel indices; in the pixel-corner convention a pixel's
            # centre is +0.5
            return {k: v + 0.5 for k, v in load_bcdata_points(ann_dir, stem).items()}, {}

        stems = sorted(p.stem for p in (ann_dir / "positive").glob("*.h5"))
        return {s: functools.partial(bcdata, s) for s in stems}
    files = _point_files(gt_dir)
    if not files:
        raise EvaluationError(
            f"no point annotations under {gt_dir}"
            + _csv_hint(gt_dir, " (expected BCData's [annotations/test/]positive/<id>.h5, or "
                        "<stem>.geojson / <stem>.csv / <stem>.json point files)")
        )  # fmt: skip
    return {s: functools.partial(load_point_annotations, p) for s, p in files.items()}


def _iter_detection(
    preds: dict[str, Path], gt: dict[str, PointLoader], common: list[str]
) -> Iterator[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]]:
    for stem in common:
        try:
            gt_pts, ignored = gt[stem]()
        except AnnotationError as err:
            raise EvaluationError(str(err)) from err
        yield stem, _centroids_by_class(preds[stem], BCDATA_CLASSES), gt_pts, ignored


def _positive_index(classes: dict[str, Any]) -> dict[str, float | None]:
    """Positive / (Positive + Negative) of the predicted and the annotated counts of one image."""
    pred, gt = (
        positive_index({k: v[key] for k, v in classes.items()}) for key in ("n_pred", "n_gt")
    )
    return {
        "pred": pred,
        "gt": gt,
        "abs_error": None if pred is None or gt is None else abs(pred - gt),
    }


def evaluate_detection(pred: str | Path, gt: str | Path, radius_px: float = 10.0) -> dict[str, Any]:
    """Per-class detection scores of cell centroids against BCData points, matched within ``radius_px``.

    ``pred``: folder of ``<stem>.geojson[.gz]`` (or ``<stem>/cells.geojson``) whose features carry
    ``properties.classification.name`` Positive / Negative (any case); ``gt``: the BCData folder,
    its ``annotations`` folder, or ``annotations/test``; or a folder of ``<stem>.geojson`` point
    annotations (Point / MultiPoint, classified Positive / Negative, as QuPath exports them) or
    ``<stem>.csv`` (x, y, class), continuous pixel coordinates, or ``<stem>.json`` point records
    (SHIDC-B-Ki-67: x, y pixel indices, label_id 1 / 2). Points of other classes are not
    scored: their number is ``ignored_gt_points`` and their classes ``ignored_gt_classes`` (per
    image and in all); ``images_without_points`` names annotation files that hold none.

    Returns ``{"task": "detection", "radius_px", "n_images", "images": {stem: detection_scores},
    "mean": {class: {precision, recall, f1, abs_count_error}, "mean_f1", "overall_f1"} (means over
    images), "pooled": detection scores from the counts summed over images, "unmatched_pred",
    "unmatched_gt"}``. Each image also gets its ``positive_index`` (Positive / (Positive +
    Negative): the Ki-67 index on a Ki-67 stain) predicted and annotated, and their absolute
    error, whose mean over the images where both exist is ``mean["positive_index_abs_error"]``.
    """
    pred_dir, gt_dir = Path(pred), Path(gt)
    _require_folder(gt_dir, "ground-truth")
    preds = _find_predictions(pred_dir, labels=False)
    gt_points = _detection_gt(gt_dir)
    common = _match(preds, dict.fromkeys(gt_points), pred_dir, gt_dir, labels=False)
    images: dict[str, dict[str, Any]] = {}
    totals: dict[str, dict[str, int]] = {}
    for stem, p, g, ignored in _iter_detection(preds, gt_points, common):
        s = detection_scores(p, g, radius_px)
        s["positive_index"] = _positive_index(s["classes"])
        s["ignored_gt_points"] = sum(ignored.values())
        s["ignored_gt_classes"] = ignored
        images[stem] = s
        for name, c in [*s["classes"].items(), ("overall", s["overall"])]:
            t = totals.setdefault(name, {"tp": 0, "fp": 0, "fn": 0, "n_pred": 0, "n_gt": 0})
            for k in t:
                t[k] += int(c[k])

    per_image_classes = sorted({c for s in images.values() for c in s["classes"]})
    mean: dict[str, Any] = {}
    for name in per_image_classes:
        vals = [s["classes"][name] for s in images.values() if name in s["classes"]]
        mean[name] = {
            k: float(np.mean([v[k] for v in vals]))
            for k in ("precision", "recall", "f1", "abs_count_error")
        }
    mean["mean_f1"] = float(np.mean([s["mean_f1"] for s in images.values()]))
    mean["overall_f1"] = float(np.mean([s["overall"]["f1"] for s in images.values()]))
    errors = [e for s in images.values() if (e := s["positive_index"]["abs_error"]) is not None]
    mean["positive_index_abs_error"] = float(np.mean(errors)) if errors else None

    pooled: dict[str, Any] = {}
    for name, t in totals.items():
        tp, fp, fn = t["tp"], t["fp"], t["fn"]
        pooled[name] = {**t, **prf(tp, fp, fn), "count_error": t["n_pred"] - t["n_gt"]}
    pooled["mean_f1"] = float(np.mean([pooled[c]["f1"] for c in BCDATA_CLASSES if c in pooled]))
    return {
        "task": "detection",
        "pred": str(pred_dir),
        "gt": str(gt_dir),
        "radius_px": float(radius_px),
        "n_images": len(images),
        "images": images,
        "mean": mean,
        "pooled": pooled,
        "unmatched_pred": sorted(set(preds) - set(gt_points)),
        "unmatched_gt": sorted(set(gt_points) - set(preds)),
        "ignored_gt_points": sum(s["ignored_gt_points"] for s in images.values()),
        "ignored_gt_classes": dict(
            sum((Counter(s["ignored_gt_classes"]) for s in images.values()), Counter())
        ),
        "images_without_points": [
            k for k, s in images.items() if s["overall"]["n_gt"] + s["ignored_gt_points"] == 0
        ],
    }
