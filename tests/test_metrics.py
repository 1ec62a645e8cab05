"""Metrics on hand-made label images whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from wsi_psm.metrics import (
    aji,
    detection_scores,
    match_points,
    object_dice,
    overlaps,
    panoptic_quality,
    pixel_f1,
    segmentation_scores,
)


def _toy() -> tuple[np.ndarray, np.ndarray]:
    """GT: A (1), B (2), C (3), three 2x2 squares. Pred: A exact (5), B split in two columns (7, 8),
    C missed, and a false positive 2x2 square (9)."""
    gt = np.zeros((6, 6), np.int32)
    gt[0:2, 0:2] = 1  # A
    gt[0:2, 3:5] = 2  # B
    gt[4:6, 0:2] = 3  # C
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 0:2] = 5  # A exactly
    pred[0:2, 3] = 7  # left half of B
    pred[0:2, 4] = 8  # right half of B
    pred[4:6, 4:6] = 9  # false positive
    return pred, gt


def test_pixel_f1_toy() -> None:
    pred, gt = _toy()
    # pred fg 12 px, gt fg 12 px, overlap A (4) + B (4) = 8 -> 2*8 / 24
    assert pixel_f1(pred > 0, gt > 0) == pytest.approx(2 / 3)


def test_object_dice_toy() -> None:
    pred, gt = _toy()
    # GT side (weights area/12): A->5 Dice 1; B->7 (tie with 8, lower id) Dice 2*2/(4+2) = 2/3; C -> 0
    #   (4*1 + 4*2/3 + 0) / 12 = 5/9
    # pred side: 5->A 1 (w 4); 7->B 2/3 (w 2); 8->B 2/3 (w 2); 9 -> 0 (w 4)
    #   (4 + 4/3 + 4/3) / 12 = 5/9
    assert object_dice(pred, gt) == pytest.approx(5 / 9)


def test_aji_toy() -> None:
    pred, gt = _toy()
    # A->5: I 4, U 4.  B->7 (IoU 2/4, tie with 8, lower id): I 2, U 4.  C unmatched: U += 4.
    # unused predictions 8 (2 px) and 9 (4 px): U += 6.  AJI = 6 / 18
    assert aji(pred, gt) == pytest.approx(1 / 3)


def test_pq_toy() -> None:
    pred, gt = _toy()
    # only (5, A) has IoU > 0.5 (B's halves reach exactly 0.5): TP 1, FP 3 (7, 8, 9), FN 2 (B, C)
    # DQ = 1 / (1 + 1.5 + 1) = 2/7, SQ = 1, PQ = 2/7
    q = panoptic_quality(pred, gt)
    assert q["dq"] == pytest.approx(2 / 7)
    assert q["sq"] == pytest.approx(1.0)
    assert q["pq"] == pytest.approx(2 / 7)


def test_perfect_and_relabelled_prediction() -> None:
    _, gt = _toy()
    pred = np.where(gt > 0, gt * 1000 + 7, 0)  # same objects, other ids
    s = segmentation_scores(pred, gt)
    assert s == pytest.approx(
        {"pixel_f1": 1, "object_dice": 1, "aji": 1, "pq": 1, "dq": 1, "sq": 1}
    )


def test_partial_overlap_iou() -> None:
    gt = np.zeros((4, 8), np.int32)
    gt[:, 0:4] = 1  # 16 px
    pred = np.zeros_like(gt)
    pred[:, 1:6] = 3  # 20 px, overlap 12 px, union 24 -> IoU 0.5 (not > 0.5), Dice 24/36
    assert aji(pred, gt) == pytest.approx(12 / 24)
    assert object_dice(pred, gt) == pytest.approx(24 / 36)
    assert panoptic_quality(pred, gt)["pq"] == 0.0
    pred[:] = 0
    pred[:, 1:5] = 3  # 16 px, overlap 12, union 20 -> IoU 0.6: one match
    assert panoptic_quality(pred, gt) == pytest.approx({"dq": 1.0, "sq": 0.6, "pq": 0.6})


def test_empty_cases() -> None:
    empty = np.zeros((5, 5), np.int32)
    one = empty.copy()
    one[1:3, 1:3] = 1
    assert pixel_f1(empty, empty) == 1.0
    assert object_dice(empty, empty) == 1.0
    assert aji(empty, empty) == 1.0
    assert panoptic_quality(empty, empty)["pq"] == 1.0
    for a, b in ((one, empty), (empty, one)):
        assert pixel_f1(a, b) == 0.0
        assert object_dice(a, b) == 0.0
        assert aji(a, b) == 0.0
        assert panoptic_quality(a, b) == {"dq": 0.0, "sq": 0.0, "pq": 0.0}


def test_shape_mismatch_and_bad_threshold() -> None:
    with pytest.raises(ValueError, match="shape"):
        aji(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError):
        panoptic_quality(np.zeros((3, 3), int), np.zeros((3, 3), int), iou_thr=0.3)


# --------------------------------------------------------------------------- against direct formulas


def _random_labels(rng: np.random.Generator, shape=(64, 64), n=25) -> np.ndarray:
    """Blobs from thresholded smoothed noise, cut into instances by a random Voronoi partition."""
    fg = ndi.gaussian_filter(rng.random(shape), 2) > 0.5
    seeds = np.zeros(shape, np.int32)
    idx = rng.choice(seeds.size, n, replace=False)
    seeds.flat[idx] = np.arange(1, n + 1)
    _, (ri, ci) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[ri, ci] * fg
    return (lab * rng.integers(1, 50)).astype(np.int32)  # non-consecutive ids


def _slow_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Per-object loops over full images, straight from the papers' definitions."""
    pids = [i for i in np.unique(pred) if i]
    gids = [j for j in np.unique(gt) if j]

    def best(mask, other, ids, key):
        top, arg = 0.0, None
        for k in ids:  # ascending ids, strict '>' keeps the lowest id on ties
            v = key(mask, other == k)
            if v > top:
                top, arg = v, k
        return arg

    inter = lambda a, b: float(np.sum(a & b))  # noqa: E731
    iou = lambda a, b: np.sum(a & b) / np.sum(a | b)  # noqa: E731
    dice = lambda a, b: 2 * np.sum(a & b) / (a.sum() + b.sum())  # noqa: E731

    g_area = sum(np.sum(gt == j) for j in gids)
    p_area = sum(np.sum(pred == i) for i in pids)
    g_side = sum(
        np.sum(gt == j)
        / g_area
        * (dice(gt == j, pred == k) if (k := best(gt == j, pred, pids, inter)) else 0)
        for j in gids
    )
    p_side = sum(
        np.sum(pred == i)
        / p_area
        * (dice(pred == i, gt == k) if (k := best(pred == i, gt, gids, inter)) else 0)
        for i in pids
    )
    c = u = 0.0
    used = set()
    for j in gids:
        g = gt == j
        k = best(g, pred, pids, iou)
        if k is None:
            u += g.sum()
            continue
        used.add(k)
        c += np.sum(g & (pred == k))
        u += np.sum(g | (pred == k))
    u += sum(np.sum(pred == i) for i in pids if i not in used)
    tp_iou = [iou(pred == i, gt == j) for i in pids for j in gids if iou(pred == i, gt == j) > 0.5]
    tp = len(tp_iou)
    dq = tp / (tp + 0.5 * (len(pids) - tp) + 0.5 * (len(gids) - tp))
    sq = float(np.mean(tp_iou)) if tp else 0.0
    return {"object_dice": 0.5 * (g_side + p_side), "aji": c / u, "pq": dq * sq, "dq": dq, "sq": sq}


@pytest.mark.parametrize("seed", range(5))
def test_instance_metrics_match_direct_formulas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = _random_labels(rng)
    pred = _random_labels(rng)
    # make the prediction overlap the truth: shift it onto the truth partly
    pred = np.where(
        rng.random(gt.shape) < 0.02, 0, np.roll(gt, (1, 2), (0, 1)) * 3 + pred * (gt == 0)
    )
    fast = segmentation_scores(pred, gt)
    slow = _slow_scores(pred, gt)
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value), key


def test_pixel_f1_matches_confusion_formula() -> None:
    rng = np.random.default_rng(7)
    p = rng.random((50, 40)) < 0.3
    g = rng.random((50, 40)) < 0.4
    tp = np.sum(p & g)
    fp = np.sum(p & ~g)
    fn = np.sum(~p & g)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert pixel_f1(p, g) == pytest.approx(2 * precision * recall / (precision + recall))


def test_overlaps_table() -> None:
    pred, gt = _toy()
    ov = overlaps(pred, gt)
    assert ov.pred_area.tolist() == [4, 2, 2, 4]
    assert ov.gt_area.tolist() == [4, 4, 4]
    table = sorted(zip(ov.pi.tolist(), ov.gi.tolist(), ov.inter.tolist(), strict=True))
    assert table == [(0, 0, 4), (1, 1, 2), (2, 1, 2)]


def test_huge_label_ids() -> None:
    pred, gt = _toy()
    big = np.where(pred > 0, pred.astype(np.int64) * 10**12, 0)
    assert aji(big, gt) == pytest.approx(aji(pred, gt))


# --------------------------------------------------------------------------- points


def test_match_points_is_optimal_not_greedy() -> None:
    # radius 2.1: A=(0,0)-X=(1.5,0) 1.5; B=(2.5,0)-X 1.0; B-Y=(4.5,0) 2.0; A-Y 4.5 (too far).
    # Greedy nearest-first takes B-X and strands A; the optimum is A-X + B-Y: 2 matches.
    pred = np.array([[0.0, 0.0], [2.5, 0.0]])
    gt = np.array([[1.5, 0.0], [4.5, 0.0]])
    tp, fp, fn, pairs = match_points(pred, gt, 2.1)
    assert (tp, fp, fn) == (2, 0, 0)
    assert pairs.tolist() == [[0, 0], [1, 1]]


def test_match_points_radius_inclusive_and_empty() -> None:
    pred = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]])
    gt = np.array([[0.0, 0.0], [10.0, 5.0]])
    tp, fp, fn, pairs = match_points(pred, gt, 5.0)  # (0,0) at distance 0, (10,0)-(10,5) exactly 5
    assert (tp, fp, fn) == (2, 1, 0)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    assert match_points(pred, gt, 4.9)[:3] == (1, 2, 1)
    assert match_points(np.zeros((0, 2)), gt, 5)[:3] == (0, 0, 2)
    assert match_points(pred, [], 5)[:3] == (0, 3, 0)
    assert match_points([], [], 5)[:3] == (0, 0, 0)


def test_match_points_many_points_one_to_one() -> None:
    rng = np.random.default_rng(3)
    gt = rng.random((2000, 2)) * 1000
    pred = np.concatenate([gt[:1500] + rng.normal(0, 2, (1500, 2)), rng.random((300, 2)) * 1000])
    tp, fp, fn, pairs = match_points(pred, gt, 10)
    assert len(np.unique(pairs[:, 0])) == tp and len(np.unique(pairs[:, 1])) == tp
    assert np.all(np.linalg.norm(pred[pairs[:, 0]] - gt[pairs[:, 1]], axis=1) <= 10)
    assert tp + fp == len(pred) and tp + fn == len(gt)
    assert tp >= 1500


def test_detection_scores_per_class() -> None:
    gt = {"Positive": np.array([[0, 0], [50, 50]]), "Negative": np.array([[100, 100]])}
    pred = {
        "Positive": np.array([[1, 1], [200, 200]]),  # 1 TP, 1 FP, 1 FN
        "Negative": np.array([[103, 104], [300, 300], [400, 400]]),  # 1 TP (distance 5), 2 FP
    }
    s = detection_scores(pred, gt, radius=10)
    pos, neg = s["classes"]["Positive"], s["classes"]["Negative"]
    assert (pos["tp"], pos["fp"], pos["fn"]) == (1, 1, 1)
    assert pos["precision"] == pytest.approx(0.5) and pos["recall"] == pytest.approx(0.5)
    assert pos["f1"] == pytest.approx(0.5) and pos["count_error"] == 0
    # Negative: P 1/3, R 1, F1 = 2/(2+2) = 0.5; 3 predicted vs 1 true
    assert neg["precision"] == pytest.approx(1 / 3) and neg["recall"] == 1.0
    assert (
        neg["f1"] == pytest.approx(0.5) and neg["count_error"] == 2 and neg["abs_count_error"] == 2
    )
    assert s["mean_f1"] == pytest.approx(0.5)
    # ignoring class: 2 TP of 5 predictions and 3 truths -> F1 = 4 / 8
    assert s["overall"]["f1"] == pytest.approx(0.5)


def test_detection_scores_missing_class() -> None:
    gt = {"Positive": np.array([[0, 0]]), "Negative": np.zeros((0, 2))}
    s = detection_scores({"Positive": np.array([[0, 0]])}, gt, radius=10)
    assert s["classes"]["Negative"]["f1"] == 1.0  # nothing to find, nothing found
    assert s["mean_f1"] == 1.0


# --------------------------------------------------------------------------- evaluation (folders)
# (kept here with the metrics they report; the library behind `wsi-psm eval`)

import gzip  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import tifffile  # noqa: E402

from wsi_psm.errors import WsiPsmError  # noqa: E402
from wsi_psm.evaluation import EvaluationError, evaluate_detection, evaluate_segmentation  # noqa: E402


def _square_features(labels: np.ndarray) -> list[dict]:
    """One axis-aligned square polygon per pixel block of each label (pixel-corner convention)."""
    feats = []
    for k in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == k)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}})
    return feats


def _write_geojson(path: Path, feats: list[dict]) -> None:
    data = json.dumps({"type": "FeatureCollection", "features": feats}).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def test_evaluate_segmentation_label_images_and_polygons(tmp_path: Path) -> None:
    pred, gt = _toy()
    (tmp_path / "gt").mkdir()
    (tmp_path / "tif").mkdir()
    (tmp_path / "gj").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", gt)
    tifffile.imwrite(tmp_path / "gt" / "b.tif", gt)
    tifffile.imwrite(tmp_path / "gt" / "lonely.tif", gt)
    tifffile.imwrite(tmp_path / "tif" / "a_labels.tif", pred)  # the toy prediction
    tifffile.imwrite(tmp_path / "tif" / "b_labels.tif", gt * 3)  # perfect
    tifffile.imwrite(tmp_path / "tif" / "extra_labels.tif", gt)
    r = evaluate_segmentation(tmp_path / "tif", tmp_path / "gt")
    assert (
        r["n_images"] == 2 and r["unmatched_pred"] == ["extra"] and r["unmatched_gt"] == ["lonely"]
    )
    assert r["images"]["a"]["aji"] == pytest.approx(1 / 3)
    assert r["images"]["a"]["n_pred"] == 4 and r["images"]["a"]["n_gt"] == 3
    assert r["images"]["b"]["pq"] == pytest.approx(1.0)
    assert r["mean"]["object_dice"] == pytest.approx((5 / 9 + 1) / 2)
    json.dumps(r)  # plain, serialisable

    # the same objects as polygons (square outlines on pixel corners), plain and gzipped
    _write_geojson(tmp_path / "gj" / "a.geojson", _square_features(pred))
    _write_geojson(tmp_path / "gj" / "b.geojson.gz", _square_features(gt))
    r2 = evaluate_segmentation(tmp_path / "gj", tmp_path / "gt")
    for stem in ("a", "b"):
        for key in ("pixel_f1", "object_dice", "aji", "pq"):
            assert r2["images"][stem][key] == pytest.approx(r["images"][stem][key]), (stem, key)
    # the same ground truth as MATLAB instance maps (CoNSeP / CPM / HoVer-Net's Kumar copy:
    # variable inst_map, float64 as MATLAB saves it; beside it another variable, as they ship)
    from scipy.io import savemat

    (tmp_path / "mat").mkdir()
    for stem in ("a", "b"):
        savemat(
            tmp_path / "mat" / f"{stem}.mat", {"inst_map": gt.astype(float), "type_map": gt > 0}
        )
    r3 = evaluate_segmentation(tmp_path / "tif", tmp_path / "mat")
    assert r3["mean"] == r["mean"] and r3["unmatched_pred"] == ["extra"]
    # MATLAB v7.3 files are HDF5, their arrays stored transposed
    import h5py

    with h5py.File(tmp_path / "mat" / "a.mat", "w", userblock_size=512) as f:
        f["inst_map"] = gt.T.astype(float)
    with open(tmp_path / "mat" / "a.mat", "r+b") as fh:  # (MATLAB's own header in the userblock)
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Sat Nov 28 2026 HDF5 schema")
    assert evaluate_segmentation(tmp_path / "tif", tmp_path / "mat")["mean"] == r["mean"]
    savemat(tmp_path / "mat" / "a.mat", {"inst": gt, "type_map": gt > 0})
    with pytest.raises(EvaluationError, match="no 'inst_map' and 2 2-D arrays"):
        evaluate_segmentation(tmp_path / "tif", tmp_path / "mat")
    # polygons of a larger image (another image's, or another scale's): refused, not cut off
    big = np.zeros((gt.shape[0] * 2, gt.shape[1] * 2), gt.dtype)
    big[-gt.shape[0] :, -gt.shape[1] :] = gt
    _write_geojson(tmp_path / "gj" / "a.geojson", _square_features(big))
    with pytest.raises(EvaluationError, match="outside the ground truth image"):
        evaluate_segmentation(tmp_path / "gj", tmp_path / "gt")


def test_evaluate_segmentation_exported_cells_round_trip(tmp_path: Path) -> None:
    """Labels -> pixel-corner polygons -> cells.geojson (the exporter) -> rasterised back: identical."""
    from wsi_psm.export import CellRecord, GeoJSONWriter
    from wsi_psm.instances import split_instances
    from wsi_psm.polygons import labels_to_polygons

    rng = np.random.default_rng(1)
    fg = ndi.gaussian_filter(rng.random((200, 240)), 2) > 0.52
    lab = split_instances(fg, mpp=0.5)
    assert lab.max() > 10
    (tmp_path / "gt").mkdir()
    (tmp_path / "run" / "img").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "gt" / "img_labels.tif", lab)
    with GeoJSONWriter(tmp_path / "run" / "img" / "cells.geojson", slide_key="img") as w:
        for _, poly in labels_to_polygons(lab):
            w.write(CellRecord(poly, "Nucleus", (255, 0, 0)))
    r = evaluate_segmentation(tmp_path / "run", tmp_path / "gt")
    assert r["images"]["img"]["pred_file"] == "img/cells.geojson"
    for key in ("pixel_f1", "object_dice", "aji", "pq"):
        assert r["mean"][key] == pytest.approx(1.0), key


def test_evaluate_segmentation_on_monuseg(tmp_path: Path, monuseg_dir: Path) -> None:
    from wsi_psm.groundtruth import load_monuseg_labels, monuseg_cases

    cases = {c.stem: c for c in monuseg_cases(monuseg_dir)}
    picks = ["TCGA-21-5784-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1"]  # one XML, one colour mask
    expected = {}
    for stem in picks:
        gt = load_monuseg_labels(cases[stem])
        pred = ndi.binary_erosion(gt > 0, iterations=2) * gt  # shrunken truth: imperfect
        tifffile.imwrite(tmp_path / f"{stem}_labels.tif", pred.astype(np.int32))
        expected[stem] = segmentation_scores(pred, gt)
    r = evaluate_segmentation(tmp_path, monuseg_dir)
    assert r["n_images"] == 2 and len(r["unmatched_gt"]) == 28
    assert r["images"][picks[0]]["gt_kind"] == "xml" and r["images"][picks[1]]["gt_kind"] == "mask"
    for stem in picks:
        assert 0.5 < r["images"][stem]["aji"] < 0.95
        for key, value in expected[stem].items():
            assert r["images"][stem][key] == pytest.approx(value), (stem, key)
    # the derived masks' folder given directly is read as the root reads it (overlap colours
    # merged): the score does not depend on which path was given
    masks = evaluate_segmentation(tmp_path, monuseg_dir / "derived_instance_color_masks_ykrmm")
    assert {row["gt_kind"] for row in masks["images"].values()} == {"mask"}
    assert masks["images"][picks[1]] == r["images"][picks[1]]


def test_evaluate_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    tifffile.imwrite(tmp_path / "p" / "x_labels.tif", np.ones((4, 4), np.int32))
    tifffile.imwrite(tmp_path / "g" / "y.tif", np.ones((4, 4), np.int32))
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_segmentation(tmp_path / "nope", tmp_path / "g")
    with pytest.raises(EvaluationError, match="no predictions"):
        evaluate_segmentation(tmp_path / "empty", tmp_path / "g")
    with pytest.raises(EvaluationError, match="no ground truth"):
        evaluate_segmentation(tmp_path / "p", tmp_path / "empty")
    with pytest.raises(EvaluationError, match="no prediction matches") as info:
        evaluate_segmentation(tmp_path / "p", tmp_path / "g")
    assert isinstance(info.value, WsiPsmError) and "x" in str(info.value) and "y" in str(info.value)
    tifffile.imwrite(tmp_path / "g" / "x.tif", np.ones((5, 4), np.int32))
    with pytest.raises(EvaluationError, match="shape"):
        evaluate_segmentation(tmp_path / "p", tmp_path / "g")
    with pytest.raises(EvaluationError, match="BCData"):
        evaluate_detection(tmp_path / "p", tmp_path / "g")


def _cell(x: float, y: float, name: str, half: float = 2.0) -> dict:
    ring = [[x - half, y - half], [x + half, y - half], [x + half, y + half], [x - half, y + half]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": name, "color": [0, 0, 0]},
        },
    }


def _bcdata_predictions(out: Path, bcdata_dir: Path) -> dict[str, int]:
    """GeoJSON predictions for BCData images 0-2: every annotated cell 3 px to the right of its
    point, every other negative cell missed, one false positive per image; returns the GT counts."""
    from wsi_psm.groundtruth import load_bcdata_points

    n_gt = {"Positive": 0, "Negative": 0}
    for stem in ("0", "1", "2"):
        pts = load_bcdata_points(bcdata_dir, stem)
        feats = []
        for name, xy in pts.items():
            n_gt[name] += len(xy)
            for i, (x, y) in enumerate(xy):
                if name == "Negative" and i % 2:  # miss every other negative cell
                    continue
                # a square around the annotated pixel's centre; lower-case class names are accepted
                feats.append(_cell(x + 0.5 + 3, y + 0.5, name.lower() if stem == "1" else name))
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [5.0, 5.0]},
                "properties": {"classification": {"name": "Positive"}},
            }
        )  # a false positive
        _write_geojson(out / f"{stem}.geojson", feats)
    return n_gt


def test_evaluate_detection_on_bcdata(tmp_path: Path, bcdata_dir: Path) -> None:
    n_gt = _bcdata_predictions(tmp_path, bcdata_dir)
    r = evaluate_detection(tmp_path, bcdata_dir, radius_px=10)
    json.dumps(r)
    assert r["n_images"] == 3 and len(r["unmatched_gt"]) == 23
    pos, neg = r["pooled"]["Positive"], r["pooled"]["Negative"]
    assert pos["fn"] == 0 and pos["tp"] == n_gt["Positive"] and pos["fp"] <= 3
    assert neg["fp"] == 0 and neg["recall"] == pytest.approx(neg["tp"] / n_gt["Negative"])
    assert 0.45 < neg["recall"] < 0.55
    assert r["mean"]["Negative"]["precision"] == 1.0
    # the positive (Ki-67) index per image: every positive cell + 1, half the negatives (rounded up)
    from wsi_psm.groundtruth import load_bcdata_points

    errors = []
    for stem in ("0", "1", "2"):
        pts = load_bcdata_points(bcdata_dir, stem)
        p, n = len(pts["Positive"]), len(pts["Negative"])
        want_pred, want_gt = (p + 1) / (p + 1 + (n + 1) // 2), p / (p + n)
        got = r["images"][stem]["positive_index"]
        assert got["pred"] == pytest.approx(want_pred) and got["gt"] == pytest.approx(want_gt)
        errors.append(abs(want_pred - want_gt))
    assert r["mean"]["positive_index_abs_error"] == pytest.approx(np.mean(errors))
    # 3 px off the centre is outside a 2 px radius: nothing matches
    r_tight = evaluate_detection(tmp_path, bcdata_dir / "annotations", radius_px=2)
    assert r_tight["pooled"]["overall"]["tp"] <= 3


def test_eval_cli_radius_in_um(tmp_path: Path, bcdata_dir: Path, capsys) -> None:
    from wsi_psm.cli.main import main

    pred = tmp_path / "pred"
    pred.mkdir()
    _bcdata_predictions(pred, bcdata_dir)

    def run(*opts: str) -> tuple[int, dict | None, str]:
        out = tmp_path / "r.json"
        out.unlink(missing_ok=True)
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(pred), str(bcdata_dir), "--json", str(out), *opts])
        err = capsys.readouterr().err
        return int(exc.value.code or 0), json.loads(out.read_text()) if out.exists() else None, err

    _, px10, _ = run("--radius", "10")
    code, um, _ = run("--radius-um", "2.5", "--mpp", "0.25")  # 10 px
    assert code == 0 and um["radius_px"] == 10.0 and um["pooled"] == px10["pooled"]
    _, tight, _ = run("--radius-um", "0.5", "--mpp", "0.25")  # 2 px: the 3 px offsets miss
    assert tight["radius_px"] == 2.0
    assert tight["pooled"]["overall"]["tp"] < px10["pooled"]["overall"]["tp"]
    for opts, expect in (
        (("--radius-um", "2.5"), "needs --mpp"),
        (("--radius-um", "2.5", "--mpp", "0.25", "--radius", "10"), "once"),
        (("--mpp", "0.25"), "only with --radius-um"),
    ):
        code, report, err = run(*opts)
        assert code != 0 and report is None and expect in err and len(err.strip().splitlines()) == 1


def _qupath_points(path: Path, pts: dict[str, np.ndarray], extra: list[dict] | None = None) -> None:
    """Point annotations as QuPath exports them: one MultiPoint feature per class."""
    feats = [
        {
            "type": "Feature",
            "id": f"id-{name}",
            "geometry": {"type": "MultiPoint", "coordinates": xy.tolist()},
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        }
        for name, xy in pts.items()
        if len(xy)
    ]
    _write_geojson(path, feats + (extra or []))


def test_point_files_score_as_bcdata_does(tmp_path: Path, bcdata_dir: Path, capsys) -> None:
    """The same points as QuPath GeoJSON or as CSV (pixel centres at +0.5), or as SHIDC-B-Ki-67's
    JSON records (pixel indices, label_id), give the very scores BCData's .h5 files give; points
    of other classes, and region outlines, are not scored."""
    from wsi_psm.cli.main import main

    from wsi_psm.evaluation import is_detection_gt
    from wsi_psm.groundtruth import load_bcdata_points

    pred = tmp_path / "pred"
    pred.mkdir()
    _bcdata_predictions(pred, bcdata_dir)
    gj, cs, sh = tmp_path / "gj", tmp_path / "csv", tmp_path / "shidc"
    gj.mkdir()
    cs.mkdir()
    sh.mkdir()
    other = {  # an unscored class, and the outline of the annotated field
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [100.0, 100.0]},
        "properties": {"classification": {"name": "Stroma"}},
    }
    field = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [640, 0], [640, 640], [0, 0]]]},
        "properties": {"objectType": "annotation"},
    }
    for stem in ("0", "1", "2"):
        pts = {k: v + 0.5 for k, v in load_bcdata_points(bcdata_dir, stem).items()}
        # QuPath's derived names and any case name the same class
        names = {"Positive": "Tumor: Positive", "Negative": "negative"}
        # (QuPath may name the file after the whole image name: 0.png.geojson)
        _qupath_points(
            gj / f"{stem}.png.geojson", {names[k]: v for k, v in pts.items()}, [other, field]
        )
        rows = ["x,y,class"] + [f"{x},{y},{k}" for k, v in pts.items() for x, y in v]
        (cs / f"{stem}.csv").write_text("\n".join(rows) + "\n")
        # SHIDC-B-Ki-67's JSON: pixel indices, label_id 1 / 2 (3, a lymphocyte, is not scored)
        ids = {"Positive": 1, "Negative": 2}
        records = [
            {"x": int(x), "y": int(y), "label_id": ids[k]}
            for k, v in load_bcdata_points(bcdata_dir, stem).items()
            for x, y in v
        ]
        records.append({"x": 5, "y": 5, "label_id": 3})
        (sh / f"{stem}.json").write_text(json.dumps(records))
        (sh / f"{stem}.jpg").write_bytes(b"")  # (its tile beside it, as SHIDC ships them)
    want = evaluate_detection(pred, bcdata_dir, radius_px=10)
    # the tiles beside their point files (as QuPath users export them) are not annotations
    for stem in ("0", "1", "2"):
        (gj / f"{stem}.png").write_bytes(
            (bcdata_dir / "images" / "test" / f"{stem}.png").read_bytes()
        )
    (sh / "dataset.json").write_text('{"name": "not points"}')  # (another JSON: not an annotation)
    assert is_detection_gt(gj) and is_detection_gt(cs) and is_detection_gt(sh)
    for folder, ignored in ((gj, 3), (cs, 0), (sh, 3)):
        got = evaluate_detection(pred, folder, radius_px=10)
        assert got["pooled"] == want["pooled"] and got["mean"] == want["mean"]
        assert got["n_images"] == 3 and got["ignored_gt_points"] == ignored
    # a point file cut short is an error naming it, not an image quietly left unscored
    (sh / "1.json").write_text((sh / "1.json").read_text()[:50])
    with pytest.raises(EvaluationError, match=r"1\.json"):
        evaluate_detection(pred, sh, radius_px=10)
    _write_geojson(gj / "2.png.geojson", [])  # an image whose export holds no point
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(pred), str(gj)])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert "note: 1 annotation files hold no points (2): their predictions all count" in err
    assert "detection at 10 px" in out
    assert "note: 2 annotated points were not scored (Stroma 2): only Positive and Negative" in err


def test_point_files_bad_and_ambiguous(tmp_path: Path) -> None:
    from wsi_psm.evaluation import EvaluationError, is_detection_gt
    from wsi_psm.groundtruth import AnnotationError, load_point_annotations

    (tmp_path / "a.csv").write_text("x,y,label\n1,2,Positive\n")
    with pytest.raises(AnnotationError, match="columns x, y, class"):
        load_point_annotations(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("x,y,class\n1,2,Positive\nten,2,Negative\n")
    with pytest.raises(AnnotationError, match="line 3"):
        load_point_annotations(tmp_path / "b.csv")
    # a CSV that is not a point table is named as such
    bad = tmp_path / "semicolons"
    bad.mkdir()
    (bad / "0.csv").write_text("x;y;class\n1;2;Positive\n")
    preds = tmp_path / "p"
    preds.mkdir()
    _write_geojson(preds / "0.geojson", [])
    with pytest.raises(EvaluationError, match=r"0\.csv is not a point table"):
        evaluate_detection(preds, bad)
    # outlines given as point annotations are refused, not scored as "no cells"
    _write_geojson(
        tmp_path / "outlines.geojson",
        [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
          "properties": {"classification": {"name": "Positive"}}}],
    )  # fmt: skip
    with pytest.raises(AnnotationError, match="holds outlines, not points"):
        load_point_annotations(tmp_path / "outlines.geojson")
    # a spreadsheet's "CSV UTF-8" (byte-order mark, CRLF) reads
    (tmp_path / "bom.csv").write_bytes("\ufeffx,y,class\r\n3,4,Negative\r\n".encode())
    assert load_point_annotations(tmp_path / "bom.csv")[0]["Negative"].tolist() == [[3.0, 4.0]]
    pts, ignored = load_point_annotations(
        _write_csv(tmp_path / "c.csv", "X,Y,Class\n1.5,2,POSITIVE\n3,4,\n")
    )
    assert pts["Positive"].tolist() == [[1.5, 2.0]] and pts["Negative"].shape == (0, 2)
    assert ignored == {"(no class)": 1}
    # a folder of label images with a stray CSV is segmentation ground truth, not points
    lab = tmp_path / "labels"
    lab.mkdir()
    tifffile.imwrite(lab / "img.tif", np.zeros((8, 8), np.int32))
    (lab / "notes.csv").write_text("x,y,class\n")
    assert not is_detection_gt(lab)
    # nor is a folder whose only CSV is a manifest (no x, y, class columns)
    man = tmp_path / "manifest"
    man.mkdir()
    (man / "manifest.csv").write_text("image,organ\na.tif,breast\n")
    assert not is_detection_gt(man)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError, match="no point annotations"):
        evaluate_detection(lab, empty)


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_outlines_from_qupath_score_as_the_xml_does(tmp_path: Path, monuseg_dir: Path) -> None:
    """A MoNuSeg XML's outlines exported as QuPath would (GeoJSON polygons, pixel corners: +0.5)
    are segmentation ground truth: the same scores as the XML, to the rasterisers' edge rules,
    whether the prediction is a label image or polygons (sized from their extent)."""
    from scipy import ndimage as ndi

    from wsi_psm.evaluation import is_detection_gt
    from wsi_psm.groundtruth import load_monuseg_xml, monuseg_cases, monuseg_polygons
    from wsi_psm.polygons import labels_to_polygons

    case = monuseg_cases(monuseg_dir, xml_only=True)[0]
    outlines = [
        _feature_polygon((np.vstack([p, p[:1]]) + 0.5).tolist())
        for p in monuseg_polygons(case.annotation)
        if len(p) >= 3
    ]
    gt_dir, xml_dir, pred_tif, pred_gj = (tmp_path / n for n in ("gt", "xml", "pt", "pg"))
    for d in (gt_dir, xml_dir, pred_tif, pred_gj):
        d.mkdir()
    _write_geojson(gt_dir / f"{case.stem}.geojson", outlines)
    (xml_dir / f"{case.stem}.xml").write_bytes(case.annotation.read_bytes())
    # a prediction: the annotated nuclei, each eroded by a pixel (a known, imperfect answer)
    lab = load_monuseg_xml(case.annotation)
    pred = np.where(ndi.grey_erosion(lab, size=3) == lab, lab, 0).astype(np.int32)
    tifffile.imwrite(pred_tif / f"{case.stem}_labels.tif", pred)
    feats = [_feature_polygon(shapely_coords(p)) for _, p in labels_to_polygons(pred)]
    _write_geojson(pred_gj / f"{case.stem}.geojson", feats)
    assert not is_detection_gt(gt_dir)
    want = evaluate_segmentation(pred_tif, xml_dir)["mean"]
    assert 0.6 < want["aji"] < 0.95  # (the erosion costs something)
    for folder in (pred_tif, pred_gj):
        got = evaluate_segmentation(folder, gt_dir)
        assert got["images"][case.stem]["gt_kind"] == "geojson"
        for k in ("pixel_f1", "object_dice", "aji"):
            assert got["mean"][k] == pytest.approx(want[k], abs=0.02), k


def test_outline_folders_as_users_export_them(tmp_path: Path, monuseg_dir: Path, capsys) -> None:
    """Outlines beside their tiles, with the annotated field's region drawn around the nuclei, and
    an image without nuclei (an empty export): the tiles size the rasters, the region is left out
    (said in a note), the empty image scores its predictions as false."""
    from PIL import Image
    from wsi_psm.cli.main import main

    from wsi_psm.groundtruth import load_monuseg_xml, monuseg_cases, monuseg_polygons
    from wsi_psm.polygons import labels_to_polygons

    case = monuseg_cases(monuseg_dir, xml_only=True)[0]
    outlines = [
        _feature_polygon((np.vstack([p, p[:1]]) + 0.5).tolist())
        for p in monuseg_polygons(case.annotation)
        if len(p) >= 3
    ]
    region = _feature_polygon([[1, 1], [999, 1], [999, 999], [1, 999], [1, 1]])
    gt, gt_plain, pred = tmp_path / "gt", tmp_path / "plain", tmp_path / "pred"
    for d in (gt, gt_plain, pred):
        d.mkdir()
    _write_geojson(gt / f"{case.stem}.geojson", [region, *outlines])
    _write_geojson(gt_plain / f"{case.stem}.geojson", outlines)
    Image.new("RGB", (1000, 1000), "white").save(gt / f"{case.stem}.png")  # the tile, beside
    _write_geojson(gt / "0-empty.geojson", [])  # (sorts first: an empty file decides nothing)
    Image.new("RGB", (64, 48), "white").save(gt / "0-empty.png")
    lab = load_monuseg_xml(case.annotation)
    _write_geojson(pred / f"{case.stem}.geojson",
                   [_feature_polygon(shapely_coords(p)) for _, p in labels_to_polygons(lab)])  # fmt: skip
    _write_geojson(pred / "0-empty.geojson", [_feature_polygon([[2, 2], [9, 2], [9, 9], [2, 2]])])
    r = evaluate_segmentation(pred, gt)
    want = evaluate_segmentation(pred, gt_plain)["images"][case.stem]
    # (the tile sizes the raster at 1000², the extent a pixel less: edge nuclei differ a little)
    assert r["images"][case.stem]["aji"] == pytest.approx(want["aji"], abs=1e-3)
    assert want["aji"] > 0.95
    assert r["ignored_gt_regions"] == 1 and r["images"]["0-empty"]["n_gt"] == 0
    assert r["images"]["0-empty"]["pixel_f1"] == 0.0
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(pred), str(gt)])
    assert exc.value.code == 0
    assert "1 annotated outlines holding other outlines" in capsys.readouterr().err


def _feature_polygon(ring: list) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation"},
    }


def shapely_coords(poly) -> list:
    return [list(c) for c in poly.exterior.coords]
