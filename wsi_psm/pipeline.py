"""One slide down the pipe: read -> tissue -> tiles -> network -> instances -> polygons -> outputs.

The network stage runs on the caller's thread (the GPU when there is one) on batches the Dask tile
stream decodes ahead of it; the per-tile CPU work (pseudo mask or probability -> instances ->
polygons -> measurements and classes) runs in a pool behind it (threads on a CPU run, worker
processes beside a GPU so the GIL does not starve it), with a bounded number of tiles in flight.
One writer thread takes the finished tiles in grid order through the seam resolver into the
writers, so the network's thread never writes. Nothing holds a whole slide's cells or pixels, so
memory does not grow with slide size.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .allocator import tune_malloc
from .atomic import OutputFolder, check_writable, remove_stale_temps
from .config import RunConfig
from .cores import usable_cores
from .export import (
    CellBlock,
    CellRecord,
    GeoJSONWriter,
    GeoParquetWriter,
    PreparedCell,
    pack_cells,
    prepare_cells,
)
from .overlay import OverlayRenderer
from .polygons import measurement_dicts, polygon_measurements
from .progress import NullProgress, ProgressHook
from .slide import Slide, warn_mpp_override
from .stain import detect_stain
from .stitching import Candidate, SeamResolver, interior, tile_candidates
from .stream import stream_batches
from .summary import class_counts_summary, software_versions, utc_now_iso, write_summary
from .tiling import Tile, TileGrid, check_input_resolution, check_slide_size, make_grid
from .tissue import TissueMask, check_input_image, detect_tissue

if TYPE_CHECKING:  # (model imports torch; the pipeline's light paths need not)
    from .model import ModelBundle

log = logging.getLogger(__name__)

NUCLEUS = ("Nucleus", (0, 160, 255))
OVERLAY_MAX_SIDE = 2048
OVERLAY_MIN_MPP = 0.5  # finer than this, the overlay only grows (nuclei are ~10 px there)


class TilePredictor(Protocol):
    """What a fitted model offers the pipeline (see inference.py)."""

    def network(self, images: np.ndarray) -> list[Any]:
        """Batched network pass on (B, H, W, 3) uint8 tiles; one opaque map per tile."""
        ...

    def labels(self, image: np.ndarray, raw: Any) -> np.ndarray:
        """CPU part for one tile (runs in the post-processing pool): int32 instance labels, 0 = background,
        each label one 4-connected piece, at the tile's (processing) resolution."""
        ...


class CellAnnotator(Protocol):
    """Names and measures the cells of one tile (see classes.py)."""

    def annotate(
        self, image: np.ndarray, labels: np.ndarray, cands: Sequence[Candidate], mpp_l0: float
    ) -> None:
        """Set ``cand.payload = (class_name, color, measurements)`` on every candidate (None: not
        a cell after all, not written)."""
        ...


class ShapeOnly:
    """One class, "Nucleus", with shape measurements: the annotator when no class model is fitted."""

    def annotate(
        self, image: np.ndarray, labels: np.ndarray, cands: Sequence[Candidate], mpp_l0: float
    ) -> None:
        meas = measurement_dicts([c.polygon for c in cands], mpp_l0)
        for c, m in zip(cands, meas, strict=True):
            c.payload = (NUCLEUS[0], NUCLEUS[1], m)


@dataclass
class SlideContext:
    """What the pipeline knows about an opened slide before any cell is found."""

    slide: Slide
    mpp: float
    thumbnail: np.ndarray
    thumb_scale: float
    tissue: TissueMask
    grid: TileGrid
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # for summary.json's total


def prepare_slide(
    path: str | Path, cfg: RunConfig, *, mpp: float | None = None, backend: str = "auto"
) -> SlideContext:
    """Open a slide, check it is brightfield, find its tissue and lay the tile grid.

    Raises the WsiPsmError subclasses of each step (unreadable, no mpp, fluorescence, no tissue,
    smaller than a tile); the caller closes ``ctx.slide``.
    """
    t0 = time.perf_counter()
    slide = Slide.open(path, backend=backend, mpp=mpp)
    try:
        slide_mpp = slide.mpp
        check_input_resolution(slide_mpp, cfg.target_mpp, slide.name, slide.info.mpp_source)
        check_slide_size(slide.width, slide.height, slide_mpp, cfg, slide.name)
        thumb, tscale = slide.thumbnail(max(cfg.tissue.thumb_mpp, slide_mpp))
        check_input_image(thumb, slide.name)
        warn_mpp_override(slide.info)
        tissue = detect_tissue(thumb, tscale, slide_mpp, cfg.tissue, slide.name)
        grid = make_grid(slide.width, slide.height, slide_mpp, cfg, tissue, name=slide.name)
    except BaseException:
        slide.close()
        raise
    return SlideContext(
        slide,
        slide_mpp,
        thumb,
        tscale,
        tissue,
        grid,
        {"open_and_tissue": time.perf_counter() - t0},
        started=t0,
    )


def sample_grid_tiles(ctx: SlideContext, n: int, seed: int) -> list[Tile]:
    """``n`` of the slide's tiles, drawn without replacement (seeded) from the tissue tiles,
    preferring tiles that are mostly tissue; in grid order."""
    tiles = list(ctx.grid)
    frac = np.array([ctx.tissue.fraction_in_box(*t.core) for t in tiles])
    rng = np.random.default_rng(seed)
    full = [t for t, f in zip(tiles, frac, strict=True) if f >= 0.5] or tiles
    pick = rng.choice(len(full), size=min(n, len(full)), replace=False)
    return [full[i] for i in sorted(pick)]


def sample_tiles(ctx: SlideContext, n: int, seed: int, cfg: RunConfig) -> list[np.ndarray]:
    """:func:`sample_grid_tiles`, read at the processing resolution."""
    return [read_tile(ctx.slide, t, cfg.target_mpp) for t in sample_grid_tiles(ctx, n, seed)]


def read_tile(slide: Slide, tile: Tile, target_mpp: float) -> np.ndarray:
    img = slide.read_at_mpp(tile.x, tile.y, tile.w, tile.h, target_mpp)
    if img.shape[:2] != (tile.size, tile.size):  # guards the exact-mapping contract of read_at_mpp
        raise RuntimeError(f"tile read gave {img.shape[:2]}, expected {(tile.size, tile.size)}")
    return img


@dataclass
class TileWork:
    """Everything the post-processing of a tile needs besides the tile itself (picklable, so it can
    be sent once to each worker process)."""

    labeller: Any  # has labels(image, raw) -> instance labels
    annotator: CellAnnotator
    grid: TileGrid
    mpp_l0: float
    band: float
    slide_key: str  # for the cell ids (export.cell_id)
    overlay_scale: float | None = None  # level-0 px per overlay px: outlines drawn ready-made


@dataclass
class TileResult:
    """A tile's cells as they leave post-processing: those no other tile can report, final and
    packed for the writers; the seam ones, for the resolver."""

    final: CellBlock | None
    seam: list[Candidate]
    cut_dropped: int


def process_tile(image: np.ndarray, raw: Any, tile: Tile, work: TileWork) -> TileResult:
    """The CPU part of one tile: instances -> cells with class and measurements, encoded."""
    labels = work.labeller.labels(image, raw)
    tc = tile_candidates(labels, tile, work.grid, work.band)
    if not tc.candidates:
        return TileResult(None, [], tc.cut_dropped)
    work.annotator.annotate(image, tc.labels, tc.candidates, work.mpp_l0)
    cands = [c for c in tc.candidates if c.payload is not None]
    final: list[PreparedCell] = []
    # objects the annotator judged no cell go to the resolver, marked: their neighbours' views of
    # the same object are dropped with them, and it counts them
    seam: list[Candidate] = [c for c in tc.candidates if c.payload is None]
    for c in seam:
        c.cell = False
    # encode the cells here, in the worker; the cells that are final at once travel back packed
    # (a few buffers, not an object per cell): the parent process, which feeds the network, only
    # appends them. Seam cells keep their polygons, which the resolver compares.
    prepared = prepare_cells(
        [CellRecord(c.polygon, *c.payload) for c in cands], work.slide_key,
        overlay_scale=work.overlay_scale,
    )  # fmt: skip
    for c, p in zip(cands, prepared, strict=True):
        c.payload = p
        if work.overlay_scale is not None and interior(c, tile, work.grid, work.band):
            final.append(c.payload)
        else:
            seam.append(c)
    return TileResult(pack_cells(final) if final else None, seam, tc.cut_dropped)


_WORKER_WORK: TileWork | None = None


def _init_worker(work: TileWork) -> None:
    global _WORKER_WORK
    _WORKER_WORK = work
    tune_malloc()
    from threadpoolctl import threadpool_limits

    # one core per worker process: no BLAS, OpenMP (or torch, if a route imported it) threads
    # fighting the other workers
    threadpool_limits(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _timed_tile(
    image: np.ndarray, raw: Any, tile: Tile, work: TileWork | None = None
) -> tuple[TileResult, float, float]:
    """process_tile, and when it started and ended (``time.perf_counter``, a system-wide clock, so
    comparable with the parent's; their difference is the pool's busy time). ``work`` None in a
    worker process."""
    t = time.perf_counter()
    work = work if work is not None else _WORKER_WORK
    assert work is not None
    return process_tile(image, raw, tile, work), t, time.perf_counter()


def decode_workers(cfg: RunConfig, on_gpu: bool) -> int:
    """Tile-decoding threads: 2 beside a CPU network (which wants the cores); beside a GPU, enough
    to keep it fed (a quarter of the cores, 2 to 8), the rest left to post-processing."""
    if cfg.tiles.decode_workers:
        return cfg.tiles.decode_workers
    return min(8, max(2, usable_cores() // 4)) if on_gpu else 2


def _post_pool(cfg: RunConfig, work: TileWork, on_gpu: bool) -> tuple[Executor, int, bool]:
    """The post-processing pool: threads on a CPU run (the network already uses the cores), worker
    processes when a GPU does the network and the CPU cores would otherwise sit behind the GIL."""
    processes = cfg.tiles.post_mode == "processes" or (cfg.tiles.post_mode == "auto" and on_gpu)
    n = cfg.tiles.post_workers or (
        max(1, min(usable_cores() - decode_workers(cfg, on_gpu) - 1, 12))
        if processes
        else decode_workers(cfg, on_gpu)
    )
    if processes:
        # spawn: never fork a process that holds Dask and torch threads. (A forkserver was tried:
        # Python <= 3.13 imports its preloaded modules with the working directory first on
        # sys.path, so a source checkout there shadows the installed package; and the CLI's main
        # module imports no torch, so a spawned worker starts in about 0.6 s anyway.)
        ctx = multiprocessing.get_context("spawn")
        return (
            ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(work,)),
            n,
            True,
        )
    return ThreadPoolExecutor(n, thread_name_prefix="wsi-psm-post"), n, False


def _stamp(done_at: dict[int, float], index: int, _fut: Future[Any]) -> None:
    done_at[index] = time.perf_counter()  # a done-callback: when the result arrived


@dataclass
class SlideRun:
    """A finished slide: its output folder, the number of cells, the cells per class name (in the
    classes' display order) and summary.json's content."""

    out_dir: Path
    cells: int
    counts: dict[str, int]
    summary: dict[str, Any]


def run_slide(
    ctx: SlideContext,
    out_dir: str | Path,
    predictor: TilePredictor,
    cfg: RunConfig,
    *,
    annotator: CellAnnotator | None = None,
    overwrite: bool = False,
    model_info: dict[str, Any] | None = None,
    progress: ProgressHook | None = None,
    extra_timings: dict[str, float] | None = None,
    summary_extras: Callable[[dict[str, int]], dict[str, Any]] | None = None,
    requested_cfg: RunConfig | None = None,
) -> SlideRun:
    """Find every cell of a prepared slide and write the outputs into ``out_dir`` (atomically).

    ``summary_extras(counts)`` may add indices (e.g. the Ki-67 index) to summary.json.
    ``requested_cfg``: the configuration summary.json records when ``cfg`` was derived from it
    (a run at both scales), so that rerunning with the recorded one repeats the run.
    """
    progress = progress or NullProgress()
    annotator = annotator or ShapeOnly()
    grid = ctx.grid
    timings = dict(ctx.timings)
    timings.update(extra_timings or {})
    band = max(2.0 / ctx.mpp, 1.0)  # 2 µm seam tolerance, in level-0 px
    resolver = SeamResolver(grid, band)
    counts: Counter[str] = Counter()
    colors: dict[str, tuple[int, int, int]] = {}
    cut_dropped = 0
    t_net = t_wait = t_write = t_post = t_busy = t_to_worker = t_from_worker = 0.0
    labeller = predictor.labeller() if hasattr(predictor, "labeller") else predictor
    name = ctx.slide.name
    on_gpu = str(getattr(predictor, "device", "cpu")).startswith("cuda")
    geojson_name = "cells.geojson.gz" if cfg.geojson_gzip else "cells.geojson"
    t_start = time.perf_counter()

    with OutputFolder(out_dir, overwrite) as tmp:  # an existing output refuses before any work
        # the overlay gets its own, finer thumbnail (nuclei visible) capped at OVERLAY_MAX_SIDE px;
        # its scale goes to the workers, which prepare each cell's outline for it
        side_um = max(ctx.slide.width, ctx.slide.height) * ctx.mpp
        ov_mpp = max(ctx.mpp, OVERLAY_MIN_MPP, side_um / OVERLAY_MAX_SIDE)
        ov_img, ov_scale = ctx.slide.thumbnail(ov_mpp)
        overlay = OverlayRenderer(ov_img, ov_scale, max_side=OVERLAY_MAX_SIDE)
        work = TileWork(labeller, annotator, grid, ctx.mpp, band, name, overlay.scale)
        pool, n_post, in_processes = _post_pool(cfg, work, on_gpu)
        with (
            GeoJSONWriter(tmp / geojson_name, gzip=cfg.geojson_gzip, slide_key=name) as gj,
            GeoParquetWriter(tmp / "cells.parquet", slide_key=name) as gp,
            pool,
            ThreadPoolExecutor(1, thread_name_prefix="wsi-psm-writer") as writer,
        ):

            def write(cells: list[Candidate]) -> None:
                for c in cells:
                    rec: PreparedCell = c.payload
                    if c.trimmed:  # gave seam pixels to a neighbour tile's cell: shape re-measured
                        shape = polygon_measurements(c.polygon, ctx.mpp)
                        cell = CellRecord(
                            c.polygon, rec.class_name, rec.color, {**rec.measurements, **shape}
                        )
                        rec = prepare_cells([cell], ctx.slide.name, overlay_scale=overlay.scale)[0]
                    gj.write(rec)
                    gp.write(rec)
                    if rec.outline is not None:
                        overlay.add_outline(rec.outline, rec.color)
                    else:
                        overlay.add(c.polygon, rec.color)
                    counts[rec.class_name] += 1
                    colors[rec.class_name] = rec.color

            def write_block(block: CellBlock) -> None:
                gj.write_block(block)
                gp.write_block(block)
                overlay.add_block(block)
                for name, (color, n) in block.classes.items():
                    counts[name] += n
                    colors[name] = color

            def consume(
                tile: Tile, fut: Future[tuple[TileResult, float, float]], submitted: float
            ) -> None:
                """Writer thread, one tile at a time in grid order (the resolver needs that)."""
                nonlocal cut_dropped, t_busy, t_write, t_to_worker, t_from_worker
                res, started, ended = fut.result()
                t = time.perf_counter()
                cut_dropped += res.cut_dropped
                t_busy += ended - started
                # (clamped: a clock that is not system-wide must not make a negative time; a result
                # can wake this thread before its done-callback has run: it arrived now, then)
                t_to_worker += max(started - submitted, 0.0)
                t_from_worker += max(done_at.pop(tile.index, time.perf_counter()) - ended, 0.0)
                if res.final is not None:
                    write_block(res.final)
                write(resolver.add(tile, res.seam))
                t_write += time.perf_counter() - t
                progress.advance("cells", 1)

            written: deque[Future[None]] = deque()
            done_at: dict[int, float] = {}  # tile index -> when its result reached the parent

            def wait_written(limit: int) -> None:
                while len(written) > limit:
                    written.popleft().result()  # re-raises a worker's or the writer's error

            progress.start("cells", len(grid))
            it = stream_batches(
                lambda t: read_tile(ctx.slide, t, cfg.target_mpp),
                grid.tiles,
                batch_size=cfg.tiles.batch_size,
                workers=decode_workers(cfg, on_gpu),
                prefetch=cfg.tiles.prefetch_batches,
            )
            # closed on the way out, an error included: its producer thread may be reading the
            # slide, which the caller closes next (OpenSlide aborts the process on a read
            # racing its close)
            with contextlib.closing(it):
                while True:
                    t = time.perf_counter()
                    batch = next(it, None)
                    t_wait += time.perf_counter() - t
                    if batch is None:
                        break
                    t = time.perf_counter()
                    raws = predictor.network(batch.images)
                    t_net += time.perf_counter() - t
                    for tile, image, raw in zip(batch.tiles, batch.images, raws, strict=True):
                        submitted = time.perf_counter()
                        fut = (
                            pool.submit(_timed_tile, image, raw, tile)
                            if in_processes
                            else pool.submit(_timed_tile, image, raw, tile, work)
                        )
                        fut.add_done_callback(partial(_stamp, done_at, tile.index))
                        written.append(writer.submit(consume, tile, fut, submitted))
                    # time the network loop waits for the CPU side (read-out workers, then the writer):
                    # the GPU starved by post-processing
                    t = time.perf_counter()
                    wait_written(limit=2 * n_post + cfg.tiles.batch_size)
                    t_post += time.perf_counter() - t
            t = time.perf_counter()
            wait_written(limit=0)
            t_post += time.perf_counter() - t
            write(resolver.finish())
            progress.done("cells")
        tiles_total = time.perf_counter() - t_start
        overlay.save(tmp / "overlay.png")
        timings.update(
            {
                "tiles_total": tiles_total,
                "overlay": time.perf_counter() - t_start - tiles_total,
                "network": t_net,
                "waiting_for_decode": t_wait,
                "waiting_for_postprocessing": t_post,
                "writing": t_write,  # the writer thread's busy time (beside the network)
                "postprocessing_busy": t_busy,  # summed over the pool's workers
                # summed over tiles: from submission to a worker starting on the tile (queueing
                # and the input's transfer), and from its end to the result in the parent
                "postprocessing_to_worker": t_to_worker,
                "postprocessing_from_worker": t_from_worker,
            }
        )
        area = ctx.tissue.area_mm2(ctx.mpp, (ctx.slide.width, ctx.slide.height))
        # classes in the annotator's display order (every class listed, even with no cells), then any other
        order = [name for name, _ in getattr(annotator, "classes", ())]
        for name, color in getattr(annotator, "classes", ()):
            colors.setdefault(name, tuple(color))
        counts = Counter(
            {n: counts.get(n, 0) for n in [*order, *[n for n in counts if n not in order]]}
        )
        # from opening the slide to here (its files' fsync and rename follow)
        timings["total"] = time.perf_counter() - ctx.started
        summary = build_summary(ctx, cfg, counts, colors, area, timings, model_info)
        if requested_cfg is not None:
            summary["config"] = requested_cfg.to_dict()
        summary["counters"] = {
            "tiles": len(grid),
            "cells_dropped_cut": cut_dropped,
            "objects_dropped_not_nuclei": resolver.not_cells,
            "seam_duplicates_removed": resolver.duplicates_removed,
            "seam_cells_trimmed": resolver.trimmed,
            "post_workers": n_post,
        }
        if summary_extras is not None:
            summary["indices"] = summary_extras(dict(counts))
        summary["outputs"] = [geojson_name, "cells.parquet", "overlay.png", "summary.json"]
        write_summary(tmp / "summary.json", summary)
    return SlideRun(Path(out_dir), sum(counts.values()), dict(counts), summary)


def build_summary(
    ctx: SlideContext,
    cfg: RunConfig,
    counts: Counter[str],
    colors: dict[str, tuple[int, int, int]],
    tissue_area_mm2: float,
    timings: dict[str, float],
    model_info: dict[str, Any] | None,
) -> dict[str, Any]:
    info = ctx.slide.info.to_dict()
    return {
        "slide": {
            k: info[k]
            for k in ("name", "path", "width", "height", "mpp", "mpp_source", "vendor", "backend")
        },
        "target_mpp": cfg.target_mpp,
        "tissue_area_mm2": round(tissue_area_mm2, 6),  # to the µm²
        "cells_total": int(sum(counts.values())),
        "class_counts": class_counts_summary(dict(counts), colors, tissue_area_mm2),
        "config": cfg.to_dict(),
        "versions": software_versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "model": model_info or {"source": "none"},
        "created": utc_now_iso(),
    }


def check_model_stain(ctx: SlideContext, model_stain: str, declared: str) -> str | None:
    """Refuse a slide whose stain is not the one the model was fitted on: its activation net,
    pseudo-mask clustering, network and classes all assume that stain, so e.g. a Ki-67 model on an
    H&E slide would put a meaningless Positive index in the cohort table. The stain is judged on
    the thumbnail (eosin's pink: the H&E and Ki-67 sets measured lie far apart, stain.detect_stain)
    unless the run declares it (``declared``: ``--stain`` or the config file's): declared as the
    model's, the slide goes ahead, with one line (returned) when it looks otherwise. Raises
    StainMismatchError."""
    from .errors import StainMismatchError

    name = ctx.slide.name
    if declared not in ("auto", model_stain):
        raise StainMismatchError(
            f"{name}: the run's stain is {declared} (--stain or --config), but the model was "
            f"fitted on {model_stain} tissue: fit a model on {declared} slides, or run without "
            "--model"
        )
    slide_stain = detect_stain(ctx.thumbnail)
    if slide_stain == model_stain:
        return None
    if declared == "auto":
        raise StainMismatchError(
            f"{name}: looks {slide_stain} but the model was fitted on {model_stain} tissue, so its "
            f"cells and classes would mean nothing: fit a model on {slide_stain} slides, run "
            f"without --model, or pass --stain {model_stain} if the slide is {model_stain}"
        )
    return (
        f"{name}: looks {slide_stain}; taken as {model_stain}, the run's stain (--stain or "
        "--config), as the model was fitted"
    )


def process_slide(
    path: str | Path,
    out_dir: str | Path,
    cfg: RunConfig,
    *,
    model: ModelBundle | None = None,
    mpp: float | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    progress: ProgressHook | None = None,
) -> SlideRun:
    """A slide file to a finished output folder: prepare, fit on the slide unless ``model`` is given
    (a ``ModelBundle`` from ``wsi-psm fit``), then find every cell. The output folder is checked
    before any work.

    ``mpp``: the slide's µm per pixel when its file does not say (or says wrongly); ``backend``:
    the reader (see :meth:`Slide.open`); ``overwrite``: replace an existing ``out_dir``;
    ``progress``: a :class:`~wsi_psm.progress.ProgressHook` (the CLI's bars). Raises the
    ``WsiPsmError`` subclasses of :mod:`wsi_psm.errors` for bad input; returns a :class:`SlideRun`.
    """
    progress = progress or NullProgress()
    out_dir = Path(out_dir)
    remove_stale_temps(out_dir)  # left by a run killed outright on this host (an old output back)
    if out_dir.exists() and not overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(
            f"output exists: {out_dir} (use --overwrite to replace it, or --skip-existing)"
        )
    declared = cfg.stain  # (a model's own stain replaces it in the run's configuration)
    if model is not None:
        cfg = model_run_config(cfg, model.config)
    # the slide's checks (unreadable, no mpp, fluorescence, no tissue) come first, in about a
    # second: they need neither torch nor a device
    ctx = prepare_slide(path, cfg, mpp=mpp, backend=backend)
    try:
        stain_note = None if model is None else check_model_stain(ctx, model.stain, declared)
        check_writable(out_dir)  # the slide is fine: can its outputs be written, before the work?
        from .device import device_label, select_device
        from .fit import fit_cell_classes, fit_model_on_context
        from .inference import make_predictor
        from .magnification import ScaleChoosingPredictor, check_slide_magnification, magnified_run

        device = select_device(cfg.device)
        extra: dict[str, float] = {}
        fitted_here = model is None
        if model is None:
            t = time.perf_counter()
            # stages the route does not use are not fitted (the transient model is not saved)
            model = fit_model_on_context(
                ctx, cfg, device=device, progress=progress, all_stages=False
            )
            extra["fit"] = time.perf_counter() - t
            model_info = {"source": "fitted on this slide"}
        else:
            model_info = {"source": "model file"}
            if stain_note is not None:
                log.warning(stain_note)
                model_info["stain_warning"] = stain_note
        model_info["provenance"] = model.provenance
        model_info["device"] = device_label(device)
        predictor, annotator, extras = make_predictor(model, device=device, cfg=cfg)
        run_ctx, run_cfg = ctx, cfg
        # the magnification check was measured on the shipped network only
        if cfg.segmenter.zoom_check and getattr(predictor, "shipped", False):
            t = time.perf_counter()
            mag = check_slide_magnification(ctx, predictor, cfg, progress)
            model_info["magnification"] = mag.summary()
            if mag.per_tile:
                # tiles read at half the mpp; the predictor keeps ``cfg``: read-outs at its mpp
                run_ctx, run_cfg = magnified_run(ctx, cfg)
                predictor = ScaleChoosingPredictor(predictor, cfg)
                if fitted_here and not isinstance(annotator, ShapeOnly):
                    # classes of the cells this run finds (a model file keeps its own classes)
                    clf = fit_cell_classes(
                        model, mag.zoomed_images, mag.chosen_labels, run_cfg.target_mpp, cfg
                    )
                    annotator, extras = clf, clf.indices
                    model_info["magnification"]["classes"] = clf.describe()
            extra["magnification_check"] = time.perf_counter() - t
        return run_slide(
            run_ctx, out_dir, predictor, run_cfg, annotator=annotator, overwrite=overwrite,
            model_info=model_info, progress=progress, extra_timings=extra, summary_extras=extras,
            requested_cfg=cfg,
        )  # fmt: skip
    finally:
        ctx.slide.close()


# What a fitted model decides (it was trained at that resolution, with those stages); the run config
# keeps the rest (tiling, device, outputs, seed, instance sizes).
MODEL_FIELDS = ("target_mpp", "stain", "psm", "cluster", "segmenter", "classes")
# ... except how the network is applied, which is the run's choice: test-time augmentation, mixed
# precision, the magnification check and the test-time magnifications (e.g. `--set
# segmenter.tta=true` with `--model`)
RUN_SEGMENTER_FIELDS = ("tta", "amp", "zoom_check", "fitted_scales")


def model_run_config(cfg: RunConfig, model_cfg: RunConfig) -> RunConfig:
    """The run configuration with the model's own fields taking precedence."""
    mine, run = model_cfg.to_dict(), cfg.to_dict()
    merged = {**run, **{k: mine[k] for k in MODEL_FIELDS if k in mine}}
    if "segmenter" in mine:
        merged["segmenter"] = {
            **mine["segmenter"],
            **{k: run["segmenter"][k] for k in RUN_SEGMENTER_FIELDS},
        }
    return RunConfig.model_validate(merged)
