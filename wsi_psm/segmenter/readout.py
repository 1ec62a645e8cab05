"""The CPU read-out of the downstream network: foreground and distance maps -> instance labels.

``maps_to_instances``: markers are the connected cores of high predicted distance inside the
foreground (split further at h-maxima of the distance), and a marker-controlled watershed on the
(negated) distance map fills the foreground from them, so touching nuclei part along the distance
valleys between their centres (not connected components).

Torch-free on purpose: the pipeline's post-processing worker processes import this module (via the
picklable :class:`MapsLabeller`), and every second of imports is paid once per worker per slide.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as cc_label
from skimage.morphology import local_maxima
from skimage.segmentation import watershed

from wsi_psm.config import RunConfig
from wsi_psm.instances import (
    fill_label_holes,
    fill_small_holes,
    merge_convex_pieces,
    relabel_by_area,
)

_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = np.ones((3, 3), bool)


def _h_maxima_above(q: np.ndarray, h: int, base: int = 0) -> np.ndarray:
    """skimage's ``h_maxima(q, h)`` of a non-negative int image wherever ``q >= max(h, base)``:
    the same pixels (unit-tested against it), 3-7x faster on a tile of nuclei, because skimage
    sorts every pixel it is given and most of a tile cannot matter.

    Why it is exact: a pixel is in an h-maximum iff it lies on a regional-maximum plateau (level v)
    whose *cap*, the 8-connected component of ``q > v - h`` around it, holds nothing higher than v.
    So the plateaus are judged in rounds on ever-higher level sets, each component of the current
    one on its own: a component holding one live plateau makes it an h-maximum; a component with
    several is cut just under its lowest plateau's cap, which parts it; once a component is that
    cap, its lowest plateaus are h-maxima if nothing in it is higher, and are dropped otherwise.
    Nothing under ``base - h`` can decide a plateau at ``base`` or above, so it is never looked at.
    """
    base = max(base, h)
    peaks = local_maxima(q, connectivity=2, allow_borders=True) & (q >= base)
    plat, n_plat = ndi.label(peaks, structure=_EIGHT)
    if n_plat == 0:
        return peaks
    flat = np.flatnonzero(plat)
    rep = np.zeros(n_plat + 1, np.int64)  # one pixel of each plateau
    rep[plat.ravel()[flat]] = flat
    level = q.ravel()[rep].astype(np.int64)
    rr, cc = np.divmod(rep, q.shape[1])
    live = np.ones(n_plat + 1, bool)
    live[0] = False
    found = np.zeros(n_plat + 1, bool)
    cut = np.full(n_plat + 1, base - h - 1, np.int64)  # the level set each plateau is judged on
    active, qa, r0, c0 = q > base - h - 1, q, 0, 0
    never = np.iinfo(np.int64).max
    while live.any():
        ids = np.flatnonzero(live)
        # the live plateaus' components lie inside the active pixels' box: label only that
        rows, cols = np.flatnonzero(active.any(1)), np.flatnonzero(active.any(0))
        active = active[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        qa = qa[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        r0, c0 = r0 + rows[0], c0 + cols[0]
        lab, n = ndi.label(active, structure=_EIGHT)
        comp = lab[rr[ids] - r0, cc[ids] - c0]
        count = np.bincount(comp, minlength=n + 1)
        lo = np.full(n + 1, never)
        np.minimum.at(lo, comp, level[ids])
        hi = np.full(n + 1, -1, np.int64)
        np.maximum.at(hi, comp, level[ids])
        now = np.zeros(n + 1, np.int64)
        now[comp] = cut[ids]  # one level set per component: its plateaus share their cut
        is_cap = (count > 1) & (lo - h == now)  # the component is its lowest plateaus' cap
        to_cut = (count > 1) & (lo - h > now)
        win = (count == 1) | (is_cap & (hi == lo))
        lose = is_cap[comp] & (hi[comp] > lo[comp]) & (level[ids] == lo[comp])
        found[ids[win[comp]]] = True
        live[ids[win[comp] | lose]] = False
        cut[ids[to_cut[comp]]] = lo[comp[to_cut[comp]]] - h
        keep_at = np.full(n + 1, never)
        keep_at[to_cut] = lo[to_cut] - h
        stay = is_cap & (hi > lo)
        keep_at[stay] = now[stay]
        active = active & (qa > keep_at[lab])
    return found[plat]


def _shrink(labels: np.ndarray, shrink_um: float, mpp: float) -> np.ndarray:
    """``labels`` without the pixels whose centre lies within ``shrink_um`` of their instance's edge
    (the edge with the background or with another instance; the image border is no edge). Each
    instance keeps its largest 4-connected piece; instances left empty are dropped (renumbered)."""
    if 0.5 * mpp >= shrink_um:  # every centre is at least half a pixel in: nothing to take off
        return labels
    lo = ndi.grey_erosion(labels, footprint=_FOUR, mode="nearest")
    hi = ndi.grey_dilation(labels, footprint=_FOUR, mode="nearest")
    edge = (labels > 0) & ((lo != labels) | (hi != labels))
    if not edge.any():
        return labels
    # an edge pixel's centre is half a pixel from the edge; the others add their distance to one
    to_edge = (ndi.distance_transform_edt(~edge) + 0.5) * mpp
    if not (to_edge[edge] < shrink_um).any():  # less than half a pixel: nothing to take off
        return labels
    cut = np.where(to_edge < shrink_um, 0, labels)
    pieces = cc_label(cut, background=0, connectivity=1)  # 4-connected pieces of one label each
    n = int(pieces.max())
    if n == 0:
        return np.zeros_like(labels)
    owner = np.zeros(n + 1, np.int64)
    owner[pieces.ravel()] = cut.ravel()
    area = np.bincount(pieces.ravel(), minlength=n + 1)
    area[0] = 0
    # the largest piece of each instance: sort pieces by (owner, area) and keep each owner's last
    order = np.lexsort((area[1:], owner[1:])) + 1
    last = np.r_[owner[order][1:] != owner[order][:-1], True]
    keep = np.zeros(n + 1, bool)
    keep[order[last]] = True
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[pieces]


def _split_cores(
    cores: np.ndarray, n_cores: int, mask: np.ndarray, d: np.ndarray, h: float, floor: float
) -> tuple[np.ndarray, int]:
    """Markers = the h-maxima of ``d`` inside ``mask`` (above ``floor``), plus every threshold core
    that holds none of them. Touching nuclei whose distance peaks are parted by a shallow valley
    (one core above the threshold) get one marker each."""
    # quantised to 1/1000: h_maxima on floats is sensitive to rounding plateaus
    q = np.where(mask, np.round(d * 1000), 0).astype(np.int32)
    h_q = max(1, round(h * 1000))
    # maxima under the floor are dropped anyway: the search need not look at lower levels
    peaks = _h_maxima_above(q, h_q, int(np.floor(floor * 1000))) & (d > floor)
    plabels, n_peaks = ndi.label(peaks, structure=np.ones((3, 3), bool))
    has_peak = np.zeros(n_cores + 1, bool)
    has_peak[np.unique(cores[plabels > 0])] = True
    has_peak[0] = True
    lonely, n_lonely = ndi.label(~has_peak[cores], structure=_FOUR)
    markers = np.where(plabels > 0, plabels, np.where(lonely > 0, lonely + n_peaks, 0))
    return markers.astype(np.int32), n_peaks + n_lonely


def maps_to_instances(
    fg: np.ndarray,
    dist: np.ndarray,
    *,
    mpp: float,
    fg_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    marker_h: float = 0.0,
    smooth_um: float = 0.25,
    shrink_um: float = 0.0,
    merge_solidity: float = 0.0,
    min_area_um2: float = 8.0,
    max_area_um2: float = 300.0,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) from foreground and distance probability maps.

    Markers: 4-connected components of ``dist > marker_threshold`` inside the foreground. With
    ``marker_h > 0`` every regional maximum of the (smoothed) distance that stands at least
    ``marker_h`` above its surroundings (an h-maximum, above ``marker_threshold / 2``) is a marker
    of its own, so a core that holds two peaks is split, and a core without one keeps one marker.
    Each foreground component without a marker keeps one label of its own. ``shrink_um > 0``
    then takes off every pixel whose centre lies within that many µm of its instance's edge (with
    the background or a neighbour; none where a pixel is at least twice as wide). With
    ``merge_solidity > 0``, touching instances whose union is that convex are merged first
    (:func:`~wsi_psm.instances.merge_convex_pieces`). Labels are one
    4-connected piece each, hole-free, area-filtered (µm²), numbered 1..n in raster order.
    """
    px = mpp * mpp
    sigma = smooth_um / mpp
    d = (
        ndi.gaussian_filter(dist.astype(np.float32), sigma)
        if sigma > 0
        else dist.astype(np.float32)
    )
    mask = fill_small_holes(fg > fg_threshold, min_area_um2 / px)
    if not mask.any():
        return np.zeros(fg.shape, np.int32)
    markers, n = ndi.label(mask & (d > marker_threshold), structure=_FOUR)
    if marker_h > 0:
        markers, n = _split_cores(markers, n, mask, d, marker_h, marker_threshold / 2)
    labels = watershed(-d, markers, mask=mask, connectivity=1)
    orphans = mask & (labels == 0)
    if orphans.any():
        extra, _ = ndi.label(orphans, structure=_FOUR)
        labels = np.where(orphans, extra + n, labels)
    pieces = cc_label(labels, background=0, connectivity=1)
    kept = relabel_by_area(pieces, min_area_um2 / px, np.inf)
    out = relabel_by_area(fill_label_holes(kept), 0, max_area_um2 / px)
    return finish_instances(
        out, mpp=mpp, merge_solidity=merge_solidity, shrink_um=shrink_um, max_area_um2=max_area_um2
    )


def finish_instances(
    labels: np.ndarray, *, mpp: float, merge_solidity: float, shrink_um: float, max_area_um2: float
) -> np.ndarray:
    """The last steps of :func:`maps_to_instances`, apart so that a caller can count the nuclei
    separated before them (the magnification rule was set on those counts): pieces whose union is
    convex merged, then the halo shrunk off (sizes were judged before: the shrink trims the halo,
    not the nucleus found)."""
    if merge_solidity > 0:
        merged = merge_convex_pieces(labels, merge_solidity, max_area_um2 / (mpp * mpp))
        if merged.max() < labels.max():  # two pieces may enclose a gap: it joins them
            labels = fill_label_holes(merged)
    return _shrink(labels, shrink_um, mpp) if shrink_um > 0 else labels


def separated_from_maps(maps: np.ndarray, *, mpp: float, cfg: RunConfig) -> np.ndarray:
    """:func:`maps_to_instances` on a (2, H, W) map pair at ``mpp`` with the run's thresholds and
    sizes, before :func:`finished_instances`'s last steps: what the magnification rule counts."""
    sc, ic = cfg.segmenter, cfg.instances
    return maps_to_instances(
        np.asarray(maps[0], np.float32), np.asarray(maps[1], np.float32), mpp=mpp,
        fg_threshold=sc.fg_threshold, marker_threshold=sc.marker_threshold, marker_h=sc.marker_h,
        min_area_um2=ic.min_area_um2, max_area_um2=ic.max_area_um2,
    )  # fmt: skip


def finished_instances(labels: np.ndarray, *, mpp: float, cfg: RunConfig) -> np.ndarray:
    """:func:`finish_instances` with the run's settings, on :func:`separated_from_maps`'s labels."""
    sc = cfg.segmenter
    return finish_instances(
        labels, mpp=mpp, merge_solidity=sc.merge_solidity, shrink_um=sc.shrink_um,
        max_area_um2=cfg.instances.max_area_um2,
    )  # fmt: skip


def instances_from_maps(maps: np.ndarray, *, mpp: float, cfg: RunConfig) -> np.ndarray:
    """:func:`maps_to_instances` on a (2, H, W) map pair at ``mpp``, with the run's thresholds and sizes."""
    return finished_instances(separated_from_maps(maps, mpp=mpp, cfg=cfg), mpp=mpp, cfg=cfg)


class MapsLabeller:
    """The CPU half of the segmenter route: network maps -> instances (picklable, holds no net)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def labels(self, image: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return instances_from_maps(raw, mpp=self.cfg.target_mpp, cfg=self.cfg)
