"""Bad input through the command line: one clear line on stderr, non-zero exit, nothing that looks finished."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from wsi_psm.cli.main import main

from wsi_psm.errors import WsiPsmError


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _assert_clean_failure(code: int, err: str, out_root: Path, expect: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert expect.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    if out_root.exists():  # no finished-looking output and no temporary left behind
        leftovers = [
            p
            for p in out_root.rglob("*")
            if p.name in ("cells.geojson", "summary.json") or ".tmp-" in p.name
        ]
        assert leftovers == []


def _write_tiff(path: Path, img: np.ndarray, mpp: float | None) -> Path:
    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", **kw)
    return path


def test_not_a_slide(tmp_path, capsys):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    code, _, err = _run(["run", str(bad), "-o", str(tmp_path / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "notes.svs")


def test_missing_file(tmp_path, capsys):
    code, _, err = _run(
        ["run", str(tmp_path / "nope.svs"), "-o", str(tmp_path / "out"), "-q"], capsys
    )
    _assert_clean_failure(code, err, tmp_path / "out", "no such file")


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "x.svs"
    empty.touch()
    code, _, err = _run(["run", str(empty), "-o", str(tmp_path / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "x.svs': the file is empty (0 bytes)")


@pytest.mark.parametrize("keep", [0.4, 0.0005])  # cut in the pixel data; cut before the first IFD
def test_truncated_slide(tmp_path, capsys, cmu_svs, keep):
    data = cmu_svs.read_bytes()
    cut = tmp_path / "truncated.svs"
    cut.write_bytes(data[: int(len(data) * keep)])
    code, _, err = _run(["run", str(cut), "-o", str(tmp_path / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "truncated.svs")
    assert "Error:" not in err and "out of range" not in err  # no internal exception text


@pytest.mark.parametrize(
    ("name", "expect"),
    [("unopenable.tiff", "unsupported tiff compression"), ("unreadable.svs", "bogus marker")],
)
def test_broken_fixtures(tmp_path, capsys, fixtures_dir, name, expect):
    code, _, err = _run(
        ["run", str(fixtures_dir / name), "-o", str(tmp_path / "out"), "-q"], capsys
    )
    _assert_clean_failure(code, err, tmp_path / "out", expect)


def test_c_library_chatter_does_not_reach_the_terminal(capfd, fixtures_dir):
    """libjpeg (under OpenSlide) prints to file descriptor 2 itself: held while the file is probed
    and dropped when it fails, so the error stays one line even at the descriptor level."""
    with pytest.raises(SystemExit) as exc:
        main(["info", str(fixtures_dir / "unreadable.svs")])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "bogus marker" in lines[0].lower()


def test_no_mpp(tmp_path, capsys, fixtures_dir):
    # boxes.tiff carries a placeholder 72 dpi, which is not a resolution
    code, _, err = _run(
        ["run", str(fixtures_dir / "boxes.tiff"), "-o", str(tmp_path / "out"), "-q"], capsys
    )
    _assert_clean_failure(code, err, tmp_path / "out", "--mpp")


def test_no_tissue(tmp_path, capsys):
    blank = _write_tiff(tmp_path / "blank.tif", np.full((1200, 1200, 3), 245, np.uint8), mpp=0.5)
    code, _, err = _run(["run", str(blank), "-o", str(tmp_path / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "no tissue")


def test_slide_smaller_than_a_tile(tmp_path, capsys, fixtures_dir):
    code, _, err = _run(
        ["run", str(fixtures_dir / "small.svs"), "-o", str(tmp_path / "out"), "-q"], capsys
    )
    _assert_clean_failure(code, err, tmp_path / "out", "smaller than one tile")


def test_fluorescence_is_refused(tmp_path, capsys, caplog):
    from conftest import data_path

    from wsi_psm import slide

    ndpi = data_path("wsi", "hamamatsu-ndpi-fluorescence", "test3-DAPI-2-(387).ndpi")
    code, _, err = _run(["run", str(ndpi), "-o", str(tmp_path / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "fluorescence")
    # an --mpp that differs from the file's: the error alone (the override warning came first)
    for cmd in ("run", "segment"):
        slide._warn_mpp_override.cache_clear()  # said once per process: not before this command
        caplog.clear()
        with caplog.at_level("WARNING", logger="wsi_psm"):
            argv = [cmd, str(ndpi), "-o", str(tmp_path / "out"), "--mpp", "0.5"]
            code, _, err = _run(argv, capsys)
        _assert_clean_failure(code, err, tmp_path / "out", "fluorescence")
        assert "overrides" not in caplog.text, caplog.text


def test_existing_output_is_refused_and_kept(tmp_path, capsys, cmu_svs):
    existing = tmp_path / "out" / "CMU-1-Small-Region"
    existing.mkdir(parents=True)
    (existing / "cells.geojson").write_text("precious")
    code, _, err = _run(["run", str(cmu_svs), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code != 0
    assert err.strip().startswith("error: output exists") and "--overwrite" in err
    assert (existing / "cells.geojson").read_text() == "precious"


def test_someone_elses_summary_csv_is_kept_and_refused_first(tmp_path, capsys, cmu_svs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("patient,score\nP1,3\n")
    code, _, err = _run(["run", str(cmu_svs), "-o", str(out), "-q"], capsys)
    assert (
        code == 2 and "not a wsi-psm cell-count table" in err and len(err.strip().splitlines()) == 1
    )
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # no slide folder: no work
    assert (out / "summary.csv").read_text() == "patient,score\nP1,3\n"


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = _run(["run", "--no-such-option"], capsys)
    assert code == 2
    assert "Traceback" not in err


def test_info_prints_slide_facts(capsys, cmu_svs):
    code, out, _ = _run(["info", str(cmu_svs), "--json"], capsys)
    assert code == 0
    assert '"width": 2220' in out and '"mpp": 0.499' in out and '"vendor": "aperio"' in out
    assert '"input_check": "ok (brightfield, stained)"' in out


def test_info_says_what_run_would_refuse(capsys):
    """`info` describes a fluorescence scan, says `run` refuses it, and why, and exits 1 (a
    script can screen a folder by the exit code); the JSON says the same."""
    from conftest import data_path

    ndpi = data_path("wsi", "hamamatsu-ndpi-fluorescence", "test3-DAPI-2-(387).ndpi")
    code, out, _ = _run(["info", str(ndpi)], capsys)
    assert code == 1 and "3968 x 4864" in out
    assert "check      refused: looks like a fluorescence or dark-field scan" in out
    code, out, _ = _run(["info", str(ndpi), "--json"], capsys)
    assert code == 1 and '"input_check": "refused: looks like a fluorescence' in out


def test_info_says_run_needs_a_resolution(tmp_path, capsys):
    """A TIFF that records no resolution: `run` needs --mpp for it, so `info` exits 1."""
    img = np.full((300, 300, 3), 235, np.uint8)
    img[100:200, 100:200] = (120, 60, 150)
    slide = _write_tiff(tmp_path / "nores.tif", img, None)
    code, out, _ = _run(["info", str(slide)], capsys)
    assert code == 1 and "mpp        unknown (pass --mpp)" in out


def test_info_on_a_copy_with_spaces_in_the_name(tmp_path, capsys, cmu_svs):
    target = tmp_path / "my slide (copy).svs"
    shutil.copy(cmu_svs, target)
    code, out, _ = _run(["info", str(target)], capsys)
    assert code == 0 and "2220 x 2967" in out
    # captured (not a terminal): one unwrapped line per field, so a long path stays greppable
    assert f"path       {target}\n" in out
    assert all(line == line.rstrip() for line in out.splitlines())


def test_greyscale_slide_is_refused(tmp_path, capsys):
    """A grey scan has no stain colour: refused up front, not taken for IHC."""
    rng = np.random.default_rng(0)
    grey = np.full((1200, 1200), 235, np.uint8)
    for y, x in rng.integers(50, 1150, (300, 2)):
        grey[y - 6 : y + 6, x - 6 : x + 6] = 90  # dark nucleus-sized blobs on a pale ground
    slide = _write_tiff(tmp_path / "grey.tif", np.repeat(grey[..., None], 3, axis=2), mpp=0.5)
    code, _, err = _run(["run", str(slide), "-o", str(tmp_path / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "greyscale")


def test_unwritable_output_is_refused_before_the_fit(tmp_path, capsys, cmu_svs, monkeypatch):
    """An output under a regular file cannot be made: said before the model is fitted, not after."""
    import wsi_psm.fit

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started although the output cannot be written")

    monkeypatch.setattr(wsi_psm.fit, "fit_model_on_context", no_fit)
    monkeypatch.setattr(wsi_psm.fit, "fit_model_on_slides", no_fit)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _run(["run", str(cmu_svs), "-o", str(blocker / "out"), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path, "cannot write output")
    code, _, err = _run(["fit", str(cmu_svs), "-o", str(blocker / "m.pt"), "-q"], capsys)
    # the path in the way, named
    _assert_clean_failure(code, err, tmp_path, f"cannot write output {blocker}: it is a file")
    assert ".probe-" not in err  # the user's path, not the probe's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the probe left nothing


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["info", "{slide}", "--mpp", "0"], "lies between 0.05 and 20"),
        (["run", "{slide}", "-o", "{out}", "--mpp", "25"], "lies between 0.05 and 20"),  # 0.25 typo
        (["segment", "{slide}", "-o", "{out}", "--mpp", "1e6"], "lies between 0.05 and 20"),
        # a magnification given as --mpp: the image would be enlarged 40x (it ran for minutes)
        (["segment", "{slide}", "-o", "{out}", "--mpp", "20"], "not a magnification: 40x is"),
        (["run", "{slide}", "-o", "{out}", "--mpp", "10"], "enlarge it 20x, at most 4x"),
        (["run", "{slide}", "-o", "{out}", "--target-mpp", "-1"], "lies between 0.1 and 2"),
        (["run", "{slide}", "-o", "{out}", "--target-mpp", "0"], "lies between 0.1 and 2"),
        (["segment", "{slide}", "-o", "{out}", "--target-mpp", "1e5"], "lies between 0.1 and 2"),
        (["info", "{slide}", "--backend", "foo"], "error: invalid value for '--backend': 'foo'"),
        (
            ["run", "{slide}", "-o", "{out}", "--device", "gpu"],
            "error: invalid value for '--device'",
        ),
        (["segment", "{slide}", "-o", "{out}", "--device", "gpu"], "invalid value for '--device'"),
        (["segment", "{slide}", "-o", "{out}", "--stain", "hne"], "'hne' is not one of 'auto'"),
        (["run", "{slide}", "-o", "{out}", "--workers", "0"], "'--workers'"),
        (["fit", "{slide}", "-o", "{out}", "--seed", "-5"], "invalid value for '--seed'"),
        (["run", "{slide}", "-o", "{out}", "--frobnicate"], "no such option: --frobnicate"),
        (["run", "{slide}", "-o", "{out}", "--debug"], "before the command: `wsi-psm --debug run"),
        (["run", "{slide}", "-o", "{out}", "--overwrite", "--skip-existing"], "contradict"),
        (["eval", "{out}", "{out}", "--radius", "3"], "error: a match radius is for detection"),
        (["eval", "{out}", "{out}", "--json", "{out}"], "is a folder: give a file"),  # no scoring
        # an unset shell variable (-o "$OUT"): not the current folder
        (["segment", "{slide}", "-o", ""], "'--output' / '-o': is empty: name an output"),
        (["run", "{slide}", "-o", "  "], "'--output' / '-o': is empty: name an output"),
    ],
)
def test_bad_option_values_are_one_line_and_leave_nothing(tmp_path, capsys, cmu_svs, argv, expect):
    out = tmp_path / "out"
    if argv[0] == "eval":
        out.mkdir()
    args = [a.format(slide=cmu_svs, out=out) for a in argv]
    code, _, err = _run(args, capsys)
    assert code == 2, err
    assert expect in err and "Traceback" not in err and "internal error" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, click's included
    if "(see `" in err:  # click's own checks point to the command's help
        assert f"(see `wsi-psm {argv[0]} --help`)" in err
    if argv[0] != "eval":
        assert not out.exists()  # refused before any folder was made


def test_demo_refuses_an_existing_output_before_writing(tmp_path, capsys):
    done = tmp_path / "demo-ihc"
    done.mkdir()
    code, _, err = _run(["demo", "-o", str(tmp_path), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path, "--overwrite")
    assert "--skip-existing" not in err
    assert not (tmp_path / "demo-ihc.tiff").exists()  # the demo slide was not (re)written


def test_fit_refuses_slides_of_two_stains_before_fitting(tmp_path, capsys, cmu_svs, monkeypatch):
    """An H&E slide and the Ki-67 demo slide in one `fit`: one line naming both, no model file;
    with --stain given they are fitted as one (the user's call)."""
    import wsi_psm.fit
    from wsi_psm.demo import DEMO_MPP, write_demo_slide

    fitted = []
    monkeypatch.setattr(wsi_psm.fit, "fit_bundle", lambda tiles, cfg, **kw: fitted.append(cfg))
    ihc = write_demo_slide(tmp_path / "demo-ihc.tiff")
    model = tmp_path / "m.pt"
    argv = ["fit", str(cmu_svs), str(ihc), "-o", str(model), "--mpp", str(DEMO_MPP), "-q"]
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path, "more than one stain")
    assert "he: CMU-1-Small-Region; ihc-dab: demo-ihc" in err
    assert fitted == [] and not model.exists()
    cfg = wsi_psm.fit.RunConfig().with_updates(stain="he")
    wsi_psm.fit.fit_model_on_slides([cmu_svs, ihc], cfg, mpp=DEMO_MPP)  # reaches the (stub) fit
    assert [c.stain for c in fitted] == ["he"]


def _he_png(path: Path, side: int) -> Path:
    """A small H&E-coloured PNG (pink with purple blobs)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = np.full((side, side, 3), (230, 190, 215), np.uint8)
    for _ in range(max(1, side // 16)):
        y, x = rng.integers(0, side, 2)
        img[max(0, y - 4) : y + 4, max(0, x - 4) : x + 4] = (90, 50, 140)
    Image.fromarray(img).save(path)
    return path


def test_segment_refuses_an_image_that_vanishes_before_any_fit(tmp_path, capsys, monkeypatch):
    """A 1 x 1 px image at 0.25 µm/px is under a pixel at 0.5 µm/px: named at the input check,
    before a network is fitted on the folder it sits in (it used to end the fit with an internal
    ZeroDivisionError)."""
    import wsi_psm.networks

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started although an input is unusable")

    monkeypatch.setattr(wsi_psm.networks, "fit_on_images", no_fit)
    folder = tmp_path / "imgs"
    folder.mkdir()
    _he_png(folder / "ok.png", 128)
    _he_png(folder / "dot.png", 1)
    argv = ["segment", str(folder), "-o", str(tmp_path / "out"), "--mpp", "0.25", "--stain", "he",
            "--config", str(tmp_path / "fit.json"), "-q"]  # fmt: skip
    (tmp_path / "fit.json").write_text('{"segmenter": {"default_model": "fit"}}')
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "dot.png: image too small")
    assert not (tmp_path / "out").exists()


def test_segment_too_small_to_fit_on_is_one_line(tmp_path, capsys):
    """Images that exist at the processing resolution but are smaller than the activation net's
    crop cannot be fitted on: a WsiPsmError line, not an internal ValueError."""
    img = _he_png(tmp_path / "tiny.png", 40)
    (tmp_path / "fit.json").write_text(
        '{"segmenter": {"default_model": "fit"}, "psm": {"fit_steps": 2}}'
    )
    argv = ["segment", str(img), "-o", str(tmp_path / "out"), "--mpp", "0.25", "--stain", "he",
            "--config", str(tmp_path / "fit.json"), "-q"]  # fmt: skip
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "too small to fit a network on")
    assert "internal error" not in err and not (tmp_path / "out").exists()


def test_segment_output_that_is_a_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import wsi_psm.segment

    def no_work(*args, **kwargs):
        raise AssertionError("segmenting started although the output is a file")

    monkeypatch.setattr(wsi_psm.segment, "resolve_labeller", no_work)
    img = _he_png(tmp_path / "a.png", 64)
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    argv = ["segment", str(img), "-o", str(blocker), "--mpp", "0.25", "--stain", "he", "-q"]
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path, "it is a file, not a folder")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("command", ["run", "segment"])
def test_a_model_option_naming_another_file_says_so(tmp_path, capsys, cmu_svs, command):
    """Not torch's unpickling advice (which suggests loading untrusted code): what the file is not."""
    fake = _he_png(tmp_path / "photo.png", 16)
    target = str(cmu_svs) if command == "run" else str(_he_png(tmp_path / "a.png", 64))
    argv = [command, target, "-o", str(tmp_path / "out"), "--model", str(fake), "-q"]
    if command == "segment":
        argv += ["--mpp", "0.25"]
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "not a wsi-psm")
    assert "weights_only" not in err and "photo.png" in err


def test_segment_does_not_take_a_refused_bundle_as_a_bare_network(tmp_path, capsys):
    """A bundle of a newer format holds a segmenter too: refused as `run` refuses it, not used."""
    import io
    import json

    import torch

    from wsi_psm.segmenter.network import SegNet, segmenter_state

    state = segmenter_state(SegNet(width=4, depth=2), target_mpp=0.5)
    buf = io.BytesIO()
    meta = json.dumps({"components": {"segmenter": state["meta"]}})
    torch.save({"format": "wsi-psm-model", "version": 99, "meta": meta,
                "components": {"segmenter": state["tensors"]}}, buf)  # fmt: skip
    newer = tmp_path / "newer.pt"
    newer.write_bytes(buf.getvalue())
    img = _he_png(tmp_path / "a.png", 64)
    argv = ["segment", str(img), "-o", str(tmp_path / "out"), "--mpp", "0.5", "--stain", "he",
            "--model", str(newer), "-q"]  # fmt: skip
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "format version 99")
    # the same network as a stand-alone segmenter file is taken
    from wsi_psm.segmenter.network import save_segmenter

    bare = save_segmenter(tmp_path / "bare.pt", SegNet(width=4, depth=2), target_mpp=0.5)
    code, _, err = _run([*argv[:-2], str(bare), "-q"], capsys)
    assert code == 0 and (tmp_path / "out" / "a_labels.tif").is_file(), err


def test_eval_refuses_photographs_as_ground_truth(tmp_path, capsys):
    """An image folder given as the ground truth: every colour would be a nucleus (nonsense scores,
    exit 0). A mask has a black background; a photograph has none."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    lab = np.zeros((32, 32), np.int32)
    lab[4:10, 4:10] = 1
    tifffile.imwrite(pred / "a_labels.tif", lab)
    from PIL import Image

    photo = np.random.default_rng(0).integers(1, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(photo).save(gt / "a.png")
    code, _, err = _run(["eval", str(pred), str(gt)], capsys)
    _assert_clean_failure(code, err, tmp_path / "none", "not an instance mask")
    photo[0, :5] = 0  # a few black pixels (BCData's PNGs have some) do not make it a mask
    Image.fromarray(photo).save(gt / "a.png")
    code, _, err = _run(["eval", str(pred), str(gt)], capsys)
    _assert_clean_failure(code, err, tmp_path / "none", "0.49% black background")


def test_eval_names_a_file_given_for_a_folder(tmp_path, capsys):
    f = tmp_path / "preds.txt"
    f.write_text("")
    (tmp_path / "gt").mkdir()
    code, _, err = _run(["eval", str(f), str(tmp_path / "gt")], capsys)
    _assert_clean_failure(code, err, tmp_path / "none", "prediction is a file, not a folder")
    code, _, err = _run(["eval", str(tmp_path / "gt"), str(f)], capsys)
    _assert_clean_failure(code, err, tmp_path / "none", "ground-truth is a file, not a folder")
    code, _, err = _run(["eval", str(tmp_path / "nope"), str(tmp_path / "gt")], capsys)
    _assert_clean_failure(code, err, tmp_path / "none", "prediction folder not found")


def test_reader_choices_match_the_library():
    """--backend offers exactly the readers Slide.open knows (kept apart so --help needs no numpy)."""
    import typing

    from wsi_psm.cli.main import BackendOpt

    from wsi_psm.slide import BACKENDS

    literal = typing.get_args(BackendOpt)[0]
    assert typing.get_args(literal) == BACKENDS


def test_fit_into_a_folder_is_refused_before_fitting(tmp_path, capsys, cmu_svs, monkeypatch):
    """`fit -o FOLDER` (even with --overwrite) names the mistake at once, not after the fit."""
    import wsi_psm.fit

    monkeypatch.setattr(wsi_psm.fit, "fit_bundle", lambda *a, **kw: pytest.fail("fitted"))
    folder = tmp_path / "models"
    folder.mkdir()
    code, _, err = _run(["fit", str(cmu_svs), "-o", str(folder), "--overwrite", "-q"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "is a folder: give a model file" in err and str(folder / "model.pt") in err
    assert list(folder.iterdir()) == []


def test_batch_with_a_bad_scheduler_address_leaves_no_folder(tmp_path, capsys, cmu_svs):
    out = tmp_path / "out"
    argv = ["batch", str(cmu_svs), "-o", str(out), "--scheduler", "no-port-here", "-q"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: cannot reach the Dask scheduler at 'no-port-here'")
    assert err.count("\n") == 1 and not out.exists()


def test_bare_command_prints_the_help(capsys):
    code, out, err = _run([], capsys)
    text = out + err
    assert code == 2  # click's code for a bare group (not a success: nothing ran)
    assert "Usage: wsi-psm" in text and "Commands:" in text and text.count("\n") > 10


def test_sigterm_removes_the_temporary_output(tmp_path, capsys, cmu_svs, monkeypatch):
    """SIGTERM (timeout, a scheduler, docker stop) mid-run: one line, exit 143, and the output's
    temporary folder removed as on Ctrl-C; the test runner's own handler is back afterwards."""
    import os
    import signal
    import time

    import wsi_psm.pipeline
    from wsi_psm.atomic import OutputFolder

    def terminated_mid_write(path, out_dir, cfg, **kwargs):
        with OutputFolder(out_dir) as tmp:
            (tmp / "cells.geojson").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        raise AssertionError("not terminated")

    def no_handler(signum, frame):  # (not the default action: that would end the test run)
        raise AssertionError("wsi-psm installed no SIGTERM handler")

    monkeypatch.setattr(wsi_psm.pipeline, "process_slide", terminated_mid_write)
    runner = signal.signal(signal.SIGTERM, no_handler)
    try:
        out = tmp_path / "out"
        code, _, err = _run(["run", str(cmu_svs), "-o", str(out), "-q"], capsys)
        assert signal.getsignal(signal.SIGTERM) is no_handler
    finally:
        signal.signal(signal.SIGTERM, runner)
    assert code == 143 and err == "error: terminated\n"
    assert not out.exists()  # nor the folder made for it


def test_a_batch_of_one_bad_slide_fails_in_one_line(tmp_path, capsys):
    """`batch` on one file fails as `run` does: its error once, no end-of-batch line, no folder
    (it printed the slide's error, "0 slide(s) processed" and "1 of 1 slides failed")."""
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    out = tmp_path / "out"
    code, stdout, err = _run(["batch", str(bad), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "notes: cannot open")
    assert stdout.strip() == "" and not out.exists()


def test_a_batch_with_a_bad_model_file_says_so_once(tmp_path, capsys, cmu_svs, monkeypatch):
    """The model is checked before any cluster starts: one line (it was one per slide, after
    the start)."""
    import wsi_psm.distributed

    monkeypatch.setattr(wsi_psm.distributed, "run_batch", lambda *a, **k: pytest.fail("started"))
    bad = tmp_path / "model.pt"
    bad.write_text("not a model\n")
    out = tmp_path / "out"
    code, _, err = _run(["batch", str(cmu_svs), str(cmu_svs.parent), "-o", str(out), "--model",
                         str(bad)], capsys)  # fmt: skip
    _assert_clean_failure(code, err, out, "model.pt")
    assert not out.exists()


def test_batch_passes_the_tile_options_to_every_slide(tmp_path, capsys, cmu_svs, monkeypatch):
    """`batch` takes --batch-size and --workers as `run` does (into the configuration the tasks
    get); a bad value is a usage error before any cluster starts."""
    import wsi_psm.distributed

    seen = {}

    def fake_run_batch(slides, output, cfg, **kw):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(wsi_psm.distributed, "run_batch", fake_run_batch)
    argv = ["batch", str(cmu_svs), "-o", str(tmp_path / "out"), "-q"]
    code, _, _ = _run([*argv, "--batch-size", "3", "--workers", "5"], capsys)
    assert code == 0
    assert (seen["cfg"].tiles.batch_size, seen["cfg"].tiles.decode_workers) == (3, 5)
    code, _, err = _run([*argv, "--batch-size", "0"], capsys)
    assert code == 2 and err.startswith("error: invalid value for '--batch-size'")


def test_batch_says_so_when_no_local_cluster_starts(tmp_path, capsys, cmu_svs, monkeypatch):
    """A local Dask cluster whose workers cannot start: one line, not an internal error, and no
    output folder."""
    import distributed

    def no_cluster(*args, **kwargs):
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    argv = ["batch", str(cmu_svs), "-o", str(tmp_path / "out"), "-q"]
    code, _, err = _run(argv, capsys)
    _assert_clean_failure(code, err, tmp_path / "out", "cannot start a local Dask cluster")
    assert "internal error" not in err and not (tmp_path / "out").exists()


def test_a_full_disk_while_saving_a_model_is_one_line(tmp_path, capsys, cmu_svs, monkeypatch):
    """`fit` (and `segment --save-model`) on a disk that fills up as the model is written: one line
    naming the file, exit 2, and neither a partial file nor the folders made for it. (torch's own
    writer reports a full disk as a RuntimeError; the model is serialised first, then written.)"""
    import errno
    import os
    from types import SimpleNamespace

    import torch

    import wsi_psm.fit
    from wsi_psm.atomic import torch_save_atomic

    def fitted(*args, **kwargs):
        return SimpleNamespace(save=lambda path: torch_save_atomic({"w": torch.zeros(8)}, path))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wsi_psm.fit, "fit_model_on_slides", fitted)
    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "new" / "sub" / "model.pt"
    code, _, err = _run(["fit", str(cmu_svs), "-o", str(out), "-q"], capsys)
    _assert_clean_failure(code, err, tmp_path, "No space left on device")
    assert code == 2 and str(out) in err and not (tmp_path / "new").exists()


def test_out_of_range_seeds_and_eval_mpp_are_usage_errors(tmp_path, capsys):
    """Seeds are offset per image and round and scikit-learn takes only seeds under 2**32: a seed
    out of range is refused before any work (option or config), as is an implausible eval --mpp."""
    img = _write_tiff(tmp_path / "img.tif", np.full((64, 64, 3), 200, np.uint8), 0.25)
    code, _, err = _run(
        ["segment", str(img), "-o", str(tmp_path / "o"), "--seed", "4294967296"], capsys
    )
    assert (
        code == 2 and err.startswith("error: invalid value for '--seed'") and err.count("\n") == 1
    )
    cfg = tmp_path / "c.json"
    cfg.write_text('{"seed": -1}')
    code, _, err = _run(
        ["segment", str(img), "-o", str(tmp_path / "o"), "--config", str(cfg)], capsys
    )
    assert code == 2 and "seed" in err and err.count("\n") == 1
    code, _, err = _run(["eval", str(tmp_path), str(tmp_path), "--mpp", "500"], capsys)
    assert code == 2 and "between 0.05 and 20" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _fake_summary(out_dir: Path, cells: int) -> None:
    """What a finished slide folder holds for the checks below (a summary naming its outputs)."""
    import json

    out_dir.mkdir(parents=True)
    (out_dir / "cells.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    summary = {
        "slide": {"name": out_dir.name, "mpp": 0.5},
        "tissue_area_mm2": 1.0,
        "cells_total": cells,
        "class_counts": {"Nucleus": {"count": cells}},
        "outputs": ["cells.geojson", "summary.json"],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary))


def test_run_stopped_keeps_the_finished_slides_rows(tmp_path, capsys, monkeypatch, fixtures_dir):
    """Ctrl-C during the second slide: exit 130, and summary.csv has the first slide's row."""
    import wsi_psm.pipeline

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b"):
        shutil.copy(fixtures_dir / "small.svs", slides / f"{name}.svs")

    def process(path, out_dir, *args, **kwargs):
        if Path(path).stem == "b":
            raise KeyboardInterrupt
        _fake_summary(Path(out_dir), 7)
        summary = {"model": {"device": "cpu (2 threads)"}}
        return type(
            "Run",
            (),
            {"cells": 7, "counts": {"Nucleus": 7}, "out_dir": out_dir, "summary": summary},
        )

    monkeypatch.setattr(wsi_psm.pipeline, "process_slide", process)
    code, _, _ = _run(["run", str(slides), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 130
    table = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in table[1:]] == [["a", "", "0.5", "1", "7"]]


def test_skip_existing_takes_only_finished_folders_for_finished(tmp_path, capsys, fixtures_dir):
    """--skip-existing skips a slide whose folder is a finished output, and refuses (that slide
    only) a folder made by hand or cut short, instead of calling it finished."""
    from wsi_psm.counts_table import finished_output

    out = tmp_path / "out"
    _fake_summary(out / "done", 3)
    assert finished_output(out / "done") and not finished_output(out / "absent")
    (out / "empty").mkdir()
    _fake_summary(out / "cut", 3)
    (out / "cut" / "cells.geojson").unlink()
    (out / "file").write_text("x")
    for name, why in (("empty", "no summary.json"), ("cut", "cells.geojson missing"),
                      ("file", "not a folder")):  # fmt: skip
        with pytest.raises(WsiPsmError, match=why):
            finished_output(out / name)
    shutil.copy(fixtures_dir / "small.svs", tmp_path / "empty.svs")
    out2 = tmp_path / "out2"
    (out2 / "empty").mkdir(parents=True)
    code, _, err = _run(
        ["run", str(tmp_path / "empty.svs"), "-o", str(out2), "-q", "--skip-existing"], capsys
    )
    _assert_clean_failure(code, err, out2, "not a finished wsi-psm output")
    assert not any((out2 / "empty").iterdir())  # left as it was


def test_a_stopped_batch_finishes_its_cleanup_through_a_second_signal():
    """A stop signal that comes again while a stopped batch cleans up (Ctrl-C pressed twice;
    `timeout` signals the process, then its group) is ignored until the cleanup ends, then the
    handlers are back; a batch that is not stopping is not shielded."""
    import os
    import signal

    from wsi_psm.distributed import shielded

    before = signal.getsignal(signal.SIGINT)
    with shielded(True):
        os.kill(os.getpid(), signal.SIGINT)  # (would raise KeyboardInterrupt here)
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), shielded(False):
        os.kill(os.getpid(), signal.SIGINT)
