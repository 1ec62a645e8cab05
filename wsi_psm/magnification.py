"""The magnification check: let the network see the tissue magnified 2x where that resolves it.

A small network sees nuclei at one scale. Small crowded nuclei (lymphocytes, some carcinomas:
6-8 µm², packed) come out merged at the processing resolution and resolved when the image is
magnified 2x (read at half the processing mpp) and read out as if it were not: every nucleus then
looks twice as large to the network and to the read-out. Ordinary nuclei are instead cut into
net-sized pieces at 2x, about four per nucleus. The number of nuclei found tells the two apart
without labels: under ``ZOOM_COUNT_RATIO`` times as many at 2x means the same nuclei, resolved.

Measured with the shipped H&E network only (networks fitted on BCData's IHC find nucleus
fragments at 2x, under 2.5x as many on less foreground), so only that network gets the check.
``segment`` decides per image. ``run`` first judges a sample of tissue tiles (each about the size
of a MoNuSeg image, judged as ``segment`` judges one); unless more than half are resolved at 2x,
as on most slides, the slide is run at 1x alone. Otherwise every tile is read at half the
processing mpp and run at both scales, and each tile keeps the read-out the rule picks for it (5x
the network time, 5x the read-out pixels), so the ordinary tissue of a crowded slide keeps 1x.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .allocator import large_blocks_reused
from .config import RunConfig
from .instances import resize_labels
from .pipeline import SlideContext, TilePredictor, sample_grid_tiles
from .progress import NullProgress, ProgressHook
from .segmenter.readout import finished_instances, separated_from_maps
from .tiling import make_grid

# the share of nuclei the 2x-magnified image may add and still count as the same nuclei, resolved
# (1x: nuclei found once at both scales; 4x: every nucleus cut into net-sized pieces); halfway
ZOOM_COUNT_RATIO = 2.5
# tissue tiles a slide's check looks at (each at 1x and at 2x: 5x a tile's network time)
ZOOM_SAMPLE_TILES = 8
# a sampled tile with fewer nuclei than this at 1x has no say (its count ratio is noise)
ZOOM_MIN_NUCLEI = 20
PROGRESS_STAGE = "magnification check"


def zoom_resolves(n_plain: int, n_zoomed: int) -> bool:
    """The check's rule: the 2x read-out finds the same nuclei, resolved, not pieces of them.
    Resolving touching nuclei only adds nuclei: a 2x read-out finding fewer than 1x (none on a
    blurred tile, say) has lost some and is not kept (the 30 MoNuSeg images: 1.5x to 4.6x)."""
    return 0 < n_plain <= n_zoomed < ZOOM_COUNT_RATIO * n_plain


@dataclass
class SlideMagnification:
    """A slide's check: nuclei found on each sampled tile at 1x and 2x, and the 2x tiles with the
    labels the per-tile rule keeps for them (for fitting the classes of a run at both scales)."""

    counts: list[tuple[int, int]]  # (nuclei at 1x, nuclei at 2x) per sampled tile
    zoomed_images: list[np.ndarray] = field(default_factory=list, repr=False)
    chosen_labels: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def resolved(self) -> int:
        """Sampled tiles whose nuclei the 2x read-out resolves."""
        return sum(tile_resolves(a, b) for a, b in self.counts)

    @property
    def judged(self) -> int:
        """Sampled tiles with enough nuclei to judge."""
        return sum(a >= ZOOM_MIN_NUCLEI for a, _ in self.counts)

    @property
    def per_tile(self) -> bool:
        """Whether the run goes to both scales (and chooses per tile): more than half of the
        judged tiles are resolved at 2x. Otherwise (most slides) it runs at 1x alone: single tiles
        near the threshold flip with the codec (CMU-1 as SVS: 0 of 8, as DICOM: 2 of 8), and a
        slide mostly of ordinary tissue should not pay 5x for them."""
        return 2 * self.resolved > self.judged

    def stays_1x(self, remaining: int) -> bool:
        """Whether no outcome of ``remaining`` more sampled tiles can make the run go to both
        scales: each adds at most one to ``2 * resolved - judged`` (resolved: +2 - 1)."""
        return 2 * self.resolved - self.judged + remaining <= 0

    def summary(self) -> dict[str, Any]:
        return {
            "sample_tiles": len(self.counts),
            "nuclei_1x": [a for a, _ in self.counts],
            "nuclei_2x": [b for _, b in self.counts],
            "threshold": ZOOM_COUNT_RATIO,
            "tiles_resolved": self.resolved,
            "tiles_judged": self.judged,
            "scale": "per tile" if self.per_tile else "1x",
        }


def tile_resolves(n_plain: int, n_zoomed: int) -> bool:
    """:func:`zoom_resolves` for a slide tile, which needs ``ZOOM_MIN_NUCLEI`` nuclei to judge."""
    return n_plain >= ZOOM_MIN_NUCLEI and zoom_resolves(n_plain, n_zoomed)


class ScaleChoosingLabeller:
    """The CPU half of :class:`ScaleChoosingPredictor` (picklable, torch-free): both read-outs of a
    tile at the processing mpp, and the one the rule keeps, at the tile's (2x) pixels."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg  # the processing configuration: the read-out's mpp

    def labels(self, image: np.ndarray, raw: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        plain, zoomed = (separated_from_maps(m, mpp=self.cfg.target_mpp, cfg=self.cfg) for m in raw)
        return self.chosen(plain, zoomed, image.shape[:2])

    def chosen(self, plain: np.ndarray, zoomed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The tile's instances at its 2x ``shape``, from both scales' nuclei as separated (counted
        by the rule) and not yet finished (:func:`~wsi_psm.segmenter.readout.finished_instances`)."""
        mpp = self.cfg.target_mpp
        if tile_resolves(int(plain.max()), int(zoomed.max())):
            return finished_instances(zoomed, mpp=mpp, cfg=self.cfg)
        return resize_labels(finished_instances(plain, mpp=mpp, cfg=self.cfg), shape)


class ScaleChoosingPredictor:
    """The downstream network at both scales on tiles read at half the processing mpp: as read
    (2x) and shrunk back to the processing mpp (1x). Its labeller keeps, per tile, what
    ``segment`` keeps per image, so a slide of crowded and ordinary tissue gets each at its scale."""

    def __init__(self, base: TilePredictor, cfg: RunConfig) -> None:
        self.base = base
        self.cfg = cfg
        self.device = getattr(base, "device", "cpu")

    def network(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        zoomed = self.base.network(images)
        plain = self.base.network(shrink_half(np.asarray(images), self.device))
        return list(zip(plain, zoomed, strict=True))

    def labeller(self) -> ScaleChoosingLabeller:
        return ScaleChoosingLabeller(self.cfg)

    def labels(self, image: np.ndarray, raw: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return self.labeller().labels(image, raw)


def shrink_half(images: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """A (B, H, W, 3) uint8 batch at half its size (antialiased bilinear, as the slide reader
    resamples), i.e. at twice its mpp; computed on ``device`` (beside a GPU, not on the CPU that
    feeds it)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    size = (max(1, round(images.shape[1] / 2)), max(1, round(images.shape[2] / 2)))
    out = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_slide_magnification(
    ctx: SlideContext,
    predictor: TilePredictor,
    cfg: RunConfig,
    progress: ProgressHook | None = None,
) -> SlideMagnification:
    """Run ``predictor``'s network on ``ZOOM_SAMPLE_TILES`` tissue tiles read at ``cfg.target_mpp``
    and at half of it, read both out at ``cfg.target_mpp`` and judge each (:func:`tile_resolves`).
    It stops once the tiles left cannot change the verdict for 1x (:meth:`SlideMagnification.stays_1x`:
    on a slide of ordinary tissue after 4 of the 8, half the check's time), so the verdict is the
    whole sample's; a slide that may go to both scales is judged on every sampled tile."""
    progress = progress or NullProgress()
    check = SlideMagnification([])
    tiles = sample_grid_tiles(ctx, ZOOM_SAMPLE_TILES, cfg.seed)
    rule = ScaleChoosingLabeller(cfg)
    progress.start(PROGRESS_STAGE, len(tiles))
    with large_blocks_reused():  # a CPU forward of a 2x tile allocates blocks of 90-270 MiB
        for i, t in enumerate(tiles):
            if check.stays_1x(remaining=len(tiles) - i):
                break
            plain = ctx.slide.read_at_mpp(t.x, t.y, t.w, t.h, cfg.target_mpp)
            zoomed = ctx.slide.read_at_mpp(t.x, t.y, t.w, t.h, cfg.target_mpp / 2)
            check.zoomed_images.append(zoomed)
            maps = (predictor.network(plain[None])[0], predictor.network(zoomed[None])[0])
            lab1, lab2 = (separated_from_maps(m, mpp=cfg.target_mpp, cfg=cfg) for m in maps)
            check.counts.append((int(lab1.max()), int(lab2.max())))
            check.chosen_labels.append(rule.chosen(lab1, lab2, zoomed.shape[:2]))
            progress.advance(PROGRESS_STAGE, 1)
    progress.done(PROGRESS_STAGE)
    if not check.per_tile:
        check.zoomed_images, check.chosen_labels = [], []
    return check


def magnified_run(ctx: SlideContext, cfg: RunConfig) -> tuple[SlideContext, RunConfig]:
    """The slide's context and run configuration for a run at both scales: tiles of the same size
    in µm read at half the processing mpp, a quarter as many per network batch (each has 4x the
    pixels: the network's memory stays what it was). The predictor keeps the processing
    configuration, so its read-outs stay at the processing mpp."""
    batch = max(1, cfg.tiles.batch_size // 4)
    run_cfg = cfg.with_updates(target_mpp=cfg.target_mpp / 2, **{"tiles.batch_size": batch})
    grid = make_grid(
        ctx.slide.width, ctx.slide.height, ctx.mpp, run_cfg, ctx.tissue, name=ctx.slide.name
    )
    return replace(ctx, grid=grid), run_cfg
