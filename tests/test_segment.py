"""``segment``: plain images in, ``<stem>.geojson`` + ``<stem>_labels.tif`` out, at the input's pixels."""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections import Counter

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from test_segmenter import synthetic_tile

from wsi_psm.config import RunConfig
from wsi_psm.errors import MissingMppError, ModelError, OutputExistsError
from wsi_psm.evaluation import rasterise_features
from wsi_psm.networks import (
    DEFAULT_MODEL,
    few_images_note,
    load_segmenter,
    model_mpp,
    resolve_model,
    shipped_matches,
)
from wsi_psm.pipeline import ShapeOnly
from wsi_psm.segment import SegmentInputError, model_classes, output_paths, segment_images
from wsi_psm.segmenter.network import SegNet, save_segmenter
from wsi_psm.segmenter.train import fit_segmenter, sample_from_labels
from wsi_psm.summary import load_schema

CFG = RunConfig().with_updates(**{"segmenter.tta": False, "device": "cpu"})


@pytest.fixture(scope="module")
def trained_net() -> SegNet:
    """A tiny net that has learnt the synthetic discs (a few seconds)."""
    torch.set_num_threads(1)
    img, labels = synthetic_tile(96)
    return fit_segmenter(
        [sample_from_labels(img, labels)], width=4, depth=2, steps=60, batch=4, crop=48, lr=5e-3,
        colour=0.2, seed=0,
    )  # fmt: skip


def write_png(path, rgb) -> None:
    Image.fromarray(rgb).save(path)


def test_outputs_at_input_resolution(tmp_path, trained_net) -> None:
    img, _ = synthetic_tile(96)
    # the input at 0.25 µm/px (twice the processing resolution): outputs must come back at 192 px
    big = np.kron(img, np.ones((2, 2, 1), np.uint8))
    src = tmp_path / "tile.png"
    write_png(src, big)
    out = tmp_path / "out"
    written = segment_images([src], out, CFG, model=trained_net, mpp=0.25)
    geo, tif = output_paths(src, out)
    assert written == [geo, tif]
    lab = tifffile.imread(tif)
    assert lab.shape == (192, 192) and lab.dtype == np.int32
    assert lab.max() >= 3  # the synthetic discs are found
    data = json.loads(geo.read_text())
    import jsonschema

    jsonschema.validate(data, load_schema("cells"))
    feats = data["features"]
    assert len(feats) == len(np.unique(lab)) - 1
    assert {f["properties"]["classification"]["name"] for f in feats} == {"Nucleus"}
    # polygons are in input pixels and rasterise back to exactly the label image's foreground
    back = rasterise_features(feats, lab.shape)
    np.testing.assert_array_equal(back > 0, lab > 0)
    # nothing left behind under a temporary name
    assert sorted(p.name for p in out.iterdir()) == [
        "summary.csv",
        "tile.geojson",
        "tile_labels.tif",
    ]
    # the table's row: the image's cells, its area at its own resolution (192 px at 0.25 µm/px)
    with (out / "summary.csv").open() as fh:
        (row,) = csv.DictReader(fh)
    assert row["name"] == "tile" and row["stain"] in ("he", "ihc-dab")
    assert int(row["cells"]) == int(row["Nucleus"]) == len(feats)
    assert float(row["area_mm2"]) == pytest.approx((192 * 0.25e-3) ** 2)
    assert row["positive_index"] == ""  # no IHC classes


def test_processing_resolution_instances(tmp_path, trained_net) -> None:
    img, _ = synthetic_tile(96)
    src = tmp_path / "a.png"
    write_png(src, np.kron(img, np.ones((2, 2, 1), np.uint8)))
    cfg = CFG.with_updates(**{"segmenter.native_instances": False})
    segment_images([src], tmp_path / "o", cfg, model=trained_net, mpp=0.25)
    lab = tifffile.imread(tmp_path / "o" / "a_labels.tif")
    assert lab.shape == (192, 192) and lab.max() >= 3


def test_large_image_goes_in_windows(tmp_path, trained_net) -> None:
    img = np.concatenate([np.concatenate([synthetic_tile(96, s)[0] for s in (0, 1, 2)], 1)] * 2, 0)
    src = tmp_path / "wide.png"
    write_png(src, img)
    cfg = CFG.with_updates(**{"segmenter.window_px": 128, "target_mpp": 0.5})
    segment_images([src], tmp_path / "o", cfg, model=trained_net, mpp=0.5)
    lab = tifffile.imread(tmp_path / "o" / "wide_labels.tif")
    assert lab.shape == img.shape[:2] and lab.max() >= 15


def test_refuses_to_overwrite(tmp_path, trained_net) -> None:
    img, _ = synthetic_tile(64)
    src = tmp_path / "x.png"
    write_png(src, img)
    out = tmp_path / "o"
    segment_images([src], out, CFG, model=trained_net, mpp=0.5)
    before = (out / "x_labels.tif").read_bytes()
    with pytest.raises(OutputExistsError):
        segment_images([src], out, CFG, model=trained_net, mpp=0.5)
    assert (out / "x_labels.tif").read_bytes() == before
    segment_images([src], out, CFG, model=trained_net, mpp=0.5, overwrite=True)


def test_skip_existing_goes_on_where_a_stopped_run_ended(tmp_path, trained_net) -> None:
    """A run stopped after image a, and inside image b (its labels written, its GeoJSON not):
    --skip-existing leaves a as it is and writes b, the same bytes one whole run writes."""
    srcs = []
    for i, name in enumerate("abc"):
        srcs.append(tmp_path / f"{name}.png")
        write_png(srcs[-1], synthetic_tile(64, i)[0])
    whole = tmp_path / "whole"
    segment_images(srcs, whole, CFG, model=trained_net, mpp=0.5)
    out = tmp_path / "o"
    segment_images(srcs, out, CFG, model=trained_net, mpp=0.5)
    for name in ("b.geojson", "c.geojson", "c_labels.tif"):  # what the stopped run had not written
        (out / name).unlink()
    a_time = (out / "a.geojson").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--skip-existing"):
        segment_images(srcs, out, CFG, model=trained_net, mpp=0.5)
    written = segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, skip_existing=True)
    assert sorted(p.name for p in written) == [
        "b.geojson",
        "b_labels.tif",
        "c.geojson",
        "c_labels.tif",
    ]
    assert (out / "a.geojson").stat().st_mtime_ns == a_time
    for f in sorted(whole.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, skip_existing=True) == []


def test_summary_table_across_reruns(tmp_path, trained_net) -> None:
    """The table follows the outputs: rebuilt from them when deleted (no segmenting), a row per
    output stem (x.tif then x.png into one folder: one row), and a damaged output of a skipped
    image stops the call before anything is written."""
    srcs = []
    for i, name in enumerate(("2", "10", "x")):
        srcs.append(tmp_path / f"{name}.png")
        write_png(srcs[-1], synthetic_tile(64, i)[0])
    out = tmp_path / "o"
    segment_images(srcs, out, CFG, model=trained_net, mpp=0.5)
    table = (out / "summary.csv").read_bytes()
    with (out / "summary.csv").open() as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["2", "10", "x"]  # natural order
    (out / "summary.csv").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, skip_existing=True) == []
    assert (out / "summary.csv").read_bytes() == table
    assert all(p.stat().st_mtime_ns == t for p, t in ((out / n, t) for n, t in mtimes.items()))
    # the same stem from another file replaces the row, as it replaces the outputs
    tif = tmp_path / "x.tif"
    tifffile.imwrite(tif, synthetic_tile(64, 7)[0])
    segment_images([tif], out, CFG, model=trained_net, mpp=0.5, overwrite=True)
    with (out / "summary.csv").open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    n_x = len(json.loads((out / "x.geojson").read_text())["features"])
    assert sorted(rows) == ["10", "2", "x"] and int(rows["x"]["cells"]) == n_x
    # a damaged GeoJSON of a skipped image that the table lacks: refused before any writing
    (out / "summary.csv").unlink()
    (out / "10.geojson").write_text('{"type": "FeatureCollection", "featu')
    (out / "2.geojson").unlink()
    with pytest.raises(OutputExistsError, match=r"10\.geojson.*--skip-existing"):
        segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, skip_existing=True)
    assert not (out / "2.geojson").exists() and not (out / "summary.csv").exists()


def test_temporary_files_of_a_killed_call_are_removed(tmp_path, trained_net) -> None:
    """A call killed outright leaves an image's temporary files; the next call that writes that
    image (here --skip-existing, after the pair was lost) removes them; a live call's stay."""
    import subprocess
    import sys

    from wsi_psm.atomic import host_tag

    src = tmp_path / "x.png"
    write_png(src, synthetic_tile(64, 0)[0])
    out = tmp_path / "o"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = out / f".x.geojson.tmp-0123456789ab-{gone.pid}@{host_tag()}"
    alive = out / f".x_labels.tif.tmp-0123456789ab-{os.getpid()}@{host_tag()}"
    dead.write_text('{"type": "Feat')
    alive.write_bytes(b"II*")
    segment_images([src], out, CFG, model=trained_net, mpp=0.5, skip_existing=True)
    assert not dead.exists() and alive.exists()
    assert all(p.exists() for p in output_paths(src, out))


class _TwoGroups(ShapeOnly):
    """A fitted class model with two groups, every cell in the first (the second is empty)."""

    classes = (("Small nucleus", (0, 128, 255)), ("Large nucleus", (255, 0, 0)))

    def annotate(self, image, labels, cands, mpp_l0) -> None:
        super().annotate(image, labels, cands, mpp_l0)
        for c in cands:
            c.payload = (*self.classes[0], c.payload[2])


def test_skipped_rows_count_empty_classes_as_zero(tmp_path, trained_net) -> None:
    """A skipped image's row, rebuilt from its GeoJSON (which names only the classes present),
    counts the call's empty class as 0, as the call that segmented it did, not blank."""
    srcs = []
    for i, name in enumerate("ab"):
        srcs.append(tmp_path / f"{name}.png")
        write_png(srcs[-1], synthetic_tile(64, i)[0])
    out = tmp_path / "o"
    segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, annotator=_TwoGroups())
    table = (out / "summary.csv").read_text()
    with (out / "summary.csv").open() as fh:
        assert {r["Large nucleus"] for r in csv.DictReader(fh)} == {"0"}
    (out / "summary.csv").unlink()
    for f in output_paths(srcs[0], out):  # a redone, b skipped
        f.unlink()
    segment_images(
        srcs, out, CFG, model=trained_net, mpp=0.5, annotator=_TwoGroups(), skip_existing=True
    )
    assert (out / "summary.csv").read_text() == table


def test_summary_table_refusals_and_mixed_stains(tmp_path, trained_net, monkeypatch) -> None:
    """Someone else's summary.csv stops the call before any output; with two stains, a damaged
    output of the second group stops the call before the first group is segmented; an output
    whose cells lost their class (edited in QuPath) is counted as Unclassified."""
    import wsi_psm.segment

    srcs = []
    for i, name in enumerate("ab"):
        srcs.append(tmp_path / f"{name}.png")
        write_png(srcs[-1], synthetic_tile(64, i)[0])
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.csv").write_text("patient,score\nP1,3\n")
    with pytest.raises(OutputExistsError, match="not a wsi-psm cell-count table"):
        segment_images(srcs, out, CFG, model=trained_net, mpp=0.5)
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]
    (out / "summary.csv").unlink()
    stain_of = {srcs[0]: "he", srcs[1]: "ihc-dab"}

    def two_stains(paths, *a, **k):
        groups: dict[str, list] = {}
        for p in paths:
            groups.setdefault(stain_of[p], []).append(p)
        return groups

    monkeypatch.setattr(wsi_psm.segment, "check_inputs", two_stains)
    segment_images(srcs, out, CFG, model=trained_net, mpp=0.5)
    (out / "summary.csv").unlink()
    (out / "a.geojson").unlink()
    (out / "b.geojson").write_text("[")
    with pytest.raises(OutputExistsError, match=r"b\.geojson"):
        segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, skip_existing=True)
    assert not (out / "a.geojson").exists()
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
              "properties": {"objectType": "detection"}}]  # fmt: skip
    (out / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    segment_images(srcs, out, CFG, model=trained_net, mpp=0.5, skip_existing=True)
    with (out / "summary.csv").open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["b"]["Unclassified"] == "1" and rows["b"]["stain"] == "ihc-dab"


def test_a_write_that_fails_says_what_was_kept(tmp_path, trained_net, monkeypatch) -> None:
    """A disk that fills up at the first image leaves no output folder; at the second, the first
    image's outputs stay and the one line says so, and how to go on."""
    import errno

    import wsi_psm.segment
    from wsi_psm.errors import OutputWriteError

    srcs = []
    for i in range(2):
        srcs.append(tmp_path / f"{i}.png")
        write_png(srcs[-1], synthetic_tile(64, i)[0])
    real, calls = wsi_psm.segment._write_outputs, []

    def full_at(k):
        def write(*args):
            calls.append(1)
            if len(calls) == k:
                raise OutputWriteError(f"cannot write out: {os.strerror(errno.ENOSPC)}")
            return real(*args)

        return write

    monkeypatch.setattr(wsi_psm.segment, "_write_outputs", full_at(1))
    with pytest.raises(OutputWriteError) as info:
        segment_images(srcs, tmp_path / "new" / "o", CFG, model=trained_net, mpp=0.5)
    assert "written before" not in str(info.value) and not (tmp_path / "new").exists()
    calls.clear()
    monkeypatch.setattr(wsi_psm.segment, "_write_outputs", full_at(2))
    with pytest.raises(OutputWriteError, match="1 of 2 images were written before it"):
        segment_images(srcs, tmp_path / "o", CFG, model=trained_net, mpp=0.5)
    # the table records the image that was finished, as its outputs stand
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == ["0.geojson", "0_labels.tif", "summary.csv"]
    with (out / "summary.csv").open() as fh:
        (row,) = csv.DictReader(fh)
    assert row["name"] == "0"
    assert int(row["cells"]) == len(json.loads((out / "0.geojson").read_text())["features"])


def test_bad_inputs(tmp_path, trained_net) -> None:
    img, _ = synthetic_tile(64)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_png(tmp_path / "a" / "same.png", img)
    write_png(tmp_path / "b" / "same.png", img)
    with pytest.raises(SegmentInputError):
        segment_images([tmp_path / "a" / "same.png", tmp_path / "b" / "same.png"], tmp_path / "o", CFG,
                       model=trained_net, mpp=0.5)  # fmt: skip
    with pytest.raises(SegmentInputError):
        segment_images([], tmp_path / "o", CFG, model=trained_net)
    with pytest.raises(MissingMppError):  # a PNG has no resolution and none was given
        segment_images([tmp_path / "a" / "same.png"], tmp_path / "o", CFG, model=trained_net)
    assert not (tmp_path / "o" / "same_labels.tif").exists()


def test_model_files(tmp_path, trained_net) -> None:
    path = save_segmenter(tmp_path / "m.pt", trained_net)
    assert isinstance(load_segmenter(path), SegNet)
    assert isinstance(
        resolve_model(str(path), paths=[], cfg=CFG, mpp=None, device=torch.device("cpu")), SegNet
    )
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_segmenter(junk)
    with pytest.raises(ModelError):
        load_segmenter(tmp_path / "missing.pt")


def test_model_file_runs_at_its_training_resolution(tmp_path, trained_net, monkeypatch) -> None:
    """A model file recording 0.25 µm/px is applied at 0.25 µm/px, whatever the config says."""
    import wsi_psm.segment as seg

    path = save_segmenter(tmp_path / "m025.pt", trained_net, target_mpp=0.25)
    assert model_mpp(path) == 0.25 and model_mpp(trained_net) is None
    seen = []
    real = seg.segment_array
    monkeypatch.setattr(
        seg,
        "segment_array",
        lambda native, proc, *a, **kw: seen.append(proc.shape) or real(native, proc, *a, **kw),
    )
    img, _ = synthetic_tile(96)
    src = tmp_path / "t.png"
    write_png(src, img)
    segment_images([src], tmp_path / "o", CFG, model=path, mpp=0.25)  # CFG processes at 0.5
    assert seen and all(s[:2] == (96, 96) for s in seen)  # not 48 x 48


def test_inputs_are_judged_at_the_resolution_the_model_runs_at(tmp_path, trained_net) -> None:
    """A model file trained at 1 µm/px runs there: a 2.5 µm/px image is enlarged 2.5x, not the 5x
    of the config's 0.5 (it was refused); one trained at 0.25 refuses 1.5 µm/px (6x, passed)."""
    from wsi_psm.errors import UnsupportedSlideError

    img, _ = synthetic_tile(96)
    src = tmp_path / "t.png"
    write_png(src, img)
    coarse = save_segmenter(tmp_path / "m1.pt", trained_net, target_mpp=1.0)
    segment_images([src], tmp_path / "o", CFG, model=coarse, mpp=2.5)
    assert output_paths(src, tmp_path / "o")[1].is_file()
    fine = save_segmenter(tmp_path / "m025.pt", trained_net, target_mpp=0.25)
    with pytest.raises(
        UnsupportedSlideError, match=r"processing at 0.25 µm/px would enlarge it 6x"
    ):
        segment_images([src], tmp_path / "o2", CFG, model=fine, mpp=1.5)
    assert not (tmp_path / "o2").exists()


def _disc_maps(shape: tuple[int, int], centres: list[tuple[int, int]], r: float) -> np.ndarray:
    """Network-like maps: foreground discs and their normalised distance."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fg = np.zeros(shape, np.float32)
    dist = np.zeros(shape, np.float32)
    for cy, cx in centres:
        d = 1 - np.hypot(yy - cy, xx - cx) / r
        fg[d > 0] = 1
        dist = np.maximum(dist, np.clip(d, 0, 1))
    return np.stack([fg, dist])


@pytest.mark.parametrize(("pieces", "zoomed_kept"), [(2, True), (4, False)])
def test_zoom_check_keeps_the_magnified_result_only_for_the_same_nuclei(
    monkeypatch, pieces, zoomed_kept
) -> None:
    """1x: one merged object. 2x: two nuclei (the same tissue, resolved: kept) or four pieces per
    object found at 1x (the net cutting nuclei too large for it: the 1x result is kept)."""
    import wsi_psm.segment as seg

    def fake_maps(net, rgb, device, **kw):
        h, w = rgb.shape[:2]
        if h == 64:  # the processing-resolution image
            return _disc_maps((h, w), [(32, 32)], 12)
        centres = [(64, 44), (64, 84)] if pieces == 2 else [(44, 44), (44, 84), (84, 44), (84, 84)]
        return _disc_maps((h, w), centres, 17)

    monkeypatch.setattr(seg, "predict_maps", fake_maps)
    native = np.zeros((128, 128, 3), np.uint8)  # at 0.25 µm/px: the 2x image is native itself
    proc = np.zeros((64, 64, 3), np.uint8)
    lab = seg.segment_array(native, proc, 0.25, None, torch.device("cpu"), CFG, zoom_check=True)
    assert lab.shape == (128, 128)
    assert lab.max() == (pieces if zoomed_kept else 1)
    assert seg.segment_array(native, proc, 0.25, None, torch.device("cpu"), CFG).max() == 1


def test_at_mpp_resamples_by_the_mpp_ratio() -> None:
    from wsi_psm.segment import _at_mpp

    img = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
    assert _at_mpp(img, 0.25, 0.25) is img
    up = _at_mpp(img, 0.5, 0.25)
    assert up.shape == (80, 120, 3) and up.dtype == np.uint8
    assert _at_mpp(img, 0.25, 0.5).shape == (20, 30, 3)
    # a read-only array (np.asarray of a PIL image) is resampled without torch's warning
    img.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(_at_mpp(img, 0.5, 0.25), up)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no default model shipped in this checkout")
def test_shipped_model_serves_only_its_resolution() -> None:
    assert shipped_matches(CFG)
    assert not shipped_matches(CFG.with_updates(target_mpp=0.25))  # `segment` fits a network then


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no default model shipped in this checkout")
def test_default_model_on_a_monuseg_crop(tmp_path, monuseg_dir) -> None:
    """The shipped model finds nuclei on a real H&E crop it was not trained on (a 13-XML image)."""
    from wsi_psm.groundtruth import load_monuseg_labels, monuseg_cases
    from wsi_psm.metrics import segmentation_scores

    case = next(c for c in monuseg_cases(monuseg_dir) if c.has_xml)
    rgb = tifffile.imread(case.image)[:256, :256, :3]
    src = tmp_path / f"{case.stem}.png"
    write_png(src, np.ascontiguousarray(rgb))
    segment_images([src], tmp_path / "o", RunConfig().with_updates(device="cpu"), mpp=0.25)
    lab = tifffile.imread(tmp_path / "o" / f"{case.stem}_labels.tif")
    gt = load_monuseg_labels(case)[:256, :256]
    scores = segmentation_scores(lab, gt)
    assert scores["pixel_f1"] > 0.6 and scores["aji"] > 0.3


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no default model shipped in this checkout")
def test_the_shipped_file_as_model_gives_the_default_route(tmp_path, monuseg_dir) -> None:
    """The shipped network's file given as ``segment --model`` (as a retrained one from
    train_default_model.py would be) is the default route, magnification check included."""
    import shutil

    from wsi_psm.cli.main import main

    from wsi_psm.groundtruth import monuseg_cases

    case = next(c for c in monuseg_cases(monuseg_dir) if c.has_xml)
    src = tmp_path / "crop.png"
    write_png(src, np.ascontiguousarray(tifffile.imread(case.image)[:192, :192, :3]))
    copy = shutil.copy(DEFAULT_MODEL, tmp_path / "retrained.pt")
    outs = {}
    for name, extra in (("default", []), ("model", ["--model", str(copy)])):
        argv = ["segment", str(src), "-o", str(tmp_path / name), "--mpp", "0.25", "-q", *extra]
        with pytest.raises(SystemExit) as ex:
            main(argv)
        assert ex.value.code == 0
        outs[name] = tifffile.imread(tmp_path / name / "crop_labels.tif")
    assert outs["default"].max() > 10
    np.testing.assert_array_equal(outs["model"], outs["default"])


def test_fit_on_the_given_images(tmp_path, caplog, monkeypatch) -> None:
    """segmenter.default_model = "fit": the whole label-free chain on the inputs (tiny settings)."""
    torch.set_num_threads(1)
    srcs = []
    for s in range(2):
        img = np.concatenate([synthetic_tile(96, s)[0], synthetic_tile(96, s + 5)[0]], 1)
        srcs.append(tmp_path / f"img{s}.png")
        write_png(srcs[-1], img)
    cfg = CFG.with_updates(
        **{"segmenter.default_model": "fit", "segmenter.width": 4, "segmenter.depth": 2,
           "segmenter.fit_steps": 4, "segmenter.fit_batch": 2, "segmenter.fit_crop_px": 48,
           "psm.fit_steps": 2, "psm.fit_batch": 2, "psm.width": 4, "cluster.sample_pixels": 2000}
    )  # fmt: skip
    saved = tmp_path / "fitted.pt"
    written = segment_images(srcs, tmp_path / "o", cfg, mpp=0.5, save_model=saved)
    assert len(written) == 4 and all(p.is_file() for p in written)
    first = tifffile.imread(tmp_path / "o" / "img0_labels.tif")
    assert first.shape == (96, 192)
    # the fitted network, saved, segments the same images the same way without a fit
    # a call stopped after the network fit and before the classes leaves no model file
    import wsi_psm.segment
    from wsi_psm.model import ModelBundle

    def stop(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(wsi_psm.segment, "fit_image_classes", stop)
        with pytest.raises(KeyboardInterrupt):
            segment_images(srcs, tmp_path / "o5", cfg, mpp=0.5, save_model=tmp_path / "half.pt")
    assert not (tmp_path / "half.pt").exists()
    # --skip-existing with every image finished still fits and saves the model asked for
    resaved = tmp_path / "resaved.pt"
    assert segment_images(srcs, tmp_path / "o", cfg, mpp=0.5, save_model=resaved,
                          skip_existing=True) == []  # fmt: skip
    assert ModelBundle.load(resaved).component_meta["classes"]["stain"] == "he"
    bundle = ModelBundle.load(saved)
    notes: list[str] = []
    again = segment_images(srcs, tmp_path / "o2", cfg, mpp=0.5, model=bundle, notes=notes)
    assert notes == [f"cell classes from the model file: {model_classes(bundle, 'he').describe()}"]
    np.testing.assert_array_equal(tifffile.imread(again[1]), first)
    # ... and keeps the classes fitted with it: one image segmented alone later gets the very
    # cells, classes and measurements it got in the whole call (its threshold is not refitted)
    assert bundle.component_meta["classes"]["stain"] == "he"
    assert model_classes(bundle, "he") is not None and model_classes(bundle, "ihc-dab") is None
    alone = segment_images(srcs[1:], tmp_path / "o3", cfg, mpp=0.5, model=bundle)
    assert alone[0].read_bytes() == (tmp_path / "o" / "img1.geojson").read_bytes()
    # images of another stain than the model's: said in one line, as `run --model` says it
    with caplog.at_level("WARNING", logger="wsi_psm.segment"):
        ihc = cfg.with_updates(stain="ihc-dab")
        segment_images(srcs[:1], tmp_path / "o4", ihc, mpp=0.5, model=bundle)
    assert "look ihc-dab but the model was fitted on he tissue" in caplog.text


def test_save_model_is_refused_before_any_work_when_nothing_is_made(
    tmp_path, trained_net, monkeypatch
) -> None:
    import wsi_psm.segment
    from wsi_psm.errors import InvalidArgumentError

    monkeypatch.setattr(wsi_psm.segment, "resolve_labeller", lambda *a, **k: pytest.fail("work"))
    img, _ = synthetic_tile(64)
    write_png(tmp_path / "a.png", img)
    out = tmp_path / "o"
    with pytest.raises(InvalidArgumentError, match=r"no model is made here \(--model was given\)"):
        segment_images([tmp_path / "a.png"], out, CFG, model=trained_net, mpp=0.5,
                       save_model=tmp_path / "m.pt")  # fmt: skip
    none = CFG.with_updates(**{"segmenter.default_model": "none"})
    with pytest.raises(InvalidArgumentError, match="default_model is none"):
        segment_images([tmp_path / "a.png"], out, none, mpp=0.5, save_model=tmp_path / "m.pt")
    assert not out.exists() and not (tmp_path / "m.pt").exists()


def test_he_groups_kept_across_calls_with_the_shipped_network(tmp_path, monuseg_dir) -> None:
    """H&E tiles: --save-model keeps the shipped network with the groups fitted in the call, so a
    tile segmented later with --model gets the very cells and classes the whole call gave it."""
    from wsi_psm.model import ModelBundle

    img = np.asarray(
        Image.open(monuseg_dir / "images" / "TCGA-21-5784-01Z-00-DX1.tif").convert("RGB")
    )
    srcs = []
    for k, (r, c) in enumerate(((0, 0), (0, 500), (500, 0), (500, 500))):
        srcs.append(tmp_path / f"q{k}.png")
        write_png(srcs[-1], img[r : r + 500, c : c + 500])
    small_psm = CFG.with_updates(**{"psm.fit_steps": 4, "psm.fit_batch": 2})
    saved = tmp_path / "he.pt"
    segment_images(srcs, tmp_path / "all", small_psm, mpp=0.25, save_model=saved)
    bundle = ModelBundle.load(saved)
    assert bundle.provenance["segmenter"] == "shipped" and bundle.stain == "he"
    assert bundle.component_meta["classes"]["stain"] == "he"
    alone = segment_images(srcs[2:3], tmp_path / "one", CFG, mpp=0.25, model=bundle)
    assert alone[0].read_bytes() == (tmp_path / "all" / "q2.geojson").read_bytes()
    assert alone[1].read_bytes() == (tmp_path / "all" / "q2_labels.tif").read_bytes()


def test_a_fit_on_few_images_is_warned_about() -> None:
    # BCData's 26 tiles (640² at 0.25 µm/px) are enough; 3 of them, or one 1000² tile, are not
    assert few_images_note([(640, 640)] * 26, 0.25) is None
    assert few_images_note([(320, 320)] * 26, 0.5) is None  # (the same area, resampled)
    note = few_images_note([(320, 320)] * 3, 0.5)
    assert note is not None and "3 image(s), 0.077 mm²" in note
    assert "\n" not in note and "--save-model" in note
    assert few_images_note([(1000, 1000)], 0.25) is not None
    # many small tiles, of which the fit samples 64: the sample size is what to raise
    note = few_images_note([(100, 100)] * 64, 0.5, given=200)
    assert note is not None and "psm.fit_tiles" in note and "64 of the 200" in note


def test_ihc_tiles_get_positive_and_negative_cells(tmp_path, caplog) -> None:
    # the shipped default on IHC: a network fitted on the images (short schedule here), then the
    # label-free classes fitted on the images' cells
    from skimage import data

    src = tmp_path / "ihc.png"
    write_png(src, data.immunohistochemistry())  # a real DAB + haematoxylin field
    cfg = CFG.with_updates(
        **{"psm.fit_steps": 30, "segmenter.fit_steps": 40, "segmenter.refine_rounds": 0}
    )
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="wsi_psm.networks"):
        segment_images([src], out, cfg, mpp=0.5)
    assert "the network is fitted on 1 image(s)" in caplog.text  # (0.066 mm²)
    geo, tif = output_paths(src, out)
    feats = json.loads(geo.read_text())["features"]
    names = [f["properties"]["classification"]["name"] for f in feats]
    meas = [f["properties"]["measurements"] for f in feats]
    assert len(names) == tifffile.imread(tif).max() > 100
    assert set(names) == {"Positive", "Negative"}
    # the names follow the stain: Positive nuclei are the brown ones
    dab = {
        c: np.median(
            [m["Nucleus: DAB OD mean"] for n, m in zip(names, meas, strict=True) if n == c]
        )
        for c in ("Positive", "Negative")
    }
    assert dab["Positive"] > 2 * dab["Negative"]


def test_blank_tiles_beside_ihc_tiles_get_no_cells(tmp_path) -> None:
    """A glass-only tile among IHC ones (common when a slide is cut into tiles) is given an empty
    pseudo mask, not a clustering of no pixels (was: internal error, "no stained pixels"); glass
    alone is refused in one line, before anything is written."""
    from skimage import data

    from wsi_psm.errors import NoTissueError

    write_png(tmp_path / "ihc.png", data.immunohistochemistry())
    write_png(tmp_path / "white.png", np.full((256, 256, 3), 250, np.uint8))
    cfg = CFG.with_updates(
        stain="ihc-dab",
        **{"psm.fit_steps": 5, "segmenter.fit_steps": 5, "segmenter.refine_rounds": 0},
    )
    segment_images([tmp_path / "ihc.png", tmp_path / "white.png"], tmp_path / "out", cfg, mpp=0.5)
    ihc, white = (tifffile.imread(output_paths(tmp_path / n, tmp_path / "out")[1]) for n in
                  ("ihc.png", "white.png"))  # fmt: skip
    assert ihc.max() > 0 and white.max() == 0
    with pytest.raises(NoTissueError, match="no stained pixel"):
        segment_images([tmp_path / "white.png"], tmp_path / "alone", cfg, mpp=0.5)
    assert not (tmp_path / "alone").exists()


def test_no_network_route_fits_on_the_images(tmp_path) -> None:
    from skimage import data

    src = tmp_path / "ihc.png"
    write_png(src, data.immunohistochemistry())
    cfg = CFG.with_updates(**{"psm.fit_steps": 30, "segmenter.default_model": "none"})
    segment_images([src], tmp_path / "out", cfg, mpp=0.5)
    assert tifffile.imread(output_paths(src, tmp_path / "out")[1]).max() > 100


def test_images_without_nuclei_are_refused_before_the_network_fit(tmp_path, monkeypatch) -> None:
    """An image of one flat colour is taken for IHC (blue OD over green) and went through a
    four-minute fit of a network on empty pseudo masks; now it stops, in one line, once the
    pseudo masks show nothing to learn from, and leaves no output folder."""
    import wsi_psm.segmenter.train
    from wsi_psm.errors import NoNucleiError

    monkeypatch.setattr(wsi_psm.segmenter.train, "fit_segmenter", lambda *a, **k: pytest.fail())
    src = tmp_path / "flat.png"
    write_png(src, np.full((128, 128, 3), (200, 180, 60), np.uint8))
    cfg = CFG.with_updates(**{"psm.fit_steps": 2, "psm.fit_batch": 2, "psm.width": 4})
    out = tmp_path / "o"
    with pytest.raises(NoNucleiError, match=r"1 image\(s\) hold \d nucleus-like object"):
        segment_images([src], out, cfg, mpp=0.5)
    assert not out.exists()


def test_pseudo_instances_count_the_nuclei_of_all_images() -> None:
    from wsi_psm.errors import NoNucleiError
    from wsi_psm.segmenter.train import MIN_PSEUDO_NUCLEI, pseudo_instances

    _, labels = synthetic_tile(96)  # separate discs of nucleus size
    n = int(labels.max())
    assert 0 < n < MIN_PSEUDO_NUCLEI <= 2 * n  # one tile is too few, two together are enough
    mask = labels > 0
    with pytest.raises(NoNucleiError, match=f"hold {n} nucleus-like"):
        pseudo_instances([mask], mpp=0.5)
    found = pseudo_instances([mask, mask], mpp=0.5)
    assert [int(lab.max()) for lab in found] == [n, n]


def test_inputs_are_checked_before_any_work(tmp_path, trained_net) -> None:
    """A greyscale or unreadable image among good ones stops `segment` before anything is written
    (not after a fit or half the images)."""
    from wsi_psm.errors import SlideOpenError, UnsupportedSlideError

    img, _ = synthetic_tile(64)
    write_png(tmp_path / "a.png", img)
    Image.fromarray(img).convert("L").save(tmp_path / "z_grey.png")
    (tmp_path / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "o"
    with pytest.raises(UnsupportedSlideError, match="greyscale"):
        segment_images([tmp_path / "a.png", tmp_path / "z_grey.png"], out, CFG, model=trained_net,
                       mpp=0.5)  # fmt: skip
    with pytest.raises(SlideOpenError, match=r"z_broken\.png"):
        segment_images([tmp_path / "a.png", tmp_path / "z_broken.png"], out, CFG,
                       model=trained_net, mpp=0.5)  # fmt: skip
    assert not out.exists()
    segment_images([tmp_path / "a.png"], out, CFG, model=trained_net, mpp=0.5)  # the good one runs
    assert (out / "a.geojson").exists()


def test_a_fit_that_fails_leaves_no_output_folder(tmp_path, monkeypatch) -> None:
    """The output folder is made at the first write: a label-free fit that fails (or is stopped)
    after the input checks leaves nothing behind, not an empty folder."""
    import wsi_psm.segment

    def failing_fit(*args, **kwargs):
        raise RuntimeError("the fit broke")

    monkeypatch.setattr(wsi_psm.segment, "resolve_labeller", failing_fit)
    img, _ = synthetic_tile(64)
    write_png(tmp_path / "a.png", img)
    out = tmp_path / "new" / "o"
    with pytest.raises(RuntimeError, match="the fit broke"):
        segment_images([tmp_path / "a.png"], out, CFG, mpp=0.5)
    assert not (tmp_path / "new").exists()


def test_a_folder_of_mixed_stains_is_segmented_stain_by_stain(tmp_path, monuseg_dir) -> None:
    """An H&E crop beside an IHC field: each gets its own stain's route and classes (before, the
    first images' stain decided for all, so IHC tiles after H&E ones got H&E classes)."""
    from skimage import data

    from wsi_psm.groundtruth import monuseg_cases
    from wsi_psm.segment import check_inputs

    case = next(c for c in monuseg_cases(monuseg_dir) if c.has_xml)
    he, ihc = tmp_path / "a_he.png", tmp_path / "b_ihc.png"
    write_png(he, np.ascontiguousarray(tifffile.imread(case.image)[:320, :320, :3]))
    write_png(ihc, data.immunohistochemistry()[:320, :320])
    cfg = CFG.with_updates(**{"psm.fit_steps": 30, "segmenter.default_model": "none"})
    assert check_inputs([he, ihc], 0.5) == {"he": [he], "ihc-dab": [ihc]}
    assert check_inputs([he, ihc], 0.5, "he") == {"he": [he, ihc]}
    out = tmp_path / "out"
    written = segment_images([he, ihc], out, cfg, mpp=0.5)
    assert sorted(written) == sorted([*output_paths(he, out), *output_paths(ihc, out)])

    def names(src):
        features = json.loads(output_paths(src, out)[0].read_text())["features"]
        return {f["properties"]["classification"]["name"] for f in features}

    assert names(ihc) <= {"Positive", "Negative"} and names(ihc)
    assert names(he) and not names(he) & {"Positive", "Negative"}


def test_an_existing_read_only_output_folder_is_refused_before_any_work(
    tmp_path, monkeypatch
) -> None:
    """An existing output folder that takes no files (read-only mount: simulated, since root may
    write anywhere) stops `segment` with one OutputWriteError before a network runs or is fitted."""
    import errno
    import pathlib

    import wsi_psm.segment
    from wsi_psm.errors import OutputWriteError

    out = tmp_path / "ro"
    out.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    monkeypatch.setattr(wsi_psm.segment, "resolve_labeller", no_work)
    img, _ = synthetic_tile(64)
    write_png(tmp_path / "a.png", img)
    with pytest.raises(OutputWriteError, match="ro"):
        segment_images([tmp_path / "a.png"], out, CFG, mpp=0.5)
    assert list(out.iterdir()) == []


def test_objects_that_are_not_nuclei_leave_both_outputs(tmp_path) -> None:
    """What the classes' pale rule drops is in neither the GeoJSON nor the label image, so `eval`
    and QuPath see the same cells."""
    from test_classes import _he_cohort

    from wsi_psm.classes import CellClassifier
    from wsi_psm.segment import _write_outputs
    from wsi_psm.stain import default_stain_matrix

    img, labels, pale = _he_cohort()
    clf = CellClassifier.fit(
        [img], [labels], mpp=0.5, stain="he", matrix=default_stain_matrix("he")
    )
    gj, tif = tmp_path / "a.geojson", tmp_path / "a_labels.tif"
    per_class = _write_outputs(img, labels, 0.5, gj, tif, clf, False, "a")
    feats = json.loads(gj.read_text())["features"]
    assert per_class.total() == 100 - len(pale) == len(feats)
    assert per_class == Counter(f["properties"]["classification"]["name"] for f in feats)
    written = tifffile.imread(tif)
    assert set(np.unique(written)) == set(range(101)) - pale
    np.testing.assert_array_equal(
        written[~np.isin(labels, list(pale))], labels[~np.isin(labels, list(pale))]
    )


def test_the_command_line_ends_with_the_cells_per_class(tmp_path, monuseg_dir, capsys) -> None:
    from wsi_psm.cli.main import main

    img = monuseg_dir / "images" / "TCGA-21-5784-01Z-00-DX1.tif"
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(img), "-o", str(tmp_path / "o"), "--mpp", "0.25", "-q"])
    assert exc.value.code in (0, None)
    feats = json.loads((tmp_path / "o" / "TCGA-21-5784-01Z-00-DX1.geojson").read_text())["features"]
    per_class = Counter(f["properties"]["classification"]["name"] for f in feats)
    lines = capsys.readouterr().err.strip().splitlines()
    said = next(ln for ln in lines if "image(s) segmented" in ln)
    assert lines[-1] == f"cell counts per image -> {tmp_path / 'o' / 'summary.csv'}"
    listed = ", ".join(f"{k} {v:,}" for k, v in per_class.most_common())
    assert said.endswith(f": {len(feats):,} cells ({listed})"), said
    # and `eval` says what it scored against
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "o"), str(monuseg_dir)])
    assert exc.value.code in (0, None)
    assert "segmentation: 1 images (against 1 XML annotations)" in capsys.readouterr().out


def test_the_command_line_gives_the_positive_index_of_ihc_cells(tmp_path, monkeypatch, capsys):
    """Over all the images' cells, as a Ki-67 index is counted (the segmenting itself stubbed)."""
    from wsi_psm.cli.main import main

    import wsi_psm.segment

    img = tmp_path / "a.png"
    write_png(img, synthetic_tile(64)[0])

    def fake(paths, out, cfg, *, class_counts, **kwargs):
        class_counts.update({"Positive": 3, "Negative": 1})
        return [out / "a.geojson", out / "a_labels.tif"]

    monkeypatch.setattr(wsi_psm.segment, "segment_images", fake)
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(img), "-o", str(tmp_path / "o"), "--mpp", "0.5", "-q"])
    assert exc.value.code in (0, None)
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith(": 4 cells (Positive 3, Negative 1; Positive index 0.750)"), said
