"""Stitching: every cell is written exactly once, by the tile that owns it.

The rule (see tiling.py): a cell belongs to the tile whose core holds its centroid. Two tiles see a cell
on their shared seam with slightly different context, so their two outlines — and centroids — can differ
by a fraction of a pixel; a bare centroid test could then keep it twice or drop it. So each tile reports
its *candidates*: complete cells (not cut by the tile's read box) whose centroid lies in its core grown by
``band``. Candidates well inside the core are final at once. Candidates whose outline comes within
``2 * band`` of a shared core edge wait until every neighbouring tile has reported; then overlapping
candidates of one cell (overlap > 30% of the smaller, the contract's duplicate threshold) are reduced
to one: the one whose own core holds its centroid, ties to the lower tile index. Two *different*
cells seen by two tiles can still share a few pixels at the seam (each tile drew its own boundary
between them); the one decided later gives those pixels to the one decided earlier (``trimmed``),
so no two written cells overlap. Tiles arrive in grid order, so at most about two rows of tiles'
seam cells wait in memory, whatever the slide size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from .polygons import labels_to_polygons
from .tiling import Tile, TileGrid

DUPLICATE_OVERLAP = 0.3
MIN_SHARED = 0.05  # level-0 px²: two cells sharing less than this are taken as only touching


@dataclass
class Candidate:
    tile: int  # tile index
    # level-0 px; None once a worker has encoded an interior cell (nothing left needs it)
    polygon: Polygon | None
    cx: float
    cy: float
    own: bool  # centroid inside this tile's own core
    payload: Any = None  # measurements, class features... attached by the pipeline
    label: int = 0  # instance label in the tile array
    trimmed: bool = False  # its polygon lost pixels to a cell of another tile (payload is stale)
    # False: an object its tile found but judged no cell (too pale to be a nucleus). It still meets
    # its neighbours' views of the same object, so that the owner's judgement decides for all.
    cell: bool = True


@dataclass
class TileCandidates:
    candidates: list[Candidate]
    cut_dropped: int = 0  # owned objects that touched a cut edge (larger than the margin allows)
    labels: np.ndarray | None = field(default=None, repr=False)


def tile_candidates(labels: np.ndarray, tile: Tile, grid: TileGrid, band: float) -> TileCandidates:
    """Cells of one tile's instance labels (tile px) that this tile may own, as level-0 polygons.

    ``band``: the seam tolerance in level-0 px. Objects touching a cut edge of the read box are never
    candidates; those among them whose centroid lies in this tile's core are counted as ``cut_dropped``
    (an object that wide is larger than the margin, hence larger than any nucleus).
    """
    labels = _inside_slide(labels, tile, grid)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return TileCandidates([], 0)
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    counts = np.bincount(ids, minlength=n + 1).astype(np.float64)
    present = counts > 0
    counts[~present] = 1
    # centroid of the pixel squares = mean pixel centre (+0.5), mapped to level-0
    cx = tile.x + (np.bincount(ids, weights=cols, minlength=n + 1) / counts + 0.5) * tile.scale_x
    cy = tile.y + (np.bincount(ids, weights=rows, minlength=n + 1) / counts + 0.5) * tile.scale_y
    cut = np.zeros(n + 1, dtype=bool)
    cut[np.unique(labels[grid.cut_edge_mask(tile)])] = True
    x0, y0, x1, y1 = tile.core
    near = (cx >= x0 - band) & (cx < x1 + band) & (cy >= y0 - band) & (cy < y1 + band)
    own = np.asarray(tile.owns(cx, cy))
    keep = present & near & ~cut
    keep[0] = False
    cut_dropped = int(np.sum(present & own & cut & (np.arange(n + 1) > 0)))
    if not keep.any():
        return TileCandidates([], cut_dropped)
    kept = np.where(keep[labels], labels, 0)
    polys = labels_to_polygons(kept, scale=tile.scale_x, offset=(tile.x, tile.y))
    cands = [
        Candidate(tile.index, poly, float(cx[lab]), float(cy[lab]), bool(own[lab]), label=lab)
        for lab, poly in polys
    ]
    return TileCandidates(cands, cut_dropped, kept)


def _inside_slide(labels: np.ndarray, tile: Tile, grid: TileGrid) -> np.ndarray:
    """``labels`` without the pixels whose centre lies outside the slide: a read box that passes
    the slide's edge is padded white there, and a nucleus at the edge would otherwise spill into it
    (by the network's blur), giving a polygon partly outside the slide."""
    h, w = labels.shape
    xs = tile.x + (np.arange(w) + 0.5) * tile.scale_x
    ys = tile.y + (np.arange(h) + 0.5) * tile.scale_y
    out_x = (xs < 0) | (xs >= grid.slide_width)
    out_y = (ys < 0) | (ys >= grid.slide_height)
    if not (out_x.any() or out_y.any()):
        return labels
    return np.where(out_y[:, None] | out_x[None, :], 0, labels)


def interior(c: Candidate, tile: Tile, grid: TileGrid, band: float) -> bool:
    """Final at once: owned by ``tile`` and its outline more than ``2 * band`` from every core edge
    it shares with a neighbour (an edge on the slide boundary has none), so no other tile can
    report it. The outline, not the centroid: a neighbour may see the same nucleus shifted (a
    different cut, say) with its centroid just across the seam, and that view must meet this one
    at the resolver. (``polygon`` None: a cell a worker already judged so; its centroid stands in.)"""
    x0, y0, x1, y1 = tile.core
    b = 2 * band
    if c.polygon is None:
        lo_x, lo_y, hi_x, hi_y = c.cx, c.cy, c.cx, c.cy
    else:
        lo_x, lo_y, hi_x, hi_y = c.polygon.bounds
    left = x0 <= 0 or lo_x >= x0 + b
    top = y0 <= 0 or lo_y >= y0 + b
    right = x1 >= grid.slide_width or hi_x < x1 - b
    bottom = y1 >= grid.slide_height or hi_y < y1 - b
    return c.own and left and top and right and bottom


class SeamResolver:
    """Turns per-tile candidates, fed in grid order, into final cells with no duplicates at seams.

    A seam candidate is compared only with the waiting candidates of its tile's 3 x 3 neighbourhood
    (the only tiles that can report the same cell), so the work per tile does not grow with the
    slide's width."""

    def __init__(self, grid: TileGrid, band: float) -> None:
        self.grid = grid
        self.band = band
        self._index = {(t.row, t.col): t.index for t in grid}
        self._done = -1  # every tile with index <= _done has reported
        self._pending: dict[int, list[Candidate]] = {}  # tile index -> its undecided candidates
        self._wait: dict[int, int] = {}  # tile index -> the tile that must be done first
        self._kept: dict[int, list[Polygon]] = {}  # tile index -> its seam cells already decided
        self.duplicates_removed = 0
        self.trimmed = 0
        self.not_cells = 0  # objects dropped because the view that won judged them no cell

    def _neighbours(self, tile: Tile) -> list[int]:
        """Indices of the tiles of this tile's 3 x 3 neighbourhood (itself included), ascending."""
        near = (
            self._index.get((tile.row + dr, tile.col + dc))
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
        )
        return sorted(i for i in near if i is not None)

    def add(self, tile: Tile, cands: Iterable[Candidate]) -> list[Candidate]:
        """Report one tile (tiles must come in grid order); returns the cells now final."""
        if tile.index != self._done + 1:
            raise ValueError(
                f"tiles must be reported in grid order: got {tile.index}, expected {self._done + 1}"
            )
        out = []
        seam = []
        for c in cands:
            if not interior(c, tile, self.grid, self.band):
                seam.append(c)
            elif c.cell:
                out.append(c)
            else:
                self.not_cells += 1
        if seam:
            self._pending[tile.index] = seam
            self._wait[tile.index] = self._neighbours(tile)[-1]
        self._done = tile.index
        out.extend(self._resolve(final=False))
        return out

    def finish(self) -> list[Candidate]:
        """All tiles reported: resolve what is still waiting."""
        return self._resolve(final=True)

    def _resolve(self, final: bool) -> list[Candidate]:
        winners = []
        ready = sorted(i for i in self._pending if final or self._wait[i] <= self._done)
        for i in ready:
            if i not in self._pending:  # all of its candidates decided with an earlier tile's
                continue
            # a cell's candidates can sit in neighbours that are not all done yet; compare with every
            # waiting one of the neighbourhood, so a cell is never decided without its counterparts
            near = [j for j in self._neighbours(self.grid.tiles[i]) if j in self._pending]
            allc = [c for j in near for c in self._pending[j]]
            geoms = np.array([c.polygon for c in allc], dtype=object)
            tiles = np.array([c.tile for c in allc])
            tree = shapely.STRtree(geoms)
            area = shapely.area(geoms)
            decided: set[int] = set()
            first = sum(len(self._pending[j]) for j in near if j < i)  # tile i's run in allc
            for k in range(first, first + len(self._pending[i])):
                if k in decided:
                    continue
                group = self._group(k, geoms, area, tiles, tree)
                decided.update(group)
                best = min(group, key=lambda j: (not allc[j].own, allc[j].tile, j))
                self.duplicates_removed += len(group) - 1
                if not allc[best].cell:  # the deciding view says: no cell (its copies go too)
                    self.not_cells += 1
                elif self._trim(allc[best]):
                    winners.append(allc[best])
                    self._kept.setdefault(allc[best].tile, []).append(allc[best].polygon)
                else:  # all but a sliver was other cells': a duplicate after all
                    self.duplicates_removed += 1
            gone = {id(allc[k]) for k in decided}
            for j in near:
                left = [c for c in self._pending[j] if id(c) not in gone]
                if left:
                    self._pending[j] = left
                else:
                    del self._pending[j], self._wait[j]
        # a decided cell matters to the seam cells of its neighbours only: tiles that are done and
        # whose neighbourhood holds no undecided tile can forget theirs
        lowest = min(self._pending, default=self._done + 1)
        reach = self.grid.cols + 1
        for j in [j for j in self._kept if j < lowest - reach]:
            del self._kept[j]
        return winners

    def _trim(self, c: Candidate) -> bool:
        """Take from ``c`` the pixels it shares with the cells of other tiles decided before it;
        False if only a sliver (under a tenth) is left. Cells of one tile never overlap."""
        near = self._neighbours(self.grid.tiles[c.tile])
        others = np.array(
            [q for j in near if j != c.tile for q in self._kept.get(j, ())], dtype=object
        )
        if not len(others):
            return True
        poly = c.polygon
        others = others[shapely.intersects(others, poly)]
        # (tiles' pixel grids differ by a fraction of a level-0 pixel: outlines that only touch
        # can share slivers far under a pixel, which are left alone)
        hits = others[shapely.area(shapely.intersection(others, poly)) > MIN_SHARED]
        if not len(hits):
            return True
        rest = shapely.difference(poly, shapely.union_all(hits))
        parts = [g for g in shapely.get_parts(rest) if isinstance(g, Polygon) and not g.is_empty]
        if not parts:
            return False
        largest = max(parts, key=lambda g: g.area)
        if largest.area < 0.1 * poly.area:
            return False
        c.polygon = Polygon(largest.exterior)
        c.trimmed = True
        self.trimmed += 1
        return True

    @staticmethod
    def _group(
        i: int, geoms: np.ndarray, area: np.ndarray, tiles: np.ndarray, tree: shapely.STRtree
    ) -> set[int]:
        """Indices of the candidates that overlap candidate i (transitively) beyond the threshold.
        Cells of one tile never overlap (they only touch), so only other tiles' are measured."""
        group, todo = {i}, [i]
        while todo:
            j = todo.pop()
            hits = tree.query(geoms[j], predicate="intersects")
            hits = [h for h in hits[tiles[hits] != tiles[j]] if h not in group]
            if not hits:
                continue
            inter = shapely.area(shapely.intersection(geoms[j], geoms[hits]))
            for h, a in zip(hits, inter, strict=True):
                if a > DUPLICATE_OVERLAP * min(area[j], area[h]):
                    group.add(int(h))
                    todo.append(int(h))
        return group
