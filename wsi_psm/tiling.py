"""The tile grid: physical-unit tiles with an overlap margin and a core that owns cells.

Ownership rule (what makes stitching provable): the cores partition the slide plane exactly —
core (row, col) is the half-open box [col*C, (col+1)*C) x [row*C, (row+1)*C) in level-0 px, with C
the core side in level-0 px, computed the same way for every tile — so every centroid falls in exactly
one core. Each tile keeps only cells whose centroid lies in its own core. Because the margin is wider
than the largest nucleus, a kept cell lies wholly inside its tile's read box; a cell that would not
(it touches the read box's edge inside the slide) is larger than any nucleus and is dropped, counted,
rather than cut (see ``Tile.touches_cut_edge``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .config import RunConfig
from .errors import SlideTooSmallError, UnsupportedSlideError
from .tissue import TissueMask


@dataclass(frozen=True)
class Tile:
    """One tile. Read box and core are in level-0 px; the tile array is ``size`` x ``size`` px at target mpp."""

    index: int
    row: int
    col: int
    x: float  # read box, level-0 px (may extend past the slide; the reader pads with white)
    y: float
    w: float  # exactly size * (target mpp / slide mpp), so the tile array maps exactly onto it
    h: float
    core: tuple[float, float, float, float]  # x0, y0, x1, y1, half-open, level-0 px
    size: int  # tile side in processing px (core + 2 margins)

    @property
    def scale_x(self) -> float:
        """Level-0 px per processing px along x (exact for this tile's read box)."""
        return self.w / self.size

    @property
    def scale_y(self) -> float:
        return self.h / self.size

    def owns(self, cx: np.ndarray | float, cy: np.ndarray | float) -> np.ndarray | bool:
        """Whether level-0 centroid(s) fall in this tile's core."""
        x0, y0, x1, y1 = self.core
        return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


@dataclass(frozen=True)
class TileGrid:
    tiles: tuple[Tile, ...]
    slide_width: int
    slide_height: int
    core_l0: float  # core side, level-0 px
    margin_px: int  # margin, processing px
    tile_px: int  # tile side, processing px
    rows: int
    cols: int

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def cut_edge_mask(self, tile: Tile, margin_px: int = 1) -> np.ndarray:
        """Boolean (size, size) mask of the tile border rows/cols that are cuts inside the slide.

        A tile edge on the slide's own boundary is not a cut (cells there really end at the edge).
        """
        m = np.zeros((tile.size, tile.size), dtype=bool)
        if tile.x > 0:
            m[:, :margin_px] = True
        if tile.y > 0:
            m[:margin_px, :] = True
        if tile.x + tile.w < self.slide_width:
            m[:, -margin_px:] = True
        if tile.y + tile.h < self.slide_height:
            m[-margin_px:, :] = True
        return m


# the most a slide or image is enlarged to the processing resolution: coarser than 4x the target mpp
# (2 µm/px for the default 0.5) a nucleus is a few pixels wide, and the enlarged image holds nothing
# the network can resolve (and many times the tiles: --mpp 20 on a 1000² image, 40x each side)
MAX_ENLARGEMENT = 4.0


def check_input_resolution(
    mpp: float, target_mpp: float, name: str = "slide", source: str = "user"
) -> None:
    """Refuse an input so coarse that the processing resolution would enlarge it over 4x; most
    often a magnification given as --mpp (20 for a 20x scan). ``source``: where ``mpp`` came from
    (``SlideInfo.mpp_source``: "user" for --mpp), so the message says what to correct."""
    if mpp > MAX_ENLARGEMENT * target_mpp:
        hint = (
            "--mpp is micrometres per pixel, not a magnification: 40x is about 0.25, 20x about 0.5"
            if source == "user"
            else f"the file says so ({source}); give --mpp if that is wrong"
        )
        raise UnsupportedSlideError(
            f"{name}: {mpp:g} µm/px is too coarse for nuclei (processing at {target_mpp:g} µm/px "
            f"would enlarge it {mpp / target_mpp:.3g}x, at most {MAX_ENLARGEMENT:g}x is done); "
            + hint
        )


def check_slide_size(
    width: int, height: int, mpp: float, cfg: RunConfig, name: str = "slide"
) -> None:
    """Refuse a slide smaller than one tile core: it is an image tile, which `segment` handles."""
    core_l0 = cfg.tiles.core_um / mpp
    if width < core_l0 or height < core_l0:
        raise SlideTooSmallError(
            f"{name}: {width}x{height} px at {mpp:g} µm/px is smaller than one tile "
            f"({cfg.tiles.core_um:g} µm = {core_l0:.0f} px); use `wsi-psm segment` for image tiles "
            f"or a smaller tile core (tiles.core_um in --config)"
        )


def make_grid(
    width: int,
    height: int,
    mpp: float,
    cfg: RunConfig,
    tissue: TissueMask | None = None,
    *,
    name: str = "slide",
    min_tissue_fraction: float = 0.0,
) -> TileGrid:
    """Tiles covering a ``width`` x ``height`` level-0 slide at ``mpp``; keep those whose core holds tissue."""
    target = cfg.target_mpp
    core_px = max(round(cfg.tiles.core_um / target), 1)
    margin_px = math.ceil(cfg.tiles.margin_um / target)
    tile_px = core_px + 2 * margin_px
    scale = target / mpp  # level-0 px per processing px
    core_l0 = core_px * scale
    check_slide_size(width, height, mpp, cfg, name)
    cols = math.ceil(width / core_l0)
    rows = math.ceil(height / core_l0)
    span = tile_px * scale
    pad = margin_px * scale
    tiles = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * core_l0, r * core_l0
            core = (
                x0,
                y0,
                min((c + 1) * core_l0, float(width)),
                min((r + 1) * core_l0, float(height)),
            )
            if tissue is not None and tissue.fraction_in_box(*core) <= min_tissue_fraction:
                continue
            tiles.append(
                Tile(
                    index=len(tiles),
                    row=r,
                    col=c,
                    x=x0 - pad,
                    y=y0 - pad,
                    w=span,
                    h=span,
                    core=core,
                    size=tile_px,
                )
            )
    return TileGrid(
        tiles=tuple(tiles),
        slide_width=width,
        slide_height=height,
        core_l0=core_l0,
        margin_px=margin_px,
        tile_px=tile_px,
        rows=rows,
        cols=cols,
    )
