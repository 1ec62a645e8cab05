"""Cell classes without labels: per-cell stain/shape features, and a classifier fitted per slide or cohort.

Features (:func:`cell_features`) are computed for every instance of a tile at once with ``bincount``
over the label array (no Python loop over cells or pixels): stain optical densities (colour
deconvolution, see stain.py) inside the nucleus and in a thin ring just outside it, pixel area and
moment shape, and the spread of haematoxylin inside the nucleus as a simple texture measure.

The classifier (:class:`CellClassifier`) is fitted once on the cells of sampled tiles and then names
every cell of the slide in the tile stream:

- **IHC (haematoxylin-DAB)**: ``Positive`` / ``Negative`` by nuclear DAB (see :func:`dab_threshold`
  for the rule: a two-component Gaussian mixture on log nuclear DAB, split where the two components
  are equally likely, never below a physical floor).
- **H&E**: a small number of nucleus groups from a Gaussian mixture on size, haematoxylin and shape,
  the number chosen by BIC (or ICL, for only well separated groups), ordered by mean nuclear
  area and named by that rank (see :func:`he_groups`). One group
  means the cells are not separable: every cell is ``Nucleus``. Before the groups, objects that
  form a mode of their own far too pale in haematoxylin to be nuclei are set apart and not
  written (see :func:`pale_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from threadpoolctl import threadpool_limits

from .config import ClassConfig
from .polygons import AREA, ECCENTRICITY, measurement_dicts
from .stain import (
    Stain,
    default_stain_matrix,
    detect_stain,
    estimate_stain_matrix,
    ink_pixels,
    stain_channels,
)

# --------------------------------------------------------------------------- features

# QuPath's measurement names for stain features ("Nucleus: DAB OD mean"), so QuPath scripts and
# classifiers that read them work on our cells. OD = optical density (log10 units, 0 = white).
_STAIN_LABEL = {"haematoxylin": "Hematoxylin", "dab": "DAB", "eosin": "Eosin"}
RING_UM = 1.0  # width of the ring just outside the nucleus (perinuclear cytoplasm / membrane)
H_MEAN = "Nucleus: Hematoxylin OD mean"


def stain_feature_names(stain: Stain) -> tuple[str, ...]:
    """Names of the stain measurements :func:`cell_features` returns for ``stain``, in order."""
    second = "DAB" if stain == "ihc-dab" else "Eosin"
    return (
        "Nucleus: Hematoxylin OD mean",
        "Nucleus: Hematoxylin OD std",
        "Nucleus: Hematoxylin OD p90",
        f"Nucleus: {second} OD mean",
        f"Nucleus: {second} OD std",
        f"Nucleus: {second} OD p90",
        "Ring: Hematoxylin OD mean",
        f"Ring: {second} OD mean",
    )


def feature_names(stain: Stain) -> tuple[str, ...]:
    """All names :func:`cell_features` returns: stain measurements, then area and eccentricity."""
    return (*stain_feature_names(stain), AREA, ECCENTRICITY)


@dataclass
class CellFeatures:
    """Features of the instances of one tile: ``ids[i]`` is the label whose features are row i."""

    ids: np.ndarray  # (n,) int64 labels, ascending
    names: tuple[str, ...]
    values: np.ndarray  # (n, len(names)) float64, finite

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    def row_of(self) -> dict[int, int]:
        return {int(k): i for i, k in enumerate(self.ids)}

    @staticmethod
    def concat(parts: Sequence[CellFeatures]) -> CellFeatures:
        if not parts:
            raise ValueError("nothing to concatenate")
        names = parts[0].names
        if any(p.names != names for p in parts):
            raise ValueError("feature tables have different columns")
        return CellFeatures(
            np.concatenate([p.ids for p in parts]), names, np.concatenate([p.values for p in parts])
        )


def _label_quantile(
    values: np.ndarray, lab: np.ndarray, counts: np.ndarray, q: float
) -> np.ndarray:
    """Per-label q-quantile (linear interpolation) of ``values`` grouped by ``lab`` (1..n, all > 0).

    ``values``: float32 and >= 0 (stain amounts). One sort of (label, value) pairs for the whole
    tile, as one uint64 key: the label above the value's bits, which a non-negative float32 orders
    as its value does (the same order as a two-key lexsort, ~10x faster); ``counts[k]`` = pixels
    of label k.
    """
    if values.dtype != np.float32 or not (values >= 0).all():
        raise ValueError("values must be float32 and >= 0")
    bits = (values + np.float32(0)).view(np.uint32)  # (+0: a -0.0 would sort after every value)
    order = np.argsort((lab.astype(np.uint64) << np.uint64(32)) | bits)
    v = values[order].astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(counts[1:])[:-1]])
    n = np.maximum(counts[1:], 1)
    pos = q * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    out = np.zeros(len(n))
    has = counts[1:] > 0
    a, b = v[(starts + lo)[has]], v[(starts + hi)[has]]
    out[has] = a + (b - a) * frac[has]
    return out


def cell_features(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    mpp: float,
    stain: Stain,
    matrix: np.ndarray | None = None,
    ring_um: float = RING_UM,
) -> CellFeatures:
    """Stain, size and shape features of every instance of one tile.

    Args:
        image: (H, W, 3) uint8 RGB at the processing resolution.
        labels: (H, W) int instance labels of that image, 0 = background.
        mpp: micrometres per pixel of ``image``.
        stain: "ihc-dab" (haematoxylin + DAB) or "he" (haematoxylin + eosin).
        matrix: (2, 3) stain vectors (e.g. a per-slide Macenko estimate); None = Ruifrok's.
        ring_um: width of the ring outside each nucleus.

    Returns rows for the labels present, ascending. Per stain channel: mean, standard deviation
    (texture) and 90th percentile inside the nucleus, and the mean in the ring of pixels within
    ``ring_um`` outside it that belong to no other nucleus (a nucleus with no such pixel gets its own
    mean there); ``Area µm^2`` = pixel count x mpp^2; ``Eccentricity`` of the moment ellipse.
    """
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in shape")
    names = feature_names(stain)
    flat = labels.ravel().astype(np.int64)
    n = int(flat.max()) if flat.size else 0
    if n <= 0:
        return CellFeatures(np.zeros(0, np.int64), names, np.zeros((0, len(names))))
    counts = np.bincount(flat, minlength=n + 1)
    ids = np.flatnonzero(counts[1:]) + 1

    ch = stain_channels(image, stain, matrix)
    chans = [ch["haematoxylin"].ravel(), ch["dab" if stain == "ihc-dab" else "eosin"].ravel()]
    inside = np.flatnonzero(flat)
    lab_in = flat[inside]
    cnt = np.maximum(counts, 1).astype(np.float64)

    # ring: background pixels within ring_px (chessboard distance) of a nucleus; a separable max
    # filter is ~5x cheaper than a Euclidean expansion, and where two rings meet one keeps the pixel
    ring_px = max(1, round(ring_um / mpp))
    grown = ndi.maximum_filter(labels, size=2 * ring_px + 1, mode="constant").ravel()
    ring_idx = np.flatnonzero((flat == 0) & (grown > 0))
    ring_lab = grown[ring_idx].astype(np.int64)
    ring_cnt = np.bincount(ring_lab, minlength=n + 1).astype(np.float64)

    cols: list[np.ndarray] = []
    means = []
    for c in chans:
        v32 = c[inside]
        v = v32.astype(np.float64)
        s1 = np.bincount(lab_in, weights=v, minlength=n + 1)
        s2 = np.bincount(lab_in, weights=v * v, minlength=n + 1)
        mean = s1 / cnt
        std = np.sqrt(np.maximum(s2 / cnt - mean * mean, 0.0))
        p90 = np.concatenate([[0.0], _label_quantile(v32, lab_in, counts, 0.9)])
        cols += [mean, std, p90]
        means.append(mean)
    for c, mean in zip(chans, means, strict=True):
        rs = np.bincount(ring_lab, weights=c[ring_idx].astype(np.float64), minlength=n + 1)
        cols.append(np.where(ring_cnt > 0, rs / np.maximum(ring_cnt, 1), mean))

    # moment ellipse of the pixel squares (each pixel contributes 1/12 variance along each axis)
    rr, cc = np.divmod(inside, labels.shape[1])
    rr, cc = rr.astype(np.float64), cc.astype(np.float64)
    mr = np.bincount(lab_in, weights=rr, minlength=n + 1) / cnt
    mc = np.bincount(lab_in, weights=cc, minlength=n + 1) / cnt
    vrr = np.bincount(lab_in, weights=rr * rr, minlength=n + 1) / cnt - mr * mr + 1 / 12
    vcc = np.bincount(lab_in, weights=cc * cc, minlength=n + 1) / cnt - mc * mc + 1 / 12
    vrc = np.bincount(lab_in, weights=rr * cc, minlength=n + 1) / cnt - mr * mc
    half_tr = 0.5 * (vrr + vcc)
    disc = np.sqrt(np.maximum(0.25 * (vrr - vcc) ** 2 + vrc * vrc, 0.0))
    lam1, lam2 = half_tr + disc, np.maximum(half_tr - disc, 0.0)
    ecc = np.sqrt(np.clip(1.0 - lam2 / np.maximum(lam1, 1e-12), 0.0, 1.0))
    cols += [counts * mpp * mpp, ecc]

    values = np.stack(cols, axis=1)[ids]
    return CellFeatures(ids.astype(np.int64), names, np.nan_to_num(values, nan=0.0))


# --------------------------------------------------------------------------- rules

EPS_OD = 0.01  # added before taking logs of haematoxylin OD (a blank nucleus has OD ~0)
# Below this nuclear DAB OD a nucleus is never called positive. Why 0.15: a haematoxylin-only
# nucleus (H OD up to ~0.5) leaks into the DAB channel in proportion to the error of the stain
# vectors: a 10 degree error, typical of per-slide estimates, and the ~37 degree angle between the
# haematoxylin and DAB vectors give 0.5 * sin(10°) / sin(37°) ~= 0.15. DAB below that cannot be told
# apart from deconvolution leakage. (It also equals 71% transmittance: a faint but visible tint.)
DAB_FLOOR_OD = 0.15
MIN_ASHMAN_D = 2.0  # two Gaussian modes closer than this (Ashman's D) are one mode
# Offset before the log of nuclear DAB: a third of the floor, the scale of leakage noise. Without it
# the near-zero DAB of unstained nuclei spreads over decades in log space and drags the mixture.
DAB_LOG_OFFSET = 0.05

CLASSES_COMPONENT = "classes"  # the model bundle's component that holds a fitted CellClassifier
POSITIVE = ("Positive", (200, 50, 50))  # QuPath's default colours for these two classes
NEGATIVE = ("Negative", (112, 112, 225))
NUCLEUS = ("Nucleus", (0, 160, 255))  # as pipeline.ShapeOnly
# H&E groups, by rank of mean nuclear area (smallest first), for 2, 3 and 4 groups.
GROUP_NAMES = {
    2: ("Small nucleus", "Large nucleus"),
    3: ("Small nucleus", "Medium nucleus", "Large nucleus"),
    4: ("Small nucleus", "Medium nucleus", "Large nucleus", "Very large nucleus"),
}
GROUP_COLORS = {
    "Small nucleus": (40, 170, 40),
    "Medium nucleus": (240, 150, 0),
    "Large nucleus": (200, 0, 200),
    "Very large nucleus": (0, 90, 255),
}
# H&E grouping features: size, stain, texture, shape (log where the spread is multiplicative).
# mixture restarts per number of groups (4 let two seeds part CMU-1's nuclei differently)
HE_N_INIT = 10
HE_FEATURES = ("log area", "log H mean", "H std / H mean", "Eccentricity")


@dataclass(frozen=True)
class DabRule:
    """Positive when nuclear DAB OD mean > ``threshold``; the fields record how it was chosen."""

    threshold: float
    mixture_threshold: float | None  # equal-posterior point of the 2-component mixture, if bimodal
    means: tuple[float, float] | None  # the two components' means (OD), low first
    ashman_d: float | None
    floor: float


def _two_gaussians_1d(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.mixture import GaussianMixture

    with threadpool_limits(1):  # tiny problem: BLAS threads only fight the tile workers
        g = GaussianMixture(2, covariance_type="tied", n_init=3, random_state=seed).fit(x[:, None])
    order = np.argsort(g.means_.ravel())
    sd = float(np.sqrt(np.ravel(g.covariances_)[0]))
    return g.weights_[order], g.means_.ravel()[order], np.array([sd, sd])


def _equal_posterior(w: np.ndarray, m: np.ndarray, s: np.ndarray) -> float:
    """The point between the two means where both weighted Gaussian densities are equal."""
    grid = np.linspace(m[0], m[1], 4001)
    logp = (
        np.log(w)[:, None]
        - np.log(s)[:, None]
        - 0.5 * ((grid[None] - m[:, None]) / s[:, None]) ** 2
    )
    above = np.flatnonzero(logp[1] >= logp[0])
    return float(grid[above[0]] if len(above) else grid[-1])


def dab_threshold(
    nuclear_dab: np.ndarray, *, floor: float = DAB_FLOOR_OD, seed: int = 0
) -> DabRule:
    """The positive/negative rule from the nuclear DAB OD means of a slide's (or cohort's) cells.

    A two-component Gaussian mixture with one shared variance is fitted to log(DAB + 0.05):
    unstained nuclei (leakage only) and stained ones, whose DAB spreads multiplicatively. When the
    two modes are separated (Ashman's D >= 2, each holding >= 1% of cells) the threshold is where
    the two weighted components are equally likely, so it follows the slide's staining intensity
    and scanner; otherwise the cells form one population and only the physical floor decides
    (all-negative or all-positive slides). The threshold is never below ``floor``
    (see :data:`DAB_FLOOR_OD`).

    Why a shared variance and the 0.05 offset: with free variances and a 0.01 offset the broad
    low mode pulled the boundary far into the positives on one cell set (BCData sample, cells at
    the annotated points: threshold 0.575, 93.8% correct; this rule: 0.33, 97.1%), while on
    segmented cells all the variants agreed within 0.05 OD (96.3-96.4%).
    """
    x = np.log(np.asarray(nuclear_dab, dtype=np.float64) + DAB_LOG_OFFSET)
    x = x[np.isfinite(x)]
    if len(x) < 20 or np.ptp(x) < 1e-6:
        return DabRule(floor, None, None, None, floor)
    w, m, s = _two_gaussians_1d(x, seed)
    s = np.maximum(s, 1e-3)
    d = float(np.sqrt(2.0) * abs(m[1] - m[0]) / np.sqrt(s[0] ** 2 + s[1] ** 2))
    means = (float(np.exp(m[0]) - DAB_LOG_OFFSET), float(np.exp(m[1]) - DAB_LOG_OFFSET))
    if d < MIN_ASHMAN_D or w.min() < 0.01:
        return DabRule(floor, None, means, d, floor)
    t = float(np.exp(_equal_posterior(w, m, s)) - DAB_LOG_OFFSET)
    return DabRule(max(t, floor), t, means, d, floor)


# A nucleus is stained by haematoxylin. Where an H&E fit's objects hold a mode of their own under
# 1/pale_ratio of the nuclei's haematoxylin, that mode is something else: on CMU-1 the network
# outlined fragments of dark-pink collagen (15% of its objects, nuclear haematoxylin OD 0.16
# against 0.68; 4.2x apart), while the objects of the 30 MoNuSeg images, pale vesicular nuclei
# included, form modes at most 2.65x apart per image and 1.92x pooled (the same mixture).
PALE_RATIO = 3.0
PALE_DIP = 0.5  # the density between the modes, relative to the pale mode's: a real valley
# ...and the pale mode must be eosin-dominant (median eosin / haematoxylin OD of its objects): pale
# vesicular nuclei are pale but still haematoxylin-dominant (the MoNuSeg images' medians 0.06-1.12,
# G9-6363's nuclei at haematoxylin 0.18 included: 1.01), CMU-1's collagen fragments 2.99
PALE_MIN_EOSIN = 1.5
E_MEAN = "Nucleus: Eosin OD mean"


@dataclass(frozen=True)
class PaleRule:
    """H&E: an object whose nuclear haematoxylin OD mean is under ``threshold`` is not a nucleus."""

    threshold: float  # where the two weighted modes are equally likely
    means: tuple[float, float]  # the two modes (OD), pale first
    weights: tuple[float, float]
    eosin_ratio: float  # median eosin / haematoxylin OD of the objects under the threshold


def pale_threshold(
    nuclear_h: np.ndarray,
    nuclear_e: np.ndarray,
    *,
    ratio: float = PALE_RATIO,
    min_eosin: float = PALE_MIN_EOSIN,
    seed: int = 0,
) -> PaleRule | None:
    """The rule that tells objects too pale to be nuclei from the nuclei of an H&E fit, or None.

    A two-component Gaussian mixture with one shared variance on log nuclear haematoxylin OD: a
    rule only when the pale mode lies more than ``ratio`` times below the other, holds at least 1%
    of the objects, the other holds the majority (the nuclei are most of what is found; a few
    very dark objects, ink say, never make the nuclei the pale mode), and the objects' density
    (Gaussian kernel estimate) dips between them: at the threshold under half of what it is at the
    pale mode. A single mode with a long pale tail also fits two Gaussians far apart, but has no
    dip (CMU-1: 0.25; pale tails simulated, and the MoNuSeg images whose modes are 2.4-2.7x
    apart: 0.75-2.0). Last, the pale mode's objects must be eosin-dominant (median ``nuclear_e``
    / ``nuclear_h`` at least ``min_eosin``): pale vesicular nuclei beside dark lymphocytes can lie
    3x apart, but they are still stained by haematoxylin more than by eosin.
    """
    h = np.asarray(nuclear_h, dtype=np.float64)
    e = np.asarray(nuclear_e, dtype=np.float64)
    x = np.log(np.clip(h, 1e-3, None))
    x = x[np.isfinite(x)]
    if len(x) < 50 or np.ptp(x) < 1e-6:
        return None
    w, m, s = _two_gaussians_1d(x, seed)
    if m[1] - m[0] < math.log(ratio) or w[0] < 0.01 or w[1] < 0.5:
        return None
    lt = _equal_posterior(w, m, np.maximum(s, 1e-3))
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(seed)
    kde = gaussian_kde(x if len(x) <= 5000 else rng.choice(x, 5000, replace=False))
    if kde(lt)[0] >= PALE_DIP * kde(m[0])[0]:
        return None
    t = float(np.exp(lt))
    below = np.isfinite(h) & np.isfinite(e) & (h < t)
    eosin = float(np.median(e[below] / np.clip(h[below], 1e-3, None))) if below.any() else 0.0
    if eosin < min_eosin:
        return None
    return PaleRule(
        t, (float(np.exp(m[0])), float(np.exp(m[1]))), (float(w[0]), float(w[1])), eosin
    )


@dataclass(frozen=True)
class Groups:
    """A Gaussian mixture over standardised H&E grouping features, components ordered by mean area."""

    center: np.ndarray  # (F,) feature medians used to standardise
    scale: np.ndarray  # (F,) robust spreads used to standardise
    weights: np.ndarray  # (k,)
    means: np.ndarray  # (k, F), standardised space
    covariances: np.ndarray  # (k, F, F)
    scores: tuple[
        float, ...
    ] = ()  # the criterion for k = 1, 2, ... (lower is better), for the record

    @property
    def k(self) -> int:
        return len(self.weights)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Most likely component of each row of raw (unstandardised) features."""
        if self.k == 1 or len(x) == 0:
            return np.zeros(len(x), dtype=np.int64)
        z = (x - self.center) / self.scale
        logp = np.empty((len(z), self.k))
        for j in range(self.k):
            chol = np.linalg.cholesky(self.covariances[j])
            sol = np.linalg.solve(chol, (z - self.means[j]).T)
            logp[:, j] = (
                math.log(self.weights[j]) - np.log(np.diag(chol)).sum() - 0.5 * (sol * sol).sum(0)
            )
        return np.argmax(logp, axis=1)


def he_grouping_features(feats: CellFeatures) -> np.ndarray:
    """(n, 4) H&E grouping features (:data:`HE_FEATURES`) from a feature table."""
    h = feats.column(H_MEAN)
    return np.stack(
        [
            np.log(feats.column(AREA)),
            np.log(h + EPS_OD),
            feats.column("Nucleus: Hematoxylin OD std") / (h + EPS_OD),
            feats.column(ECCENTRICITY),
        ],
        axis=1,
    )


def he_groups(
    x: np.ndarray,
    *,
    max_groups: int = 3,
    min_fraction: float = 0.05,
    criterion: str = "bic",
    seed: int = 0,
) -> Groups:
    """Unsupervised nucleus groups from H&E grouping features (rows = cells).

    Features are standardised (median, 1.4826 x MAD) and Gaussian mixtures with 1..``max_groups``
    full components are fitted. The number of groups minimises ``criterion``:

    - ``"bic"`` (default): the Bayesian information criterion. More than one group whenever one
      Gaussian does not explain the cells as well; the groups then partition a phenotype cloud
      that may be continuous (nuclear size tiers, as in pleomorphism grading) rather than
      separate cell types.
    - ``"icl"``: BIC plus twice the classification entropy (Biernacki et al. 2000): only groups the
      cells fall clearly into. Measured: on the 13 MoNuSeg XML images with their true outlines ICL
      finds one group in 11 and when pooled; on CMU-1 one group.

    One group (fewer than 50 cells per feature, or the criterion's choice) means "not separable".
    A solution with a group under ``min_fraction`` of the cells is not taken. Components are
    ordered by the mean area of the cells they take, so names and colours follow size rank
    whatever order the fit found them in; ``Groups.scores`` records the criterion per k.
    """
    from sklearn.mixture import GaussianMixture

    if criterion not in ("bic", "icl"):
        raise ValueError(f"unknown criterion {criterion!r}: use 'bic' or 'icl'")
    x = np.asarray(x, dtype=np.float64)
    f = x.shape[1]
    center = np.median(x, axis=0) if len(x) else np.zeros(f)
    scale = 1.4826 * np.median(np.abs(x - center), axis=0) if len(x) else np.ones(f)
    scale = np.where(scale > 1e-9, scale, 1.0)
    one = Groups(center, scale, np.ones(1), np.zeros((1, f)), np.eye(f)[None])
    if len(x) < 50 * f:  # too few cells to say anything about groups
        return one
    z = (x - center) / scale
    best, best_score, scores = one, math.inf, []
    for k in range(1, max_groups + 1):
        with threadpool_limits(1):  # a few thousand rows: threads cost more than they give
            g = GaussianMixture(
                k, covariance_type="full", n_init=HE_N_INIT, random_state=seed, reg_covar=1e-4
            ).fit(z)
        tau = g.predict_proba(z)
        score = float(g.bic(z))
        if criterion == "icl":
            score -= 2.0 * float(np.sum(tau * np.log(np.clip(tau, 1e-300, None))))
        scores.append(score)
        frac = np.bincount(tau.argmax(1), minlength=k) / len(z)
        if score < best_score and frac.min() >= min_fraction:
            # by the mean area of the cells each group takes (what a reader of the names checks;
            # the components' own mean log areas can rank overlapping groups the other way)
            member = tau.argmax(1)
            sizes = [np.exp(x[member == j, 0]) for j in range(k)]  # (none empty unless the
            order = np.argsort([a.mean() if len(a) else np.inf for a in sizes])  # min share is 0)
            best_score = score
            best = Groups(center, scale, g.weights_[order], g.means_[order], g.covariances_[order])
    return Groups(
        best.center, best.scale, best.weights, best.means, best.covariances, tuple(scores)
    )


# --------------------------------------------------------------------------- the classifier

# 2: the H&E pale rule ("pale"). Version 1 states (no rule) still load; a wsi-psm that knows
# only 1 refuses a 2 instead of writing the objects the rule drops.
STATE_VERSION = 3


def positive_index(counts: Mapping[str, int]) -> float | None:
    """Positive / (Positive + Negative): the Ki-67 index on a Ki-67 stain; None without IHC cells."""
    pos, neg = int(counts.get(POSITIVE[0], 0)), int(counts.get(NEGATIVE[0], 0))
    return pos / (pos + neg) if pos + neg else None


def ink_fraction(image: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Share of each label's pixels (``ids``, rows of a :class:`CellFeatures`) that are marking
    ink (:func:`stain.ink_pixels`)."""
    lab = np.asarray(labels)
    inside = lab > 0  # (only the objects' pixels are judged: a tile is mostly background)
    n = max(int(lab.max(initial=0)) + 1, int(ids.max(initial=0)) + 1)
    ink = np.bincount(lab[inside], ink_pixels(np.asarray(image)[inside]), n)
    return ink[ids] / np.maximum(np.bincount(lab[inside], minlength=n)[ids], 1)


Color = tuple[int, int, int]


@dataclass
class CellClassifier:
    """Names and measures cells; fitted once per slide or cohort (:meth:`fit`), then applied per tile.

    It is the pipeline's ``CellAnnotator``: :meth:`annotate` sets every candidate's payload to
    ``(class name, colour, measurements)``, or None for an object :attr:`pale` says is no
    nucleus. :meth:`indices` turns class counts into summary indices.
    """

    stain: Stain
    matrix: np.ndarray  # (2, 3) stain OD vectors: haematoxylin, then DAB or eosin
    classes: tuple[tuple[str, Color], ...]  # in display order; predictions index into it
    ring_um: float = RING_UM
    marker: str = "ki67"
    dab: DabRule | None = None  # IHC rule
    groups: Groups | None = None  # H&E groups
    n_fit_cells: int = 0
    pale: PaleRule | None = None  # H&E: objects too pale to be nuclei, not written
    max_ink: float | None = None  # H&E: objects at least this much marking ink, not written

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        images: Sequence[np.ndarray],
        labels_list: Sequence[np.ndarray],
        *,
        mpp: float,
        stain: str = "auto",
        cfg: ClassConfig | None = None,
        seed: int = 0,
        matrix: np.ndarray | None = None,
    ) -> CellClassifier:
        """Fit on sampled tiles (uint8 RGB at processing resolution ``mpp``) and their instance labels.

        ``stain``: "he", "ihc-dab", or "auto" (:func:`stain.detect_stain` on ``images``). The stain
        vectors are estimated from the same tiles (Macenko) unless ``cfg.estimate_stain_matrix`` is
        false, or ``matrix`` (2, 3) is given (e.g. the one the pseudo-mask stage estimated). At most
        ``cfg.fit_max_cells`` cells (a seeded sample) decide the classes.
        """
        cfg = cfg or ClassConfig()
        if len(images) != len(labels_list):
            raise ValueError(f"{len(images)} images but {len(labels_list)} label arrays")
        if not images:
            raise ValueError("no tiles to fit the cell classes on")
        st: Stain = detect_stain(list(images), seed=seed) if stain == "auto" else stain  # type: ignore[assignment]
        if st not in ("he", "ihc-dab"):
            raise ValueError(f"unknown stain {stain!r}: use 'auto', 'he' or 'ihc-dab'")
        if matrix is None:
            matrix = (
                estimate_stain_matrix(list(images), st, seed=seed)
                if cfg.estimate_stain_matrix
                else default_stain_matrix(st)
            )
        parts = [
            cell_features(im, lab, mpp=mpp, stain=st, matrix=matrix, ring_um=cfg.ring_um)
            for im, lab in zip(images, labels_list, strict=True)
        ]
        feats = CellFeatures.concat(parts)
        ink = None
        if st == "he" and cfg.enabled and cfg.max_ink_fraction is not None:
            ink = np.concatenate([
                ink_fraction(im, lab, p.ids)
                for im, lab, p in zip(images, labels_list, parts, strict=True)
            ])  # fmt: skip
        if len(feats) > cfg.fit_max_cells:
            pick = np.sort(
                np.random.default_rng(seed).choice(len(feats), cfg.fit_max_cells, replace=False)
            )
            feats = CellFeatures(feats.ids[pick], feats.names, feats.values[pick])
            ink = None if ink is None else ink[pick]
        base = cls(st, np.asarray(matrix, dtype=np.float64), (NUCLEUS,), cfg.ring_um, cfg.marker,
                   n_fit_cells=len(feats))  # fmt: skip
        if not cfg.enabled:
            return base
        if st == "ihc-dab":
            base.dab = dab_threshold(
                feats.column("Nucleus: DAB OD mean"), floor=cfg.dab_floor_od, seed=seed
            )
            base.classes = (POSITIVE, NEGATIVE)
        else:
            if ink is not None:  # ink blobs are no nuclei: kept out of the fit
                base.max_ink = cfg.max_ink_fraction
                keep = np.flatnonzero(ink < base.max_ink)
                if len(keep):  # (all ink: nothing will be written, the rest fits on what there is)
                    feats = CellFeatures(feats.ids[keep], feats.names, feats.values[keep])
            if cfg.pale_ratio is not None:
                base.pale = pale_threshold(
                    feats.column(H_MEAN), feats.column(E_MEAN), ratio=cfg.pale_ratio, seed=seed
                )
            if base.pale is not None:  # the groups are of nuclei
                keep = np.flatnonzero(feats.column(H_MEAN) >= base.pale.threshold)
                feats = CellFeatures(feats.ids[keep], feats.names, feats.values[keep])
            g = he_groups(
                he_grouping_features(feats),
                max_groups=cfg.max_groups,
                min_fraction=cfg.min_group_fraction,
                criterion=cfg.group_criterion,
                seed=seed,
            )
            if g.k > 1:
                base.groups = g
                base.classes = tuple((n, GROUP_COLORS[n]) for n in GROUP_NAMES[g.k])
        return base

    # ------------------------------------------------------------------ applying

    def features(self, image: np.ndarray, labels: np.ndarray, mpp: float) -> CellFeatures:
        return cell_features(
            image, labels, mpp=mpp, stain=self.stain, matrix=self.matrix, ring_um=self.ring_um
        )

    def predict(self, feats: CellFeatures) -> np.ndarray:
        """Index into :attr:`classes` for every row of ``feats``."""
        if self.dab is not None:
            return np.where(feats.column("Nucleus: DAB OD mean") > self.dab.threshold, 0, 1)
        if self.groups is not None:
            return self.groups.predict(he_grouping_features(feats))
        return np.zeros(len(feats), dtype=np.int64)

    def annotate(
        self, image: np.ndarray, labels: np.ndarray, cands: Sequence[Any], mpp_l0: float
    ) -> None:
        """Set ``cand.payload = (class name, colour, measurements)`` for the cells of one tile, and
        None for an object that is not a nucleus (not to be written): too pale (the fit's
        :class:`PaleRule`), or ``max_ink`` or more of its pixels marking ink (H&E).

        Measurements: the polygon's shape (polygons.measurement_dicts, at ``mpp_l0``) and the
        stain measurements (:func:`stain_feature_names`). The processing resolution is read off the
        candidates (polygon area in level-0 px² over the label's pixel count), so this works whatever
        resolution the tile was processed at.
        """
        if not cands:
            return
        counts = np.bincount(
            np.asarray(labels).ravel(), minlength=max(int(c.label) for c in cands) + 1
        )
        ratios = [c.polygon.area / counts[c.label] for c in cands if counts[c.label] > 0]
        if not ratios:
            raise ValueError("no candidate's label occurs in the label array")
        mpp = mpp_l0 * math.sqrt(float(np.median(ratios)))
        feats = self.features(image, labels, mpp)
        row = feats.row_of()
        pred = self.predict(feats)
        names = stain_feature_names(self.stain)
        cols = [feats.names.index(n) for n in names]
        pale = (
            feats.column(H_MEAN) < self.pale.threshold
            if self.pale is not None
            else np.zeros(len(feats), dtype=bool)
        )
        if self.max_ink is not None:
            pale |= ink_fraction(image, labels, feats.ids) >= self.max_ink
        shapes = measurement_dicts([c.polygon for c in cands], mpp_l0)
        for c, meas in zip(cands, shapes, strict=True):
            r = row.get(int(c.label))
            if r is None:
                raise ValueError(f"candidate label {c.label} does not occur in the label array")
            if pale[r]:
                c.payload = None
                continue
            name, color = self.classes[int(pred[r])]
            meas.update({n: float(v) for n, v in zip(names, feats.values[r, cols], strict=True)})
            c.payload = (name, color, meas)

    def indices(self, counts: Mapping[str, int]) -> dict[str, float | None]:
        """Summary indices from class counts: IHC ``<marker>_index`` = positive / (positive + negative)
        (None without cells); H&E: none (per-group fractions are in the class counts already)."""
        if self.dab is None:
            return {}
        return {f"{self.marker}_index": positive_index(counts)}

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.dab is not None:
            d = self.dab
            how = (
                "mixture" if d.mixture_threshold is not None and d.threshold > d.floor else "floor"
            )
            return (
                f"IHC: Positive if nuclear DAB OD mean > {d.threshold:.3f} ({how}; floor {d.floor})"
            )
        pale = (
            ""
            if self.pale is None
            else f"; objects with nuclear haematoxylin OD mean < {self.pale.threshold:.3f} are "
            f"not nuclei (modes {self.pale.means[0]:.2f} / {self.pale.means[1]:.2f}; the pale "
            f"one eosin-dominant, eosin / haematoxylin {self.pale.eosin_ratio:.2f})"
        )
        if self.max_ink is not None:
            pale += f"; objects at least {self.max_ink:.0%} marking ink are not nuclei"
        if self.groups is not None:
            g = self.groups
            # each group's centre in natural units: the groups part four features, not area alone
            # (a "Small nucleus" can be larger than some "Large" ones: darker, rounder, ...)
            centre = g.means * g.scale + g.center
            names = ", ".join(
                f"{n} (about {math.exp(c[0]):.0f} µm², haematoxylin {math.exp(c[1]):.2f}, "
                f"spread {c[2]:.2f}, eccentricity {c[3]:.2f})"
                for (n, _), c in zip(self.classes, centre, strict=True)
            )
            return (
                f"H&E: {g.k} groups (by area, haematoxylin, its spread and eccentricity), named "
                f"by size rank: {names}{pale}"
            )
        return f"{self.stain}: one class (Nucleus){pale}"

    # ------------------------------------------------------------------ state

    def to_state(self) -> dict[str, Any]:
        """Plain JSON-able state (numbers and lists only) for the model bundle."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "stain": self.stain,
            "matrix": np.asarray(self.matrix, dtype=float).tolist(),
            "classes": [[n, list(c)] for n, c in self.classes],
            "ring_um": self.ring_um,
            "marker": self.marker,
            "n_fit_cells": self.n_fit_cells,
            "dab": None,
            "groups": None,
            "pale": None,
            "max_ink": self.max_ink,
        }
        if self.pale is not None:
            state["pale"] = {
                "threshold": self.pale.threshold,
                "means": list(self.pale.means),
                "weights": list(self.pale.weights),
                "eosin_ratio": self.pale.eosin_ratio,
            }
        if self.dab is not None:
            d = self.dab
            state["dab"] = {
                "threshold": d.threshold,
                "mixture_threshold": d.mixture_threshold,
                "means": list(d.means) if d.means is not None else None,
                "ashman_d": d.ashman_d,
                "floor": d.floor,
            }
        if self.groups is not None:
            g = self.groups
            state["groups"] = {
                "features": list(HE_FEATURES),
                "center": g.center.tolist(),
                "scale": g.scale.tolist(),
                "weights": g.weights.tolist(),
                "means": g.means.tolist(),
                "covariances": g.covariances.tolist(),
                "scores": list(g.scores),
            }
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CellClassifier:
        if state.get("version") not in (1, 2, STATE_VERSION):
            raise ValueError(f"unsupported cell classifier state version {state.get('version')!r}")
        dab = groups = None
        if state.get("dab") is not None:
            d = state["dab"]
            dab = DabRule(
                float(d["threshold"]),
                None if d["mixture_threshold"] is None else float(d["mixture_threshold"]),
                None if d["means"] is None else (float(d["means"][0]), float(d["means"][1])),
                None if d["ashman_d"] is None else float(d["ashman_d"]),
                float(d["floor"]),
            )
        if state.get("groups") is not None:
            g = state["groups"]
            if tuple(g["features"]) != HE_FEATURES:
                raise ValueError(
                    f"cell classifier state uses features {g['features']}, expected {HE_FEATURES}"
                )
            groups = Groups(
                np.asarray(g["center"], float),
                np.asarray(g["scale"], float),
                np.asarray(g["weights"], float),
                np.asarray(g["means"], float),
                np.asarray(g["covariances"], float),
                tuple(float(v) for v in g["scores"]),
            )
        pale = None
        if state.get("pale") is not None:  # (absent from states saved before the rule)
            q = state["pale"]
            pale = PaleRule(
                float(q["threshold"]),
                (float(q["means"][0]), float(q["means"][1])),
                (float(q["weights"][0]), float(q["weights"][1])),
                float(q["eosin_ratio"]),
            )
        return cls(
            state["stain"],
            np.asarray(state["matrix"], dtype=np.float64),
            tuple((str(n), (int(c[0]), int(c[1]), int(c[2]))) for n, c in state["classes"]),
            float(state["ring_um"]),
            str(state["marker"]),
            dab,
            groups,
            int(state["n_fit_cells"]),
            pale,
            None if state.get("max_ink") is None else float(state["max_ink"]),  # (from version 3)
        )
