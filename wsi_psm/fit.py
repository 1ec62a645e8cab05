"""Fitting a model bundle, label-free, on tiles sampled from one slide or a cohort.

Order of the stages (each one's output feeds the next; no annotation anywhere): stain detection ->
self-supervised activation net (+ PSM calibration) -> pseudo-mask clustering (model.fit_model) ->
downstream segmenter (networks.attach_segmenter: the shipped one, or trained on the pseudo masks) ->
instances on the fit tiles (from the segmenter when there is one) -> cell classes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .classes import CLASSES_COMPONENT, CellClassifier
from .config import RunConfig
from .errors import MixedStainError
from .inference import make_predictor
from .model import ModelBundle, fit_model
from .networks import attach_segmenter, uses_shipped_network
from .pipeline import SlideContext, prepare_slide, sample_tiles
from .progress import NullProgress, ProgressHook
from .stain import detect_stain


def fit_bundle(
    tiles: Sequence[np.ndarray],
    cfg: RunConfig,
    *,
    device: torch.device,
    sources: Sequence[str] = (),
    progress: ProgressHook | None = None,
    all_stages: bool = True,
) -> ModelBundle:
    """Fit every stage on ``tiles`` (uint8 RGB at ``cfg.target_mpp``).

    ``all_stages`` False (``run``): where the route is the shipped network (H&E), the activation
    net and the pseudo-mask clustering are not fitted: nothing would use them (about a third of a
    small slide's run on a CPU). A model file (``fit``) always gets them."""
    progress = progress or NullProgress()
    stage, shown = "fit: activation net", []

    def step(_step: int, _total: int, _loss: float) -> None:
        if not shown:  # no bar for a net that is not fitted
            progress.start(stage, cfg.psm.fit_steps)
            shown.append(True)
        progress.advance(stage, 1)

    bundle = fit_model(
        tiles, cfg, device=device, sources=sources, progress=step,
        psm_needed=None if all_stages else lambda stain: not uses_shipped_network(stain, cfg),
    )  # fmt: skip
    if shown:
        progress.done(stage)
    bundle.provenance["segmenter"] = attach_segmenter(
        bundle, tiles, cfg, device=device, progress=progress
    )
    if cfg.classes.enabled:
        t = time.perf_counter()
        # the cells the classes are fitted on need no test-time augmentation (8x the network time)
        fit_cfg = cfg.with_updates(**{"segmenter.tta": False})
        predictor, _, _ = make_predictor(bundle, device=device, cfg=fit_cfg)
        images = list(tiles)
        raws = [
            r
            for i in range(0, len(images), cfg.tiles.batch_size)
            for r in predictor.network(np.stack(images[i : i + cfg.tiles.batch_size]))
        ]
        labels = [predictor.labels(img, raw) for img, raw in zip(images, raws, strict=True)]
        clf = fit_cell_classes(bundle, images, labels, cfg.target_mpp, cfg)
        bundle.component_meta[CLASSES_COMPONENT] = clf.to_state()
        bundle.provenance["classes"] = clf.describe()
        bundle.provenance["classes_fit_seconds"] = round(time.perf_counter() - t, 2)
    return bundle


def fit_cell_classes(
    bundle: ModelBundle,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    mpp: float,
    cfg: RunConfig,
) -> CellClassifier:
    """The label-free cell classes of the cells (instance labels) of ``images`` at ``mpp``, with
    the bundle's stain and stain vectors."""
    return CellClassifier.fit(
        images, labels, mpp=mpp, stain=bundle.stain, cfg=cfg.classes, seed=cfg.seed,
        matrix=bundle.stain_matrix,
    )  # fmt: skip


def fit_model_on_context(
    ctx: SlideContext,
    cfg: RunConfig,
    *,
    device: torch.device,
    progress: ProgressHook | None = None,
    all_stages: bool = True,
) -> ModelBundle:
    """Fit on tiles sampled from one prepared slide (``run`` without ``--model``, which passes
    ``all_stages`` False: see :func:`fit_bundle`)."""
    tiles = sample_tiles(ctx, cfg.psm.fit_tiles, cfg.seed, cfg)
    return fit_bundle(
        tiles, cfg, device=device, sources=[ctx.slide.name], progress=progress,
        all_stages=all_stages,
    )  # fmt: skip


def fit_model_on_slides(
    paths: Sequence[str | Path],
    cfg: RunConfig,
    *,
    mpp: float | None = None,
    backend: str = "auto",
    progress: ProgressHook | None = None,
) -> ModelBundle:
    """Fit on a cohort: ``cfg.psm.fit_tiles`` tiles drawn evenly from every slide (``fit`` command).

    With ``cfg.stain`` "auto", slides of more than one stain (each judged on its thumbnail) raise
    MixedStainError before the fit: the stages of one model assume one stain."""
    from .device import select_device

    device = select_device(cfg.device)
    per_slide = max(1, -(-cfg.psm.fit_tiles // max(len(paths), 1)))
    tiles: list[np.ndarray] = []
    names = []
    stains: dict[str, list[str]] = {}
    for i, p in enumerate(paths):
        ctx = prepare_slide(p, cfg, mpp=mpp, backend=backend)
        try:
            tiles += sample_tiles(ctx, per_slide, cfg.seed + i, cfg)
            names.append(ctx.slide.name)
            if cfg.stain == "auto":
                stains.setdefault(detect_stain(ctx.thumbnail), []).append(ctx.slide.name)
        finally:
            ctx.slide.close()
    if len(stains) > 1:
        found = "; ".join(f"{s}: {', '.join(n)}" for s, n in stains.items())
        raise MixedStainError(
            f"slides of more than one stain ({found}): fit one model per stain, "
            "or give --stain to fit them as one"
        )
    return fit_bundle(tiles, cfg, device=device, sources=names, progress=progress)
