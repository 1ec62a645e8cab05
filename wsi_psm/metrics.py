"""Segmentation and detection metrics (numpy / scipy only).

Every instance metric works from one sparse contingency table of (prediction, ground truth) overlaps,
built with a single pass over the pixels, so a 1000x1000 image with ~500 nuclei costs milliseconds.

Conventions for degenerate inputs: when both images are empty every score is 1.0 (nothing to find and
nothing found); when exactly one is empty the overlap scores are 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    return pred, gt


# --------------------------------------------------------------------------- pixel level


def pixel_f1(pred_fg: np.ndarray, gt_fg: np.ndarray) -> float:
    """Foreground F1 (= Dice) of two binary masks; any non-zero value is foreground."""
    pred_fg, gt_fg = _check_pair(pred_fg, gt_fg)
    p, g = pred_fg.astype(bool, copy=False), gt_fg.astype(bool, copy=False)
    tp = np.count_nonzero(p & g)
    denom = np.count_nonzero(p) + np.count_nonzero(g)
    return 1.0 if denom == 0 else float(2.0 * tp / denom)


# --------------------------------------------------------------------------- instance level


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..n in order of value (0 stays background), and the area of each."""
    lab = labels.ravel()
    if lab.size and lab.min() < 0:
        raise ValueError("label images must not hold negative values")
    lab = lab.astype(np.int64, copy=False)
    top = int(lab.max()) if lab.size else 0
    if top <= 4 * lab.size + 1024:  # a lookup table is cheaper than sorting
        counts = np.bincount(lab, minlength=top + 1)
        present = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[present] = np.arange(1, len(present) + 1)
        return lut[lab], counts[present]
    uniq, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    if uniq[0] != 0:
        inv = inv + 1
        counts = np.concatenate([[0], counts])
    return inv.ravel(), counts[1:]


@dataclass(frozen=True)
class Overlaps:
    """Sparse contingency table of two instance images.

    ``pred_area[i]`` / ``gt_area[j]``: pixel counts of prediction i+1 / ground-truth j+1;
    ``pi, gi, inter``: one entry per overlapping pair (0-based object indices, overlap in pixels).
    """

    pred_area: np.ndarray
    gt_area: np.ndarray
    pi: np.ndarray
    gi: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.pred_area[self.pi] + self.gt_area[self.gi] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def overlaps(pred_labels: np.ndarray, gt_labels: np.ndarray) -> Overlaps:
    """The contingency table of two label images (any integer ids, 0 = background)."""
    pred_labels, gt_labels = _check_pair(pred_labels, gt_labels)
    p, pred_area = _compact(pred_labels)
    g, gt_area = _compact(gt_labels)
    both = (p > 0) & (g > 0)
    ng = len(gt_area)
    pair = (p[both] - 1) * ng + (g[both] - 1)
    codes, inter = np.unique(pair, return_counts=True)
    return Overlaps(
        pred_area=pred_area,
        gt_area=gt_area,
        pi=codes // max(ng, 1),
        gi=codes % max(ng, 1),
        inter=inter,
    )


def _best_partner(owner: np.ndarray, other: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """For each of n objects, the index of the pair entry with the highest score (-1 if none).

    Ties are broken towards the lower partner index, so the result does not depend on pair order.
    """
    best = np.full(n, -1, dtype=np.int64)
    if len(owner) == 0:
        return best
    order = np.lexsort((other, -score, owner))  # by owner, then score descending, then partner id
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    best[owner[order][first]] = order[first]
    return best


def object_dice(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """Object-level Dice (Sirinukunwattana et al. 2017, gland segmentation challenge).

    Each object is scored by its Dice with the partner it overlaps most (0 without a partner),
    weighted by its share of its own image's object area; the ground-truth-side and the
    prediction-side sums are averaged.
    """
    ov = overlaps(pred_labels, gt_labels)
    n_p, n_g = len(ov.pred_area), len(ov.gt_area)
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    dice = 2.0 * ov.inter / (ov.pred_area[ov.pi] + ov.gt_area[ov.gi])

    def side(owner: np.ndarray, other: np.ndarray, area: np.ndarray) -> float:
        best = _best_partner(owner, other, ov.inter.astype(np.float64), len(area))
        d = np.where(best >= 0, dice[np.maximum(best, 0)], 0.0)
        return float(np.sum(area * d) / np.sum(area))

    return 0.5 * (side(ov.gi, ov.pi, ov.gt_area) + side(ov.pi, ov.gi, ov.pred_area))


def aji(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each ground-truth object is paired with the prediction of highest IoU (a prediction may serve
    several); intersections and unions of those pairs are summed (a ground truth with no overlap adds
    its own area to the union), and every prediction never chosen adds its area to the union.
    """
    ov = overlaps(pred_labels, gt_labels)
    n_p, n_g = len(ov.pred_area), len(ov.gt_area)
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    best = _best_partner(ov.gi, ov.pi, ov.iou, n_g)
    hit = best >= 0
    chosen = best[hit]
    inter = float(ov.inter[chosen].sum())
    union = float(ov.union[chosen].sum()) + float(ov.gt_area[~hit].sum())
    used = np.zeros(n_p, dtype=bool)
    used[ov.pi[chosen]] = True
    union += float(ov.pred_area[~used].sum())
    return inter / union


def panoptic_quality(
    pred_labels: np.ndarray, gt_labels: np.ndarray, iou_thr: float = 0.5
) -> dict[str, float]:
    """Panoptic quality (Kirillov et al. 2019) of one class: ``{"dq", "sq", "pq"}``.

    A pair matches when its IoU exceeds ``iou_thr`` (>= 0.5, so matches are unique).
    DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches, PQ = DQ * SQ.
    """
    if iou_thr < 0.5:
        raise ValueError("iou_thr must be >= 0.5 for matches to be unique")
    ov = overlaps(pred_labels, gt_labels)
    n_p, n_g = len(ov.pred_area), len(ov.gt_area)
    if n_p == 0 and n_g == 0:
        return {"dq": 1.0, "sq": 1.0, "pq": 1.0}
    iou = ov.iou
    matched = iou > iou_thr
    tp = int(matched.sum())
    fp, fn = n_p - tp, n_g - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].mean()) if tp else 0.0
    return {"dq": float(dq), "sq": sq, "pq": float(dq * sq)}


def segmentation_scores(pred_labels: np.ndarray, gt_labels: np.ndarray) -> dict[str, float]:
    """Pixel F1, object Dice, AJI and PQ (with DQ, SQ) of one image."""
    pq = panoptic_quality(pred_labels, gt_labels)
    return {
        "pixel_f1": pixel_f1(np.asarray(pred_labels) > 0, np.asarray(gt_labels) > 0),
        "object_dice": object_dice(pred_labels, gt_labels),
        "aji": aji(pred_labels, gt_labels),
        "pq": pq["pq"],
        "dq": pq["dq"],
        "sq": pq["sq"],
    }


# --------------------------------------------------------------------------- detection


def _as_points(xy: np.ndarray | None) -> np.ndarray:
    arr = np.zeros((0, 2)) if xy is None else np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {arr.shape}")
    return arr


def match_points(
    pred_xy: np.ndarray, gt_xy: np.ndarray, radius: float
) -> tuple[int, int, int, np.ndarray]:
    """One-to-one matching of points within ``radius`` (inclusive).

    Maximises the number of matches, then minimises their total distance (optimal assignment on
    each connected group of nearby points, so large point sets stay cheap).
    Returns (tp, fp, fn, pairs) with ``pairs`` an int (tp, 2) array of (pred index, gt index).
    """
    p, g = _as_points(pred_xy), _as_points(gt_xy)
    if radius < 0:
        raise ValueError("radius must be >= 0")
    empty = np.zeros((0, 2), dtype=np.int64)
    if len(p) == 0 or len(g) == 0:
        return 0, len(p), len(g), empty
    cand = cKDTree(p).sparse_distance_matrix(cKDTree(g), radius, output_type="ndarray")
    if len(cand) == 0:
        return 0, len(p), len(g), empty
    ri, ci = cand["i"].astype(np.int64), cand["j"].astype(np.int64)
    dv = cand["v"].astype(np.float64)

    # groups of points linked by candidate pairs are solved independently
    n = len(p) + len(g)
    graph = coo_matrix((np.ones(len(ri)), (ri, len(p) + ci)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    pairs = []
    order = np.argsort(comp[ri], kind="stable")
    ri, ci, dv = ri[order], ci[order], dv[order]
    bounds = np.flatnonzero(np.diff(comp[ri])) + 1
    for sl in np.split(np.arange(len(ri)), bounds):
        r, c, d = ri[sl], ci[sl], dv[sl]
        ur, r_local = np.unique(r, return_inverse=True)
        uc, c_local = np.unique(c, return_inverse=True)
        # a non-edge costs more than any full set of real edges: maximise matches first
        big = (radius + 1.0) * (min(len(ur), len(uc)) + 1)
        cost = np.full((len(ur), len(uc)), big)
        cost[r_local, c_local] = d
        a, b = linear_sum_assignment(cost)
        ok = cost[a, b] < big
        pairs.append(np.stack([ur[a[ok]], uc[b[ok]]], axis=1))
    out = np.concatenate(pairs).astype(np.int64) if pairs else empty
    out = out[np.argsort(out[:, 0], kind="stable")]
    tp = len(out)
    return tp, len(p) - tp, len(g) - tp, out


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 of match counts (1.0 where a ratio has nothing to count)."""
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1}


def detection_scores(
    pred: Mapping[str, np.ndarray], gt: Mapping[str, np.ndarray], radius: float
) -> dict[str, object]:
    """Per-class detection scores of point sets (x, y), matched one-to-one within ``radius``.

    Classes are those of the ground truth plus any extra predicted class. For each:
    tp, fp, fn, precision, recall, f1, n_pred, n_gt, count_error (n_pred - n_gt) and
    abs_count_error. ``mean_f1`` averages f1 over the ground-truth classes; ``overall`` scores all
    points ignoring class.
    """
    classes = list(gt) + [c for c in pred if c not in gt]
    per_class: dict[str, dict[str, float]] = {}
    for name in classes:
        p, g = _as_points(pred.get(name)), _as_points(gt.get(name))
        tp, fp, fn, _ = match_points(p, g, radius)
        per_class[name] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            **prf(tp, fp, fn),
            "n_pred": len(p),
            "n_gt": len(g),
            "count_error": len(p) - len(g),
            "abs_count_error": abs(len(p) - len(g)),
        }
    all_p = np.concatenate([_as_points(v) for v in pred.values()] or [np.zeros((0, 2))])
    all_g = np.concatenate([_as_points(v) for v in gt.values()] or [np.zeros((0, 2))])
    tp, fp, fn, _ = match_points(all_p, all_g, radius)
    overall = {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        **prf(tp, fp, fn),
        "n_pred": len(all_p),
        "n_gt": len(all_g),
    }
    gt_classes = list(gt) or classes
    mean_f1 = float(np.mean([per_class[c]["f1"] for c in gt_classes])) if gt_classes else 1.0
    return {"classes": per_class, "mean_f1": mean_f1, "overall": overall, "radius": float(radius)}
