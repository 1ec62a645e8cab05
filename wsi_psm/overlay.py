"""overlay.png: a slide's thumbnail with every cell drawn in its class colour, one cell at a time
(nothing but the image is held), so a slide of millions of cells draws in bounded memory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
from PIL import Image, ImageDraw
from shapely.geometry import Polygon

if TYPE_CHECKING:  # (the cell types are export's; export imports this module's outlines)
    from wsi_psm.export import CellBlock, CellRecord


# a cell on the overlay: its bounding box and the (n, 2) points to draw (one point: a dot), in
# thumbnail px; one array, not n tuples, so it crosses from a worker process cheaply
Outline = tuple[tuple[float, float, float, float], np.ndarray]


def overlay_outline(polygon: Polygon, scale: float) -> Outline:
    """A cell's exterior in thumbnail px (``scale`` level-0 px each); cells under about a pixel
    become their mean point, so dense slides still show their classes."""
    xy = shapely.get_coordinates(polygon.exterior)
    return overlay_outlines(xy, np.array([0]), np.array([len(xy)]), scale)[0]


def ring_bounds(xy: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per ring (points ``xy[starts[i]:starts[i + 1]]``) the (n, 2) minima and maxima of x, y."""
    lo = np.stack([np.minimum.reduceat(xy[:, k], starts) for k in (0, 1)], axis=1)
    hi = np.stack([np.maximum.reduceat(xy[:, k], starts) for k in (0, 1)], axis=1)
    return lo, hi


def overlay_outlines(
    xy: np.ndarray, starts: np.ndarray, ends: np.ndarray, scale: float
) -> list[Outline]:
    """:func:`overlay_outline` of the exteriors ``xy[starts[i]:ends[i]]`` (level-0 px)."""
    xy = xy / scale
    lo, hi = ring_bounds(xy, starts)
    dot = (hi[:, 0] - lo[:, 0] < 1.5) & (hi[:, 1] - lo[:, 1] < 1.5)
    out: list[Outline] = []
    for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        box = (float(lo[i, 0]), float(lo[i, 1]), float(hi[i, 0]), float(hi[i, 1]))
        out.append((box, xy[a:b].mean(axis=0, keepdims=True) if dot[i] else xy[a:b]))
    return out


class OverlayRenderer:
    """Draw cells onto a slide thumbnail one at a time (nothing but the image is kept).

    ``scale``: level-0 px per thumbnail px. Thumbnails larger than ``max_side`` are shrunk first.
    Cells are filled in their class colour at ``fill_alpha`` with an opaque outline; cells smaller
    than about a pixel of the thumbnail become a single dot, so dense slides still show their classes.
    """

    def __init__(
        self,
        thumbnail_rgb: np.ndarray,
        scale: float,
        *,
        max_side: int = 2048,
        fill_alpha: int = 110,
    ) -> None:
        img = Image.fromarray(np.asarray(thumbnail_rgb, dtype=np.uint8)).convert("RGB")
        shrink = max(img.size) / max_side
        if shrink > 1:
            size = (max(1, round(img.width / shrink)), max(1, round(img.height / shrink)))
            scale *= img.width / size[0]
            img = img.resize(size, Image.Resampling.LANCZOS)
        self.image = img
        self.scale = float(scale)
        self.fill_alpha = fill_alpha
        self.count = 0
        self._layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        self._draw = ImageDraw.Draw(self._layer)

    def add(self, polygon: Polygon, color: Sequence[int]) -> None:
        self.add_outline(overlay_outline(polygon, self.scale), color)

    def add_outline(self, outline: Outline, color: Sequence[int]) -> None:
        """Draw a cell from :func:`overlay_outline` (computed elsewhere, e.g. in a worker)."""
        (x0, y0, x1, y1), pts = outline
        if x1 < 0 or y1 < 0 or x0 >= self.image.width or y0 >= self.image.height:
            return
        rgb = tuple(int(v) for v in color[:3])
        flat = pts.ravel().tolist()  # x, y, x, y, ...
        if len(pts) == 1:
            self._draw.point(flat, fill=(*rgb, 255))
        else:
            self._draw.polygon(flat, fill=(*rgb, self.fill_alpha), outline=(*rgb, 255))
        self.count += 1

    def add_block(self, block: CellBlock) -> None:
        """Draw the cells of a :class:`CellBlock` (packed with their outlines)."""
        o = block.outlines
        if o is None:
            raise ValueError("the block was packed without overlay outlines")
        for k, (box, rgb) in enumerate(zip(o.boxes.tolist(), o.colours.tolist(), strict=True)):
            self.add_outline((box, o.points[o.offsets[k] : o.offsets[k + 1]]), rgb)

    def add_cell(self, cell: CellRecord) -> None:
        self.add(cell.polygon, cell.color)

    def to_image(self) -> Image.Image:
        return Image.alpha_composite(self.image.convert("RGBA"), self._layer).convert("RGB")

    def save(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        self.to_image().save(out, format="PNG", optimize=False)
        return out


def render_overlay(
    thumbnail_rgb: np.ndarray,
    cells: Iterable[CellRecord] | Iterable[tuple[Polygon, Sequence[int]]],
    scale: float,
    path: str | os.PathLike[str],
    *,
    max_side: int = 2048,
) -> Path:
    """Write overlay.png: the thumbnail (``scale`` = level-0 px per thumbnail px) with every cell of
    ``cells`` (CellRecords or (polygon, colour) pairs, consumed lazily) drawn in its class colour."""
    r = OverlayRenderer(thumbnail_rgb, scale, max_side=max_side)
    for c in cells:
        if hasattr(c, "polygon"):  # a CellRecord (export's; not imported: export imports this)
            r.add_cell(c)
        else:
            r.add(c[0], c[1])
    return r.save(path)


__all__ = ["Outline", "OverlayRenderer", "overlay_outline", "overlay_outlines", "render_overlay"]
