"""The ``wsi-psm`` command: thin wrappers that parse options, call the library and show progress.

Errors the user can act on (``WsiPsmError``) are printed as one line on stderr with a non-zero exit
code; ``--debug`` (or WSI_PSM_DEBUG=1) shows the traceback instead. Heavy imports happen inside the
commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from wsi_psm import __version__
from wsi_psm.errors import WsiPsmError

if TYPE_CHECKING:  # (the slide readers are imported by the commands that need them)
    from wsi_psm.slide import Slide

from .progress import console

app = typer.Typer(
    name="wsi-psm",
    help="Label-free nucleus segmentation and classification on whole-slide images "
    "(prior self-activation maps). Outputs QuPath GeoJSON, GeoParquet, per-class counts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_DEBUG = {"on": os.environ.get("WSI_PSM_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        print(f"wsi-psm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if debug:
        _DEBUG["on"] = True
    from wsi_psm.allocator import tune_malloc  # light: ctypes only

    tune_malloc()


# Shared options --------------------------------------------------------------------------------


def _target_mpp(value: float | None) -> float | None:
    from wsi_psm.config import TARGET_MPP_RANGE  # light: pydantic, no torch

    lo, hi = TARGET_MPP_RANGE
    if value is not None and not lo <= value <= hi:
        raise typer.BadParameter(
            f"{value:g} µm/px: the processing resolution lies between {lo:g} and {hi:g}"
        )
    return value


def _output_path(value: str) -> Path:
    # an empty -o (an unset shell variable: -o "$OUT") would mean the current folder
    if not str(value).strip():
        raise typer.BadParameter("is empty: name an output (use . for the current folder)")
    return Path(value)


def _output_option(help: str) -> Any:
    """Every command's -o: an empty value is refused (see :func:`_output_path`)."""
    return typer.Option("--output", "-o", parser=_output_path, metavar="<path>", help=help)


def _slide_mpp(value: float | None) -> float | None:
    from wsi_psm.slide import PLAUSIBLE_MPP  # light: numpy and PIL, no torch

    lo, hi = PLAUSIBLE_MPP
    if value is not None and not lo <= value <= hi:
        raise typer.BadParameter(
            f"µm per pixel lies between {lo:g} and {hi:g} (0.25 is 40x, 0.5 is 20x), not {value:g}"
        )
    return value


MppOpt = Annotated[
    float | None,
    typer.Option(
        "--mpp",
        help="Micrometres per pixel of level 0: needed when the file does not say; overrides "
        "(with a warning) what it says.",
        callback=_slide_mpp,
    ),
]
# the reader names as wsi_psm.slide.BACKENDS (a test keeps the two equal; slide is not imported for --help)
BackendOpt = Annotated[
    Literal["auto", "openslide", "tiffslide", "image"],
    typer.Option(
        "--backend",
        help="Slide reader (auto: OpenSlide, then tiffslide, then a plain image reader).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Run configuration JSON (see schemas/config.schema.json).",
        exists=True,
        dir_okay=False,
    ),
]
TargetMppOpt = Annotated[
    float | None,
    typer.Option(
        "--target-mpp",
        help="Processing resolution, µm/px (default 0.5; 0.1 to 2).",
        callback=_target_mpp,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", metavar="<device>", help="auto, cpu, cuda, cuda:N or mps."),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Random seed (fits are deterministic on CPU).", min=0, max=2**31 - 1
    ),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="A model from `wsi-psm fit` or `segment --save-model` (without it: the default route "
        "described above).",
        exists=True,
        dir_okay=False,
    ),
]
SegmentModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="A model from `wsi-psm fit`, `segment --save-model` or "
        "benchmarks/train_default_model.py, or a stand-alone segmenter file (without it: the "
        "default route described above). Cell classes it holds for the images' stain are used "
        "as they are (one Positive / Negative rule across calls).",
        exists=True,
        dir_okay=False,
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
SkipOpt = Annotated[
    bool,
    typer.Option(
        "--skip-existing",
        help="Skip slides whose folder holds a finished output (its summary.json and the files it "
        "lists); anything else at that path is an error for that slide.",
    ),
]
StainOpt = Annotated[
    Literal["auto", "he", "ihc-dab"] | None,
    typer.Option(
        "--stain",
        help="Stain (auto: detected per slide or image). run and batch with --model refuse a "
        "slide judged another stain than the model's, unless this declares the model's stain.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
GzipOpt = Annotated[bool | None, typer.Option("--gzip/--no-gzip", help="Write cells.geojson.gz.")]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size", help="Tiles per network batch (a CPU runs it a few tiles at a time).", min=1
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", help="Threads decoding tiles (tiles.decode_workers).", min=1),
]


def _config(
    config: Path | None,
    *,
    target_mpp: float | None = None,
    device: str | None = None,
    seed: int | None = None,
    stain: str | None = None,
    gzip: bool | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
):
    from pydantic import ValidationError

    from wsi_psm.config import RunConfig

    given = {
        "target_mpp": ("--target-mpp", target_mpp),
        "device": ("--device", device),
        "seed": ("--seed", seed),
        "stain": ("--stain", stain),
        "geojson_gzip": ("--gzip", gzip),
        "tiles.batch_size": ("--batch-size", batch_size),
        "tiles.decode_workers": ("--workers", workers),
    }
    try:
        cfg = RunConfig.load(config) if config else RunConfig()
    except ValidationError as err:
        raise WsiPsmError(f"invalid configuration {config}: {_first_problem(err)}") from err
    except ValueError as err:  # not JSON
        raise WsiPsmError(f"invalid configuration file {config}: {err}") from err
    try:
        return cfg.with_updates(**{key: value for key, (_, value) in given.items()})
    except ValidationError as err:
        where = ".".join(str(part) for part in err.errors()[0]["loc"])
        if where not in given:  # a rule across settings
            raise WsiPsmError(f"invalid configuration: {_first_problem(err)}") from err
        what = _first_problem(err, where=False)
        raise WsiPsmError(
            f"invalid value for '{given[where][0]}': {what[:1].lower()}{what[1:]}"
        ) from err


def _first_problem(err, *, where: bool = True) -> str:
    """A pydantic ValidationError as one line: its first problem (and how many more)."""
    problems = err.errors()
    what = problems[0]["msg"].removeprefix("Value error, ").replace(" or instance of RunConfig", "")
    loc = ".".join(str(part) for part in problems[0]["loc"])
    if where and loc:  # (a file that is not a JSON object has no field to name)
        what = f"{loc}: {what}"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return what + more


def _one_of(overwrite: bool, skip_existing: bool) -> None:
    if overwrite and skip_existing:
        raise WsiPsmError("--overwrite and --skip-existing contradict each other: give one")


# Commands --------------------------------------------------------------------------------------


def _input_check(s: Slide) -> str | None:
    """What `run` and `segment` say of the slide's thumbnail (brightfield, stained), as one
    phrase; None without a resolution to read the thumbnail at."""
    from wsi_psm.config import TissueConfig
    from wsi_psm.tissue import check_input_image

    if not s.info.mpp:
        return None
    thumb, _ = s.thumbnail(max(TissueConfig().thumb_mpp, s.info.mpp))
    try:
        check_input_image(thumb, s.name)
    except WsiPsmError as err:
        return "refused: " + str(err).removeprefix(f"{s.name}: ")
    return "ok (brightfield, stained)"


@app.command()
def info(
    slide: Annotated[
        Path, typer.Argument(help="A slide file, DICOM folder or image.", metavar="SLIDE")
    ],
    mpp: MppOpt = None,
    backend: BackendOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print a slide's size, pyramid levels, resolution, vendor and reader.

    Also says whether `run` would take the slide (brightfield, stained, a known resolution); exit
    code 1 when it would refuse it, after the facts (for scripts that screen a folder), else 0.
    """
    import json

    from rich.table import Table

    from wsi_psm.slide import Slide, warn_mpp_override

    with Slide.open(slide, backend=backend, mpp=mpp) as s:
        warn_mpp_override(s.info)
        d = s.info.to_dict()
        d["input_check"] = _input_check(s)
    # (`run` refuses a slide without a resolution too, unless given --mpp)
    refused = not d["mpp"] or str(d["input_check"]).startswith("refused")
    if as_json:
        print(json.dumps(d, indent=2))
        raise typer.Exit(1 if refused else 0)
    rows = [
        ("name", d["name"]),
        ("path", d["path"]),
        ("vendor", d["vendor"] or "- (plain image or generic TIFF)"),
        ("reader", d["backend"]),
        ("size", f"{d['width']} x {d['height']} px (level 0)"),
        (
            "mpp",
            f"{d['mpp']:.4g} µm/px ({d['mpp_source']})" if d["mpp"] else "unknown (pass --mpp)",
        ),
    ]
    if d.get("objective_power"):
        rows.append(("objective", f"{d['objective_power']:g}x"))
    if d["input_check"] is not None:
        rows.append(("check", d["input_check"]))
    levels = ", ".join(
        f"{w}x{h} (/{ds:.4g})"
        for (w, h), ds in zip(d["level_dimensions"], d["level_downsamples"], strict=True)
    )
    rows.append(("levels", f"{d['level_count']}: {levels}"))
    from rich.console import Console

    out = Console()
    if not out.is_terminal:  # piped: one unwrapped line per row, for grep and scripts
        print("\n".join(f"{k:<10} {v}" for k, v in rows))
    else:
        t = Table(show_header=False, box=None)
        t.add_column(no_wrap=True)
        t.add_column(overflow="fold")  # long paths wrap whole, not cut with an ellipsis
        for k, v in rows:
            t.add_row(k, v)
        out.print(t)
    if refused:
        raise typer.Exit(1)


@app.command()
def run(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Slide files, DICOM folders, or folders of slides.", metavar="SLIDE"),
    ],
    output: Annotated[
        Path,
        _output_option("Output folder: one subfolder per slide, and summary.csv."),
    ],
    model: ModelOpt = None,
    mpp: MppOpt = None,
    backend: BackendOpt = "auto",
    config: ConfigOpt = None,
    target_mpp: TargetMppOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    stain: StainOpt = None,
    gzip: GzipOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find, outline and classify every nucleus of each slide.

    Writes OUTPUT/<slide>/{cells.geojson, cells.parquet, summary.json, overlay.png} and
    OUTPUT/summary.csv (a row per slide: cells per class, Positive index, density). Without --model,
    each slide is fitted on itself, label-free: an H&E slide gets the shipped segmentation network,
    and only its stain vectors and cell classes are fitted (seconds); an IHC slide gets the PSM,
    pseudo masks and a segmentation network trained on them (3-11 minutes on 2 CPU cores, about a
    minute on a GPU), then its Positive / Negative rule.
    """
    from wsi_psm.atomic import remove_stale_temps
    from wsi_psm.counts_table import check_counts_table, finished_output
    from wsi_psm.discovery import find_slides
    from wsi_psm.pipeline import process_slide

    from .progress import progress_bars

    _one_of(overwrite, skip_existing)
    cfg = _config(config, target_mpp=target_mpp, device=device, seed=seed, stain=stain, gzip=gzip,
                  batch_size=batch_size, workers=workers)  # fmt: skip
    slides = find_slides(inputs)
    check_counts_table(output)  # a summary.csv that is not ours stops the run before any work
    bundle = _load_model(model) if model else None
    failed = []
    completed = False
    # left by an earlier run killed outright on this host (the processed ones: process_slide too)
    remove_stale_temps(*(output / s.name for s in slides))
    try:
        for s in slides:
            out_dir = output / s.name
            try:
                if skip_existing and finished_output(out_dir):
                    console.print(f"{s.name}: output exists, skipped ({out_dir})")
                    continue
                with progress_bars(not quiet, prefix=f"{s.name}: ") as prog:
                    res = process_slide(s.path, out_dir, cfg, model=bundle, mpp=mpp, backend=backend,
                                        overwrite=overwrite, progress=prog)  # fmt: skip
            except WsiPsmError as err:
                if len(slides) == 1:
                    raise
                console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
                failed.append(s.name)
                continue
            counts = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items())) or "no cells"
            on = res.summary["model"].get("device", "")
            console.print(
                f"{s.name}: {res.cells} cells ({counts}) on {on} -> {res.out_dir}", highlight=False
            )
        completed = True
    finally:  # the finished slides' rows, also when a stop (Ctrl-C) or an error ends the run
        table = _slides_table(output, [s.name for s in slides], completed)
    if table is not None:
        console.print(f"cell counts per slide -> {table}", highlight=False)
    if failed:
        raise WsiPsmError(f"{len(failed)} of {len(slides)} slides failed: {', '.join(failed)}")


def _slides_table(output: Path, names: list[str], completed: bool) -> Path | None:
    """OUTPUT/summary.csv updated with the slides whose folders are finished; when the run is being
    stopped, a failure to write it is not reported over the stop's own error."""
    from wsi_psm.atomic import write_error
    from wsi_psm.counts_table import write_slides_table

    try:
        return write_slides_table(output, names)
    except OSError as err:
        if completed:
            raise write_error(err, output) from err
        return None


@app.command()
def fit(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Slides (or folders of slides) to fit on, unlabelled.", metavar="SLIDE"
        ),
    ],
    output: Annotated[
        Path,
        _output_option("Model file to write (e.g. model.pt)."),
    ],
    mpp: MppOpt = None,
    backend: BackendOpt = "auto",
    config: ConfigOpt = None,
    target_mpp: TargetMppOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    stain: StainOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a model (self-supervised, no labels) on a cohort of slides, for `run --model`."""
    from wsi_psm.atomic import check_writable, write_error
    from wsi_psm.discovery import find_slides
    from wsi_psm.fit import fit_model_on_slides
    from wsi_psm.model import ModelBundle

    from .progress import progress_bars

    if output.is_dir():
        raise WsiPsmError(f"{output} is a folder: give a model file, e.g. {output / 'model.pt'}")
    if output.exists() and not overwrite:
        raise WsiPsmError(f"output exists: {output} (use --overwrite to replace it)")
    cfg = _config(config, target_mpp=target_mpp, device=device, seed=seed, stain=stain)
    slides = find_slides(inputs)
    check_writable(output)
    with progress_bars(not quiet) as prog:
        bundle: ModelBundle = fit_model_on_slides(
            [s.path for s in slides], cfg, mpp=mpp, backend=backend, progress=prog
        )
    try:
        bundle.save(output)
    except OSError as err:
        raise write_error(err, output) from err
    console.print(f"model fitted on {len(slides)} slide(s) -> {output}", highlight=False)


def _load_model(path: Path):
    from wsi_psm.model import ModelBundle

    return ModelBundle.load(path)


def _segment_model(path: Path):
    """``segment --model``: a model bundle (``fit``, ``--save-model``, the shipped file), or a
    stand-alone segmenter file (``save_segmenter``; given as its path: it records its resolution).
    Anything else: the bundle loader's one-line error."""
    from wsi_psm.errors import ModelError
    from wsi_psm.segmenter.network import is_segmenter_file

    try:
        return _load_model(path)
    except ModelError:
        # (a bundle the loader refused, e.g. a newer format, is not used as a bare network)
        if not is_segmenter_file(path):
            raise
        return str(path)


@app.command()
def batch(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Slide files, DICOM folders, or folders of slides.", metavar="SLIDE"),
    ],
    output: Annotated[
        Path,
        _output_option("Output folder: one subfolder per slide, and summary.csv."),
    ],
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="Address of a running Dask scheduler (tcp://host:8786); default: a local cluster.",
        ),
    ] = None,
    n_workers: Annotated[
        int,
        typer.Option(
            "--n-workers",
            help="Local cluster: worker processes. Slides at once = n-workers x "
            "threads-per-worker, each about 2 GB of memory on a CPU.",
            min=1,
        ),
    ] = 1,
    threads_per_worker: Annotated[
        int,
        typer.Option(
            "--threads-per-worker",
            help="Local cluster: slides each worker runs at once, sharing this many torch "
            "threads (on a CPU, keep slides at once at most the usable cores).",
            min=1,
        ),
    ] = 2,
    model: ModelOpt = None,
    mpp: MppOpt = None,
    backend: BackendOpt = "auto",
    config: ConfigOpt = None,
    target_mpp: TargetMppOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    stain: StainOpt = None,
    gzip: GzipOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipOpt = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only failures and the end result.")
    ] = False,
) -> None:
    """Process many slides on a Dask distributed cluster, one slide per task.

    Each worker opens, processes, writes and closes its own slide; finished slides are skipped on a
    rerun with --skip-existing, so an interrupted batch can be resumed. Without --model each slide
    goes the way `wsi-psm run` takes it (a model fitted on the slide itself). With --scheduler, the
    workers need wsi-psm installed and the slides and OUTPUT at the same paths.
    """
    from wsi_psm.discovery import find_slides
    from wsi_psm.distributed import run_batch

    _one_of(overwrite, skip_existing)
    cfg = _config(config, target_mpp=target_mpp, device=device, seed=seed, stain=stain, gzip=gzip,
                  batch_size=batch_size, workers=workers)  # fmt: skip
    slides = find_slides(inputs)
    if model is not None:  # a bad model file: one line now, not one per slide after a cluster start
        _load_model(model)
    # a batch of one slide fails as `run` does: its error is the one line, said once at exit
    alone = slides[0].name if len(slides) == 1 else None

    def show(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    results = run_batch(
        slides, output, cfg, model_path=model, mpp=mpp, backend=backend, overwrite=overwrite,
        skip_existing=skip_existing, scheduler=scheduler, n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        report=None if quiet else show, report_failures=alone is None,
    )  # fmt: skip
    failed = [r for r in results if r.error]
    if alone is not None and failed:
        raise WsiPsmError(f"{alone}: {(failed[0].error or '').removeprefix(alone + ': ')}")
    for r in failed if quiet else ():
        show(f"{r.name}: error: {(r.error or '').removeprefix(r.name + ': ')}")
    skipped = sum(r.skipped for r in results)
    done = len(results) - len(failed) - skipped
    # (a batch in which every slide failed leaves no folder: nothing points at one)
    show(
        f"{done} slide(s) processed, {skipped} skipped"
        + (f" -> {output}" if done or skipped else "")
    )
    if failed:
        raise WsiPsmError(
            f"{len(failed)} of {len(results)} slides failed: {', '.join(r.name for r in failed)}"
        )


@app.command()
def segment(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image tiles (PNG, TIFF, JPEG) or folders of them.",
            metavar="IMAGE",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        _output_option("Folder for <stem>.geojson, <stem>_labels.tif and summary.csv."),
    ],
    mpp: MppOpt = None,
    model: SegmentModelOpt = None,
    config: ConfigOpt = None,
    target_mpp: TargetMppOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    stain: StainOpt = None,
    save_model: Annotated[
        Path | None,
        typer.Option(
            "--save-model",
            help="Also save the network (fitted on the images: IHC, another --target-mpp; or "
            "the shipped one: H&E) with the cell classes fitted on them, to this file, to "
            "segment more images with --model under the same classes, without fitting again "
            "(H&E: also fits the activation net the file holds, +14 s for 3 MoNuSeg images on 2 "
            "CPU cores).",
            dir_okay=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Skip images whose two outputs exist (a stopped run goes on; the network and "
            "classes are still fitted on all the images, so with the same images the outputs "
            "match one whole run).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Segment nuclei in image tiles; writes a GeoJSON and an instance-label TIFF per image.

    OUTPUT/summary.csv gets a row per image: cells per class, Positive index, cells per mm².

    Without --model: H&E images go through the network shipped with wsi-psm; IHC images (which it
    was not trained on) get a network fitted on themselves, label-free (3-11 minutes on 2 CPU
    cores, about a minute on a GPU, whatever the number of images; give a few dozen tiles at once:
    a fit on a handful is weaker, and says so). Cell classes (IHC Positive/Negative, H&E groups)
    are fitted on the images' own cells (a --model's own classes of the images' stain are used
    instead); a mix of stains is segmented stain by stain.
    segmenter.default_model in --config changes the route (shipped, fit, none).
    A --model runs at the resolution it was trained at (over --target-mpp); the shipped network
    only at its own 0.5 µm/px, so another --target-mpp fits a network on the images.
    """
    from wsi_psm.classes import positive_index
    from wsi_psm.discovery import find_slides
    from wsi_psm.networks import model_mpp
    from wsi_psm.segment import segment_images

    from .progress import progress_bars

    _one_of(overwrite, skip_existing)
    cfg = _config(config, target_mpp=target_mpp, device=device, seed=seed, stain=stain)
    paths = [s.path for s in find_slides(images, tiles=True)]
    bundle = _segment_model(model) if model else None
    trained = model_mpp(bundle)
    if trained is not None and abs(trained - cfg.target_mpp) > 1e-6:
        console.print(
            f"note: the model was trained at {trained:g} µm/px; processing at that resolution",
            highlight=False,
        )
    counts: Counter[str] = Counter()
    notes: list[str] = []
    with progress_bars(not quiet) as prog:
        written = segment_images(
            paths, output, cfg, model=bundle, mpp=mpp, overwrite=overwrite, progress=prog,
            save_model=save_model, skip_existing=skip_existing, class_counts=counts, notes=notes,
        )  # fmt: skip
    for line in notes:
        console.print(f"note: {line}", highlight=False)
    skipped = f", {len(paths) - len(written) // 2} skipped" if skip_existing else ""
    cells = ", ".join(f"{name} {n:,}" for name, n in counts.most_common())
    if (index := positive_index(counts)) is not None:  # IHC: over all the images' cells
        cells += f"; Positive index {index:.3f}"
    console.print(
        f"{len(written) // 2} image(s) segmented{skipped} -> {output}"
        + (f": {counts.total():,} cells ({cells})" if counts else ""),
        highlight=False,
    )
    if (output / "summary.csv").is_file():
        console.print(f"cell counts per image -> {output / 'summary.csv'}", highlight=False)
    if save_model is not None:
        console.print(f"fitted model saved -> {save_model} (reuse: --model)", highlight=False)


@app.command(name="eval")
def eval_(
    pred: Annotated[
        Path,
        typer.Argument(
            help="Folder of predictions (<stem>_labels.tif, <stem>.geojson[.gz], or run folders "
            "<stem>/cells.geojson).",
            metavar="PRED",
        ),
    ],
    gt: Annotated[
        Path,
        typer.Argument(
            help="Folder of annotations: outlines (MoNuSeg XML, label images or .mat inst_map "
            "files, or <stem>.geojson "
            "outlines from QuPath) or points (a BCData .h5 root, <stem>.geojson point annotations "
            "from QuPath, <stem>.csv with x, y, class, or SHIDC-B-Ki-67's <stem>.json records "
            "with x, y, label_id; classes Positive / Negative).",
            metavar="GT",
        ),
    ],
    radius: Annotated[
        float | None,
        typer.Option("--radius", help="Detection match radius in px (default 10).", min=0.0),
    ] = None,
    radius_um: Annotated[
        float | None,
        typer.Option("--radius-um", help="The match radius in µm instead (needs --mpp).", min=0.0),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp",
            help="µm per pixel of the annotated images (for --radius-um).",
            callback=_slide_mpp,
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
) -> None:
    """Score predictions against annotations: pixel F1, object Dice, AJI, PQ; or detection P/R/F1."""
    from .report import print_eval

    if radius_um is not None:
        if radius is not None:
            raise WsiPsmError("give the match radius once: --radius (px) or --radius-um (µm)")
        if not mpp:
            raise WsiPsmError("--radius-um needs --mpp, the annotated images' µm per pixel")
        radius = radius_um / mpp
    elif mpp is not None:
        raise WsiPsmError("--mpp is used only with --radius-um (detection radius in µm)")
    print_eval(pred, gt, radius=radius, json_out=json_out)


@app.command()
def demo(
    output: Annotated[
        Path,
        _output_option("Folder for the demo slide and its outputs."),
    ] = Path("demo-out"),
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipe on a small slide built from an image scikit-image ships (no download)."""
    from wsi_psm.demo import run_demo

    from .progress import progress_bars

    with progress_bars(not quiet) as prog:
        res, slide_path = run_demo(output, overwrite=overwrite, progress=prog)
    console.print(f"demo slide: {slide_path}", highlight=False)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items())) or "no cells"
    console.print(f"{res.cells} cells ({counts})", highlight=False)
    for name in sorted(os.listdir(res.out_dir)):
        console.print(f"  {res.out_dir / name}", highlight=False)
    console.print(f"  {res.out_dir.parent / 'summary.csv'} (a row per slide)", highlight=False)
    console.print(
        "open cells.geojson in QuPath (File > Import objects), or look at overlay.png",
        highlight=False,
    )


# Entry point -----------------------------------------------------------------------------------


def _is_usage_error(err: Exception) -> bool:
    exit_code = getattr(err, "exit_code", None)
    return callable(getattr(err, "show", None)) and isinstance(exit_code, int) and exit_code != 0


def _usage_message(err: Exception) -> str:
    """Click's message without its pydantic prefix, with the command's --help to turn to."""
    text = err.format_message() if hasattr(err, "format_message") else str(err)
    text = " ".join(text.replace("Value error, ", "").replace(": Input ", ": input ").split())
    ctx = getattr(err, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    if ctx is not None and text.startswith("No such option: --debug"):  # a root option
        sub = ctx.command_path.split(" ", 1)[-1]
        where = f" (it goes before the command: `wsi-psm --debug {sub} ...`)"
    return text[:1].lower() + text[1:].rstrip(".") + where


class Terminated(BaseException):
    """SIGTERM (``timeout``, a cluster scheduler, ``docker stop``) as an exception, so that the
    outputs' context managers remove their temporary files as they do on Ctrl-C."""


_STOPS = {"SIGINT": KeyboardInterrupt, "SIGTERM": Terminated}


def _stop(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stop, cleaning up (temporary folders, a batch's workers, the table of
    finished slides). Once: further stop signals are ignored from here on, so that a second one
    (Ctrl-C pressed again; `timeout`, which signals the process and then its group) cannot cut
    that cleanup short (it takes at most a minute or two; SIGKILL still ends it at once)."""
    import signal

    for name in _STOPS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise _STOPS[signal.Signals(signum).name]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn failures into one line and an exit code."""
    import signal

    if threading.current_thread() is not threading.main_thread():  # signals: main thread only
        _main(argv)
        return
    kinds = [getattr(signal, name) for name in _STOPS]
    before = {k: signal.signal(k, _stop) for k in kinds}
    try:
        _main(argv)
    finally:  # (a caller that goes on, e.g. a test runner, keeps its own handlers)
        for k, handler in before.items():
            if handler is not None:  # (None: set outside Python, cannot be put back)
                signal.signal(k, handler)


def _main(argv: list[str] | None) -> None:
    try:
        rv = app(args=argv, prog_name="wsi-psm", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(128 + 15)
    except WsiPsmError as err:
        if _DEBUG["on"]:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `wsi-psm`: the help, as click shows it
            err.show()  # type: ignore[attr-defined]
            sys.exit(err.exit_code)  # type: ignore[attr-defined]
        if _is_usage_error(err):  # click's own usage errors, as one line like ours
            print(f"error: {_usage_message(err)}", file=sys.stderr)
            sys.exit(err.exit_code)  # type: ignore[attr-defined]
        # a bug: say so in one line, with the way to see more
        if _DEBUG["on"]:
            traceback.print_exc()
        print(
            f"internal error: {type(err).__name__}: {err} "
            "(rerun as `wsi-psm --debug ...` for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
    if rv == 130:  # typer returns Ctrl-C as this exit code when not standalone
        print("error: interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
