"""Cells planted on tile seams and corners are found exactly once, whole, where they were planted."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from wsi_psm.config import RunConfig
from wsi_psm.instances import split_instances
from wsi_psm.pipeline import prepare_slide, run_slide

MPP = 0.5
CFG = RunConfig().with_updates(
    **{"tiles.core_um": 64.0, "tiles.margin_um": 12.0, "tiles.batch_size": 3, "target_mpp": MPP}
)


class DarkThreshold:
    """A stand-in for the learned model: nuclei are the dark pixels (keeps this test about stitching)."""

    def network(self, images):
        return [None] * len(images)

    def labels(self, image, raw):
        return split_instances(image.mean(axis=-1) < 120, mpp=MPP)


def _plant(path, size_px: int, centres: list[tuple[float, float]], radius_px: float) -> None:
    img = np.empty((size_px, size_px, 3), dtype=np.uint8)
    img[:] = (235, 170, 205)  # eosin-pink tissue everywhere
    for cx, cy in centres:
        rr, cc = disk((cy, cx), radius_px, shape=img.shape[:2])
        img[rr, cc] = (60, 40, 120)  # haematoxylin-dark nucleus
    res = (1e4 / MPP, 1e4 / MPP)  # px per cm
    tifffile.imwrite(
        path, img, tile=(128, 128), resolution=res, resolutionunit="CENTIMETER", photometric="rgb"
    )


def test_cells_on_seams_and_corners_are_found_once(tmp_path):
    core_px = 128  # 64 µm at 0.5 µm/px
    size = 4 * core_px
    seams = [core_px * k for k in (1, 2, 3)]
    centres = []
    for s in seams:
        centres += [
            (s, 40.0),
            (s + 0.5, 300.0),
            (40.0, s),
            (300.0, s - 0.5),
        ]  # on vertical/horizontal seams
        for t in seams:
            centres.append((s, t))  # on corners where four tiles meet
    centres += [(64.0, 64.0), (200.0, 450.0)]  # inside cores
    centres = list(dict.fromkeys(centres))
    # keep planted disks apart so each is one object
    pts = np.array(centres)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)) + np.eye(len(pts)) * 1e9
    assert d.min() > 25
    slide_path = tmp_path / "planted.tif"
    _plant(slide_path, size, centres, radius_px=8)

    ctx = prepare_slide(slide_path, CFG)
    try:
        assert len(ctx.grid) == 16
        run = run_slide(ctx, tmp_path / "out" / "planted", DarkThreshold(), CFG)
    finally:
        ctx.slide.close()

    fc = json.loads((tmp_path / "out" / "planted" / "cells.geojson").read_text())
    feats = fc["features"]
    assert run.cells == len(feats) == len(centres)
    found = np.array(
        [np.mean(np.array(f["geometry"]["coordinates"][0])[:-1], axis=0) for f in feats]
    )
    # every planted disk is matched by exactly one cell within 1.5 px, and its area is the whole disk
    dist = np.sqrt(((found[:, None] - pts[None]) ** 2).sum(-1))
    assert np.all((dist < 1.5).sum(axis=0) == 1)
    areas = np.array([f["properties"]["measurements"]["Area µm^2"] for f in feats])
    assert np.allclose(areas, np.pi * (8 * MPP) ** 2, rtol=0.15)
    summary = json.loads((tmp_path / "out" / "planted" / "summary.json").read_text())
    assert summary["cells_total"] == len(centres)
    assert summary["class_counts"]["Nucleus"]["count"] == len(centres)


@pytest.mark.parametrize(("seed", "post_mode"), [(0, "threads"), (1, "processes")])
def test_random_cells_across_seams_no_duplicates_no_losses(tmp_path, seed, post_mode):
    rng = np.random.default_rng(seed)
    size = 512
    pts = []
    while len(pts) < 120:
        p = rng.uniform(12, size - 12, 2)
        if all(np.hypot(*(p - q)) > 22 for q in pts):
            pts.append(p)
    slide_path = tmp_path / "random.tif"
    _plant(slide_path, size, [tuple(p) for p in pts], radius_px=7)
    cfg = CFG.with_updates(**{"tiles.post_mode": post_mode})
    ctx = prepare_slide(slide_path, cfg)
    try:
        run_slide(ctx, tmp_path / "out", DarkThreshold(), cfg)
    finally:
        ctx.slide.close()
    feats = json.loads((tmp_path / "out" / "cells.geojson").read_text())["features"]
    found = np.array(
        [np.mean(np.array(f["geometry"]["coordinates"][0])[:-1], axis=0) for f in feats]
    )
    dist = np.sqrt(((found[:, None] - np.array(pts)[None]) ** 2).sum(-1))
    assert len(feats) == len(pts)
    assert np.all((dist < 2.0).sum(axis=0) == 1)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counters"]["post_workers"] >= 1
    assert summary["timings_s"]["postprocessing_busy"] > 0  # timed inside the workers
    # and the way there and back, timed across the processes
    assert summary["timings_s"]["postprocessing_to_worker"] > 0
    assert summary["timings_s"]["postprocessing_from_worker"] >= 0


class FailsOnThirdTile(DarkThreshold):
    def __init__(self) -> None:
        self.calls = 0

    def labels(self, image, raw):
        self.calls += 1
        if self.calls == 3:
            raise ValueError("read-out failed on purpose")
        return super().labels(image, raw)


def test_postprocessing_error_reaches_the_caller_and_nothing_is_written(tmp_path):
    """A read-out error in the pool surfaces through the writer thread; no output folder is left."""
    slide_path = tmp_path / "s.tif"
    # large enough (144 tiles) that tiles are still being read when the error arrives
    _plant(slide_path, 1536, [(100.0, 100.0), (300.0, 300.0)], radius_px=7)
    cfg = CFG.with_updates(**{"tiles.post_mode": "threads"})
    ctx = prepare_slide(slide_path, cfg)
    try:
        with pytest.raises(ValueError, match="on purpose"):
            run_slide(ctx, tmp_path / "out", FailsOnThirdTile(), cfg)
        # no tile is being read any more when the error arrives: the caller closes the slide next,
        # and OpenSlide aborted the whole process (once, in CI) on a read racing that close
        assert not [t for t in threading.enumerate() if t.name == "wsi-psm-tile-producer"]
    finally:
        ctx.slide.close()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.tif"]


def _square(cx: float, cy: float, r: float = 6.0):
    from shapely.geometry import box

    return box(cx - r, cy - r, cx + r, cy + r)


@pytest.mark.parametrize(
    ("xa", "xb", "expect_tile"),
    [
        (
            127.8,
            128.2,
            0,
        ),  # each tile sees the cell's centroid in its *own* core: keep one (lower index)
        (
            128.3,
            127.7,
            0,
        ),  # each tile sees it in the *other* core (neither owns it): still keep one
        (127.9, 127.9, 0),  # identical views: the owner's
        (128.1, 128.1, 1),
    ],
)
def test_seam_resolver_keeps_one_of_two_disagreeing_views(xa, xb, expect_tile):
    from wsi_psm.stitching import Candidate, SeamResolver
    from wsi_psm.tiling import make_grid

    cfg = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 12.0})
    grid = make_grid(256, 128, 0.5, cfg)  # two tiles side by side, seam at x = 128
    t0, t1 = grid.tiles
    res = SeamResolver(grid, band=4.0)
    a = Candidate(0, _square(xa, 60), xa, 60, bool(t0.owns(xa, 60)))
    b = Candidate(1, _square(xb, 60), xb, 60, bool(t1.owns(xb, 60)))
    out = res.add(t0, [a]) + res.add(t1, [b]) + res.finish()
    assert len(out) == 1
    assert out[0].tile == expect_tile
    assert res.duplicates_removed == 1


def test_seam_resolver_keeps_an_orphan_seen_by_one_tile_only():
    from wsi_psm.stitching import Candidate, SeamResolver
    from wsi_psm.tiling import make_grid

    cfg = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 12.0})
    grid = make_grid(256, 128, 0.5, cfg)
    t0, t1 = grid.tiles
    res = SeamResolver(grid, band=4.0)
    # tile 0 sees a cell just across the seam that tile 1 missed: better kept once than lost
    a = Candidate(0, _square(129, 60), 129, 60, False)
    interior = Candidate(1, _square(200, 60), 200, 60, True)
    out = res.add(t0, [a]) + res.add(t1, [interior]) + res.finish()
    assert sorted(c.cx for c in out) == [129, 200]


def test_an_object_its_owner_judges_no_cell_is_dropped_with_its_copies():
    """The classes' pale rule judges per tile: where the owner tile's view of a seam object is no
    cell, its neighbour's view (just above the threshold there) is dropped too, not written as an
    orphan; where the owner's view is a cell, it is written once whatever the neighbour judged.
    Every dropped object is counted once, interior ones included."""
    from dataclasses import replace

    from wsi_psm.stitching import Candidate, SeamResolver
    from wsi_psm.tiling import make_grid

    cfg = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 12.0})
    grid = make_grid(256, 128, 0.5, cfg)  # two tiles side by side, seam at x = 128
    t0, t1 = grid.tiles
    owner_no = Candidate(1, _square(131, 40), 131, 40, True, cell=False)
    other_yes = Candidate(0, _square(130.6, 40), 130.6, 40, False)
    owner_yes = Candidate(1, _square(131, 90), 131, 90, True)
    other_no = Candidate(0, _square(130.6, 90), 130.6, 90, False, cell=False)
    inner_no = Candidate(1, _square(200, 60), 200, 60, True, cell=False)
    res = SeamResolver(grid, band=4.0)
    out = res.add(t0, [other_yes, other_no]) + res.add(t1, [owner_no, owner_yes, inner_no])
    out += res.finish()
    assert out == [owner_yes]
    assert res.not_cells == 2 and res.duplicates_removed == 2
    # the same objects all judged cells: three written
    res = SeamResolver(grid, band=4.0)
    views = [replace(c, cell=True) for c in (other_yes, other_no, owner_no, owner_yes, inner_no)]
    out = res.add(t0, views[:2]) + res.add(t1, views[2:]) + res.finish()
    assert len(out) == 3 and res.not_cells == 0


def test_a_cell_reaching_the_seam_meets_a_shifted_view_of_it():
    """Seen on a real slide: tile 1 owns a nucleus whose centroid lies 9 px inside its core (more
    than 2 * band) but whose outline reaches the seam; tile 0 sees it shifted, centroid just across
    the seam. Judged by centroid, tile 1's cell was final at once and tile 0's view, alone at the
    resolver, was kept too (one nucleus written twice, 60% overlap). By outline, both meet."""
    from wsi_psm.stitching import Candidate, SeamResolver, interior
    from wsi_psm.tiling import make_grid

    cfg = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 12.0})
    grid = make_grid(256, 128, 0.5, cfg)  # two tiles side by side, seam at x = 128
    t0, t1 = grid.tiles
    band = 4.0
    a = Candidate(1, _square(137, 60, 8), 137, 60, True)  # x 129-145
    b = Candidate(0, _square(130.5, 60, 7), 130.5, 60, False)  # x 123.5-137.5: 61% of b
    assert not interior(a, t1, grid, band)
    res = SeamResolver(grid, band)
    out = res.add(t0, [b]) + res.add(t1, [a]) + res.finish()
    assert out == [a] and res.duplicates_removed == 1


def test_two_cells_sharing_seam_pixels_are_both_kept_without_overlap():
    """Seen on CMU-1: two different nuclei touching across a seam, each tile drawing its own
    boundary between them, so their outlines share a few pixels (under the duplicate threshold).
    Both are written; the one decided later gives the shared pixels up and is marked trimmed."""
    from shapely.geometry import box

    from wsi_psm.stitching import Candidate, SeamResolver
    from wsi_psm.tiling import make_grid

    cfg = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 12.0})
    grid = make_grid(256, 128, 0.5, cfg)  # two tiles side by side, seam at x = 128
    t0, t1 = grid.tiles
    a = Candidate(0, box(116, 52, 130, 68), 123, 60, True)  # tile 0's nucleus, reaching x = 130
    b = Candidate(1, box(128, 50, 144, 70), 136, 60, True)  # tile 1's, from x = 128: 32 px shared
    res = SeamResolver(grid, band=4.0)
    out = res.add(t0, [a]) + res.add(t1, [b]) + res.finish()
    assert sorted(c.tile for c in out) == [0, 1] and res.duplicates_removed == 0
    first, second = sorted(out, key=lambda c: c.tile)
    assert not first.trimmed and first.polygon.area == 14 * 16
    assert second.trimmed and res.trimmed == 1
    assert second.polygon.intersection(first.polygon).area == 0
    assert second.polygon.area == 16 * 20 - 2 * 16  # only the shared pixels went


def test_interior_cells_are_final_without_their_polygon():
    """Workers drop the polygon of cells no other tile can report (pipeline.process_tile): the
    resolver must pass those through untouched and keep comparing the seam cells."""
    from wsi_psm.stitching import Candidate, SeamResolver, interior
    from wsi_psm.tiling import make_grid

    cfg = RunConfig().with_updates(**{"tiles.core_um": 64.0, "tiles.margin_um": 12.0})
    grid = make_grid(256, 128, 0.5, cfg)  # two tiles side by side, seam at x = 128
    t0, t1 = grid.tiles
    band = 4.0
    # slide-boundary edges have no neighbour: a cell at y = 2 is still interior
    inner = Candidate(0, None, 60, 2, True)
    near_seam = Candidate(0, _square(124, 60), 124, 60, True)  # within 2 * band of the seam
    not_owned = Candidate(0, _square(60, 60), 60, 60, False)
    assert interior(inner, t0, grid, band)
    assert not interior(near_seam, t0, grid, band)
    assert not interior(not_owned, t0, grid, band)
    twin = Candidate(1, _square(124.2, 60), 124.2, 60, False)  # tile 1's view of the seam cell
    res = SeamResolver(grid, band)
    out = res.add(t0, [inner, near_seam]) + res.add(t1, [twin]) + res.finish()
    assert out[0] is inner
    assert [c.tile for c in out[1:]] == [0] and res.duplicates_removed == 1


class SpillingThreshold(DarkThreshold):
    """Dark pixels grown by 3 px: like a network whose blur reaches past the slide's edge into the
    white padding of a read box that passes it."""

    def labels(self, image, raw):
        from scipy import ndimage as ndi

        dark = ndi.binary_dilation(image.mean(axis=-1) < 120, iterations=3)
        return split_instances(dark, mpp=MPP)


def test_cells_at_the_slide_edge_stay_inside_the_slide(tmp_path):
    size = 300  # not a multiple of the 128-px core: the last tiles' read boxes pass the edge
    path = tmp_path / "edge.tif"
    _plant(path, size, [(296.0, 150.0), (150.0, 297.0), (297.0, 297.0), (150.0, 150.0)], 6)
    ctx = prepare_slide(path, CFG)
    try:
        res = run_slide(ctx, tmp_path / "out", SpillingThreshold(), CFG)
    finally:
        ctx.slide.close()
    assert res.cells == 4
    fc = json.loads((tmp_path / "out" / "cells.geojson").read_text())
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in fc["features"]])
    assert xy.min() >= 0 and xy.max() <= size
    # the edge cells keep the part inside the slide, grown by the stand-in's 3 px
    assert xy[:, 0].max() == size and xy[:, 1].max() == size
