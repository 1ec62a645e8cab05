"""The magnification check: let the network see the tissue magnified 2x where that resolves it.

A small network sees nuclei at one scale. Small crowded nuclei (lymphocytes, some carcinomas:
6-8 µm², packed) come out merged at the processing resolution and resolved when the image is
magnified 2x (read at half the processing mpp) and read out as if it were not: every nucleus then
looks twice as large to the network and to the read-out. Ordinary nuclei are instead cut into
net-sized pieces at 2x, about four per nucleus. The number of nuclei found tells the two apart
without labels: under ``ZOOM_COUNT_RATIO`` times as many at 2x means the same nuclei, resolved.

Measured with the shipped H&E network only (networks fitted on BCData's IHC find nucleus
fragments at 2x, under 2.5x as many on less foreground), so only that network gets the check.
``segment`` decides per image; ``run`` decides per slide from a sample of its tissue tiles, and a
magnified slide is then processed at half the processing mpp (4x the pixels) with the read-out of
the processing mpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .config import RunConfig
from .pipeline import SlideContext, TilePredictor, sample_grid_tiles
from .tiling import make_grid

# the share of nuclei the 2x-magnified image may add and still count as the same nuclei, resolved
# (1x: nuclei found once at both scales; 4x: every nucleus cut into net-sized pieces); halfway
ZOOM_COUNT_RATIO = 2.5
# tissue tiles a slide's check looks at (each at 1x and at 2x: 5x a tile's network time)
ZOOM_SAMPLE_TILES = 8


def zoom_resolves(n_plain: int, n_zoomed: int) -> bool:
    """The check's rule: the 2x read-out finds the same nuclei, resolved, not pieces of them."""
    return n_plain > 0 and n_zoomed < ZOOM_COUNT_RATIO * n_plain


@dataclass
class SlideMagnification:
    """A slide's check: nuclei found on the sampled tiles at 1x and 2x, and the verdict. The 2x
    tiles and their instance labels are kept for fitting the cell classes of a magnified run."""

    tiles: int
    nuclei_plain: int
    nuclei_zoomed: int
    magnified: bool
    zoomed_images: list[np.ndarray] = field(default_factory=list, repr=False)
    zoomed_labels: list[np.ndarray] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        ratio = self.nuclei_zoomed / self.nuclei_plain if self.nuclei_plain else None
        return {
            "sample_tiles": self.tiles,
            "nuclei_1x": self.nuclei_plain,
            "nuclei_2x": self.nuclei_zoomed,
            "ratio": None if ratio is None else round(ratio, 3),
            "threshold": ZOOM_COUNT_RATIO,
            "magnified": self.magnified,
        }


def check_slide_magnification(
    ctx: SlideContext, predictor: TilePredictor, cfg: RunConfig
) -> SlideMagnification:
    """Run ``predictor`` (its read-out at ``cfg.target_mpp``) on ``ZOOM_SAMPLE_TILES`` tissue tiles
    read at ``cfg.target_mpp`` and at half of it, and compare the nuclei found, pooled."""
    n_plain = n_zoomed = 0
    images, labels = [], []
    tiles = sample_grid_tiles(ctx, ZOOM_SAMPLE_TILES, cfg.seed)
    for t in tiles:
        plain = ctx.slide.read_at_mpp(t.x, t.y, t.w, t.h, cfg.target_mpp)
        n_plain += int(predictor.labels(plain, predictor.network(plain[None])[0]).max())
        zoomed = ctx.slide.read_at_mpp(t.x, t.y, t.w, t.h, cfg.target_mpp / 2)
        lab = predictor.labels(zoomed, predictor.network(zoomed[None])[0])
        n_zoomed += int(lab.max())
        images.append(zoomed)
        labels.append(lab)
    magnified = zoom_resolves(n_plain, n_zoomed)
    if not magnified:
        images, labels = [], []
    return SlideMagnification(len(tiles), n_plain, n_zoomed, magnified, images, labels)


def magnified_run(ctx: SlideContext, cfg: RunConfig) -> tuple[SlideContext, RunConfig]:
    """The slide's context and run configuration for a magnified run: tiles of the same size in µm
    read at half the processing mpp, a quarter as many per network batch (each has 4x the pixels:
    the network's memory stays what it was). The predictor keeps its own configuration, so its
    read-out stays at the processing mpp."""
    batch = max(1, cfg.tiles.batch_size // 4)
    run_cfg = cfg.with_updates(target_mpp=cfg.target_mpp / 2, **{"tiles.batch_size": batch})
    grid = make_grid(
        ctx.slide.width, ctx.slide.height, ctx.mpp, run_cfg, ctx.tissue, name=ctx.slide.name
    )
    return replace(ctx, grid=grid), run_cfg
