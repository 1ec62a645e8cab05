"""Which slides a user's paths name, and the output folder each gets."""

from __future__ import annotations

import pytest

from wsi_psm.discovery import find_slides
from wsi_psm.errors import SlideOpenError


def test_folder_of_slides_and_dicom_subfolder(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b (copy).ndpi").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.svs").write_bytes(b"x")
    dcm = tmp_path / "case7"
    dcm.mkdir()
    (dcm / "level-0.dcm").write_bytes(b"x")
    (dcm / "level-1.dcm").write_bytes(b"x")
    found = find_slides([tmp_path])
    assert [s.name for s in found] == ["a", "b (copy)", "case7"]
    assert found[2].path == dcm


def test_a_dcm_file_names_its_whole_series(tmp_path):
    dcm = tmp_path / "series"
    dcm.mkdir()
    (dcm / "level-3-frames-0-1.dcm").write_bytes(b"x")
    (found,) = find_slides([dcm / "level-3-frames-0-1.dcm"])
    assert found.path == dcm and found.name == "series"


def test_a_broken_or_looping_link_is_named_so(tmp_path):
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    (tmp_path / "gone.svs").symlink_to(tmp_path / "moved.svs")
    for link in (loop, tmp_path / "gone.svs"):
        with pytest.raises(SlideOpenError, match="a broken or looping symbolic link"):
            find_slides([link])
    with pytest.raises(SlideOpenError, match="no such file or folder"):
        find_slides([tmp_path / "nope.svs"])


def test_same_slide_twice_is_listed_once_but_name_clash_is_an_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "s.svs").write_bytes(b"x")
    (tmp_path / "y" / "s.tif").write_bytes(b"x")
    assert len(find_slides([tmp_path / "x" / "s.svs", tmp_path / "x"])) == 1
    # the same file by another path (relative and absolute, `x/../x`): one slide too
    assert len(find_slides([tmp_path / "x" / "s.svs", tmp_path / "x" / ".." / "x" / "s.svs"])) == 1
    with pytest.raises(SlideOpenError, match="one output folder"):
        find_slides([tmp_path / "x", tmp_path / "y"])


def test_segment_outputs_in_an_input_folder_are_not_inputs(tmp_path):
    """`segment DIR -o DIR` writes <stem>.geojson + <stem>_labels.tif beside the images; a second
    run must not take the label images for tissue. A *_labels.tif without its GeoJSON, or one
    named on the command line, is still an input."""
    for name in ("img.png", "img.geojson", "img_labels.tif", "scan_labels.tif"):
        (tmp_path / name).write_bytes(b"x")
    assert [s.name for s in find_slides([tmp_path])] == ["img", "scan_labels"]
    assert [s.name for s in find_slides([tmp_path / "img_labels.tif"])] == ["img_labels"]


def test_missing_and_empty(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        find_slides([tmp_path / "missing.svs"])
    with pytest.raises(SlideOpenError, match="no slides in this folder"):
        find_slides([tmp_path])


def test_real_data_folders(fixtures_dir):
    names = {s.name for s in find_slides([fixtures_dir])}
    # the slide files, plus boxes_0.dcm / boxes_1.dcm as one DICOM series named after the folder
    assert names == {"small", "boxes", "unreadable", "unopenable", fixtures_dir.name}


def test_tiles_take_only_images_from_a_folder(tmp_path):
    """`segment`'s folders: image tiles only (a whole slide there would be read whole), no DICOM,
    and the error speaks of images."""
    for name in ("a.png", "b.tif", "c.svs", "d.ndpi"):
        (tmp_path / name).write_bytes(b"x")
    dcm = tmp_path / "series"
    dcm.mkdir()
    (dcm / "f.dcm").write_bytes(b"x")
    assert [s.name for s in find_slides([tmp_path], tiles=True)] == ["a", "b"]
    assert {s.name for s in find_slides([tmp_path])} == {"a", "b", "c", "d", "series"}
    only_slides = tmp_path / "slides"
    only_slides.mkdir()
    (only_slides / "e.svs").write_bytes(b"x")
    with pytest.raises(SlideOpenError, match=r"no images in this folder \(looked for .jpeg, .jpg"):
        find_slides([only_slides], tiles=True)


def test_what_a_folder_leaves_out_is_said(tmp_path, caplog):
    """Subfolders are not searched and segment reads no whole slide: a folder that holds only those
    says so in its error; beside what is found, one warning line each."""
    case = tmp_path / "cases"
    (case / "caseA").mkdir(parents=True)
    (case / "caseA" / "s.svs").write_bytes(b"x")
    with pytest.raises(SlideOpenError, match=r"subfolders are not searched \(caseA\)"):
        find_slides([case])
    assert [s.name for s in find_slides([case / "caseA"])] == ["s"]
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "slide.svs").write_bytes(b"x")
    with pytest.raises(SlideOpenError, match="whole slides are not read as tiles"):
        find_slides([tiles], tiles=True)
    (tiles / "a.png").write_bytes(b"x")
    for k in range(5):
        (tiles / f"sub{k}").mkdir()
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_psm.discovery"):
        assert [s.name for s in find_slides([tiles], tiles=True)] == ["a"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert "sub0, sub1, sub2 and 2 more" in said[0] and "`wsi-psm run` takes them" in said[1]
    caplog.clear()
    # nothing left out: nothing said; a MIRAX slide's data folder and a run's output folder are
    # nobody's slides
    (case / "caseA" / "m.mrxs").write_bytes(b"x")
    (case / "caseA" / "m").mkdir()
    (case / "caseA" / "out" / "s").mkdir(parents=True)
    (case / "caseA" / "out" / "s" / "summary.json").write_text("{}")
    (case / "caseA" / "s").mkdir()  # (a run written beside its slide: OUT/<slide>/summary.json)
    (case / "caseA" / "s" / "summary.json").write_text("{}")
    with caplog.at_level("WARNING", logger="wsi_psm.discovery"):
        assert [s.name for s in find_slides([case / "caseA"])] == ["m", "s"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{case / 'caseA'}: subfolders are not searched (out): name them, e.g. {case / 'caseA' / '*'}"
    ]
    # segment reads no DICOM: a series among its tiles is named as a whole slide
    (tiles / "series").mkdir()
    (tiles / "series" / "level-0.dcm").write_bytes(b"x")
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_psm.discovery"):
        find_slides([tiles], tiles=True)
    assert "(series/, slide.svs)" in caplog.records[-1].getMessage()
