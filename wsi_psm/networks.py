"""The downstream network a run segments with, and the label-free fits that make one.

Which network: the one shipped with the package (:data:`DEFAULT_MODEL`, trained by
benchmarks/train_default_model.py), one read from a model file or taken from a model bundle, or
one fitted on the given images or tiles (activation net, pseudo masks, then the segmenter trained on
them). Shared by ``run`` (:func:`attach_segmenter`, via ``fit``), ``segment`` (:func:`resolve_model`)
and the tile inference (:func:`bundle_segmenter`, :func:`is_shipped_network`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .errors import ModelError
from .progress import NullProgress, ProgressHook
from .segmenter.network import SegEnsemble, Segmenter, SegNet, read_segmenter_file
from .slide import Slide
from .stain import stained_pixels

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default.pt"
# Image area (mm², at any resolution) under which a fit is warned about. Measured on BCData
# (0.025 mm² per tile): the 26 tiles of a call (0.67 mm²) fitted 13 at a time lost 0.00-0.03 mean
# F1 on them, 3 at a time (0.08 mm²) 0.05-0.07 (benchmarks/README.md, "Robustness checks").
FEW_IMAGES_MM2 = 0.25

log = logging.getLogger(__name__)


def load_segmenter(path: str | Path) -> Segmenter:
    """A segmenter from a file (stand-alone segmenter, or a model bundle with a segmenter)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}")
    try:
        net, _ = read_segmenter_file(p)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise ModelError(f"cannot use {p} as a segmentation model: {exc}".splitlines()[0]) from exc
    return net


def default_model() -> Segmenter:
    """The segmenter shipped with the package (see benchmarks/train_default_model.py)."""
    if not DEFAULT_MODEL.is_file():
        raise ModelError(
            f"the default segmentation model is missing from the installation ({DEFAULT_MODEL}); "
            "pass --model, or set segmenter.default_model to 'fit'"
        )
    return load_segmenter(DEFAULT_MODEL)


def fit_start(cfg: RunConfig) -> Segmenter | None:
    """The weights a label-free segmenter fit starts from (``segmenter.init``): None = random."""
    return default_model() if cfg.segmenter.init == "shipped" else None


def read_processing_images(
    paths: Sequence[Path], cfg: RunConfig, mpp: float | None
) -> list[np.ndarray]:
    """Every image read whole at the processing resolution (uint8 RGB)."""
    out = []
    for p in paths:
        with Slide.open(p, mpp=mpp) as slide:
            out.append(slide.read_at_mpp(0, 0, slide.width, slide.height, cfg.target_mpp))
    return out


# an image with less stained area than this (about 5 nuclei) is not clustered: no pseudo nuclei
MIN_STAINED_UM2 = 250.0


def pseudo_masks_per_image(
    bundle: Any, images: Sequence[np.ndarray], cfg: RunConfig, *, device: torch.device
) -> list[np.ndarray]:
    """Boolean pseudo masks of ``images`` (uint8 RGB at ``cfg.target_mpp``): the bundle's PSM, then
    one PSM + stain clustering fitted on each image's own pixels (each image may come from another
    slide or stain batch, as the pipeline fits one clustering per slide)."""
    from .clustering import PseudoMaskModel

    masks = []
    for im in images:
        # glass or a blank tile (e.g. from a tiled slide): no nuclei, and nothing to cluster
        stained = np.count_nonzero(stained_pixels(im))
        if stained * cfg.target_mpp**2 < MIN_STAINED_UM2:
            masks.append(np.zeros(im.shape[:2], bool))
            continue
        psm = bundle.psm(im[None], device)[0]
        pm = PseudoMaskModel.fit(
            [im], [psm], cfg.cluster, mpp=cfg.target_mpp, seed=cfg.seed, stain=bundle.stain
        )
        masks.append(pm.predict(im, psm))
    return masks


def few_images_note(
    shapes: Sequence[tuple[int, int]], mpp: float, given: int | None = None
) -> str | None:
    """A one-line warning when a fit is to learn from under :data:`FEW_IMAGES_MM2` of image
    (``shapes`` in px at ``mpp``: the images the fit samples, of ``given``), else None."""
    area = sum(h * w for h, w in shapes) * mpp * mpp / 1e6
    if area >= FEW_IMAGES_MM2:
        return None
    if given is not None and given > len(shapes):  # many small tiles: the sample is the limit
        more = f"raise psm.fit_tiles (the fit samples {len(shapes)} of the {given} given)"
    else:
        more = "segment a few dozen tiles together, or reuse a model saved from more (--save-model)"
    return (
        f"the network is fitted on {len(shapes)} image(s), {area:.3f} mm² in all: a fit on a few "
        f"tiles is weaker (3 BCData tiles alone: mean F1 0.05-0.07 lower); {more}"
    )


def fit_on_images(
    images: Sequence[np.ndarray],
    cfg: RunConfig,
    *,
    device: torch.device,
    progress: ProgressHook | None = None,
    sources: Sequence[str] = (),
) -> Any:
    """The whole label-free chain on unlabelled images (uint8 RGB at ``cfg.target_mpp``): the
    self-supervised activation net (fitted on all images) and a PSM + stain clustering per image
    give pseudo masks; the downstream network is trained on them, then refined from its own points.

    Returns the ``ModelBundle`` with the segmenter in ``components["segmenter"]`` (its
    ``component_meta["segmenter"]`` records the schedule and timings).
    """
    from .model import fit_model
    from .segmenter.train import fit_on_pseudo_masks

    progress = progress or NullProgress()
    t0 = time.perf_counter()
    progress.start("fit: PSM and pseudo masks", None)
    bundle = fit_model(list(images), cfg, device=device, sources=sources)
    masks = pseudo_masks_per_image(bundle, images, cfg, device=device)
    progress.done("fit: PSM and pseudo masks")
    t1 = time.perf_counter()
    sc = cfg.segmenter
    progress.start("fit: segmenter", sc.fit_steps * (sc.refine_rounds + 1))
    net = fit_on_pseudo_masks(
        images, masks, cfg, stain=bundle.stain, device=device,
        progress=lambda stage, i, n: progress.advance("fit: segmenter", 1), init=fit_start(cfg),
    )  # fmt: skip
    progress.done("fit: segmenter")
    set_segmenter(
        bundle,
        net,
        target_mpp=cfg.target_mpp,
        trained_on=list(sources) or f"{len(images)} images",
        schedule=sc.model_dump(mode="json"),
        fit_seconds={
            "psm_and_pseudo_masks": round(t1 - t0, 1),
            "segmenter": round(time.perf_counter() - t1, 1),
        },
    )
    return bundle


SEGMENTER_COMPONENT = "segmenter"


def set_segmenter(bundle: Any, net: Segmenter, **meta: Any) -> None:
    """Store ``net`` in a model bundle as its downstream-network component."""
    from .segmenter.network import segmenter_state

    state = segmenter_state(net, **meta)
    bundle.components[SEGMENTER_COMPONENT] = state["tensors"]
    bundle.component_meta[SEGMENTER_COMPONENT] = state["meta"]


def bundle_segmenter(bundle: Any) -> Segmenter | None:
    """The bundle's downstream network, or None when it has none (cells come from pseudo masks)."""
    from .segmenter.network import segmenter_from_state

    comps = getattr(bundle, "components", {}) or {}
    meta = (getattr(bundle, "component_meta", {}) or {}).get(SEGMENTER_COMPONENT)
    if SEGMENTER_COMPONENT not in comps or meta is None:
        return None
    return segmenter_from_state({"meta": meta, "tensors": comps[SEGMENTER_COMPONENT]})


def attach_segmenter(
    bundle: Any,
    tiles: Sequence[np.ndarray],
    cfg: RunConfig,
    *,
    device: torch.device,
    progress: ProgressHook | None = None,
) -> str:
    """Give a freshly fitted bundle its downstream network (``run`` and ``fit``); returns the source.

    ``segmenter.default_model``: "shipped" = the packaged network when it matches the bundle (H&E at
    the same processing resolution), else (IHC, other resolutions) one trained on ``tiles`` (uint8
    RGB at ``cfg.target_mpp``) and the bundle's pseudo masks of them, as "fit" always does (seconds
    to minutes on a GPU, about 10 minutes on 2 CPU cores); "none" = no network (cells from the
    pseudo masks).
    """
    from .segmenter.train import fit_on_pseudo_masks

    sc = cfg.segmenter
    if sc.default_model == "none":
        return "none (segmenter.default_model = none)"
    if uses_shipped_network(bundle.stain, cfg):
        net, meta = read_segmenter_file(DEFAULT_MODEL)
        set_segmenter(bundle, net, **{k: v for k, v in meta.items() if k not in _STATE_KEYS})
        return "shipped"
    progress = progress or NullProgress()
    images = list(tiles)
    masks = [
        m
        for i in range(0, len(images), cfg.tiles.batch_size)
        for m in bundle.pseudo_masks(np.stack(images[i : i + cfg.tiles.batch_size]), device)
    ]
    stage = "fit: segmenter"
    progress.start(stage, sc.fit_steps * (sc.refine_rounds + 1))
    t = time.perf_counter()
    net = fit_on_pseudo_masks(
        images, masks, cfg, stain=bundle.stain, device=device,
        progress=lambda _stage, i, n: progress.advance(stage, 1), init=fit_start(cfg),
    )  # fmt: skip
    progress.done(stage)
    set_segmenter(
        bundle, net, target_mpp=cfg.target_mpp, trained_on=f"{len(images)} tiles",
        schedule=sc.model_dump(mode="json"), fit_seconds={"segmenter": round(time.perf_counter() - t, 1)},
    )  # fmt: skip
    return f"fitted on {len(images)} tiles (label-free)"


_STATE_KEYS = ("format", "version", "arch")


def seeded_sample(paths: Sequence[Path], n: int, seed: int) -> list[Path]:
    """Up to ``n`` of ``paths``, a seeded random choice, in their given order."""
    pick = np.random.default_rng(seed).permutation(len(paths))[:n]
    return [paths[i] for i in sorted(pick)]


def fit_sample(paths: Sequence[Path], cfg: RunConfig) -> list[Path]:
    """The images a label-free fit in ``segment`` reads (held in memory at the processing
    resolution): a seeded sample of ``psm.fit_tiles`` of them."""
    return seeded_sample(paths, cfg.psm.fit_tiles, cfg.seed)


def resolve_model(
    model: Any,
    *,
    paths: Sequence[Path],
    cfg: RunConfig,
    mpp: float | None,
    device: torch.device,
    progress: ProgressHook | None = None,
    fitted: list[Any] | None = None,
) -> Segmenter:
    """The net to segment with: ``model`` itself (SegNet or SegEnsemble), loaded from a file, taken from a model
    bundle, or the default (``cfg.segmenter.default_model``: the shipped model, or a fit on ``paths``).
    ``fitted``: gets the ``ModelBundle`` fitted here (for ``--save-model``: saved once its cell
    classes are fitted too, so a saved model file is never without them)."""
    if isinstance(model, (SegNet, SegEnsemble)):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_segmenter(model)
    if model is not None:  # a ModelBundle (or anything carrying a segmenter component)
        net = bundle_segmenter(model)
        if net is None:
            raise ModelError("the model holds no downstream segmenter (fit it with the segmenter)")
        return net
    if cfg.segmenter.default_model == "fit":
        sample = fit_sample(paths, cfg)
        images = read_processing_images(sample, cfg, mpp)
        sources = [p.name for p in sample]
        note = few_images_note([im.shape[:2] for im in images], cfg.target_mpp, len(paths))
        if note:
            log.warning("%s", note)
        bundle = fit_on_images(images, cfg, device=device, progress=progress, sources=sources)
        if fitted is not None:
            fitted.append(bundle)
        return resolve_model(bundle, paths=paths, cfg=cfg, mpp=mpp, device=device)
    return default_model()


def model_mpp(model: Any) -> float | None:
    """The processing resolution (µm/px) a given model was trained at, as recorded in it; None for
    a bare network object, no model, or an unreadable file (:func:`load_segmenter` reports that)."""
    meta: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        try:
            _, meta = read_segmenter_file(model)
        except Exception:
            return None
    elif model is not None and not isinstance(model, (SegNet, SegEnsemble)):
        meta = (getattr(model, "component_meta", {}) or {}).get(SEGMENTER_COMPONENT) or {}
        if not meta.get("target_mpp") and getattr(model, "config", None) is not None:
            meta = {"target_mpp": model.config.target_mpp}
    mpp = meta.get("target_mpp")
    return float(mpp) if mpp else None


@functools.cache
def _shipped_mpp() -> float | None:
    return model_mpp(DEFAULT_MODEL) if DEFAULT_MODEL.is_file() else None


def shipped_matches(cfg: RunConfig) -> bool:
    """Whether the shipped network was trained at ``cfg.target_mpp`` (else it cannot serve it)."""
    mpp = _shipped_mpp()  # read once per process: the file is part of the installation
    return mpp is not None and abs(mpp - cfg.target_mpp) < 1e-6


def _weights_digest(net: Segmenter) -> str:
    h = hashlib.sha1()
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@functools.cache
def _shipped_digest() -> str | None:
    return (
        _weights_digest(read_segmenter_file(DEFAULT_MODEL)[0]) if DEFAULT_MODEL.is_file() else None
    )


def is_shipped_network(net: Segmenter | None) -> bool:
    """Whether ``net`` has the shipped network's weights, however it came (the default, a bundle
    from ``wsi-psm fit``, a copy of the file given as ``--model``): the one rule for the routes
    measured on it (the magnification check instead of ``segmenter.fitted_scales``). Weights, not
    provenance, so ``segment`` and ``run`` route a given model file alike."""
    shipped = _shipped_digest()
    return net is not None and shipped is not None and _weights_digest(net) == shipped


def network_scales(shipped: bool, cfg: RunConfig) -> tuple[float, ...]:
    """The test-time magnifications a network's maps are averaged over: none for the shipped
    network (``shipped``: :func:`is_shipped_network`; it has the magnification check instead),
    ``segmenter.fitted_scales`` for any other."""
    return (1.0,) if shipped else tuple(cfg.segmenter.fitted_scales)


def uses_shipped_network(stain: str, cfg: RunConfig) -> bool:
    """Whether a bundle fitted for ``stain`` gets the shipped network (:func:`attach_segmenter`)."""
    return cfg.segmenter.default_model == "shipped" and stain == "he" and shipped_matches(cfg)


__all__ = [
    "DEFAULT_MODEL",
    "FEW_IMAGES_MM2",
    "SEGMENTER_COMPONENT",
    "attach_segmenter",
    "bundle_segmenter",
    "default_model",
    "few_images_note",
    "fit_on_images",
    "fit_sample",
    "fit_start",
    "is_shipped_network",
    "load_segmenter",
    "model_mpp",
    "network_scales",
    "pseudo_masks_per_image",
    "read_processing_images",
    "resolve_model",
    "seeded_sample",
    "set_segmenter",
    "shipped_matches",
    "uses_shipped_network",
]
