"""PSM + stain -> binary nucleus pseudo mask, with one k-means model per slide (or cohort).

Per-pixel features (``ClusterConfig.features``, '+'-joined):

- ``psm``: the prior self-activation map (one column);
- ``h``: nuclear stain OD (haematoxylin); ``stain``: haematoxylin and eosin (or DAB) OD as two
  columns; both by colour deconvolution with stain vectors estimated (Macenko) on the fit tiles;
- ``rgb``: RGB in [0, 1] (the reference clustered a JET colour map of the PSM plus RGB).

A feature set without ``psm`` is the ablation "colour/stain alone". Features are smoothed (Gaussian,
``smooth_um``), z-scored with the fit sample's mean and std (the PSM column then multiplied by
``psm_weight``), and k-means (scikit-learn, ``k`` clusters) is fitted on ``sample_pixels`` stained
pixels drawn evenly from all fit tiles; every tile is then predicted with the same centroids, so
masks are consistent across a slide. The nucleus cluster is picked by a rule, never by labels: the
centroid highest in PSM plus nuclear stain ("high activation and dark"; with ``rgb``, darkness).
Holes smaller than ``min_hole_um2`` are filled and specks smaller than ``min_object_um2`` removed
(sizes converted to pixels with the processing mpp).

Haematoxylin-DAB (Ki-67) with ``h`` in the features: positive nuclei are brown and negative ones
faint blue, which one cluster cannot hold (measured on BCData: a single 2-means on H + DAB finds
75% of positive and 0% of negative cells). So two stages run in turn, each a k-means as above:
stage 1 on log DAB (+ PSM) finds brown nuclei; stage 2 on log haematoxylin (+ PSM), fitted on the
pixels stage 1 left, finds blue ones; the mask is their union (BCData, 26 images at 0.5 um/px:
99% of positive and 81% of negative annotated cells fall inside the mask, 31% foreground).
A DAB region larger than ``max_stage_region_um2`` (holes filled) is not a clump of stained nuclei but
membranous or cytoplasmic staining (HER2-, cytokeratin-like): stage 1 releases it, so stage 2 is fitted
on and finds the blue nuclei inside it (on BCData no region is that large: the largest clump of
positive nuclei is 1,741 um^2).

Measured on MoNuSeg (benchmarks/pseudo_masks.py): k=2 on ``psm+h`` or ``h`` gives the best masks, and
the clustering must be fitted per slide: one cohort model does not transfer across stainings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from wsi_psm.config import ClusterConfig
from wsi_psm.errors import NoTissueError
from wsi_psm.stain import (
    Stain,
    detect_stain,
    estimate_stain_matrix,
    stain_channels,
    stained_pixels,
)

STATE_VERSION = 2
FEATURE_PARTS = ("psm", "h", "stain", "rgb")
# Offset inside the log of stain OD (H-DAB stages): compresses strong DAB, spreads faint haematoxylin.
LOG_EPS = 0.05
# Column kinds that count towards "nucleus" in the rule (z-scored centroid summed); rgb counts negatively.
_NUCLEAR = {"psm", "h", "dab", "logh", "logdab"}


def _parts(features: str) -> list[str]:
    parts = features.split("+")
    if not parts or any(p not in FEATURE_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown cluster features {features!r}: '+'-joined parts of {FEATURE_PARTS}"
        )
    return parts


def stages_for(features: str, stain: Stain) -> list[list[str]]:
    """Column kinds of each clustering stage: ["psm", "h"] etc.; see the module docstring."""
    parts = _parts(features)
    psm = ["psm"] if "psm" in parts else []
    if stain == "ihc-dab" and "h" in parts:
        return [[*psm, "logdab"], [*psm, "logh"]]
    cols: list[str] = []
    for p in parts:
        if p == "psm":
            cols.append("psm")
        elif p == "h":
            cols.append("h")
        elif p == "stain":
            cols += ["h", "dab" if stain == "ihc-dab" else "eosin"]
        else:
            cols += ["r", "g", "b"]
    return [cols]


def _features(
    rgb: np.ndarray,
    psm: np.ndarray | None,
    cols: list[str],
    stain: Stain,
    matrix: np.ndarray,
    smooth_px: float,
) -> np.ndarray:
    """(H, W, len(cols)) float32 raw features of one tile (before standardisation)."""
    ch: list[np.ndarray] | None = None
    out: list[np.ndarray] = []
    for c in cols:
        if c == "psm":
            if psm is None:
                raise ValueError("these cluster features need a PSM")
            out.append(np.asarray(psm, np.float32))
            continue
        if c in ("r", "g", "b"):
            out.append(np.asarray(rgb[..., "rgb".index(c)], np.float32) / 255.0)
            continue
        if ch is None:
            ch = list(stain_channels(rgb, stain, matrix).values())  # haematoxylin first
        v = ch[0] if c in ("h", "logh") else ch[1]
        out.append(np.log(v + LOG_EPS) if c.startswith("log") else v)
    f = np.stack(out, axis=-1).astype(np.float32)
    if smooth_px > 0:
        f = ndi.gaussian_filter(f, sigma=(smooth_px, smooth_px, 0))
    return f


def _nucleus_score(centroids: np.ndarray, cols: list[str]) -> np.ndarray:
    """Rule picking the nucleus cluster on standardised centroids: high activation and dark."""
    score = np.zeros(len(centroids))
    for j, c in enumerate(cols):
        if c in _NUCLEAR:
            score += centroids[:, j]
        elif c in ("r", "g", "b"):
            score -= centroids[:, j] / 3.0
    return score


def _small_components(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Pixels of 4-connected components of ``mask`` smaller than ``max_px`` pixels."""
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    small = np.bincount(lab.ravel()) < max_px
    small[0] = False
    return small[lab]


def _large_regions(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Pixels of ``mask`` in 4-connected regions (holes filled) of at least ``min_px`` pixels."""
    lab, n = ndi.label(ndi.binary_fill_holes(mask))
    if n == 0:
        return np.zeros_like(mask)
    large = np.bincount(lab.ravel()) >= min_px
    large[0] = False
    return mask & large[lab]


def one_openmp_thread() -> threadpool_limits:
    """A scope in which scikit-learn's k-means runs on one OpenMP thread. Its problems here are
    small (at most a few hundred thousand rows of 2-6 features): on a 16-core GPU machine its 16
    threads, beside torch's spinning ones, took 4x the 2-core machine's time (BCData's 83 fits:
    20 s against 5 s), and on the 2-core machine one thread is as fast as two
    (benchmarks/README.md)."""
    return threadpool_limits(1, user_api="openmp")


def fit_kmeans(x: np.ndarray, k: int, *, n_init: int, seed: int) -> KMeans:
    """scikit-learn's k-means, on one OpenMP thread (:func:`one_openmp_thread`)."""
    with one_openmp_thread():
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)


class _Stage:
    """One k-means over some feature columns: z-scoring, weights, centroids, nucleus cluster."""

    def __init__(self, cols: list[str], mean, std, weights, centroids, nucleus: int) -> None:
        self.cols = list(cols)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.weights = np.asarray(weights, np.float32)
        self.centroids = np.asarray(centroids, np.float32)
        self.nucleus = int(nucleus)

    @classmethod
    def fit(cls, cols: list[str], x: np.ndarray, cfg: ClusterConfig, seed: int) -> _Stage:
        mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        w = np.array([cfg.psm_weight if c == "psm" else 1.0 for c in cols], np.float32)
        km = fit_kmeans((x - mean) / std * w, cfg.k, n_init=4, seed=seed)
        cents = km.cluster_centers_.astype(np.float32)
        return cls(cols, mean, std, w, cents, int(np.argmax(_nucleus_score(cents / w, cols))))

    def clusters(self, f: np.ndarray) -> np.ndarray:
        z = (f - self.mean) / self.std * self.weights
        return np.argmin(((z[..., None, :] - self.centroids) ** 2).sum(axis=-1), axis=-1)

    def claimed(self, clusters: np.ndarray, cfg: ClusterConfig, mpp: float) -> np.ndarray:
        """What an earlier stage of several claims on a tile, from its (H, W) cluster indices: its
        nucleus cluster, less regions too large to be stained nuclei (they go on to the next stage)."""
        nuc = clusters == self.nucleus
        return nuc & ~_large_regions(nuc, cfg.max_stage_region_um2 / (mpp * mpp))

    def to_state(self) -> dict[str, Any]:
        return {
            "cols": self.cols,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "weights": self.weights.tolist(),
            "centroids": self.centroids.tolist(),
            "nucleus": self.nucleus,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> _Stage:
        return cls(d["cols"], d["mean"], d["std"], d["weights"], d["centroids"], d["nucleus"])


class PseudoMaskModel:
    """k-means on per-pixel PSM + stain features, fitted once per slide (or cohort)."""

    def __init__(
        self,
        *,
        cfg: ClusterConfig,
        mpp: float,
        stain: Stain,
        stain_matrix: np.ndarray,
        stages: list[_Stage],
    ) -> None:
        self.cfg = cfg
        self.mpp = float(mpp)
        self.stain: Stain = stain
        self.stain_matrix = np.asarray(stain_matrix, np.float64)
        self.stages = stages

    @property
    def needs_psm(self) -> bool:
        return "psm" in _parts(self.cfg.features)

    @property
    def _smooth_px(self) -> float:
        return self.cfg.smooth_um / self.mpp

    @classmethod
    def fit(
        cls,
        rgb_tiles: list[np.ndarray],
        psms: list[np.ndarray] | None,
        cfg: ClusterConfig,
        *,
        mpp: float,
        seed: int,
        stain: Stain | None = None,
    ) -> PseudoMaskModel:
        """Fit on stained pixels sampled evenly from ``rgb_tiles`` (uint8 RGB at ``mpp``) and their
        PSMs (``None`` is fine when the features have no ``psm``).

        ``stain`` None detects it from the tiles; the stain vectors are a Macenko estimate on them.
        """
        if not rgb_tiles:
            raise ValueError("PseudoMaskModel.fit needs at least one tile")
        if "psm" in _parts(cfg.features) and (psms is None or len(psms) != len(rgb_tiles)):
            raise ValueError("one PSM per tile is needed for PSM features")
        rng = np.random.default_rng(seed)
        stain = stain or detect_stain(rgb_tiles, seed=seed)
        matrix = estimate_stain_matrix(rgb_tiles, stain, seed=seed)
        stage_cols = stages_for(cfg.features, stain)
        all_cols = list(dict.fromkeys(c for cols in stage_cols for c in cols))
        per_tile = max(1, cfg.sample_pixels // len(rgb_tiles))
        smooth_px = cfg.smooth_um / mpp

        def tile_features(i: int, cols: list[str]) -> np.ndarray:
            psm = None if psms is None else psms[i]
            return _features(rgb_tiles[i], psm, cols, stain, matrix, smooth_px)

        samples, picks = [], []  # per tile: the stained pixels sampled from it, and their features
        for i, rgb in enumerate(rgb_tiles):
            f = tile_features(i, all_cols)
            # Fit on stained pixels only: glass would otherwise claim a cluster and move the nucleus
            # boundary with the amount of glass in the sample.
            idx = np.flatnonzero(stained_pixels(rgb).ravel())
            pick = rng.choice(idx, min(per_tile, len(idx)), replace=False) if len(idx) else idx
            picks.append(pick)
            samples.append(f.reshape(-1, f.shape[-1])[pick])
        x_all = np.concatenate(samples)
        if not len(x_all):
            raise NoTissueError(
                f"nothing to fit on: no stained pixel in the {len(rgb_tiles)} image(s) or tile(s) "
                "of the label-free fit (glass or blank only)"
            )
        stages: list[_Stage] = []
        left = np.ones(len(x_all), bool)  # each stage is fitted on the pixels earlier stages left
        for s, cols in enumerate(stage_cols):
            sel = [all_cols.index(c) for c in cols]
            x = x_all[left][:, sel]
            if len(x) < cfg.k:
                raise ValueError("too few stained pixels left to fit the clustering")
            st = _Stage.fit(cols, x, cfg, seed)
            stages.append(st)
            if s < len(stage_cols) - 1:
                # taken: the stage's nuclei less its released regions, which need whole tiles
                # (features recomputed rather than all kept: bounded memory on 64 fit tiles)
                taken = [
                    st.claimed(st.clusters(tile_features(i, cols)), cfg, mpp).ravel()[p]
                    for i, p in enumerate(picks)
                ]
                left &= ~np.concatenate(taken)
        return cls(cfg=cfg, mpp=mpp, stain=stain, stain_matrix=matrix, stages=stages)

    def predict_clusters(self, rgb: np.ndarray, psm: np.ndarray | None) -> np.ndarray:
        """(H, W) int cluster index per pixel: stage s's clusters are numbered from s * k, and a
        pixel gets the first stage that calls it nucleus (else the last stage's cluster)."""
        all_cols = list(dict.fromkeys(c for st in self.stages for c in st.cols))
        f = _features(rgb, psm, all_cols, self.stain, self.stain_matrix, self._smooth_px)
        out = np.full(f.shape[:2], -1, np.int64)
        k = self.cfg.k
        for s, st in enumerate(self.stages):
            lab = st.clusters(f[..., [all_cols.index(c) for c in st.cols]])
            free = out < 0
            if s == len(self.stages) - 1:
                take = free
            else:
                take = free & st.claimed(lab, self.cfg, self.mpp)
            out[take] = lab[take] + s * k
        return out

    def nucleus_clusters(self) -> list[int]:
        return [st.nucleus + s * self.cfg.k for s, st in enumerate(self.stages)]

    def predict(self, rgb: np.ndarray, psm: np.ndarray | None) -> np.ndarray:
        """Bool nucleus mask (H, W) for one tile (``psm`` is ignored when the features have none)."""
        mask = np.isin(
            self.predict_clusters(rgb, psm if self.needs_psm else None), self.nucleus_clusters()
        )
        px_area = self.mpp * self.mpp
        if self.cfg.min_hole_um2 > 0:
            mask |= _small_components(~mask, self.cfg.min_hole_um2 / px_area)
        if self.cfg.min_object_um2 > 0:
            mask &= ~_small_components(mask, self.cfg.min_object_um2 / px_area)
        return mask

    # ----------------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON-able state (plain lists), enough to predict identically after :meth:`from_state`."""
        return {
            "version": STATE_VERSION,
            "cfg": self.cfg.model_dump(mode="json"),
            "mpp": self.mpp,
            "stain": self.stain,
            "stain_matrix": self.stain_matrix.tolist(),
            "stages": [st.to_state() for st in self.stages],
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> PseudoMaskModel:
        if d.get("version") == 1:
            d = _state_v1_to_v2(d)
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported PseudoMaskModel state version {d.get('version')!r}")
        return cls(
            cfg=ClusterConfig.model_validate(d["cfg"]),
            mpp=d["mpp"],
            stain=d["stain"],
            stain_matrix=np.array(d["stain_matrix"]),
            stages=[_Stage.from_state(s) for s in d["stages"]],
        )


def _state_v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (one k-means, columns in feature order) as one stage; H-DAB with ``h`` summed the
    two stains into one column, which no stage reproduces: such a model must be refitted."""
    cfg = ClusterConfig.model_validate(d["cfg"])
    if d["stain"] == "ihc-dab" and "h" in _parts(cfg.features):
        raise ValueError(
            "PseudoMaskModel state version 1 for H-DAB cannot be read: refit the model"
        )
    (cols,) = stages_for(cfg.features, d["stain"])
    weights = [cfg.psm_weight if c == "psm" else 1.0 for c in cols]
    stage = {"cols": cols, "mean": d["mean"], "std": d["std"], "weights": weights,
             "centroids": d["centroids"], "nucleus": d["nucleus"]}  # fmt: skip
    keep = {k: d[k] for k in ("cfg", "mpp", "stain", "stain_matrix")}
    return {**keep, "version": 2, "stages": [stage]}


def sample_tiles(tiles: Sequence[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """Up to ``n`` tiles picked at random (seeded), in their original order."""
    idx = np.random.default_rng(seed).choice(len(tiles), min(n, len(tiles)), replace=False)
    return [tiles[i] for i in sorted(idx)]
