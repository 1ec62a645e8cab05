"""PSM + stain -> binary nucleus pseudo mask, with one k-means model per slide or cohort.

Per-pixel features (``ClusterConfig.features``):

- ``psm+stain``: PSM, haematoxylin OD and eosin (or DAB) OD, from colour deconvolution with a stain
  matrix estimated (Macenko) on the fit tiles;
- ``stain``: the two stain ODs only (the ablation: no PSM);
- ``psm+rgb``: PSM and RGB in [0, 1] (the reference used a JET colour map of the PSM plus RGB).

Features are z-scored with the fit sample's mean and std (the PSM column then multiplied by
``psm_weight``), k-means (scikit-learn, ``k`` clusters) is fitted on ``sample_pixels`` pixels drawn
evenly from all fit tiles, and every tile is predicted with the same centroids, so masks are
consistent across a slide. The nucleus cluster is picked by a rule, never by labels: the cluster whose
centroid is highest in PSM plus haematoxylin (or PSM plus darkness for ``psm+rgb``; haematoxylin
alone for ``stain``). Holes smaller than ``min_hole_um2`` are filled and objects smaller than
``min_object_um2`` removed (sizes converted to pixels with the processing mpp).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from sklearn.cluster import KMeans

from wsi_psm.config import ClusterConfig
from wsi_psm.stain import (
    TISSUE_OD,
    Stain,
    detect_stain,
    estimate_stain_matrix,
    rgb_to_od,
    stain_channels,
)

STATE_VERSION = 1
FEATURE_PARTS = ("psm", "h", "stain", "rgb")


def _parts(features: str) -> list[str]:
    parts = features.split("+")
    if not parts or any(p not in FEATURE_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown cluster features {features!r}: '+'-joined parts of {FEATURE_PARTS}"
        )
    return parts


def _features(
    rgb: np.ndarray,
    psm: np.ndarray | None,
    features: str,
    stain: Stain,
    matrix: np.ndarray,
    smooth_px: float,
) -> np.ndarray:
    """(H, W, F) float32 raw features of one tile (before standardisation), in ``features`` order:
    psm -> 1 column, h -> haematoxylin, stain -> haematoxylin + eosin/DAB, rgb -> 3 columns."""
    cols: list[np.ndarray] = []
    for part in _parts(features):
        if part == "psm":
            if psm is None:
                raise ValueError(f"features {features!r} need a PSM")
            cols.append(np.asarray(psm, np.float32))
        elif part in ("h", "stain"):
            ch = list(stain_channels(rgb, stain, matrix).values())  # haematoxylin first
            cols.extend(ch[:1] if part == "h" else ch)
        else:
            cols.extend(np.moveaxis(np.asarray(rgb, np.float32) / 255.0, -1, 0))
    f = np.stack(cols, axis=-1).astype(np.float32)
    if smooth_px > 0:
        f = ndi.gaussian_filter(f, sigma=(smooth_px, smooth_px, 0))
    return f


def _nucleus_score(centroids: np.ndarray, features: str) -> np.ndarray:
    """Rule picking the nucleus cluster on standardised centroids: high activation and dark, i.e.
    the sum of the PSM column (if any) and the haematoxylin column (or, with rgb, darkness)."""
    score = np.zeros(len(centroids))
    col = 0
    for part in _parts(features):
        if part == "psm":
            score += centroids[:, col]
            col += 1
        elif part in ("h", "stain"):
            score += centroids[:, col]
            col += 1 if part == "h" else 2
        else:
            score -= centroids[:, col : col + 3].mean(axis=1)
            col += 3
    return score


def _small_components(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Pixels of 4-connected components of ``mask`` smaller than ``max_px`` pixels."""
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    small = np.bincount(lab.ravel()) < max_px
    small[0] = False
    return small[lab]


class PseudoMaskModel:
    """k-means on per-pixel PSM + stain features, fitted once per slide or cohort."""

    def __init__(
        self,
        *,
        cfg: ClusterConfig,
        mpp: float,
        stain: Stain,
        stain_matrix: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        centroids: np.ndarray,
        nucleus: int,
    ) -> None:
        self.cfg = cfg
        self.mpp = float(mpp)
        self.stain: Stain = stain
        self.stain_matrix = np.asarray(stain_matrix, np.float64)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.centroids = np.asarray(centroids, np.float32)
        self.nucleus = int(nucleus)

    # ----------------------------------------------------------------------------------------
    @property
    def _smooth_px(self) -> float:
        return self.cfg.smooth_um / self.mpp

    def _weights(self) -> np.ndarray:
        w = np.ones(len(self.mean), np.float32)
        if "psm" in _parts(self.cfg.features):
            w[_parts(self.cfg.features).index("psm")] = self.cfg.psm_weight  # psm is one column
        return w

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
        """Fit on pixels sampled evenly from ``rgb_tiles`` (uint8 RGB at ``mpp``) and their PSMs.

        ``stain`` None detects it from the tiles; the stain matrix is a Macenko estimate on them.
        """
        if not rgb_tiles:
            raise ValueError("PseudoMaskModel.fit needs at least one tile")
        if "psm" in _parts(cfg.features) and (psms is None or len(psms) != len(rgb_tiles)):
            raise ValueError("one PSM per tile is needed for PSM features")
        rng = np.random.default_rng(seed)
        stain = stain or detect_stain(rgb_tiles, seed=seed)
        matrix = estimate_stain_matrix(rgb_tiles, stain, seed=seed)
        per_tile = max(1, cfg.sample_pixels // len(rgb_tiles))
        smooth_px = cfg.smooth_um / mpp
        samples = []
        for i, rgb in enumerate(rgb_tiles):
            f = _features(
                rgb, None if psms is None else psms[i], cfg.features, stain, matrix, smooth_px
            )
            f = f.reshape(-1, f.shape[-1])
            # Fit on stained pixels only: white background/lumen would otherwise claim a cluster and
            # shift the nucleus boundary with the amount of glass in the sample.
            idx = np.flatnonzero(rgb_to_od(rgb).sum(axis=-1).ravel() > TISSUE_OD)
            if len(idx) == 0:
                continue
            samples.append(f[rng.choice(idx, min(per_tile, len(idx)), replace=False)])
        if not samples:
            raise ValueError("no stained pixels in the fit tiles")
        x = np.concatenate(samples)
        mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        model = cls(
            cfg=cfg,
            mpp=mpp,
            stain=stain,
            stain_matrix=matrix,
            mean=mean,
            std=std,
            centroids=np.zeros((cfg.k, x.shape[1])),
            nucleus=0,
        )
        z = (x - mean) / std * model._weights()
        km = KMeans(n_clusters=cfg.k, n_init=4, random_state=seed).fit(z)
        model.centroids = km.cluster_centers_.astype(np.float32)
        model.nucleus = int(
            np.argmax(_nucleus_score(model.centroids / model._weights(), cfg.features))
        )
        return model

    def predict_clusters(self, rgb: np.ndarray, psm: np.ndarray | None) -> np.ndarray:
        """(H, W) int cluster index per pixel."""
        f = _features(rgb, psm, self.cfg.features, self.stain, self.stain_matrix, self._smooth_px)
        z = (f - self.mean) / self.std * self._weights()
        d = ((z[..., None, :] - self.centroids) ** 2).sum(axis=-1)
        return np.argmin(d, axis=-1)

    def predict(self, rgb: np.ndarray, psm: np.ndarray | None) -> np.ndarray:
        """Bool nucleus mask (H, W) for one tile."""
        mask = self.predict_clusters(rgb, psm) == self.nucleus
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
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "centroids": self.centroids.tolist(),
            "nucleus": self.nucleus,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> PseudoMaskModel:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported PseudoMaskModel state version {d.get('version')!r}")
        return cls(
            cfg=ClusterConfig.model_validate(d["cfg"]),
            mpp=d["mpp"],
            stain=d["stain"],
            stain_matrix=np.array(d["stain_matrix"]),
            mean=np.array(d["mean"]),
            std=np.array(d["std"]),
            centroids=np.array(d["centroids"]),
            nucleus=d["nucleus"],
        )


def sample_tiles(tiles: Sequence[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """Up to ``n`` tiles picked at random (seeded), in their original order."""
    idx = np.random.default_rng(seed).choice(len(tiles), min(n, len(tiles)), replace=False)
    return [tiles[i] for i in sorted(idx)]
