"""Tile grid geometry, the ownership rule, and the Dask tile stream."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from wsi_psm.config import RunConfig
from wsi_psm.errors import SlideTooSmallError, UnsupportedSlideError
from wsi_psm.stream import stream_batches
from wsi_psm.tiling import check_input_resolution, make_grid
from wsi_psm.tissue import TissueMask

CFG = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 8.0})


def test_cores_partition_the_slide_exactly():
    grid = make_grid(1000, 700, 0.499, CFG)
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(0, 1000, 5000), rng.uniform(0, 700, 5000)])
    # corners and seams exactly
    seams = [(t.core[0], t.core[1]) for t in grid] + [
        (t.core[2] - 1e-9, t.core[3] - 1e-9) for t in grid
    ]
    pts = np.vstack([pts, np.array(seams)])
    owners = np.zeros(len(pts), dtype=int)
    for t in grid:
        owners += t.owns(pts[:, 0], pts[:, 1])
    assert np.all(owners == 1)


def test_read_box_contains_core_plus_margin():
    grid = make_grid(1000, 700, 0.25, CFG)
    for t in grid:
        x0, y0, _x1, _y1 = t.core
        margin_l0 = grid.margin_px * t.scale_x
        assert t.x <= x0 - margin_l0 + 1e-6 and t.y <= y0 - margin_l0 + 1e-6
        assert t.x + t.w >= x0 + grid.core_l0 + margin_l0 - 1e-6
        assert t.y + t.h >= y0 + grid.core_l0 + margin_l0 - 1e-6
        assert t.size == grid.tile_px


def test_tissue_filter_keeps_only_tiles_with_tissue():
    mask = np.zeros((70, 100), dtype=bool)
    mask[:, :30] = True  # tissue in the left 30% (thumbnail at 10 level-0 px per px)
    grid_all = make_grid(1000, 700, 0.5, CFG)
    grid = make_grid(1000, 700, 0.5, CFG, TissueMask(mask, 10.0))
    assert 0 < len(grid) < len(grid_all)
    assert all(t.core[0] < 300 for t in grid)


def test_slide_smaller_than_a_tile_is_refused():
    with pytest.raises(SlideTooSmallError, match="smaller than one tile"):
        make_grid(16, 16, 0.499, CFG, name="small.svs")


def test_stream_yields_every_tile_once_in_order_with_bounded_prefetch():
    grid = make_grid(1000, 700, 0.5, CFG)
    in_flight = []
    lock = threading.Lock()
    consumed = []

    def read(tile):
        with lock:
            in_flight.append(tile.index - len(consumed))
        return np.full((tile.size, tile.size, 3), tile.index % 256, dtype=np.uint8)

    seen = []
    for batch in stream_batches(read, grid.tiles, batch_size=3, workers=2, prefetch=2):
        assert batch.images.shape[1:] == (grid.tile_px, grid.tile_px, 3)
        seen.extend(t.index for t in batch.tiles)
        assert all(
            int(img[0, 0, 0]) == t.index % 256
            for img, t in zip(batch.images, batch.tiles, strict=True)
        )
        consumed.extend(batch.tiles)
    assert seen == [t.index for t in grid]
    # never more than (prefetch + 2 batches) of tiles decoded ahead of the consumer
    assert max(in_flight) <= 3 * (2 + 2)


def test_stream_reraises_decode_errors_in_the_consumer():
    grid = make_grid(1000, 700, 0.5, CFG)

    def read(tile):
        if tile.index == 4:
            raise OSError("bad tile")
        return np.zeros((tile.size, tile.size, 3), dtype=np.uint8)

    with pytest.raises(OSError, match="bad tile"):
        for _ in stream_batches(read, grid.tiles, batch_size=2, workers=2, prefetch=1):
            pass


def test_tissue_area_counts_only_the_slide_part_of_edge_pixels():
    """A thumbnail rounds up: a 1005 x 702 px slide at 10 px per mask pixel gives 101 x 71 mask
    pixels, the last column holding 5 slide px and the last row 2. All tissue: the area is the
    slide's, not the mask's 1010 x 710 px."""
    mask = TissueMask(np.ones((71, 101), dtype=bool), 10.0)
    mpp = 0.5
    assert mask.area_mm2(mpp, (1005, 702)) == pytest.approx(1005 * 702 * mpp**2 / 1e6)
    assert mask.area_mm2(mpp) == pytest.approx(1010 * 710 * mpp**2 / 1e6)  # the mask as drawn


def test_an_input_over_4x_coarser_than_processing_is_refused_with_the_right_hint() -> None:
    check_input_resolution(2.0, 0.5)  # 4x: the most that is done
    with pytest.raises(UnsupportedSlideError, match="not a magnification"):  # --mpp 20 for 20x
        check_input_resolution(20.0, 0.5, "a", "user")
    with pytest.raises(UnsupportedSlideError, match=r"the file says so \(tiff-resolution\)"):
        check_input_resolution(5.0, 0.5, "b", "tiff-resolution")  # nothing the user typed
