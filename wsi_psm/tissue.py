"""Tissue detection on a low-resolution thumbnail, and the brightfield sanity check.

Brightfield background is near-white glass, so tissue is where optical density (OD) is clearly above the
glass level. A fixed OD floor keeps fully-tissue images (no glass at all) from being split in two by a
purely adaptive threshold; Otsu on the thumbnail only raises the threshold when glass dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

from .config import TissueConfig
from .errors import NoTissueError, UnsupportedSlideError
from .stain import TISSUE_OD, rgb_to_od

# OD floor and ceiling for the tissue threshold (max over RGB of -log10(I/255)).
# 0.05 ~ intensity 228 (glass is brighter); 0.10 ~ intensity 203 in the darkest channel: pale eosin
# still counts. Generous on purpose: a glass tile costs a little time, a lost tissue tile loses cells.
_OD_FLOOR = 0.05
_OD_CEIL = 0.10


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask on a thumbnail; ``scale`` is level-0 px per mask px."""

    mask: np.ndarray
    scale: float

    def area_mm2(self, mpp: float, extent: tuple[int, int] | None = None) -> float:
        """Tissue area; with the slide's level-0 ``extent`` (width, height), the mask pixels of the
        last column and row count only for the part inside the slide (the thumbnail rounds up)."""
        px_um = self.scale * mpp
        if extent is None:
            return float(self.mask.sum()) * px_um * px_um / 1e6
        h, w = self.mask.shape
        inside_x = np.clip(extent[0] / self.scale - np.arange(w), 0.0, 1.0)
        inside_y = np.clip(extent[1] / self.scale - np.arange(h), 0.0, 1.0)
        px = float(inside_y @ self.mask.astype(np.float64) @ inside_x)
        return px * px_um * px_um / 1e6

    def fraction_in_box(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Fraction of tissue pixels inside a level-0 box (clipped to the mask)."""
        h, w = self.mask.shape
        c0, r0 = max(int(x0 / self.scale), 0), max(int(y0 / self.scale), 0)
        c1, r1 = min(int(np.ceil(x1 / self.scale)), w), min(int(np.ceil(y1 / self.scale)), h)
        if c1 <= c0 or r1 <= r0:
            return 0.0
        return float(self.mask[r0:r1, c0:c1].mean())


def optical_density_max(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel max over channels of OD = -log10(I / 255), with I clipped to >= 1."""
    darkest = np.clip(rgb[..., :3].min(axis=-1).astype(np.float32), 1.0, 255.0)
    return -np.log10(darkest / 255.0)


def check_brightfield(thumb: np.ndarray, name: str) -> None:
    """Refuse fluorescence / dark-field scans: their background is dark, not glass-white.

    The networks and stain features here assume transmitted light (H&E, IHC); running them on a
    fluorescence scan would produce confident nonsense, so stop with a clear message instead.
    """
    grey = thumb[..., :3].astype(np.float32).mean(axis=-1)
    bright = np.percentile(grey, 90)
    if bright < 110:
        raise UnsupportedSlideError(
            f"{name}: looks like a fluorescence or dark-field scan (90th-percentile brightness "
            f"{bright:.0f}/255); wsi-psm processes brightfield slides (H&E, IHC) only"
        )


# Median chroma ((max - min) / sum of the three optical densities) of the stained pixels: 0.000 for a
# greyscale image (PNG or JPEG); 0.09-0.18 on the 26 BCData Ki-67 images, 0.16-0.52 on the 30
# MoNuSeg H&E images, 0.23 on CMU-1. The threshold is a third of the lowest stained value.
MIN_STAIN_CHROMA = 0.03


def check_colour(rgb: np.ndarray, name: str) -> None:
    """Refuse greyscale (or otherwise colourless) images: stain separation, the H&E / H-DAB
    decision, the cell classes and the networks all read the stains' colours, so a grey image
    would be processed as a confident but meaningless "IHC" slide."""
    od = rgb_to_od(rgb[..., :3]).reshape(-1, 3)
    total = od.sum(axis=1)
    stained = total > TISSUE_OD
    if stained.sum() < 100:  # (almost) blank: the tissue check speaks for it
        return
    o = od[stained]
    chroma = float(np.median((o.max(axis=1) - o.min(axis=1)) / total[stained]))
    if chroma < MIN_STAIN_CHROMA:
        raise UnsupportedSlideError(
            f"{name}: has no stain colour (greyscale; median chroma {chroma:.3f}); wsi-psm "
            "processes colour brightfield images (H&E, IHC) only"
        )


def check_input_image(thumb: np.ndarray, name: str) -> None:
    """The checks every input passes on a small copy before any work: brightfield, and coloured."""
    check_brightfield(thumb, name)
    check_colour(thumb, name)


def detect_tissue(
    thumb: np.ndarray, scale: float, mpp: float, cfg: TissueConfig, name: str = "slide"
) -> TissueMask:
    """Tissue mask of a brightfield thumbnail (``scale`` level-0 px per thumbnail px).

    Raises NoTissueError when nothing is left after removing specks smaller than ``cfg.min_area_um2``.
    """
    od = ndi.uniform_filter(optical_density_max(thumb), size=3)
    try:
        otsu = float(filters.threshold_otsu(od))
    except ValueError:  # constant image
        otsu = _OD_FLOOR
    thr = float(np.clip(otsu, _OD_FLOOR, _OD_CEIL))
    mask = od > thr
    mask = ndi.binary_closing(mask, morphology.disk(2), border_value=0) | mask
    mask = ndi.binary_fill_holes(mask)
    px_um2 = (scale * mpp) ** 2
    min_px = int(cfg.min_area_um2 / px_um2)
    if min_px > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_px)
    if not mask.any():
        raise NoTissueError(
            f"{name}: no tissue found (no region darker than glass larger than {cfg.min_area_um2:g} µm²)"
        )
    return TissueMask(mask=mask, scale=scale)
