"""export (cells: GeoJSON + GeoParquet), summary.json, overlay, the atomic output folder."""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shapely.geometry import Polygon, box
from skimage.draw import disk

from wsi_psm.atomic import OutputFolder
from wsi_psm.config import RunConfig
from wsi_psm.errors import OutputExistsError, OutputWriteError
from wsi_psm.export import (
    CellRecord,
    GeoJSONWriter,
    GeoParquetWriter,
    PreparedCell,
    pack_cells,
    prepare_cell,
    prepare_cells,
)
from wsi_psm.overlay import OverlayRenderer, render_overlay
from wsi_psm.polygons import MEASUREMENT_NAMES, labels_to_polygons, polygon_measurements
from wsi_psm.summary import (
    class_counts_summary,
    config_json_schema,
    load_schema,
    software_versions,
    utc_now_iso,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[1]
CHECK_CELLS = ROOT.parent / "shared" / "tools" / "check_cells.py"
W, H = 2400, 1800  # level-0 size of the synthetic slide
MPP = 0.25
COLORS = {"tumour": (200, 30, 30), "stroma": (30, 160, 60), "immune": (40, 60, 220)}


def synthetic_cells(n_side: int = 18, seed: int = 0) -> list[CellRecord]:
    """Nuclei-like blobs on a jittered grid, traced at 2x downsampling into a level-0 frame."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n_side * 24, n_side * 24), np.int32)
    k = 0
    for i in range(n_side):
        for j in range(n_side):
            k += 1
            r = rng.uniform(3, 9)
            centre = (i * 24 + 12 + rng.uniform(-2, 2), j * 24 + 12 + rng.uniform(-2, 2))
            labels[disk(centre, r, shape=labels.shape)] = k
    names = list(COLORS)
    cells = []
    for lab, poly in labels_to_polygons(labels, scale=1.984, offset=(301.5, 123.25)):
        m = polygon_measurements(poly, MPP)
        m["Hematoxylin OD mean"] = float(rng.uniform(0, 1))
        m["undefined"] = float("nan")  # must be dropped from the GeoJSON
        name = names[lab % 3]
        cells.append(CellRecord(poly, name, COLORS[name], m))
    return cells


def summary_for(cells: list[CellRecord], tissue_mm2: float = 0.2) -> dict:
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.class_name] = counts.get(c.class_name, 0) + 1
    return {
        "slide": {
            "name": "synthetic.svs",
            "path": "/data/synthetic.svs",
            "width": W,
            "height": H,
            "mpp": MPP,
            "mpp_source": "metadata",
            "vendor": None,
            "backend": "synthetic",
        },
        "target_mpp": 0.5,
        "tissue_area_mm2": tissue_mm2,
        "cells_total": len(cells),
        "class_counts": class_counts_summary(counts, COLORS, tissue_mm2),
        "indices": {"ki67_index": None},
        "counters": {"cells_dropped": 3},
        "config": RunConfig().to_dict(),
        "versions": software_versions(),
        "timings_s": {"segment": 1.5, "export": 0.25},
        "model": {"source": "fitted-on-slide", "path": None},
        "outputs": ["cells.geojson", "cells.parquet", "overlay.png"],
        "created": utc_now_iso(),
    }


@pytest.fixture(scope="module")
def cells() -> list[CellRecord]:
    return synthetic_cells()


def write_all(folder: Path, cells: list[CellRecord], gz: bool, slide_key="synthetic.svs"):
    name = "cells.geojson.gz" if gz else "cells.geojson"
    with (
        GeoJSONWriter(folder / name, gzip=gz, slide_key=slide_key) as gj,
        GeoParquetWriter(folder / "cells.parquet", slide_key=slide_key, row_group_size=100) as gp,
    ):
        for c in cells:
            assert gj.write(c) == gp.write(c)
    write_summary(folder / "summary.json", summary_for(cells))
    thumb = np.full((H // 8, W // 8, 3), 235, np.uint8)
    render_overlay(thumb, iter(cells), 8.0, folder / "overlay.png")
    return folder / name


def load_geojson(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


@pytest.mark.skipif(os.name != "posix", reason="stale folders are judged by POSIX process ids")
def test_stale_temporary_folders_of_gone_processes_are_removed(tmp_path):
    """A temporary folder left by a process killed outright (its pid gone) is removed when the same
    output is written again; one of a live process, of another host, or without an owner stays."""
    import subprocess
    import sys

    from wsi_psm.atomic import host_tag, remove_stale_temps

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # (reaped: its pid names no process)
    host = host_tag()
    final = tmp_path / "slide"
    names = {
        "dead": f".slide.tmp-0123456789ab-{gone.pid}@{host}",
        "alive": f".slide.tmp-0123456789ab-{os.getpid()}@{host}",
        "elsewhere": f".slide.tmp-0123456789ab-{gone.pid}@{host}x",
        "old": ".slide.tmp-0123456789ab",
        "other slide": f".slide2.tmp-0123456789ab-{gone.pid}@{host}",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cells.geojson").write_text("[")
    assert remove_stale_temps(final) == [tmp_path / names["dead"]]
    (tmp_path / names["dead"]).mkdir()
    with OutputFolder(final) as folder:  # (writing the slide again cleans up too)
        assert not (tmp_path / names["dead"]).exists()
        assert folder.name.endswith(f"-{os.getpid()}@{host}")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"slide", *(v for k, v in names.items() if k != "dead")}
    # killed between the two renames of an overwrite (the old output set aside, the new one,
    # synced, not yet renamed in): the next write of it finishes the overwrite
    old = tmp_path / f".slide.old-0123456789ab-{gone.pid}@{host}"
    (tmp_path / "slide").rename(old)
    (tmp_path / names["dead"]).mkdir()
    (tmp_path / names["dead"] / "new").write_text("")
    assert remove_stale_temps(final) == [old]
    assert (tmp_path / "slide" / "new").is_file()
    # an old copy left after the new output was in (then deleted by its user): removed, not put
    # back over the user's deletion
    shutil.rmtree(tmp_path / "slide")
    old.mkdir()
    assert remove_stale_temps(final) == [old] and not (tmp_path / "slide").exists()


@pytest.mark.parametrize("gz", [False, True])
def test_outputs_round_trip_and_pass_the_checker(tmp_path, cells, gz):
    final = tmp_path / "out" / "synthetic"
    with OutputFolder(final, overwrite=False) as folder:
        assert folder.parent == final.parent and folder.name.startswith(".synthetic.tmp-")
        geojson_name = write_all(folder, cells, gz).name
        assert not final.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["synthetic"]
    assert {p.name for p in final.iterdir()} == {
        geojson_name,
        "cells.parquet",
        "summary.json",
        "overlay.png",
    }

    fc = load_geojson(final / geojson_name)
    jsonschema.Draft202012Validator(load_schema("cells")).validate(fc)
    feats = fc["features"]
    assert len(feats) == len(cells) > 300
    for f in feats:
        p = f["properties"]
        assert "type" not in p and p["objectType"] == "detection"
        assert "undefined" not in p["measurements"]
        assert set(MEASUREMENT_NAMES) <= set(p["measurements"])
    assert len({f["id"] for f in feats}) == len(feats)

    gj = gpd.read_file(f"/vsigzip/{final / geojson_name}" if gz else final / geojson_name)
    gp = gpd.read_parquet(final / "cells.parquet")
    assert gp.geometry.name == "geometry" and gp.crs is None
    assert len(gj) == len(gp) == len(cells)
    assert list(gp["id"]) == [f["id"] for f in feats]
    assert list(gp["class"]) == [c.class_name for c in cells]
    assert gp.geometry.geom_equals_exact(gj.geometry.set_crs(None, allow_override=True), 0).all()
    # Geometry is the input rounded to 2 decimals; areas agree to rounding.
    np.testing.assert_allclose(gp.area, [c.polygon.area for c in cells], rtol=1e-3)
    np.testing.assert_allclose(
        gp["Area µm^2"], [c.measurements["Area µm^2"] for c in cells], rtol=1e-5
    )
    assert "undefined" not in gp.columns  # finite in no cell: no column (a NaN is no value)
    meta = json.loads(pq.ParquetFile(final / "cells.parquet").metadata.metadata[b"wsi_psm"])
    assert meta["classes"] == {k: list(v) for k, v in COLORS.items()}

    summary = json.loads((final / "summary.json").read_text())
    jsonschema.Draft202012Validator(load_schema("summary")).validate(summary)
    assert summary["cells_total"] == len(cells)

    if not CHECK_CELLS.exists():
        pytest.skip(f"{CHECK_CELLS} not available")
    run = subprocess.run(
        [sys.executable, str(CHECK_CELLS), str(final), str(W), str(H)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_ids_are_deterministic_and_gzip_bytes_reproducible(tmp_path, cells):
    few = cells[:50]
    paths = []
    for i, key in enumerate(["a.svs", "a.svs", "b.svs"]):
        (tmp_path / str(i)).mkdir()
        p = tmp_path / str(i) / "cells.geojson.gz"
        with GeoJSONWriter(p, gzip=True, slide_key=key) as w:
            w.write_many(few)
        paths.append(p)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    ids = [[f["id"] for f in load_geojson(p)["features"]] for p in paths]
    assert ids[0] == ids[1] and not set(ids[0]) & set(ids[2])


def test_cells_prepared_in_workers_write_the_same_bytes(tmp_path, cells):
    # the pipeline encodes cells in its worker processes (prepare_cell); the files must not change
    few = cells[:80]
    prepared = [prepare_cell(c, "a.svs") for c in few]
    for name, items in (("direct", few), ("prepared", prepared)):
        (tmp_path / name).mkdir()
        with (
            GeoJSONWriter(tmp_path / name / "cells.geojson", slide_key="a.svs") as gj,
            GeoParquetWriter(tmp_path / name / "cells.parquet", slide_key="a.svs") as gp,
        ):
            gj.write_many(items)
            gp.write_many(items)
    for f in ("cells.geojson", "cells.parquet"):
        assert (tmp_path / "direct" / f).read_bytes() == (tmp_path / "prepared" / f).read_bytes()
    # a cell encoded for another slide would carry the wrong ids: refused, not written
    with GeoJSONWriter(tmp_path / "other.geojson", slide_key="b.svs") as w:
        with pytest.raises(ValueError, match="slide key"):
            w.write(prepared[0])


def test_cells_prepared_together_equal_cells_prepared_one_by_one(cells):
    """The workers encode a tile's cells in one call; each must come out as if encoded alone,
    a polygon with a hole and cells under a thumbnail pixel (drawn as dots) among them."""
    holed = Polygon([(1000, 1000), (1040, 1000), (1040, 1040), (1000, 1040)],
                    [[(1010, 1010), (1020, 1010), (1020, 1020), (1010, 1020)]])  # fmt: skip
    tiny = Polygon([(500, 500), (502.5, 500), (502.5, 502), (500, 502)])
    few = [*cells[:30], CellRecord(holed, "stroma", COLORS["stroma"]),
           CellRecord(tiny, "immune", COLORS["immune"], {"x": 1.0}), *cells[30:40]]  # fmt: skip
    together = prepare_cells(few, "a.svs", overlay_scale=8.0)
    for rec, cell in zip(together, few, strict=True):
        alone = prepare_cell(cell, "a.svs", overlay_scale=8.0)
        assert (rec.id, rec.wkb, rec.bounds, rec.feature) == (alone.id, alone.wkb, alone.bounds,
                                                             alone.feature)  # fmt: skip
        assert rec.outline[0] == alone.outline[0]
        np.testing.assert_array_equal(rec.outline[1], alone.outline[1])
    assert len(json.loads(together[30].feature)["geometry"]["coordinates"]) == 2  # the hole kept
    assert len(together[31].outline[1]) == 1  # under 1.5 thumbnail px: one point
    assert prepare_cells([], "a.svs") == []
    with pytest.raises(ValueError, match="non-empty shapely Polygon"):
        prepare_cells([few[0], CellRecord(Polygon(), "stroma", COLORS["stroma"])], "a.svs")


def test_rounding_never_writes_an_invalid_polygon():
    """A cell trimmed at a seam between tiles whose pixel grids differ by a fraction of a pixel can
    hold vertices closer than the written precision (DICOM CMU-1 at 0.2499 µm/px: two such cells).
    Rounding them alone folds the ring into a spike, which QuPath and check_cells reject: they are
    snapped to the grid instead, and a cell whose rounding is harmless is written as before."""
    import shapely

    # a 10 x 10 square with a slit 0.002 px wide down to its middle: valid, but 2-decimal rounding
    # collapses the slit to a zero-width spike
    slit = Polygon([(0, 0), (10, 0), (10, 10), (5.003, 10), (5.003, 5), (5.001, 5), (5.001, 10),
                    (0, 10)])  # fmt: skip
    assert slit.is_valid
    assert not shapely.set_precision(slit, 0.01, mode="pointwise").is_valid
    plain = Polygon([(20.004, 0), (30, 0), (30, 10.006), (20.004, 10.006)])
    recs = prepare_cells([CellRecord(plain, "a", (1, 2, 3)), CellRecord(slit, "a", (1, 2, 3))], "s")
    for rec, src in zip(recs, (plain, slit), strict=True):
        wkb = shapely.from_wkb(rec.wkb)
        geo = shapely.geometry.shape(json.loads(rec.feature)["geometry"])
        assert wkb.is_valid and geo.is_valid and geo.equals(wkb)
        assert shapely.is_ccw(geo.exterior)  # RFC 7946 (GEOS snaps it clockwise)
        assert abs(geo.area - src.area) < 0.2  # rounding moves each edge by <= 0.005 px
    assert shapely.get_coordinates(shapely.from_wkb(recs[0].wkb)).tolist()[0] == [20.0, 0.0]
    assert recs[0] == prepare_cell(CellRecord(plain, "a", (1, 2, 3)), "s")
    # a clockwise cell (what a seam trim gives) is written counter-clockwise, with the same id
    cw = prepare_cell(CellRecord(plain.reverse(), "a", (1, 2, 3)), "s")
    assert cw.wkb == recs[0].wkb and cw.id == recs[0].id
    # a cell thinner than the grid everywhere is no cell: refused, not written invalid
    with pytest.raises(ValueError, match="no valid polygon at 2 decimals"):
        prepare_cell(
            CellRecord(Polygon([(0, 0), (10, 0), (10, 0.001), (0, 0.002)]), "a", (1, 2, 3)), "s"
        )


def test_blocks_write_the_same_files_as_their_cells(tmp_path, cells):
    """The pipeline's workers pack a tile's final cells into one block (pack_cells); blocks mixed
    with single cells must give the very bytes of writing every cell one by one, across row groups,
    and the overlay the very image."""
    few = [*cells[:150], CellRecord(box(50, 50, 50.5, 50.5), "tumour", COLORS["tumour"])]
    thumb = np.full((H // 8, W // 8, 3), 235, np.uint8)
    prepared = [prepare_cell(c, "a.svs", overlay_scale=8.0) for c in few]
    # blocks of uneven sizes, with single cells between them (as seam cells are)
    items = [pack_cells(prepared[:40]), *prepared[40:45], pack_cells(prepared[45:46])]
    items += [pack_cells(prepared[46:120]), *prepared[120:], pack_cells(prepared[-1:])]
    for name, how in (("single", prepared + prepared[-1:]), ("blocks", items)):
        (tmp_path / name).mkdir()
        ov = OverlayRenderer(thumb, 8.0)
        with (
            GeoJSONWriter(tmp_path / name / "cells.geojson", slide_key="a.svs") as gj,
            GeoParquetWriter(
                tmp_path / name / "cells.parquet", slide_key="a.svs", row_group_size=64
            ) as gp,
        ):
            for item in how:
                if isinstance(item, PreparedCell):
                    gj.write(item), gp.write(item), ov.add_outline(item.outline, item.color)
                else:
                    assert gj.write_block(item) == gp.write_block(item) == len(item)
                    ov.add_block(item)
        ov.save(tmp_path / name / "overlay.png")
    for f in ("cells.geojson", "cells.parquet", "overlay.png"):
        assert (tmp_path / "single" / f).read_bytes() == (tmp_path / "blocks" / f).read_bytes()
    data = json.loads((tmp_path / "blocks" / "cells.geojson").read_text())
    assert len(data["features"]) == len(few) + 1
    table = pq.read_table(tmp_path / "blocks" / "cells.parquet")
    assert table.num_rows == len(few) + 1
    assert table.column("Area µm^2").null_count == 2  # the tiny cell had no measurements
    assert pq.ParquetFile(tmp_path / "blocks" / "cells.parquet").metadata.num_row_groups == 3
    block = pack_cells(prepared[:40])
    assert sum(n for _, n in block.classes.values()) == 40
    # a block encoded for another slide carries the wrong ids: refused
    with GeoJSONWriter(tmp_path / "other.geojson", slide_key="b.svs") as w:
        with pytest.raises(ValueError, match="slide key"):
            w.write_block(block)
    # a measurement the Parquet file has no column for is refused, not lost
    with GeoParquetWriter(tmp_path / "m.parquet", measurement_names=["Area µm^2"]) as w:
        with pytest.raises(ValueError, match="not columns"):
            w.write_block(pack_cells([prepare_cell(few[0], "")]))


def test_integral_coordinates_are_written_as_integers(tmp_path):
    p = tmp_path / "c.geojson"
    with GeoJSONWriter(p) as w:
        w.write(CellRecord(box(5, 3, 6, 4), "a", (1, 2, 3), {"x": 1.0}))
        w.write(CellRecord(box(0.123456, 0, 1, 1.5), "a", (1, 2, 3)))
    text = p.read_text()
    assert "[[[6,3],[6,4],[5,4],[5,3],[6,3]]]" in text
    assert "0.12," in text and "0.123456" not in text
    assert load_geojson(p)["features"][1]["properties"]["measurements"] == {}


def test_empty_outputs_are_valid(tmp_path):
    with GeoJSONWriter(tmp_path / "c.geojson") as w, GeoParquetWriter(tmp_path / "c.parquet") as g:
        assert w.count == g.count == 0
    fc = load_geojson(tmp_path / "c.geojson")
    assert fc == {"type": "FeatureCollection", "features": []}
    assert len(gpd.read_parquet(tmp_path / "c.parquet")) == 0


def test_geojson_streams_and_is_not_valid_json_when_interrupted(tmp_path, cells):
    p = tmp_path / "c.geojson"
    with pytest.raises(RuntimeError), GeoJSONWriter(p) as w:
        for _ in range(12):
            w.write_many(cells)  # > 2000 features: flushed to disk before the end
        assert p.stat().st_size > 100_000
        raise RuntimeError("crash")
    with pytest.raises(json.JSONDecodeError):
        json.loads(p.read_text())


def test_writers_reject_bad_cells(tmp_path):
    with GeoJSONWriter(tmp_path / "c.geojson") as w:
        w.write(CellRecord(box(0, 0, 1, 1), "a", (1, 2, 3)))
        with pytest.raises(ValueError, match="two colours"):
            w.write(CellRecord(box(0, 0, 1, 1), "a", (1, 2, 4)))
        with pytest.raises(ValueError, match="colour"):
            w.write(CellRecord(box(0, 0, 1, 1), "b", (1, 2, 300)))
        with pytest.raises(ValueError, match="Polygon"):
            w.write(CellRecord(box(0, 0, 1, 1).union(box(3, 3, 4, 4)), "a", (1, 2, 3)))


def test_parquet_measurement_columns(tmp_path):
    p = tmp_path / "c.parquet"
    with GeoParquetWriter(p, measurement_names=["a", "b"]) as w:
        w.write(CellRecord(box(0, 0, 1, 1), "x", (1, 2, 3), {"a": 1.0}))
        w.write(CellRecord(box(2, 0, 3, 1), "x", (1, 2, 3), {"a": 2.0, "b": math.inf}))
        with pytest.raises(ValueError, match="not columns"):
            w.write(CellRecord(box(4, 0, 5, 1), "x", (1, 2, 3), {"c": 1.0}))
    df = gpd.read_parquet(p)
    assert list(df.columns) == ["id", "class", "a", "b", "geometry"]
    assert df["a"].tolist() == [1.0, 2.0] and df["b"].isna().all()


def test_write_summary_rejects_bad_content(tmp_path, cells):
    good = summary_for(cells)
    # numpy scalars, tuples and paths are fine
    good["cells_total"] = np.int64(good["cells_total"])
    good["class_counts"]["tumour"]["color"] = (200, 30, 30)
    good["slide"]["path"] = Path("/data/synthetic.svs")
    write_summary(tmp_path / "s.json", good)
    assert json.loads((tmp_path / "s.json").read_text())["slide"]["path"] == "/data/synthetic.svs"
    bad_cases = [
        ({k: v for k, v in good.items() if k != "tissue_area_mm2"}, "tissue_area_mm2"),
        ({**good, "cells_total": len(cells) + 1}, "add up"),
        ({**good, "created": "yesterday"}, "created"),
        ({**good, "surprise": 1}, "surprise"),
        ({**good, "config": {**good["config"], "target_mpp": -1}}, "config"),
        ({**good, "timings_s": {"x": -1.0}}, "timings_s"),
        ({**good, "timings_s": {"x": math.nan}}, "JSON compliant"),
        ({**good, "config": object()}, "not JSON serialisable"),
    ]
    for bad, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            write_summary(tmp_path / "bad.json", bad)
    assert not (tmp_path / "bad.json").exists()


def test_config_schema_file_matches_runconfig():
    committed = json.loads((ROOT / "schemas" / "config.schema.json").read_text())
    assert committed == config_json_schema(), (
        "schemas/config.schema.json is stale; regenerate with "
        "python -c 'from wsi_psm.summary import write_config_schema; write_config_schema()'"
    )
    jsonschema.Draft202012Validator.check_schema(committed)
    jsonschema.validate(RunConfig().to_dict(), committed)
    for name in ("cells", "summary"):
        jsonschema.Draft202012Validator.check_schema(load_schema(name))


def test_overlay_is_capped_and_draws_class_colours(tmp_path):
    thumb = np.full((1000, 5000, 3), 255, np.uint8)  # scale 4 -> level-0 20000 x 4000
    cells = (
        CellRecord(box(x, 1000, x + 400, 1400), "t", (255, 0, 0)) for x in range(0, 20000, 1000)
    )
    out = render_overlay(thumb, cells, 4.0, tmp_path / "overlay.png")
    img = np.asarray(Image.open(out))
    assert img.shape == (410, 2048, 3)  # 5000 x 1000 shrunk to 2048 on the long side
    s = 2048 / 20000  # thumbnail px per level-0 px
    inside = img[round(1200 * s), round(200 * s)]
    outside = img[round(1200 * s), round(700 * s)]
    assert inside[0] > 200 and inside[1] < 200 and tuple(outside) == (255, 255, 255)
    # (polygon, colour) pairs work too, and tiny cells still leave a mark
    out = render_overlay(thumb, [(box(40, 40, 41, 41), (0, 0, 255))], 4.0, tmp_path / "o2.png")
    assert tuple(np.asarray(Image.open(out))[4, 4]) == (0, 0, 255)


def test_overlay_from_worker_outlines_matches_drawing_polygons():
    """The pipeline's workers send ready-made outlines (prepare_cell with overlay_scale); drawing
    them must give the very image that drawing the polygons gives, dots for tiny cells included."""
    thumb = np.full((300, 400, 3), 230, np.uint8)
    cells = [*synthetic_cells(8), CellRecord(box(50, 50, 52, 52), "tumour", COLORS["tumour"])]
    a, b = OverlayRenderer(thumb, 4.0), OverlayRenderer(thumb, 4.0)
    for c in cells:
        a.add(c.polygon, c.color)
        rec = prepare_cell(c, "s", overlay_scale=b.scale)
        assert rec.outline is not None
        b.add_outline(rec.outline, rec.color)
    assert a.count == b.count == len(cells)
    assert np.array_equal(np.asarray(a.to_image()), np.asarray(b.to_image()))
    assert np.asarray(a.to_image()).std() > 0  # something was drawn
    assert prepare_cell(cells[0], "s").outline is None  # no scale, no outline


# ---------------------------------------------------------------------------- OutputFolder


def siblings(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir())


def test_exception_inside_leaves_nothing(tmp_path):
    final = tmp_path / "slide"
    with pytest.raises(KeyError), OutputFolder(final) as folder:
        (folder / "cells.geojson").write_text("{")
        raise KeyError("boom")
    assert siblings(final) == []


def test_existing_output_raises_at_entry_and_is_untouched(tmp_path):
    final = tmp_path / "slide"
    final.mkdir()
    (final / "summary.json").write_text("old")
    ran = False
    with pytest.raises(OutputExistsError, match="overwrite"), OutputFolder(final):
        ran = True
    assert not ran
    assert (final / "summary.json").read_text() == "old" and siblings(final) == ["slide"]


def test_overwrite_replaces_and_failure_keeps_old(tmp_path):
    final = tmp_path / "slide"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), OutputFolder(final, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        raise RuntimeError
    assert [p.name for p in final.iterdir()] == ["old.txt"] and siblings(final) == ["slide"]
    with OutputFolder(final, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and siblings(final) == ["slide"]


def test_new_parent_folders_are_created(tmp_path):
    final = tmp_path / "a" / "b" / "slide"
    with OutputFolder(final) as folder:
        (folder / "x").write_text("1")
    assert (final / "x").read_text() == "1"


def test_a_failure_removes_the_parent_folders_it_made(tmp_path):
    (tmp_path / "a").mkdir()
    final = tmp_path / "a" / "b" / "c" / "slide"
    with pytest.raises(KeyError), OutputFolder(final) as folder:
        (folder / "x").write_text("1")
        raise KeyError("stopped")
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and list((tmp_path / "a").iterdir()) == []


def test_full_disk_inside_becomes_one_line_write_error(tmp_path):
    final = tmp_path / "slide"
    with pytest.raises(OutputWriteError) as info, OutputFolder(final):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write() reports
    msg = str(info.value)
    assert str(final) in msg and "No space left" in msg and "\n" not in msg
    assert siblings(final) == []


def test_unrelated_oserror_passes_through(tmp_path):
    with pytest.raises(FileNotFoundError), OutputFolder(tmp_path / "slide"):
        open(tmp_path / "elsewhere" / "missing.svs")
    assert siblings(tmp_path / "slide") == []


def test_read_only_rename_becomes_write_error_and_keeps_old(tmp_path, monkeypatch):
    final = tmp_path / "slide"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if ".slide.tmp-" in str(src):  # moving the old output aside works, the new one in fails
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputWriteError, match="Read-only"), OutputFolder(final, True) as folder:
        (folder / "new.txt").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in final.iterdir()] == ["old.txt"] and siblings(final) == ["slide"]


def test_read_only_parent_at_entry(tmp_path, monkeypatch):
    def mkdir(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OutputWriteError, match="Read-only"), OutputFolder(tmp_path / "x" / "s"):
        pass


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_read_only_parent_directory(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match="ro"), OutputFolder(parent / "slide"):
            pass
    finally:
        parent.chmod(0o755)
