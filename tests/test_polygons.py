"""labels_to_polygons: exact pixel-corner outlines in level-0 px; polygon_measurements: shape features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from scipy import ndimage
from shapely.geometry import Polygon, box
from skimage.draw import disk, ellipse
from skimage.measure import label as cc_label

from wsi_psm.polygons import (
    AREA,
    CIRCULARITY,
    ECCENTRICITY,
    MAJOR_AXIS,
    MEASUREMENT_NAMES,
    MINOR_AXIS,
    PERIMETER,
    SOLIDITY,
    labels_to_polygons,
    polygon_measurements,
    polygons_measurements,
)

CROSS = ndimage.generate_binary_structure(2, 1)


def rasterise(poly: Polygon, shape: tuple[int, int], scale=1.0, offset=(0.0, 0.0)) -> np.ndarray:
    """Pixel-centre rasterisation of a level-0 polygon back onto the label array's grid."""
    transform = Affine(scale, 0, offset[0], 0, scale, offset[1])
    return rasterio.features.rasterize(
        [(poly, 1)], out_shape=shape, transform=transform, all_touched=False, dtype=np.uint8
    ).astype(bool)


def expected_mask(labels: np.ndarray, k: int) -> np.ndarray:
    """The documented result for label k: its largest 4-connected piece, holes filled."""
    pieces, n = ndimage.label(labels == k, structure=CROSS)
    if n > 1:
        sizes = np.bincount(pieces.ravel())[1:]
        pieces = pieces == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(pieces > 0, structure=CROSS)


def assert_round_trip(labels: np.ndarray, scale=1.0, offset=(0.0, 0.0)) -> int:
    out = labels_to_polygons(labels, scale=scale, offset=offset)
    assert [k for k, _ in out] == sorted(int(v) for v in np.unique(labels) if v)
    for k, poly in out:
        assert poly.is_valid, (k, shapely.is_valid_reason(poly))
        assert len(poly.interiors) == 0
        assert shapely.is_ccw(poly.exterior)
        np.testing.assert_array_equal(
            rasterise(poly, labels.shape, scale, offset), expected_mask(labels, k), err_msg=str(k)
        )
    return len(out)


def test_one_pixel_cell_is_the_unit_square_at_c_r():
    labels = np.zeros((6, 9), np.int32)
    labels[3, 5] = 7  # row 3, column 5
    [(k, poly)] = labels_to_polygons(labels)
    assert k == 7
    assert poly.equals(box(5, 3, 6, 4))
    assert poly.area == 1.0
    assert sorted(map(tuple, shapely.get_coordinates(poly)[:-1])) == [
        (5, 3),
        (5, 4),
        (6, 3),
        (6, 4),
    ]


def test_scale_and_offset_map_to_level0():
    labels = np.zeros((6, 9), np.int32)
    labels[3, 5] = 1
    labels[0:2, 0:3] = 2
    out = dict(labels_to_polygons(labels, scale=2.5, offset=(100.0, 40.0)))
    assert out[1].equals(box(100 + 5 * 2.5, 40 + 3 * 2.5, 100 + 6 * 2.5, 40 + 4 * 2.5))
    assert out[2].equals(box(100, 40, 100 + 3 * 2.5, 40 + 2 * 2.5))
    assert out[2].area == pytest.approx(6 * 2.5**2)
    assert_round_trip(labels, scale=2.5, offset=(100.0, 40.0))


def test_concave_diagonal_touching_and_border_shapes():
    labels = np.zeros((20, 24), np.int32)
    labels[0:6, 0:2] = 1  # L shape on the top-left border
    labels[4:6, 2:6] = 1
    labels[1:6, 8:15] = 2  # U shape (concave)
    labels[1:4, 10:13] = 0
    labels[8, 8] = 3  # 3 and 4 touch only at a corner
    labels[9, 9] = 4
    for i in range(6):  # a diagonal staircase
        labels[10 + i, 12 + i : 14 + i] = 5
    labels[14:20, 0:4] = 6  # two labels sharing an edge, on the bottom border
    labels[14:20, 4:7] = 7
    labels[8:11, 18:24] = 8  # right border
    assert assert_round_trip(labels) == 8


def test_pinched_ring_comes_back_filled_and_pieces_keep_the_largest():
    labels = np.zeros((10, 12), np.int32)
    # A C whose tips touch diagonally: one 4-connected piece enclosing one background pixel.
    labels[1, 1:4] = 1
    labels[2, 1] = 1
    labels[2, 3] = 1
    labels[3, 2:4] = 1
    # Label 2 in two 4-pieces (touching diagonally): 4 pixels and 1 pixel; the 1-pixel piece goes.
    labels[5:7, 5:7] = 2
    labels[7, 7] = 2
    out = dict(labels_to_polygons(labels))
    assert out[1].area == 8  # 7 pixels + the enclosed hole pixel
    assert out[2].equals(box(5, 5, 7, 7))
    assert_round_trip(labels)


def test_random_partitions_round_trip_exactly():
    rng = np.random.default_rng(0)
    for trial in range(4):
        h, w = 96, 128
        noise = ndimage.gaussian_filter(rng.normal(size=(h, w)), 1.5 + trial)
        fg = noise > 0.02
        seeds = rng.integers(0, [h, w], size=(40, 2))
        rr, cc = np.mgrid[:h, :w]
        d = (rr[..., None] - seeds[:, 0]) ** 2 + (cc[..., None] - seeds[:, 1]) ** 2
        voronoi = d.argmin(axis=-1) + 1
        # 4-connected pieces of equal value; some enclose others, some have pinches and holes.
        labels = cc_label(np.where(fg, voronoi, 0), connectivity=1, background=0)
        # Re-merge a few pieces under one label so multi-piece labels occur too.
        labels[labels % 7 == 0] = np.where(labels[labels % 7 == 0] > 0, 1, 0)
        assert assert_round_trip(labels.astype(np.int32)) > 20


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32, np.int64])
def test_integer_dtypes(dtype):
    labels = np.zeros((5, 5), dtype)
    labels[1:3, 1:4] = 9
    [(k, poly)] = labels_to_polygons(labels)
    assert k == 9 and poly.equals(box(1, 1, 4, 3))


def test_empty_and_bad_input():
    assert labels_to_polygons(np.zeros((4, 4), np.int32)) == []
    assert labels_to_polygons(np.zeros((0, 4), np.int32)) == []
    with pytest.raises(ValueError):
        labels_to_polygons(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError):
        labels_to_polygons(np.ones((2, 4, 4), np.int32))


def test_measurements_of_one_pixel_and_names():
    m = polygon_measurements(box(5, 3, 6, 4), mpp=0.5)
    assert tuple(m) == MEASUREMENT_NAMES
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert m[AREA] == pytest.approx(0.25)
    assert m[SOLIDITY] == pytest.approx(1.0)
    assert m[ECCENTRICITY] == pytest.approx(0.0, abs=1e-9)
    assert m[MAJOR_AXIS] == pytest.approx(4 / math.sqrt(12) * 0.5)


def test_measurements_of_a_digital_disk_and_ellipse():
    labels = np.zeros((80, 80), np.int32)
    labels[disk((40.3, 40.6), 20)] = 1
    [(_, poly)] = labels_to_polygons(labels, scale=2.0, offset=(1000, 500))
    m = polygon_measurements(poly, mpp=0.25)  # 0.5 µm per array pixel
    assert m[AREA] == pytest.approx((labels == 1).sum() * 0.25)
    assert m[PERIMETER] == pytest.approx(2 * math.pi * 20 * 0.5, rel=0.02)
    assert m[CIRCULARITY] > 0.97
    assert m[MAJOR_AXIS] == pytest.approx(40 * 0.5, rel=0.02)
    assert m[MINOR_AXIS] == pytest.approx(40 * 0.5, rel=0.02)
    assert m[SOLIDITY] > 0.95

    labels[:] = 0
    labels[ellipse(40, 40, 10, 30, rotation=0.6)] = 1
    [(_, poly)] = labels_to_polygons(labels)
    m = polygon_measurements(poly, mpp=1.0)
    assert m[MAJOR_AXIS] == pytest.approx(60, rel=0.03)
    assert m[MINOR_AXIS] == pytest.approx(20, rel=0.05)
    assert m[ECCENTRICITY] == pytest.approx(math.sqrt(1 - (10 / 30) ** 2), abs=0.01)
    assert 0.6 < m[CIRCULARITY] < 0.8  # an exact 3:1 ellipse has 0.70


def test_measurements_concave_and_scale_invariant():
    labels = np.zeros((12, 12), np.int32)
    labels[1:9, 1:3] = 1  # L: 16 + 12 = 28 px, hull 8x8 minus a triangle
    labels[7:9, 3:9] = 1
    [(_, poly)] = labels_to_polygons(labels)
    m = polygon_measurements(poly, mpp=1.0)
    assert m[AREA] == 28
    assert m[SOLIDITY] == pytest.approx(28 / poly.convex_hull.area)
    assert m[SOLIDITY] < 0.7
    [(_, big)] = labels_to_polygons(labels, scale=4.0, offset=(7, 9))
    m4 = polygon_measurements(big, mpp=0.25)
    for k in MEASUREMENT_NAMES:
        assert m4[k] == pytest.approx(m[k], rel=1e-9)


def test_measurements_reject_degenerate():
    with pytest.raises(ValueError):
        polygon_measurements(Polygon(), 1.0)
    with pytest.raises(ValueError):
        polygon_measurements(Polygon([(0, 0), (1, 1), (2, 2)]), 1.0)


def test_measurements_of_many_polygons_at_once_equal_one_by_one():
    """A tile's polygons are measured in one call (per-edge sums per ring): no edge may join two
    rings, whatever the mix of sizes, shapes and vertex counts."""
    rng = np.random.default_rng(3)
    labels = np.zeros((120, 160), np.int32)
    for k in range(1, 40):
        r, c = rng.integers(5, 115), rng.integers(5, 155)
        labels[ellipse(r, c, rng.uniform(1, 6), rng.uniform(1, 9), shape=labels.shape,
                       rotation=rng.uniform(0, np.pi))] = k  # fmt: skip
    polys = [p for _, p in labels_to_polygons(labels, scale=1.7, offset=(1e5, 3e4))]
    assert len(polys) > 20
    many = polygons_measurements(polys, 0.3)
    assert many.shape == (len(polys), len(MEASUREMENT_NAMES))
    for row, poly in zip(many, polys, strict=True):
        one = polygon_measurements(poly, 0.3)
        np.testing.assert_allclose(row, [one[k] for k in MEASUREMENT_NAMES], rtol=1e-12)
        assert one[AREA] == pytest.approx(poly.area * 0.3 * 0.3, rel=1e-9)
    assert polygons_measurements([], 0.3).shape == (0, len(MEASUREMENT_NAMES))
