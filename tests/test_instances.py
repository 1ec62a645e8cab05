"""Instance separation: touching nuclei, sizes in µm, holes, 4-connected labels, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.draw import disk, ellipse
from skimage.filters import threshold_otsu
from skimage.measure import label as cc_label

from wsi_psm.config import InstanceConfig
from wsi_psm.groundtruth import load_monuseg_xml
from wsi_psm.instances import fill_label_holes, fill_small_holes, split_instances
from wsi_psm.metrics import aji, panoptic_quality

MPP = 0.25  # MoNuSeg-like: default sizes are 128..4800 px, seeds >= 10 px apart


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a & b) / np.sum(a | b))


def _check_labels(lab: np.ndarray) -> None:
    """int32, labels 1..n all present, each one 4-connected piece."""
    assert lab.dtype == np.int32
    ids = np.unique(lab)
    assert ids[0] == 0 or lab.all()
    assert np.array_equal(ids[ids > 0], np.arange(1, lab.max() + 1))
    pieces = cc_label(lab, background=0, connectivity=1)
    assert pieces.max() == lab.max()


def test_touching_discs_are_split() -> None:
    fg = np.zeros((100, 120), bool)
    a = np.zeros_like(fg)
    b = np.zeros_like(fg)
    a[disk((50, 40), 14)] = True
    b[disk((50, 64), 14)] = True  # centres 24 px apart: a neck of ~14 px
    fg = a | b
    lab = split_instances(fg, mpp=MPP)
    _check_labels(lab)
    assert lab.max() == 2
    assert np.array_equal(lab > 0, fg)
    ious = sorted(max(_iou(lab == k, a), _iou(lab == k, b)) for k in (1, 2))
    assert ious[0] > 0.85


def test_elongated_nucleus_and_flat_ridge_stay_whole() -> None:
    fg = np.zeros((100, 130), bool)
    fg[ellipse(50, 40, 10, 24)] = True
    fg[20:40, 75:125] = True  # a 5 x 12.5 µm bar: its distance ridge is flat
    lab = split_instances(fg, mpp=MPP)
    _check_labels(lab)
    assert lab.max() == 2
    # without the merge of shallow saddles the flat ridge would yield several seeds
    assert split_instances(fg, mpp=MPP, min_depth_um=0).max() > 2


def test_probability_valley_splits_a_bar() -> None:
    fg = np.zeros((80, 100), bool)
    fg[30:50, 25:75] = True
    yy, xx = np.mgrid[:80, :100]
    prob = np.exp(-((yy - 40) ** 2 + (xx - 37) ** 2) / 200) + np.exp(
        -((yy - 40) ** 2 + (xx - 63) ** 2) / 200
    )
    prob /= prob.max()
    lab = split_instances(fg, mpp=MPP, prob=prob)
    _check_labels(lab)
    assert lab.max() == 2
    cut = np.flatnonzero(np.diff(lab[40, 25:75])) + 25  # the boundary sits in the valley at x = 50
    assert len(cut) == 1 and abs(cut[0] - 50) <= 2
    with pytest.raises(ValueError, match="shape"):
        split_instances(fg, mpp=MPP, prob=prob[:10])


def test_sizes_in_micrometres() -> None:
    # one seed per blob (seeds >= 50 µm apart), so each blob is judged whole by its area
    cfg = InstanceConfig(min_area_um2=8.0, max_area_um2=300.0, split_min_distance_um=50.0)
    fg = np.zeros((200, 200), bool)
    fg[disk((20, 20), 4)] = True  # 49 px = 3 µm² at 0.25 µm/px: debris
    fg[disk((60, 60), 15)] = True  # ~700 px = 44 µm²: a nucleus
    fg[100:190, 100:190] = True  # 8100 px = 506 µm²: too large
    lab = split_instances(fg, mpp=MPP, cfg=cfg)
    assert lab.max() == 1 and lab[60, 60] == 1
    # at 0.5 µm/px the same pixels cover 4x the area: small disc 12 µm², large one 177 µm², square 2025 µm²
    lab = split_instances(fg, mpp=0.5, cfg=cfg)
    assert lab.max() == 2 and lab[20, 20] > 0 and lab[60, 60] > 0 and lab[150, 150] == 0


def test_holes() -> None:
    fg = np.zeros((120, 100), bool)
    fg[disk((30, 30), 16)] = True
    fg[30, 30] = False  # a 1-px hole: filled before splitting
    fg[disk((85, 45), 25)] = True
    fg[disk((85, 45), 10)] = False  # ~310 px = 19 µm²: the pale centre of one nucleus, filled after
    lab = split_instances(fg, mpp=MPP, min_depth_um=10)
    _check_labels(lab)
    assert lab[30, 30] > 0
    assert lab[85, 45] > 0 and len(np.unique(lab[60:111, 20:71])) == 2  # one nucleus, hole filled
    # a gap bordered by two different nuclei stays background
    two = np.zeros((60, 60), np.int32)
    two[10:50, 10:30] = 1
    two[10:50, 30:50] = 2
    two[25:35, 25:35] = 0
    np.testing.assert_array_equal(fill_label_holes(two), two)
    one = two.copy()
    one[one == 2] = 1
    assert (fill_label_holes(one)[25:35, 25:35] == 1).all()
    edge = np.zeros((10, 10), bool)
    edge[:, 3:] = True
    edge[:, 5] = False  # a background channel touching the border is not a hole
    assert not fill_small_holes(edge, 100)[:, 5].any()


def test_empty_and_diagonal_pixels_and_determinism() -> None:
    assert split_instances(np.zeros((32, 32), bool), mpp=MPP).max() == 0
    rng = np.random.default_rng(0)
    fg = ndi.gaussian_filter(rng.random((256, 256)), 1.5) > 0.52  # ragged blobs, diagonal contacts
    cfg = InstanceConfig(min_area_um2=0.0, max_area_um2=1e6, split_min_distance_um=1.0)
    lab = split_instances(fg, mpp=MPP, cfg=cfg)
    _check_labels(lab)
    # nothing dropped with open size limits; only enclosed pockets are added
    assert not (fg & (lab == 0)).any()
    assert not ((lab > 0) & ~ndi.binary_fill_holes(fg)).any()
    np.testing.assert_array_equal(lab, split_instances(fg.copy(), mpp=MPP, cfg=cfg))
    with pytest.raises(ValueError):
        split_instances(fg, mpp=0)


def test_watershed_beats_connected_components_on_monuseg(monuseg_dir: Path) -> None:
    """On real touching nuclei, splitting must improve AJI and PQ over plain connected components."""
    stem = "TCGA-21-5786-01Z-00-DX1"  # crowded tissue
    rgb = tifffile.imread(monuseg_dir / "images" / f"{stem}.tif")[:500, :500, :3]
    gt = load_monuseg_xml(monuseg_dir / "annotations" / f"{stem}.xml")[:500, :500]
    h = rgb2hed(rgb)[..., 0]
    fg = h > threshold_otsu(h)
    lab = split_instances(fg, mpp=0.2527)
    _check_labels(lab)
    no_split = InstanceConfig(split_min_distance_um=1000.0, max_area_um2=1e6)
    cc = split_instances(fg, mpp=0.2527, cfg=no_split, min_depth_um=1e6)
    assert cc.max() < lab.max()
    assert aji(lab, gt) > aji(cc, gt) + 0.02
    assert panoptic_quality(lab, gt)["pq"] > panoptic_quality(cc, gt)["pq"]


def _lattice_pixels(mask: np.ndarray) -> int:
    from wsi_psm.instances import _label_hulls, _lattice_counts

    return int(_lattice_counts(_label_hulls(mask.astype(np.int32), np.array([1])))[0])


def test_hull_pixel_count_is_exact_on_convex_shapes() -> None:
    """Pick's theorem on the hull of pixel centres counts a digital convex shape's own pixels,
    whatever its size (so the solidity threshold does not drift with the resolution)."""
    for r in (3, 6, 11):
        d = np.zeros((30, 30), bool)
        d[disk((15, 15), r)] = True
        assert _lattice_pixels(d) == d.sum()
    sq = np.zeros((9, 9), bool)
    sq[2:7, 1:8] = True
    assert _lattice_pixels(sq) == 35
    line = np.zeros((9, 9), bool)
    line[[0, 2, 4, 6], [0, 1, 2, 3]] = True  # collinear: points of a segment
    assert _lattice_pixels(line) == 4
    notch = sq.copy()
    notch[2:5, 4] = False  # a slit: the hull keeps its pixels
    assert _lattice_pixels(notch) == 35


def test_convex_pieces_merge_and_touching_nuclei_do_not() -> None:
    from wsi_psm.instances import merge_convex_pieces

    lab = np.zeros((80, 160), np.int32)
    # an elongated nucleus cut across its long axis into three pieces
    rr, cc = ellipse(40, 30, 9, 24)
    lab[rr, cc] = np.where(cc < 22, 1, np.where(cc < 38, 2, 3))
    # two round nuclei pressed together (one straight contact of 10 px)
    a = np.zeros(lab.shape, bool)
    a[disk((40, 100), 10)] = True
    b = np.zeros(lab.shape, bool)
    b[disk((40, 116), 10)] = True
    lab[a] = 4
    lab[b & ~a] = 5
    out = merge_convex_pieces(lab, 0.96, 5000)
    _check_labels(out)
    assert out.max() == 3
    assert len(np.unique(out[rr, cc])) == 1  # the three pieces are one nucleus again
    assert out[40, 100] != out[40, 116]  # the notched pair stays two
    assert np.array_equal(out > 0, lab > 0)  # no pixel gained or lost
    # the same nucleus over the size limit, or with the merge off, stays cut
    assert merge_convex_pieces(lab, 0.96, 400).max() == 5
    assert np.array_equal(merge_convex_pieces(lab, 0.0, 5000), lab)
