"""Nucleus foreground (and optionally a nucleus probability map) -> instance labels.

Touching nuclei are separated by a marker-controlled watershed: markers are the peaks of the smoothed
distance transform (times the smoothed probability when one is given), at least
``split_min_distance_um`` apart; neighbours whose saddle is shallower than ``min_depth_um`` are merged
back (a flat distance ridge is one elongated nucleus). Sizes are physical (µm, µm²), converted with mpp.

Every output label is one 4-connected piece without holes (background enclosed by one nucleus joins
it; gaps enclosed by several stay background), labels run 1..n in raster order of their first pixel,
and the result depends only on the inputs (no randomness).
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.feature import peak_local_max
from skimage.measure import label as cc_label
from skimage.segmentation import watershed

from wsi_psm.config import InstanceConfig

_FOUR = ndi.generate_binary_structure(2, 1)


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """``mask`` with background pockets of at most ``max_hole_px`` pixels (not touching the border) filled."""
    mask = np.asarray(mask, dtype=bool)
    if max_hole_px <= 0 or not mask.any():
        return mask.copy()
    holes, n = ndi.label(~mask, structure=_FOUR)
    if n == 0:
        return mask.copy()
    size = np.bincount(holes.ravel(), minlength=n + 1)
    fill = size <= max_hole_px
    fill[0] = False
    # background that reaches the edge of the array is outside, not a hole
    edge = np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])
    fill[edge] = False
    return mask | fill[holes]


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Background pockets enclosed by a single label (not touching the array edge) join that label.

    Pockets bordered by several labels (gaps between touching nuclei) stay background. Polygon
    export keeps only exterior rings, so this makes an outline rasterised back equal its label.
    """
    bg, n = ndi.label(labels == 0, structure=_FOUR)
    if n == 0:
        return labels
    hole_parts, lab_parts = [], []
    for a, b in ((bg[:, :-1], labels[:, 1:]), (bg[:, 1:], labels[:, :-1])):
        m = (a > 0) & (b > 0)
        hole_parts.append(a[m])
        lab_parts.append(b[m])
    for a, b in ((bg[:-1], labels[1:]), (bg[1:], labels[:-1])):
        m = (a > 0) & (b > 0)
        hole_parts.append(a[m])
        lab_parts.append(b[m])
    hole = np.concatenate(hole_parts).astype(np.int64)
    lab = np.concatenate(lab_parts).astype(np.int64)
    if len(hole) == 0:
        return labels
    codes = np.unique(hole * (int(labels.max()) + 1) + lab)
    hole, lab = codes // (int(labels.max()) + 1), codes % (int(labels.max()) + 1)
    n_neighbours = np.bincount(hole, minlength=n + 1)
    fill = np.zeros(n + 1, dtype=labels.dtype)
    single = n_neighbours[hole] == 1
    fill[hole[single]] = lab[single]
    edge = np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])
    fill[edge] = 0
    fill[0] = 0
    if not fill.any():
        return labels
    return np.where(labels == 0, fill[bg], labels)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of labels onto a (H, W) grid covering the same area."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def relabel_by_area(labels: np.ndarray, min_px: float, max_px: float) -> np.ndarray:
    """Drop labels outside [min_px, max_px] and renumber the rest 1..n, keeping their order."""
    area = np.bincount(labels.ravel())
    keep = (area >= min_px) & (area <= max_px)
    keep[0] = False
    lut = np.zeros(len(area), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def _contacts(
    labels: np.ndarray, values: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every 4-neighbour pixel pair of two different labels: (lower label, higher label, the lower
    of the two pixels' ``values``; zeros without ``values``), one entry per pixel pair."""
    values = np.zeros(labels.shape, np.float32) if values is None else values
    a_parts, b_parts, v_parts = [], [], []
    for a, b, ra, rb in (
        (labels[:, :-1], labels[:, 1:], values[:, :-1], values[:, 1:]),
        (labels[:-1], labels[1:], values[:-1], values[1:]),
    ):
        m = (a != b) & (a > 0) & (b > 0)
        a_parts.append(a[m])
        b_parts.append(b[m])
        v_parts.append(np.minimum(ra[m], rb[m]))
    a, b, v = (np.concatenate(x) for x in (a_parts, b_parts, v_parts))
    return np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64), v


def _lattice_counts(hulls: np.ndarray) -> np.ndarray:
    """Integer points inside or on each convex hull (shapely geometries with integer vertices):
    Pick's theorem, area + boundary points / 2 + 1, i.e. the pixels of the hull of pixel centres.
    A hull of collinear points is a segment (its points: boundary + 1), of one point a point."""
    coords, idx = shapely.get_coordinates(hulls, return_index=True)
    step = np.abs(np.diff(coords, axis=0)).astype(np.int64)
    on_edge = np.gcd(step[:, 0], step[:, 1]) * (idx[1:] == idx[:-1])
    boundary = np.bincount(idx[1:], weights=on_edge, minlength=len(hulls))
    kind = shapely.get_type_id(hulls)  # 0 point, 1 segment, 3 polygon (its ring closed)
    polygon = np.rint(shapely.area(hulls) + boundary / 2 + 1)
    return np.where(kind == 3, polygon, np.where(kind == 1, boundary + 1, 1)).astype(np.int64)


def _hulls(points: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Convex hull of each group of at least two points (``groups`` 0..g-1, ascending), all at once
    in GEOS: as the hull of a line through them (made straight from the array, unlike a multipoint,
    which makes a geometry per point first)."""
    return shapely.convex_hull(shapely.linestrings(points.astype(np.float64), indices=groups))


def _label_hulls(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Convex hull of the pixel centres (row, col) of each label in ``ids`` (ascending), from the
    first and last pixel of each of its rows."""
    want = np.zeros(int(labels.max()) + 1, bool)
    want[ids] = True
    rows, cols = np.nonzero(want[labels])  # raster order
    lab = labels[rows, cols]
    order = np.argsort(lab, kind="stable")  # by label, still raster order within one
    rows, cols, lab = rows[order], cols[order], lab[order]
    first = np.flatnonzero(np.r_[True, (lab[1:] != lab[:-1]) | (rows[1:] != rows[:-1])])
    last = np.r_[first[1:] - 1, len(lab) - 1]
    points = np.stack([rows[first], cols[first], rows[last], cols[last]], axis=1).reshape(-1, 2)
    return _hulls(points, np.repeat(np.searchsorted(ids, lab[first]), 2))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The indices start..start+count-1 of every (start, count), concatenated."""
    before = np.cumsum(counts) - counts
    return np.repeat(starts - before, counts) + np.arange(int(counts.sum()))


def _union_hulls(hulls: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The convex hull of ``hulls[a[k]]`` and ``hulls[b[k]]`` for each k."""
    coords, idx = shapely.get_coordinates(hulls, return_index=True)
    counts = np.bincount(idx, minlength=len(hulls))
    starts = np.cumsum(counts) - counts
    pick = np.r_[_ranges(starts[a], counts[a]), _ranges(starts[b], counts[b])]
    pair = np.r_[np.repeat(np.arange(len(a)), counts[a]), np.repeat(np.arange(len(b)), counts[b])]
    order = np.argsort(pair, kind="stable")
    return _hulls(coords[pick[order]], pair[order])


def merge_convex_pieces(
    labels: np.ndarray,
    min_solidity: float,
    max_px: float,
    *,
    min_contact: float = 0.5,
    rounds: int = 4,
) -> np.ndarray:
    """Merge touching labels whose union is convex: area over the pixels of its convex hull at
    least ``min_solidity``, and at most ``max_px`` pixels. A nucleus is convex, so two pieces that
    make a convex whole are one nucleus cut in two by a spurious marker (an elongated nucleus cut
    across its ridge, a pale one in fragments); two round nuclei side by side leave notches where
    they meet. Only pairs in contact along at least ``min_contact`` x the square root of the smaller
    one's area are judged (a cut runs across a piece; a chance contact is short).

    Greedy, most convex pair first, each label merged once per round, up to ``rounds`` rounds;
    merged labels take the lower id and the result is renumbered 1..n in the same order."""
    if min_solidity <= 0 or labels.max() < 2:
        return labels
    n = int(labels.max()) + 1  # ids keep their numbers until the end
    hull = np.full(n, None, object)  # each label's hull, once computed
    changed = np.ones(n, bool)  # pairs of labels unchanged since they were judged stay as judged
    for _ in range(rounds):
        lo, hi, _v = _contacts(labels)
        if len(lo) == 0:
            break
        key, contact = np.unique(lo * n + hi, return_counts=True)
        a_ids, b_ids = key // n, key % n
        area = np.bincount(labels.ravel(), minlength=n)
        size = area[a_ids] + area[b_ids]
        ok = (
            (size <= max_px)
            & (contact >= min_contact * np.sqrt(np.minimum(area[a_ids], area[b_ids])))
            & (changed[a_ids] | changed[b_ids])
        )
        a_ids, b_ids, size = a_ids[ok], b_ids[ok], size[ok]
        if len(a_ids) == 0:
            break
        ids = np.unique(np.r_[a_ids, b_ids])
        todo = ids[shapely.is_missing(hull[ids])]
        if len(todo):
            hull[todo] = _label_hulls(labels, todo)
        union = _union_hulls(hull[ids], np.searchsorted(ids, a_ids), np.searchsorted(ids, b_ids))
        solidity = size / _lattice_counts(union)
        good = solidity >= min_solidity
        if not good.any():
            break
        union, sol, a_ids, b_ids = union[good], solidity[good], a_ids[good], b_ids[good]
        lut = np.arange(n, dtype=labels.dtype)  # ids fit: they are labels
        changed[:] = False
        # most convex first (ties: higher ids first)
        for k in np.lexsort((-b_ids, -a_ids, -sol)).tolist():
            a, b = int(a_ids[k]), int(b_ids[k])
            if changed[a] or changed[b]:
                continue
            changed[a] = changed[b] = True
            lut[b] = a  # a < b
            hull[a] = union[k]  # the hull of a union is the hull of the two hulls
        labels = lut[labels]
    return relabel_by_area(labels, 1, np.inf)  # ids left empty go


def _merge_shallow(
    labels: np.ndarray, relief: np.ndarray, peak: np.ndarray, min_depth: float
) -> np.ndarray:
    """Merge adjacent watershed regions separated by a saddle less than ``min_depth`` below the lower peak.

    ``peak[i]`` is the relief at the seed of label i+1. The saddle of two regions is the highest
    relief along their shared boundary (the lower of the two pixels of each 4-neighbour pair).
    """
    lo, hi, v = _contacts(labels, relief)
    if len(lo) == 0:
        return labels
    n = len(peak) + 1
    key = lo * n + hi
    order = np.lexsort((-v, key))  # per pair, highest boundary value first
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    sel = order[first]
    lo, hi, saddle = lo[sel], hi[sel], v[sel]
    shallow = np.minimum(peak[lo - 1], peak[hi - 1]) - saddle < min_depth
    if not shallow.any():
        return labels
    graph = coo_matrix((np.ones(int(shallow.sum())), (lo[shallow], hi[shallow])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # component ids are assigned in order of the smallest member, so background (0) keeps 0
    return comp[labels].astype(np.int32)


def split_instances(
    foreground: np.ndarray,
    *,
    mpp: float,
    cfg: InstanceConfig | None = None,
    prob: np.ndarray | None = None,
    smooth_um: float = 0.5,
    max_hole_um2: float | None = None,
    min_depth_um: float = 0.25,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) from a boolean nucleus foreground.

    Args:
        foreground: 2-D boolean (or 0/non-0) nucleus mask.
        mpp: micrometres per pixel of ``foreground``.
        cfg: sizes (min/max nucleus area in µm², minimum seed distance in µm); defaults to
            ``InstanceConfig()``.
        prob: optional nucleus probability map in [0, 1], same shape; it multiplies the distance
            relief so seeds and cut lines follow low-probability valleys between nuclei.
        smooth_um: Gaussian sigma (µm) applied to the relief before peak finding, so a flat ridge of
            the distance transform yields one seed rather than several.
        min_depth_um: two touching regions are merged back when the lower of their peaks rises less
            than this above the saddle between them (a flat ridge is one nucleus, not several).
        max_hole_um2: holes up to this area inside the foreground are filled first
            (default: the minimum nucleus area, i.e. anything too small to be a nucleus itself).
    """
    cfg = cfg or InstanceConfig()
    fg = np.asarray(foreground)
    if fg.ndim != 2:
        raise ValueError(f"foreground must be 2-D, got shape {fg.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    fg = fg.astype(bool, copy=False)
    if prob is not None:
        prob = np.asarray(prob, dtype=np.float32)
        if prob.shape != fg.shape:
            raise ValueError(f"prob shape {prob.shape} != foreground shape {fg.shape}")
    px_area = mpp * mpp
    min_px = cfg.min_area_um2 / px_area
    max_px = cfg.max_area_um2 / px_area
    hole_px = (cfg.min_area_um2 if max_hole_um2 is None else max_hole_um2) / px_area

    fg = fill_small_holes(fg, hole_px)
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)

    relief = ndi.distance_transform_edt(fg).astype(np.float32)
    sigma = smooth_um / mpp
    if sigma > 0:
        relief = ndi.gaussian_filter(relief, sigma)
    if prob is not None:
        relief *= ndi.gaussian_filter(prob, sigma) if sigma > 0 else prob
    relief[~fg] = 0

    min_dist = max(1, round(cfg.split_min_distance_um / mpp))
    peaks = peak_local_max(relief, min_distance=min_dist, exclude_border=False, threshold_abs=1e-6)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-relief, markers, mask=fg, connectivity=1)
    if min_depth_um > 0 and len(peaks) > 1:
        labels = _merge_shallow(
            labels, relief, relief[peaks[:, 0], peaks[:, 1]], min_depth_um / mpp
        )

    # components that got no seed (too thin for a peak) keep their own label
    orphans = fg & (labels == 0)
    if orphans.any():
        extra, _ = ndi.label(orphans, structure=_FOUR)
        labels = np.where(orphans, extra + len(peaks), labels)

    # one 4-connected piece per label; equal-valued neighbours connect, so this splits only pieces
    pieces = cc_label(labels, background=0, connectivity=1)
    # debris goes first, so a speck inside a nucleus leaves a hole that is then filled; a nucleus is
    # judged against the maximum area (and exported) with its holes filled
    kept = relabel_by_area(pieces, min_px, np.inf)
    return relabel_by_area(fill_label_holes(kept), 0, max_px)
