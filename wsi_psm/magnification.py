"""The magnification check: let the network see the tissue magnified 2x where that resolves it.

A small network sees nuclei at one scale. Small crowded nuclei (lymphocytes, some carcinomas:
6-8 µm², packed) come out merged at the processing resolution and resolved when the image is
magnified 2x (read at half the processing mpp) and read out as if it were not: every nucleus then
looks twice as large to the network and to the read-out. Ordinary nuclei are instead cut into
net-sized pieces at 2x, about four per nucleus. The number of nuclei found tells the two apart
without labels: under ``ZOOM_COUNT_RATIO`` times as many at 2x means the same nuclei, resolved.

Measured with the shipped H&E network only (networks fitted on BCData's IHC find nucleus
fragments at 2x, under 2.5x as many on less foreground), so only that network gets the check.
``segment`` decides per image; ``run`` decides per slide by a vote of sampled tissue tiles (each
about the size of a MoNuSeg image, judged as ``segment`` judges one), and a magnified slide is then
processed at half the processing mpp (4x the pixels) with the read-out of the processing mpp.
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
# a sampled tile with fewer nuclei than this at 1x has no say (its count ratio is noise)
ZOOM_MIN_NUCLEI = 20


def zoom_resolves(n_plain: int, n_zoomed: int) -> bool:
    """The check's rule: the 2x read-out finds the same nuclei, resolved, not pieces of them."""
    return n_plain > 0 and n_zoomed < ZOOM_COUNT_RATIO * n_plain


@dataclass
class SlideMagnification:
    """A slide's check: nuclei found on each sampled tile at 1x and 2x, and the verdict. The 2x
    tiles and their instance labels are kept for fitting the cell classes of a magnified run."""

    counts: list[tuple[int, int]]  # (nuclei at 1x, nuclei at 2x) per sampled tile
    zoomed_images: list[np.ndarray] = field(default_factory=list, repr=False)
    zoomed_labels: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def votes(self) -> tuple[int, int]:
        """(tiles whose nuclei are resolved at 2x, tiles with a say)."""
        voting = [(a, b) for a, b in self.counts if a >= ZOOM_MIN_NUCLEI]
        return sum(zoom_resolves(a, b) for a, b in voting), len(voting)

    @property
    def magnified(self) -> bool:
        """Magnify when more than half of the tiles with a say are resolved at 2x: the scale that
        is right for most of the tissue (a slide of crowded and ordinary tissue in equal parts
        stays at 1x; each scale costs the other kind of tissue about as much)."""
        resolved, voting = self.votes
        return 2 * resolved > voting

    def summary(self) -> dict[str, Any]:
        resolved, voting = self.votes
        return {
            "sample_tiles": len(self.counts),
            "nuclei_1x": [a for a, _ in self.counts],
            "nuclei_2x": [b for _, b in self.counts],
            "threshold": ZOOM_COUNT_RATIO,
            "tiles_resolved": resolved,
            "tiles_voting": voting,
            "magnified": self.magnified,
        }


def check_slide_magnification(
    ctx: SlideContext, predictor: TilePredictor, cfg: RunConfig
) -> SlideMagnification:
    """Run ``predictor`` (its read-out at ``cfg.target_mpp``) on ``ZOOM_SAMPLE_TILES`` tissue tiles
    read at ``cfg.target_mpp`` and at half of it, and let each tile vote (:func:`zoom_resolves`)."""
    check = SlideMagnification([])
    for t in sample_grid_tiles(ctx, ZOOM_SAMPLE_TILES, cfg.seed):
        plain = ctx.slide.read_at_mpp(t.x, t.y, t.w, t.h, cfg.target_mpp)
        n_plain = int(predictor.labels(plain, predictor.network(plain[None])[0]).max())
        zoomed = ctx.slide.read_at_mpp(t.x, t.y, t.w, t.h, cfg.target_mpp / 2)
        lab = predictor.labels(zoomed, predictor.network(zoomed[None])[0])
        check.counts.append((n_plain, int(lab.max())))
        check.zoomed_images.append(zoomed)
        check.zoomed_labels.append(lab)
    if not check.magnified:
        check.zoomed_images, check.zoomed_labels = [], []
    return check


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
