"""Optical density, colour deconvolution and stain detection (H&E vs haematoxylin-DAB).

Optical density (Beer-Lambert) is ``OD = -log10((I + 1) / 256)`` per channel, so white is 0 and
black is log10(256) ~= 2.41, with no clipping or log(0). Stain amounts are the OD projected onto the
inverse of a stain matrix whose rows are unit OD vectors (Ruifrok & Johnston 2001). The matrix is
either the fixed Ruifrok one or a per-slide estimate (Macenko et al. 2009) from sampled tissue pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Stain = Literal["he", "ihc-dab"]

# Ruifrok & Johnston stain OD vectors (rows), as also shipped by scikit-image.
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
DAB = np.array([0.27, 0.57, 0.78])

# OD (sum over channels) above which a pixel counts as stained tissue for stain estimation.
TISSUE_OD = 0.15

_NAMES: dict[str, tuple[str, str]] = {
    "he": ("haematoxylin", "eosin"),
    "ihc-dab": ("haematoxylin", "dab"),
}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _od(values: np.ndarray) -> np.ndarray:
    return (-np.log10((values.astype(np.float32) + 1.0) / 256.0)).astype(np.float32)


# uint8 input (every tile) takes its OD from a table: the same float32 values, ~2.5x faster than a
# logarithm per pixel
_OD_OF_UINT8 = _od(np.arange(256, dtype=np.uint8))


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 optical density (..., 3); 0 for white, ~2.41 for black."""
    a = np.asarray(rgb)
    if a.shape[-1] != 3:
        raise ValueError(f"expected RGB with 3 channels last, got shape {a.shape}")
    return _OD_OF_UINT8[a] if a.dtype == np.uint8 else _od(a)


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean (..., H, W): the pixels of uint8 RGB whose OD sum is over ``TISSUE_OD`` (not glass)."""
    return rgb_to_od(rgb).sum(axis=-1) > TISSUE_OD


# Marking ink on H&E: hues neither stain makes (haematoxylin is blue-purple, eosin pink), from
# yellow-green to cyan, with a chroma (max - min channel) that glass and grey dirt lack. Pathologists'
# teal, green and light-blue pens fall here; blue and black ones do not (they look like haematoxylin).
INK_HUE_DEG = (75, 200)
INK_MIN_CHROMA = 20  # of 255


def ink_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels of uint8 RGB with an H&E-foreign hue (``INK_HUE_DEG``) and chroma
    at least ``INK_MIN_CHROMA``. On H&E these are marking ink; do not apply it to H-DAB, whose pale
    haematoxylin can reach cyan (hue 196-200 on some BCData nuclei)."""
    a = np.asarray(rgb, dtype=np.int32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    c = mx - mn
    lo, hi = INK_HUE_DEG
    # the hexcone hue without a division: green-max pixels lie at 60-180° (hue = 120 + 60 (b - r)
    # / c, so over lo when 60 (b - r) > (lo - 120) c), blue-max ones at 180-300° (hue = 240 + 60
    # (r - g) / c, under hi when 60 (r - g) < (hi - 240) c); red-max ones (under 60°, over 300°) never
    in_band = np.where(mx == g, 60 * (b - r) > (lo - 120) * c, 60 * (r - g) < (hi - 240) * c)
    return (c >= INK_MIN_CHROMA) & (mx != r) & in_band


def default_stain_matrix(stain: Stain = "he") -> np.ndarray:
    """The fixed Ruifrok (2, 3) matrix of unit OD vectors: [haematoxylin, eosin|dab]."""
    if stain not in _NAMES:
        raise ValueError(f"unknown stain {stain!r}: use 'he' or 'ihc-dab'")
    second = EOSIN if stain == "he" else DAB
    return _unit(np.stack([HAEMATOXYLIN, second])).astype(np.float64)


def _full_matrix(m2: np.ndarray) -> np.ndarray:
    """Complete two stain vectors with a third (residual) orthogonal to both, so it is invertible."""
    r = np.cross(m2[0], m2[1])
    r = r if np.linalg.norm(r) > 1e-8 else np.array([0.0, 0.0, 1.0])
    return np.vstack([m2, _unit(r)])


def stain_channels(
    rgb: np.ndarray, stain: Stain = "he", matrix: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-pixel stain amounts (OD units, clipped at 0), as float32 maps shaped like ``rgb[..., 0]``.

    Keys: ``haematoxylin`` and ``eosin`` for ``stain="he"``; ``haematoxylin`` and ``dab`` for
    ``"ihc-dab"``. ``matrix`` is a (2, 3) array of stain OD vectors (e.g. from
    :func:`estimate_stain_matrix`); ``None`` uses the fixed Ruifrok vectors.
    """
    m2 = (
        default_stain_matrix(stain)
        if matrix is None
        else _unit(np.asarray(matrix, dtype=np.float64))
    )
    if m2.shape != (2, 3):
        raise ValueError(f"stain matrix must be (2, 3), got {m2.shape}")
    inv = np.linalg.inv(_full_matrix(m2)).astype(np.float32)
    conc = rgb_to_od(rgb) @ inv
    np.maximum(conc, 0.0, out=conc)
    a, b = _NAMES[stain]
    return {a: np.ascontiguousarray(conc[..., 0]), b: np.ascontiguousarray(conc[..., 1])}


# detect_stain: H&E when more than this share of the stained pixels is pink (and not fewer than
# are brown), against 255 or against the sample's own white
PINK_SHARE = 0.25
# ... and, where only the OD against 255 shows pink, H-DAB when more than this share is brown
# against the sample's own white: 0.00-0.01 on the 30 MoNuSeg images under any cast tried,
# 0.35-0.84 on the 26 BCData images under a magenta one (geometric mean)
BROWN_SHARE = 0.06
# The level, per channel, taken as a sample's white: glass, or the palest tissue of a full tile.
WHITE_PERCENTILE = 99.5
# pixels of each sample (evenly strided) that detect_stain looks at: shares and a white point need
# no more, and two views of every pixel of a fit's 64 tiles took 2.2 s against 0.5 s for one
STAIN_SAMPLE_PIXELS = 65_536


def white_balanced_od(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) OD of uint8 RGB pixels relative to the sample's own white (per channel, its
    ``WHITE_PERCENTILE``, at least 128), not to 255. A scanner's white balance adds a constant to
    every pixel's OD (a bluish cast: red OD up, blue OD down); this takes it off again."""
    a = np.asarray(rgb).reshape(-1, 3)
    if not len(a):
        return np.zeros((0, 3), np.float32)
    white = np.clip(np.percentile(a, WHITE_PERCENTILE, axis=0), 128, 255)
    return np.maximum(rgb_to_od(a) - _od(white), 0.0)


def _tissue_od(
    rgb_samples: Sequence[np.ndarray] | np.ndarray,
    max_pixels: int,
    seed: int,
    *,
    white_balance: bool = False,
) -> np.ndarray:
    to_od = white_balanced_od if white_balance else rgb_to_od
    ods = [
        to_od(np.asarray(t)).reshape(-1, 3)
        for t in (rgb_samples if isinstance(rgb_samples, Sequence) else [rgb_samples])
    ]
    od = np.concatenate(ods)
    od = od[od.sum(1) > TISSUE_OD]
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    return od


def estimate_stain_matrix(
    rgb_samples: Sequence[np.ndarray] | np.ndarray,
    stain: Stain = "he",
    *,
    percentile: float = 1.0,
    max_pixels: int = 200_000,
    seed: int = 0,
) -> np.ndarray:
    """Macenko estimate of the (2, 3) stain matrix from tissue pixels of one slide or cohort.

    Falls back to the fixed Ruifrok matrix when there are too few stained pixels, or when the
    estimate is implausible (a vector far from its Ruifrok counterpart, or both vectors the same
    colour: an image of one hue, whose matrix would not invert), so a blank or odd tile set never
    yields a nonsense deconvolution.
    """
    ref = default_stain_matrix(stain)
    od = _tissue_od(rgb_samples, max_pixels, seed)
    if len(od) < 500:
        return ref
    # Plane of the two largest principal directions of OD (not mean-centred, as Macenko).
    _, _, vt = np.linalg.svd(od, full_matrices=False)
    plane = vt[:2]
    plane = plane * np.sign(plane.sum(1, keepdims=True) + 1e-12)  # point into positive OD
    proj = od @ plane.T
    ang = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(ang, [percentile, 100 - percentile])
    v1 = _unit(np.array([np.cos(lo), np.sin(lo)]) @ plane)
    v2 = _unit(np.array([np.cos(hi), np.sin(hi)]) @ plane)
    cands = np.stack([np.abs(v1), np.abs(v2)])
    # Assign each candidate to the reference vector it is closest to (cosine).
    cos = cands @ ref.T
    if cos[0, 0] + cos[1, 1] >= cos[0, 1] + cos[1, 0]:
        est = cands
    else:
        est = cands[::-1]
    if np.any(np.sum(est * ref, axis=1) < 0.8):  # > ~37 degrees off: distrust the estimate
        return ref
    if abs(float(est[0] @ est[1])) > 0.99:  # one colour only (< ~8 degrees): not two stains
        return ref  # (the 30 MoNuSeg images' estimates: cosine 0.85-0.97; BCData's 0.77-0.88)
    return _unit(est)


def _shares(od: np.ndarray) -> tuple[float, float]:
    """Pink and brown shares of stained pixels' OD (:func:`detect_stain`); (0, 0) for too few."""
    if len(od) < 100:
        return 0.0, 0.0
    r, g, b = od[:, 0], od[:, 1], od[:, 2]
    return float(np.mean((g > 1.4 * r) & (g > b))), float(np.mean(b > g))


def _looks_he(pink: float, brown: float) -> bool:
    return pink > PINK_SHARE and pink >= brown


def detect_stain(rgb_samples: Sequence[np.ndarray] | np.ndarray, *, seed: int = 0) -> Stain:
    """Guess H&E or haematoxylin-DAB from a few tissue tiles.

    Eosin absorbs green far more than red (Ruifrok vector 0.07, 0.99, 0.11), which neither
    haematoxylin (red ~ green) nor DAB (blue > green) does. So the share of stained pixels whose OD
    has green > 1.4 x red and green > blue ("pink") is high in H&E and near zero in H-DAB, whose
    brown pixels instead have blue OD > green OD. The OD is judged against 255 and against the
    sample's own white (:func:`white_balanced_od`), measured on stained pixels (OD sum > 0.15):
    - against 255: pink 0.40-1.00 on the 30 MoNuSeg H&E images and 0.84 on CMU-1, 0.01-0.05 on
      the 26 BCData Ki-67 images; but a bluish scanner cast (red x 0.9, blue x 1.06) took 2 of the
      13 MoNuSeg XML images to 0.02, and a magenta one (green x 0.9) 24 of the BCData images over
      the threshold;
    - against the own white a cast comes off (MoNuSeg 0.42-1.00, 0.42-0.98 under the bluish cast;
      CMU-1 0.89; BCData 0.02-0.11, none over the threshold under any cast tried), but a tile of
      stroma with no glass has pink tissue as its white and loses its pink.
    So: H&E when the balanced view shows pink (over 0.25, and not under the brown share; 0.25 is
    the geometric mean of 0.15 and 0.42); Ki-67 when neither does; when only the view against
    255 does, Ki-67 if the balanced view is brown (:data:`BROWN_SHARE`). Nothing stained counts
    as H&E. Ten casts on the 56 images: every image right (benchmarks/README.md).
    """
    samples = [
        a[:: max(1, len(a) // STAIN_SAMPLE_PIXELS)]
        for a in (
            np.asarray(t).reshape(-1, 3)
            for t in (rgb_samples if isinstance(rgb_samples, Sequence) else [rgb_samples])
        )
    ]
    raw = _tissue_od(samples, 100_000, seed)
    if len(raw) < 100:
        return "he"
    balanced = _shares(_tissue_od(samples, 100_000, seed, white_balance=True))
    if _looks_he(*balanced):  # (also where a cast hid the pink against 255)
        return "he"
    if not _looks_he(*_shares(raw)):
        return "ihc-dab"
    # pink against 255 only: pink tissue as the sample's white (no glass), or a magenta cast on
    # H-DAB, whose DAB the balanced view still shows
    return "ihc-dab" if balanced[1] > BROWN_SHARE else "he"
