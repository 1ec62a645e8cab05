"""End to end on real slides: the output contract (QuPath GeoJSON, GeoParquet, summary, overlay),
the checker from ../shared/tools, DICOM against SVS of the same tissue, batch runs on Dask distributed.

A small model is fitted once (few steps) so this stays within CI's time; accuracy is measured by the
benchmarks, not here.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import jsonschema
import pandas as pd
import pytest
import shapely
from conftest import DATA, data_path

from wsi_psm.config import RunConfig
from wsi_psm.fit import fit_model_on_slides
from wsi_psm.pipeline import process_slide
from wsi_psm.summary import load_schema

pytestmark = pytest.mark.acceptance

# no test-time augmentation: these tests check the contract, and TTA costs 8x the network time
QUICK = RunConfig().with_updates(
    **{"psm.fit_steps": 40, "psm.fit_tiles": 12, "segmenter.tta": False}
)
# the runs after the first check the contract, not the route: no magnification check (CMU-1's own
# run shows it leaves ordinary nuclei at 1x; test_magnification shows the other side)
CONTRACT = QUICK.with_updates(**{"segmenter.zoom_check": False})
CHECKER = DATA.parent / "tools" / "check_cells.py"


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    svs = data_path("wsi", "aperio-svs", "CMU-1-Small-Region.svs")
    path = tmp_path_factory.mktemp("model") / "cmu.pt"
    fit_model_on_slides([svs], QUICK).save(path)
    return path


@pytest.fixture(scope="module")
def cmu_run(quick_model, tmp_path_factory):
    from wsi_psm.model import ModelBundle

    svs = data_path("wsi", "aperio-svs", "CMU-1-Small-Region.svs")
    out = tmp_path_factory.mktemp("run") / "CMU-1-Small-Region"
    res = process_slide(svs, out, QUICK, model=ModelBundle.load(quick_model))
    return res


def _features(folder):
    for name in ("cells.geojson", "cells.geojson.gz"):
        p = folder / name
        if p.exists():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(p, "rt") as f:
                return json.load(f)
    raise AssertionError(f"no cells.geojson in {folder}")


def test_outputs_meet_the_contract(cmu_run):
    out = cmu_run.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "cells.geojson",
        "cells.parquet",
        "overlay.png",
        "summary.json",
    ]
    fc = _features(out)
    jsonschema.validate(fc, load_schema("cells"))
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, load_schema("summary"))
    assert sorted(summary["outputs"]) == sorted(p.name for p in out.iterdir())
    assert summary["cells_total"] == len(fc["features"]) == cmu_run.cells
    assert sum(c["count"] for c in summary["class_counts"].values()) == summary["cells_total"]
    assert summary["slide"]["mpp"] == pytest.approx(0.499)
    assert 0.3 < summary["tissue_area_mm2"] < 1.65  # the slide is 1.64 mm², partly glass
    # thousands of nuclei on this slide
    assert cmu_run.cells > 2000
    # what the network ran on, as the run's line says it
    assert re.fullmatch(
        r"cpu \(\d+ threads\)|cuda:\d+ \(.+\)|mps(:\d+)?", summary["model"]["device"]
    )


def test_slide_cells_come_from_the_downstream_network(cmu_run, quick_model):
    # an H&E slide gets the shipped segmenter, the same network `segment` uses on tiles
    from wsi_psm.model import ModelBundle
    from wsi_psm.networks import bundle_segmenter

    summary = json.loads((cmu_run.out_dir / "summary.json").read_text())
    assert summary["model"]["provenance"]["segmenter"] == "shipped"
    assert bundle_segmenter(ModelBundle.load(quick_model)) is not None
    # ordinary nuclei: the network cuts them into pieces at 2x, so the slide is run at 1x alone
    mag = summary["model"]["magnification"]
    assert mag["scale"] == "1x" and mag["tiles_resolved"] == 0 < mag["tiles_judged"]
    # half of the 8 sampled tiles decide it (none resolved): the check stops there
    assert mag["sample_tiles"] == mag["tiles_judged"] == 4
    assert sum(mag["nuclei_2x"]) > mag["threshold"] * sum(mag["nuclei_1x"])
    assert summary["target_mpp"] == QUICK.target_mpp


def test_run_fits_no_psm_stages_for_the_shipped_network(quick_model):
    """`run` without --model on H&E: the shipped network needs no pseudo masks, so no activation
    net is fitted (a third of a small slide's run on a CPU). What the run uses of the fit (stain,
    stain vectors, segmenter, cell classes) is what the full fit of the same tiles gives."""
    import numpy as np
    import torch

    from wsi_psm.errors import ModelError
    from wsi_psm.fit import fit_model_on_context
    from wsi_psm.model import ModelBundle
    from wsi_psm.pipeline import prepare_slide

    ctx = prepare_slide(data_path("wsi", "aperio-svs", "CMU-1-Small-Region.svs"), QUICK)
    try:
        light = fit_model_on_context(ctx, QUICK, device=torch.device("cpu"), all_stages=False)
    finally:
        ctx.slide.close()
    full = ModelBundle.load(quick_model)  # fit_model_on_slides: the same tiles, all stages
    assert light.net is None and light.pseudo is None and full.net is not None
    assert light.provenance["segmenter"] == full.provenance["segmenter"] == "shipped"
    assert light.stain == full.stain == "he"
    np.testing.assert_array_equal(light.stain_matrix, full.stain_matrix)
    assert light.component_meta["classes"] == full.component_meta["classes"]
    with pytest.raises(ModelError, match="without its PSM stages"):
        light.save(quick_model.parent / "light.pt")
    assert not (quick_model.parent / "light.pt").exists()


def test_stroma_fragments_are_dropped_and_groups_follow_size(cmu_run, quick_model):
    """On CMU-1 the network also outlines fragments of dark-pink collagen (a sixth of its objects,
    a quarter of the nuclei's haematoxylin): the classes' pale rule drops them, so no written cell
    is that pale, and the nucleus groups, fitted on nuclei only, rise in mean area with their rank."""
    from wsi_psm.classes import H_MEAN, CellClassifier
    from wsi_psm.model import ModelBundle

    summary = json.loads((cmu_run.out_dir / "summary.json").read_text())
    assert summary["counters"]["objects_dropped_not_nuclei"] > 0.05 * cmu_run.cells
    clf = CellClassifier.from_state(ModelBundle.load(quick_model).component_meta["classes"])
    assert clf.pale is not None and clf.pale.means[1] > 3 * clf.pale.means[0]
    cells = gpd.read_parquet(cmu_run.out_dir / "cells.parquet")
    assert cells[H_MEAN].min() >= clf.pale.threshold - 1e-3  # (written to 6 significant digits)
    area = cells.groupby("class")["Area µm^2"].mean()
    names = [n for n, _ in clf.classes]
    assert len(names) >= 2 and list(area[names]) == sorted(area[names])


def test_marking_ink_is_not_written_as_cells(cmu_run):
    """CMU-1's tissue edge carries teal marking ink, which the network outlines like nuclei (163
    objects at least 30% ink before the rule, up to 93%): the classes' ink rule keeps them out."""
    import numpy as np
    from rasterio import features

    from wsi_psm.classes import ink_fraction
    from wsi_psm.slide import Slide
    from wsi_psm.stain import ink_pixels

    with Slide.open(data_path("wsi", "aperio-svs", "CMU-1-Small-Region.svs")) as slide:
        rgb = slide.read_region(0, 0, slide.width, slide.height)
    assert ink_pixels(rgb).mean() > 0.003  # the slide has ink
    cells = gpd.read_parquet(cmu_run.out_dir / "cells.parquet")
    shapes = ((g, i) for i, g in enumerate(cells.geometry, 1))
    lab = features.rasterize(shapes, out_shape=rgb.shape[:2], dtype="int32")
    ink = ink_fraction(rgb, lab, np.arange(1, len(cells) + 1))
    # (measured at level 0, the rule at the processing resolution: a few cells sit near 0.3)
    assert ink.max() < 0.5 and (ink >= 0.3).mean() < 0.01


def test_geopandas_reads_the_same_cells(cmu_run):
    out = cmu_run.out_dir
    gj = gpd.read_file(out / "cells.geojson")
    gp = gpd.read_parquet(out / "cells.parquet")
    assert len(gj) == len(gp) == cmu_run.cells
    assert gp.geometry.is_valid.all()
    area_gj, area_gp = (
        shapely.area(gj.geometry.values).sum(),
        shapely.area(gp.geometry.values).sum(),
    )
    assert abs(area_gp - area_gj) < 1e-3 * area_gp
    # no pixel belongs to two cells, at tile seams included (DESIGN: each cell written once)
    cells = gp.geometry.values
    a, b = shapely.STRtree(cells).query(cells, predicate="intersects")
    pair = a < b
    shared = shapely.area(shapely.intersection(cells[a[pair]], cells[b[pair]]))
    assert shared.max(initial=0.0) <= 0.05, f"{int((shared > 0.05).sum())} overlapping pairs"


def _check_cmu_output(out_dir: Path) -> None:
    if not CHECKER.exists():
        pytest.skip(f"checker not available: {CHECKER}")
    r = subprocess.run([sys.executable, str(CHECKER), str(out_dir), "2220", "2967", "--min-cells", "2000"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_shared_checker_accepts_the_output(cmu_run):
    _check_cmu_output(cmu_run.out_dir)


def test_dicom_gives_the_same_cells_as_svs(cmu_run, quick_model, tmp_path):
    from wsi_psm.model import ModelBundle

    dcm = data_path("wsi", "dicom-CMU-1-Small-Region")
    res = process_slide(dcm, tmp_path / "dicom", CONTRACT, model=ModelBundle.load(quick_model))
    # same tissue through another container and codec: counts agree closely
    assert abs(res.cells - cmu_run.cells) < 0.05 * cmu_run.cells
    # its level-0 pixel is not the processing grid's: seam-trimmed cells once came out invalid
    _check_cmu_output(tmp_path / "dicom")


def test_batch_on_dask_distributed_and_resume(quick_model, tmp_path, monkeypatch):
    import wsi_psm.distributed
    from wsi_psm.atomic import host_tag
    from wsi_psm.demo import write_demo_slide
    from wsi_psm.discovery import find_slides
    from wsi_psm.distributed import run_batch

    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    write_demo_slide(slides_dir / "a.tiff")
    write_demo_slide(slides_dir / "b.tiff")
    (slides_dir / "broken.svs").write_text("not a slide")
    # (the demo slides are Ki-67 and the quick model H&E: declared H&E so that they are taken)
    cfg = CONTRACT.with_updates(**{"tiles.core_um": 128.0, "stain": "he"})
    slides = find_slides([slides_dir])
    out = tmp_path / "out"
    said: list[str] = []
    # as if on one core: the two slides at once are more than it has, and the batch says so
    monkeypatch.setattr(wsi_psm.distributed, "usable_cores", lambda: 1)
    results = run_batch(
        slides, out, cfg, model_path=quick_model, n_workers=2, threads_per_worker=1,
        report=said.append,
    )  # fmt: skip
    by_name = {r.name: r for r in results}
    assert said[:2] == [
        "3 slide(s) sent to a local cluster: 2 at a time",
        "warning: 2 slides at once on 1 usable core(s), about 2 GB of memory each: fewer at once "
        "(--n-workers x --threads-per-worker) is usually faster",
    ]
    # a line per finished slide, with what it ran on
    ran = [line for line in said if line.startswith("a: ")]
    assert len(ran) == 1 and re.search(
        r" on (cpu \(\d+ threads\)|cuda:\d+ \(.+\)|mps(:\d+)?) -> ", ran[0]
    )
    assert by_name["a"].cells > 10 and by_name["b"].cells == by_name["a"].cells
    assert by_name["broken"].error and "broken.svs" in by_name["broken"].error
    assert (out / "a" / "summary.json").exists() and not (out / "broken").exists()
    # the cohort table: a row per finished slide, its counts those of the slide's summary.json
    table = pd.read_csv(out / "summary.csv").set_index("name")
    assert sorted(table.index) == ["a", "b"]
    summary = json.loads((out / "a" / "summary.json").read_text())
    for name, c in summary["class_counts"].items():
        assert table.loc["a", name] == c["count"]
    assert table.loc["a", "cells"] == summary["cells_total"] == by_name["a"].cells
    assert table.loc["a", "area_mm2"] == pytest.approx(summary["tissue_area_mm2"], rel=1e-5)
    before = (out / "summary.csv").read_bytes()
    # resumed: a folder that a worker killed outright left (its process gone) is removed; a slide
    # whose folder is not a finished output (made by hand, or a copy cut short) is refused
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = out / f".a.tmp-0123456789ab-{gone.pid}@{host_tag()}"
    stale.mkdir()
    write_demo_slide(slides_dir / "c.tiff")
    (out / "c").mkdir()
    again = run_batch(
        find_slides([slides_dir]), out, cfg, model_path=quick_model, skip_existing=True,
        n_workers=1,
    )  # fmt: skip
    assert {r.name for r in again if r.skipped} == {"a", "b"} and not stale.exists()
    assert "not a finished wsi-psm output" in {r.name: r for r in again}["c"].error
    assert (out / "summary.csv").read_bytes() == before  # skipped slides keep their rows
    # a batch in which every slide fails leaves no empty folder behind
    broken = [s for s in slides if s.name == "broken"]
    failed = run_batch(broken, tmp_path / "none" / "out", cfg, model_path=quick_model, n_workers=1)
    assert failed[0].error and not (tmp_path / "none").exists()


def test_a_stopped_batch_leaves_finished_slides_and_no_temporary_folders(quick_model, tmp_path):
    """Stopped (Ctrl-C) once the first slide is reported: the local workers are waited for, no
    temporary folder stays, and summary.csv has a row for every finished slide (the first; the
    second too if its worker finished it while closing), and for no other."""
    from wsi_psm.demo import write_demo_slide
    from wsi_psm.discovery import find_slides
    from wsi_psm.distributed import run_batch

    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    for name in ("a", "b"):
        write_demo_slide(slides_dir / f"{name}.tiff")
    # (the demo slides are Ki-67 and the quick model H&E: declared H&E so that they are taken)
    cfg = CONTRACT.with_updates(**{"tiles.core_um": 128.0, "stain": "he"})
    out = tmp_path / "out"

    def stop_at_first_slide(line: str) -> None:
        if " cells in " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(
            find_slides([slides_dir]), out, cfg, model_path=quick_model, n_workers=1,
            threads_per_worker=1, report=stop_at_first_slide,
        )  # fmt: skip
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []
    finished = sorted(p.name for p in out.iterdir() if (p / "summary.json").is_file())
    assert len(finished) >= 1
    assert sorted(pd.read_csv(out / "summary.csv")["name"]) == finished


def test_a_model_on_a_slide_of_another_stain_is_refused(cmu_run, quick_model, tmp_path, caplog):
    """The H&E model of CMU-1 on the Ki-67 demo slide: refused in one line, nothing written (its
    Positive index would mean nothing); declared another stain than the model's: refused;
    declared the model's stain with --stain, it goes ahead with one line in the log and the
    summary. The same model on its own kind of slide: nothing said."""
    from wsi_psm.demo import DEMO_MPP, write_demo_slide
    from wsi_psm.errors import StainMismatchError
    from wsi_psm.model import ModelBundle

    model = ModelBundle.load(quick_model)
    assert model.stain == "he"
    assert (
        "stain_warning" not in json.loads((cmu_run.out_dir / "summary.json").read_text())["model"]
    )
    ihc = write_demo_slide(tmp_path / "demo-ihc.tiff")
    with pytest.raises(StainMismatchError) as err:
        process_slide(ihc, tmp_path / "out", CONTRACT, model=model, mpp=DEMO_MPP)
    assert str(err.value).startswith("demo-ihc: looks ihc-dab but the model was fitted on he")
    assert "pass --stain he if the slide is he" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(StainMismatchError, match=r"stain is ihc-dab .*, but the model was fitted"):
        process_slide(
            ihc, tmp_path / "out", CONTRACT.with_updates(stain="ihc-dab"), model=model,
            mpp=DEMO_MPP,
        )  # fmt: skip
    with caplog.at_level("WARNING", logger="wsi_psm.pipeline"):
        res = process_slide(
            ihc, tmp_path / "out", CONTRACT.with_updates(stain="he"), model=model, mpp=DEMO_MPP
        )
    warning = res.summary["model"]["stain_warning"]
    assert warning == (
        "demo-ihc: looks ihc-dab; taken as he, the run's stain (--stain or --config), as the "
        "model was fitted"
    )
    assert [r.getMessage() for r in caplog.records] == [warning]
