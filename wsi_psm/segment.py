"""``wsi-psm segment``: nuclei of plain image tiles (PNG / TIFF / JPEG), one image at a time.

For each input image ``<stem>.<ext>`` it writes, into ``out_dir``:

- ``<stem>.geojson``: one Feature per nucleus, the same cell contract as ``run`` (export.GeoJSONWriter),
  polygons in the input image's pixel coordinates (pixel-corner convention);
- ``<stem>_labels.tif``: int32 instance labels at the input's resolution, 0 = background.

The image is read at ``cfg.target_mpp`` (the network's resolution), the downstream network gives
foreground and distance maps there (windows, batched, test-time-augmented), the maps are upsampled
to the input's pixels and the instances are separated there (``segmenter.native_instances``; else
separated at the processing resolution and the labels resampled). Both files are written under a
temporary name and renamed when complete; existing outputs are refused unless ``overwrite``.

Model: a :class:`~wsi_psm.segmenter.network.SegNet` (or ensemble), a segmenter state or model-bundle file, a
``ModelBundle`` carrying a segmenter component, or None for the default (see :func:`resolve_labeller`; the networks themselves: ``networks``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from torch.nn import functional as F

from .atomic import (
    check_writable,
    make_dirs,
    remove_made,
    remove_stale_temps,
    temp_path,
    write_error,
)
from .classes import CLASSES_COMPONENT, CellClassifier
from .config import RunConfig
from .counts_table import (
    TABLE_NAME,
    CountsRow,
    check_counts_table,
    read_counts_table,
    write_counts_table,
)
from .errors import (
    InvalidArgumentError,
    OutputExistsError,
    OutputWriteError,
    WsiPsmError,
)
from .export import CellRecord, GeoJSONWriter, prepare_cells
from .instances import resize_labels
from .magnification import zoom_resolves
from .networks import (
    attach_segmenter,
    fit_sample,
    is_shipped_network,
    model_mpp,
    network_scales,
    read_processing_images,
    resolve_model,
    seeded_sample,
    shipped_matches,
)
from .pipeline import CellAnnotator, ShapeOnly
from .polygons import labels_to_polygons
from .progress import NullProgress, ProgressHook
from .segmenter.network import Segmenter
from .segmenter.predict import predict_maps
from .segmenter.readout import finished_instances, separated_from_maps
from .slide import Slide, warn_mpp_override
from .stitching import Candidate
from .tiling import check_input_resolution
from .tissue import check_input_image

log = logging.getLogger(__name__)

SEGMENT_STAGE = "segment"


class SegmentInputError(WsiPsmError):
    """The list of images to segment is empty or names two images with the same stem."""


def output_paths(image: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """``(OUT/<stem>.geojson, OUT/<stem>_labels.tif)`` for one input image."""
    stem = Path(image).stem
    out = Path(out_dir)
    return out / f"{stem}.geojson", out / f"{stem}_labels.tif"


def _check_outputs(paths: Sequence[Path], out_dir: Path, overwrite: bool) -> None:
    # (``overwrite`` here also stands for --skip-existing: finished images are skipped, and a
    # leftover half pair of a stopped image is replaced)
    if not paths:
        raise SegmentInputError("no images to segment")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise SegmentInputError(
                f"two inputs share the name '{p.stem}' ({stems[p.stem]} and {p}): their outputs would collide"
            )
        stems[p.stem] = p
    if overwrite:
        return
    for p in paths:
        for o in output_paths(p, out_dir):
            if o.exists():
                raise OutputExistsError(
                    f"output exists: {o} (use --overwrite to replace it, or --skip-existing to "
                    "segment only the images without outputs)"
                )


def _finished(path: Path, out_dir: Path) -> bool:
    """Both outputs there: the GeoJSON is published last, so the pair is complete."""
    return all(o.exists() for o in output_paths(path, out_dir))


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise OutputExistsError(f"output exists: {final} (another run wrote it meanwhile)")
    os.replace(tmp, final)


def _resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of (C, h, w) maps onto a (H, W) grid covering the same area (pixel-area
    geometry, as ``Slide.read_at_mpp`` maps the image)."""
    if maps.shape[1:] == tuple(shape):
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0].numpy()


def _at_mpp(rgb: np.ndarray, mpp: float, to_mpp: float) -> np.ndarray:
    """``rgb`` (uint8, at ``mpp``) resampled to ``to_mpp`` (bilinear; antialiased when shrinking)."""
    if abs(mpp - to_mpp) < 1e-6 * to_mpp:
        return rgb
    h, w = rgb.shape[:2]
    shape = (max(1, round(h * mpp / to_mpp)), max(1, round(w * mpp / to_mpp)))
    # torch warns on a read-only array (e.g. np.asarray of a PIL image), though it only reads it
    arr = np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb)
    t = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=to_mpp > mpp)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


INPUT_CHECK_SIDE = 512  # px: the small copy each input is checked on before any work


def check_inputs(
    paths: Sequence[Path],
    mpp: float | None,
    stain: str = "auto",
    *,
    seed: int = 0,
    target_mpp: float | None = None,
) -> dict[str, list[Path]]:
    """Open every image and look at a small copy of it before any work, so an unreadable file, a
    missing mpp, a fluorescence or greyscale image, or one that vanishes at the processing
    resolution ``target_mpp`` stops the run at once with one line, not after a network has been
    fitted or half the images written.

    Returns the images by stain, in input order: ``stain``, or with "auto" each image's own
    (:func:`~wsi_psm.stain.detect_stain` on the small copy; a colour share, so 512 px is plenty),
    so that a folder mixing H&E and IHC tiles does not send all of them down the route of the
    first ones."""
    from .stain import detect_stain

    groups: dict[str, list[Path]] = {}
    for p in paths:
        with Slide.open(p, mpp=mpp) as slide:
            side_um = max(slide.width, slide.height) * slide.mpp
            if target_mpp is not None:
                check_input_resolution(slide.mpp, target_mpp, p.name, slide.info.mpp_source)
            if target_mpp is not None and min(slide.width, slide.height) * slide.mpp < target_mpp:
                raise SegmentInputError(
                    f"{p}: image too small: {slide.width} x {slide.height} px at {slide.mpp:g} "
                    f"µm/px is under one pixel a side at the processing {target_mpp:g} µm/px"
                )
            thumb, _ = slide.thumbnail(max(slide.mpp, side_um / INPUT_CHECK_SIDE))
        check_input_image(thumb, p.name)
        warn_mpp_override(slide.info)
        key = detect_stain(thumb, seed=seed) if stain == "auto" else stain
        groups.setdefault(key, []).append(p)
    return groups


def segment_array(
    rgb_native: np.ndarray,
    rgb_processing: np.ndarray,
    native_mpp: float,
    net: Segmenter,
    device: torch.device,
    cfg: RunConfig,
    *,
    zoom_check: bool = False,
    scales: Sequence[float] = (1.0,),
) -> np.ndarray:
    """Instance labels (int32) at the native image's pixels from its processing-resolution copy.

    ``scales``: test-time magnifications whose maps are averaged (``segmenter.fitted_scales``).

    With ``zoom_check`` the net also sees the image magnified 2x (at half the processing
    mpp), read out as if at the processing mpp, and that result is kept when
    :func:`~wsi_psm.magnification.zoom_resolves` says it holds the same nuclei, resolved (see
    :mod:`wsi_psm.magnification`; measured on the shipped H&E network only).
    """
    sc = cfg.segmenter
    maps = predict_maps(
        net, rgb_processing, device, window=sc.window_px, tta=sc.tta, amp=sc.amp, scales=scales
    )
    shape = rgb_native.shape[:2]
    if sc.native_instances:
        mpp1, maps = native_mpp, _resize_maps(maps, shape)
    else:
        mpp1 = cfg.target_mpp
    plain = separated_from_maps(maps, mpp=mpp1, cfg=cfg)
    n = int(plain.max())
    if zoom_check and n > 0:
        zoomed = _at_mpp(rgb_native, native_mpp, cfg.target_mpp / 2)
        maps2 = predict_maps(net, zoomed, device, window=sc.window_px, tta=sc.tta, amp=sc.amp)
        labels2 = separated_from_maps(maps2, mpp=cfg.target_mpp, cfg=cfg)  # read as if 1x
        if zoom_resolves(n, int(labels2.max())):
            return resize_labels(finished_instances(labels2, mpp=cfg.target_mpp, cfg=cfg), shape)
    return resize_labels(finished_instances(plain, mpp=mpp1, cfg=cfg), shape)


def _write_outputs(
    rgb: np.ndarray,
    labels: np.ndarray,
    mpp: float,
    geojson: Path,
    labels_tif: Path,
    annotator: CellAnnotator,
    overwrite: bool,
    slide_key: str,
) -> Counter[str]:
    """Both outputs of one image, published once complete; the cells written per class."""
    polys = labels_to_polygons(labels)
    cands = []
    for lab, poly in polys:
        c = poly.centroid
        cands.append(Candidate(0, poly, float(c.x), float(c.y), True, label=lab))
    if cands:
        annotator.annotate(rgb, labels, cands, mpp)
    dropped = [c.label for c in cands if c.payload is None]  # not nuclei after all
    if dropped:
        cands = [c for c in cands if c.payload is not None]
        labels = np.where(np.isin(labels, dropped), 0, labels)
    tmp_json, tmp_tif = temp_path(geojson), temp_path(labels_tif)
    try:
        with GeoJSONWriter(tmp_json, slide_key=slide_key) as gj:
            # encoded all at once (one image's cells: GEOS arrays, not one call per cell)
            gj.write_many(
                prepare_cells([CellRecord(c.polygon, *c.payload) for c in cands], slide_key)
            )
        tifffile.imwrite(tmp_tif, labels.astype(np.int32), compression="zlib")
        _publish(tmp_tif, labels_tif, overwrite)
        _publish(tmp_json, geojson, overwrite)
    except OSError as err:
        raise OutputWriteError(f"cannot write {geojson.parent}: {err.strerror or err}") from err
    finally:
        for tmp in (tmp_json, tmp_tif):
            with contextlib.suppress(OSError):  # not there, or the disk went read-only: not ours
                tmp.unlink(missing_ok=True)
    return Counter(c.payload[0] for c in cands)


ImageLabeller = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
"""(native uint8 RGB, the same at ``cfg.target_mpp``, native mpp) -> int32 labels at native pixels."""

CLASS_FIT_IMAGES = 32  # images (a seeded sample) whose cells fit the class model in `segment`


def _images_stain(paths: Sequence[Path], cfg: RunConfig, mpp: float | None) -> str:
    if cfg.stain != "auto":
        return cfg.stain
    from .stain import detect_stain

    return detect_stain(read_processing_images(list(paths)[:8], cfg, mpp), seed=cfg.seed)


def resolve_labeller(
    model: Any,
    *,
    paths: Sequence[Path],
    cfg: RunConfig,
    mpp: float | None,
    device: torch.device,
    progress: ProgressHook | None = None,
    fitted: list[Any] | None = None,
) -> ImageLabeller:
    """How ``segment`` turns an image into instances.

    The downstream network: ``model``, else per ``segmenter.default_model``: "shipped" (the packaged
    H&E network; IHC images, which it was not trained on and where it finds few pale
    haematoxylin-only nuclei, and any ``target_mpp`` other than the one it was trained at, get a
    network fitted on the images themselves, label-free), "fit"
    (always fitted on the images), or "none" (no network: an activation net and clustering fitted
    on a sample of the images, pseudo masks split by the watershed). The shipped network's route
    has the magnification check (``segmenter.zoom_check``), also when ``model`` holds its weights
    (``networks.is_shipped_network``); any other network averages its maps over
    ``segmenter.fitted_scales``.
    """
    sc = cfg.segmenter
    if model is None and sc.default_model == "none":
        from .instances import split_instances
        from .model import fit_model

        sample = fit_sample(paths, cfg)
        bundle = fit_model(
            read_processing_images(sample, cfg, mpp), cfg, device=device,
            sources=[p.name for p in sample],
        )  # fmt: skip

        def pseudo_labels(native: np.ndarray, proc: np.ndarray, native_mpp: float) -> np.ndarray:
            fg = bundle.pseudo_masks(proc[None], device)[0]
            lab = split_instances(fg, mpp=cfg.target_mpp, cfg=cfg.instances)
            return resize_labels(lab, native.shape[:2])

        return pseudo_labels
    if model is None and sc.default_model == "shipped":
        if _images_stain(paths, cfg, mpp) == "ihc-dab":
            cfg = cfg.with_updates(stain="ihc-dab", **{"segmenter.default_model": "fit"})
        elif not shipped_matches(cfg):  # as `run`: another resolution needs its own network
            cfg = cfg.with_updates(**{"segmenter.default_model": "fit"})
    net = resolve_model(
        model, paths=paths, cfg=cfg, mpp=mpp, device=device, progress=progress, fitted=fitted
    )
    # the magnification check was measured on the shipped network only; other networks average
    # their maps over test-time magnifications instead
    shipped = is_shipped_network(net)  # (a digest of the weights: once)
    zoom = sc.zoom_check and shipped
    scales = network_scales(shipped, cfg)
    net = net.to(device).eval()

    def network_labels(native: np.ndarray, proc: np.ndarray, native_mpp: float) -> np.ndarray:
        return segment_array(
            native, proc, native_mpp, net, device, cfg, zoom_check=zoom, scales=scales
        )

    return network_labels


def _read_pair(p: Path, cfg: RunConfig, mpp: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """The image at its own pixels, at the processing resolution, and its mpp."""
    with Slide.open(p, mpp=mpp) as slide:
        native_mpp = slide.mpp
        rgb = slide.read_region(0, 0, slide.width, slide.height)
        proc = (
            rgb
            if abs(native_mpp - cfg.target_mpp) < 1e-9
            else slide.read_at_mpp(0, 0, slide.width, slide.height, cfg.target_mpp)
        )
    if min(proc.shape[:2]) < 1:
        raise SegmentInputError(f"{p}: image is empty at {cfg.target_mpp} µm/px")
    return rgb, proc, native_mpp


# labels of the class-fit sample kept for the writing pass (int32: 256 MiB at most)
CACHE_PIXELS = 64 * 2**20


def fit_image_classes(
    paths: Sequence[Path],
    labeller: ImageLabeller,
    cfg: RunConfig,
    mpp: float | None,
    cache: dict[Path, np.ndarray] | None = None,
) -> CellAnnotator:
    """The label-free cell classes of a set of images (IHC positive / negative, H&E groups), fitted
    on the cells of a seeded sample of up to CLASS_FIT_IMAGES of them (one cohort). The sample's
    labels go into ``cache`` (up to CACHE_PIXELS) so the writing pass need not segment them again."""
    images, labels, cached_px = [], [], 0
    for p in seeded_sample(paths, CLASS_FIT_IMAGES, cfg.seed):
        native, proc, native_mpp = _read_pair(p, cfg, mpp)
        lab = labeller(native, proc, native_mpp)
        if cache is not None and cached_px + lab.size <= CACHE_PIXELS:
            cache[p], cached_px = lab, cached_px + lab.size
        images.append(proc)
        labels.append(resize_labels(lab, proc.shape[:2]))
    return CellClassifier.fit(
        images, labels, mpp=cfg.target_mpp, stain=cfg.stain, cfg=cfg.classes, seed=cfg.seed
    )


def model_classes(model: Any, stain: str) -> CellClassifier | None:
    """The cell classes a model file carries for ``stain`` (fitted with its network by `wsi-psm
    fit` or `segment --save-model`), so that a study segmented in several calls keeps one rule
    (e.g. one nuclear-DAB threshold), as `run --model` does; None for a bare network, a model
    without classes, or classes of another stain."""
    state = (getattr(model, "component_meta", None) or {}).get(CLASSES_COMPONENT)
    if not state or state.get("stain") != stain:
        return None
    return CellClassifier.from_state(state)


def _shipped_bundle(
    paths: Sequence[Path], cfg: RunConfig, mpp: float | None, device: torch.device
) -> Any:
    """A model file's bundle for the shipped network's route (H&E): the shipped network, with the
    activation net and pseudo-mask clustering fitted on a sample of the images (a model file holds
    every stage, as `wsi-psm fit` writes it; the route itself uses none of them)."""
    from .model import fit_model

    sample = fit_sample(paths, cfg)
    images = read_processing_images(sample, cfg, mpp)
    bundle = fit_model(images, cfg, device=device, sources=[p.name for p in sample])
    bundle.provenance["segmenter"] = attach_segmenter(bundle, images, cfg, device=device)
    return bundle


def _save_model(bundle: Any, annotator: CellAnnotator, path: Path) -> None:
    """--save-model: the network fitted on the images and the classes fitted on their cells,
    written once (atomically), so an interrupted call leaves no model file without its classes."""
    if isinstance(annotator, CellClassifier):
        bundle.component_meta[CLASSES_COMPONENT] = annotator.to_state()
        bundle.provenance["classes"] = annotator.describe()
    try:
        bundle.save(path)
    except OSError as err:  # e.g. a disk that filled up during the fit: one line, not a trace
        raise write_error(err, path) from err


def _check_save_model(
    save_model: str | os.PathLike[str] | None,
    groups: dict[str, list[Path]],
    model: Any,
    cfg: RunConfig,
    overwrite: bool,
) -> Path | None:
    """``--save-model`` judged before any work: one stain, a route that fits, a writable file."""
    if save_model is None:
        return None
    path = Path(save_model)
    if len(groups) > 1:
        raise InvalidArgumentError(
            f"--save-model: the images are of {len(groups)} stains ({', '.join(groups)}), each "
            "fitted apart: segment them stain by stain to save each network"
        )
    if model is not None or cfg.segmenter.default_model == "none":
        why = "--model was given" if model is not None else "segmenter.default_model is none"
        raise InvalidArgumentError(f"--save-model: no model is made here ({why})")
    if path.is_dir():
        raise InvalidArgumentError(
            f"--save-model {path} is a folder: give a file, e.g. {path / 'model.pt'}"
        )
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output exists: {path} (use --overwrite to replace it; to go on with "
            "--skip-existing, give it as --model instead of fitting again)"
        )
    check_writable(path)
    return path


def segment_images(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    cfg: RunConfig,
    *,
    model: Any = None,
    mpp: float | None = None,
    overwrite: bool = False,
    progress: ProgressHook | None = None,
    annotator: CellAnnotator | None = None,
    on_image: Callable[[Path, int, float], None] | None = None,
    save_model: str | os.PathLike[str] | None = None,
    skip_existing: bool = False,
    class_counts: Counter[str] | None = None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Segment every image of ``paths`` into ``out_dir``; returns the written files (two per image).

    Then ``out_dir/summary.csv`` gets one row per image of the call (by output stem), skipped ones
    included (:mod:`wsi_psm.counts_table`: cells per class, Positive index, density; rows of other
    images already in it are kept). It is not in the returned list. ``notes`` (when given) gets
    lines a user should see, e.g. that the cell classes came from the model file.

    ``mpp`` overrides the images' own resolution (MoNuSeg TIFFs carry none: pass 0.25). A given
    ``model`` that records its training resolution is applied at it, whatever ``cfg.target_mpp``.
    ``annotator`` names and measures the cells; by default (``classes.enabled``) the label-free
    classes are fitted on the images' own cells first (:func:`fit_image_classes`), else one class
    "Nucleus". With ``cfg.stain`` "auto" each image's stain is detected, and images of different
    stains are segmented group by group (:func:`check_inputs`), each with its stain's route and
    classes. ``on_image(path, n_cells, seconds)`` is called after each image, and ``class_counts``
    (when given) adds up the cells written per class. ``save_model``: also
    save the network fitted on the images (IHC, another ``target_mpp``, or ``default_model`` "fit")
    there, as a model file for ``model`` next time; refused when nothing would be fitted.
    Outputs are checked before any work: an existing one raises OutputExistsError unless
    ``overwrite``, or ``skip_existing``: images whose two outputs exist are not written again (a
    stopped run goes on; the network and classes are still fitted on all the images, so the
    outputs are those of one uninterrupted run). Unreadable images, missing mpp etc. raise the
    slide reader's WsiPsmError.
    """
    check_counts_table(out_dir)  # a table we may not update stops the call before any work
    rows: list[CountsRow] = []
    try:
        written = _segment_images(
            paths, out_dir, cfg, model=model, mpp=mpp, overwrite=overwrite, progress=progress,
            annotator=annotator, on_image=on_image, save_model=save_model,
            skip_existing=skip_existing, class_counts=class_counts, rows=rows,
            notes=notes if notes is not None else [],
        )  # fmt: skip
    except BaseException:
        # the images finished before the failure keep rows that match their outputs (a row
        # from an earlier call would otherwise outlive an output this call replaced)
        with contextlib.suppress(Exception):
            if rows:
                write_counts_table(out_dir, rows)
        raise
    if rows:
        try:
            write_counts_table(out_dir, rows)
        except OSError as err:
            raise write_error(err, out_dir) from err
    return written


def _segment_images(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    cfg: RunConfig,
    *,
    model: Any,
    mpp: float | None,
    overwrite: bool,
    progress: ProgressHook | None,
    annotator: CellAnnotator | None,
    on_image: Callable[[Path, int, float], None] | None,
    save_model: str | os.PathLike[str] | None,
    skip_existing: bool,
    class_counts: Counter[str] | None,
    rows: list[CountsRow],
    notes: list[str],
) -> list[Path]:
    """:func:`segment_images` for one call or one stain group; ``rows`` gets each image's row."""
    from .device import select_device

    progress = progress or NullProgress()
    paths = [Path(p) for p in paths]
    out = Path(out_dir)
    _check_outputs(paths, out, overwrite or skip_existing)
    # a given model works at the resolution it was trained at (as `run --model` does): the
    # inputs are judged against that one
    trained_mpp = model_mpp(model)
    processing_mpp = cfg.target_mpp if trained_mpp is None else trained_mpp
    groups = check_inputs(paths, mpp, cfg.stain, seed=cfg.seed, target_mpp=processing_mpp)
    # writable? asked now, before the fit; the folder itself is made at the first write, so a fit
    # that fails (or is stopped) leaves no empty folder behind
    if out.exists() and not out.is_dir():
        raise OutputWriteError(f"cannot write into {out}: it is a file, not a folder")
    check_writable(output_paths(paths[0], out)[0])  # the folder, and a file in it if it exists
    save_to = _check_save_model(save_model, groups, model, cfg, overwrite)
    if len(groups) > 1:  # each stain its own route (network, classes), as if segmented apart
        log.info(
            "images of %d stains, segmented by stain: %s",
            len(groups),
            ", ".join(f"{len(g)} {s}" for s, g in groups.items()),
        )
        for stain, group in groups.items():  # every group's finished outputs readable, first
            _skipped_rows(
                [p for p in group if skip_existing and _finished(p, out)], out, stain, mpp
            )
        files: list[Path] = []
        for stain, group in groups.items():
            files += _segment_images(
                group, out, cfg.with_updates(stain=stain), model=model, mpp=mpp,
                overwrite=overwrite, progress=progress, annotator=annotator, on_image=on_image,
                save_model=None, skip_existing=skip_existing, class_counts=class_counts, rows=rows,
                notes=notes,
            )  # fmt: skip
        return files
    cfg = cfg.with_updates(stain=next(iter(groups)))
    todo = [p for p in paths if not (skip_existing and _finished(p, out))]
    # the rows of images skipped as finished, read now: a damaged output stops the call before a fit
    skipped = _skipped_rows([p for p in paths if p not in todo], out, cfg.stain, mpp)
    if not todo and save_to is None:
        log.info("every image's outputs exist in %s: nothing to do", out)
        rows += skipped
        return []
    model_stain = getattr(model, "stain", None)
    if model_stain is not None and model_stain != cfg.stain:  # (`run --model` refuses a slide)
        log.warning(
            "%d image(s) look %s but the model was fitted on %s tissue: its cells and classes "
            "assume %s (fit a model on %s images, or segment without --model)",
            len(paths), cfg.stain, model_stain, model_stain, cfg.stain,
        )  # fmt: skip
    device = select_device(cfg.device)
    if trained_mpp is not None and abs(trained_mpp - cfg.target_mpp) > 1e-6:
        log.info("processing at %g µm/px, the resolution the model was trained at", trained_mpp)
        cfg = cfg.with_updates(target_mpp=trained_mpp)
    fitted: list[Any] = []
    labeller = resolve_labeller(
        model, paths=paths, cfg=cfg, mpp=mpp, device=device, progress=progress, fitted=fitted
    )
    cache: dict[Path, np.ndarray] = {}
    if annotator is None and cfg.classes.enabled:
        annotator = model_classes(model, cfg.stain)
        if annotator is None:
            annotator = fit_image_classes(paths, labeller, cfg, mpp, cache)
        else:
            notes.append(f"cell classes from the model file: {annotator.describe()}")
    if annotator is None:
        annotator = ShapeOnly()
    if save_to is not None:  # the network and its classes in one file, as `wsi-psm fit` keeps them
        bundle = fitted[0] if fitted else _shipped_bundle(paths, cfg, mpp, device)
        _save_model(bundle, annotator, save_to)
    try:  # the fits are done: only now the folder (a failed fit leaves none)
        made = make_dirs(out)
    except OSError as err:
        raise OutputWriteError(f"cannot create output folder {out}: {err.strerror or err}") from err
    # left by a call killed outright on this host (one listing of the folder for all the images)
    remove_stale_temps(*(o for p in todo for o in output_paths(p, out)))
    written: list[Path] = []
    class_names = [name for name, _ in getattr(annotator, "classes", ())]
    progress.start(SEGMENT_STAGE, len(todo))
    try:
        for p in todo:
            t0 = time.perf_counter()
            rgb, proc, native_mpp = _read_pair(p, cfg, mpp)
            labels = cache.pop(p) if p in cache else labeller(rgb, proc, native_mpp)
            geo, tif = output_paths(p, out)
            try:
                per_class = _write_outputs(
                    rgb, labels, native_mpp, geo, tif, annotator, overwrite or skip_existing, p.name
                )
            except OutputWriteError as err:  # e.g. a full disk: say what is kept, and how to go on
                if not written:
                    raise
                raise OutputWriteError(
                    f"{err} ({len(written) // 2} of {len(todo)} images were written before it: "
                    "--skip-existing goes on from there)"
                ) from err
            written += [geo, tif]
            every = Counter({**dict.fromkeys(class_names, 0), **per_class})  # (0s: measured)
            rows.append(_counts_row(p.stem, cfg.stain, native_mpp, rgb.shape[:2], every))
            progress.advance(SEGMENT_STAGE, 1)
            if class_counts is not None:
                class_counts.update(per_class)
            if on_image is not None:
                on_image(p, per_class.total(), time.perf_counter() - t0)
    except BaseException:
        remove_made(made)  # (only if nothing is in it: the first image failed, or was stopped)
        raise
    progress.done(SEGMENT_STAGE)
    # a skipped image's row rebuilt from its GeoJSON: this call's classes that it has no cell of
    # are counted 0, as its own call counted them (the GeoJSON holds only the classes present)
    rows += [replace(r, counts={**dict.fromkeys(class_names, 0), **r.counts}) for r in skipped]
    return written


def _skipped_rows(
    paths: Sequence[Path], out: Path, stain: str, mpp: float | None
) -> list[CountsRow]:
    """Rows of images skipped as finished that the folder's table lacks (a table from before the
    rows, or deleted), from their written GeoJSON; those it has keep theirs."""
    have = {r["name"] for r in read_counts_table(out / TABLE_NAME)}
    rows = []
    for p in paths:
        if p.stem in have:
            continue
        with Slide.open(p, mpp=mpp) as slide:
            shape, native_mpp = (slide.height, slide.width), slide.mpp
        rows.append(_counts_row(p.stem, stain, native_mpp, shape, _geojson_counts(p, out)))
    return rows


def _counts_row(
    name: str, stain: str, mpp: float, shape: tuple[int, ...], counts: Counter[str]
) -> CountsRow:
    return CountsRow(name, stain, mpp, shape[0] * shape[1] * mpp**2 / 1e6, dict(counts))


def _geojson_counts(image: Path, out: Path) -> Counter[str]:
    """Cells per class in an image's written GeoJSON."""
    geo = output_paths(image, out)[0]
    try:
        features = json.loads(geo.read_text(encoding="utf-8"))["features"]
        names = [
            ((f.get("properties") or {}).get("classification") or {}).get("name", "Unclassified")
            for f in features
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise OutputExistsError(
            f"cannot read {geo} to count its cells for summary.csv ({err}): delete it and "
            f"{output_paths(image, out)[1].name}, then rerun the same call with --skip-existing"
        ) from err
    return Counter(names)


__all__ = [
    "SegmentInputError",
    "check_inputs",
    "fit_image_classes",
    "model_classes",
    "output_paths",
    "resolve_labeller",
    "segment_array",
    "segment_images",
]
