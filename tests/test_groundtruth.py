"""Annotation readers: MoNuSeg XML and colour masks, label images, BCData points, case listings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_psm.groundtruth import (
    AnnotationError,
    bcdata_cases,
    load_bcdata_points,
    load_instance_png,
    load_label_image,
    load_monuseg_labels,
    load_monuseg_xml,
    monuseg_cases,
    monuseg_mpp,
    monuseg_polygons,
)
from wsi_psm.metrics import panoptic_quality, pixel_f1

XML_HEAD = '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>'
XML_TAIL = "</Regions></Annotation></Annotations>"


def _xml(tmp_path: Path, regions: list[list[tuple[float, float]]], head: str = XML_HEAD) -> Path:
    body = "".join(
        "<Region><Vertices>"
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in verts)
        + "</Vertices></Region>"
        for verts in regions
    )
    path = tmp_path / "toy.xml"
    path.write_text(head + body + XML_TAIL)
    return path


def test_xml_pixel_convention_overlap_and_degenerate(tmp_path: Path) -> None:
    # square 1: X 1.5..4.5, Y 2.5..5.5 holds the pixel centres (c, r) with c in 2..4, r in 3..5
    sq1 = [(1.5, 2.5), (4.5, 2.5), (4.5, 5.5), (1.5, 5.5)]
    sq2 = [(3.5, 4.5), (6.5, 4.5), (6.5, 7.5), (3.5, 7.5)]  # overlaps sq1 at pixel (r 5, c 4)
    degenerate = [(0.0, 0.0), (3.0, 3.0)]
    path = _xml(tmp_path, [sq1, degenerate, sq2])
    assert len(monuseg_polygons(path)) == 2
    lab = load_monuseg_xml(path, shape=(10, 10))
    assert lab.dtype == np.int32
    expected = np.zeros((10, 10), np.int32)
    expected[3:6, 2:5] = 1
    expected[5:8, 4:7] = 2  # later region wins the shared pixel
    np.testing.assert_array_equal(lab, expected)
    assert monuseg_mpp(path) == 0.25


def test_xml_errors_and_missing_mpp(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region>")
    with pytest.raises(AnnotationError, match=r"bad\.xml"):
        load_monuseg_xml(bad)
    with pytest.raises(AnnotationError):
        load_monuseg_xml(tmp_path / "absent.xml")
    path = _xml(tmp_path, [], head="<Annotations><Annotation><Regions>")
    assert monuseg_mpp(path) is None
    assert load_monuseg_xml(path, shape=(4, 4)).max() == 0


def test_colour_png_and_label_images(tmp_path: Path) -> None:
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[0:2, 0:2] = (255, 0, 0)
    rgb[3:5, 3:5] = (0, 0, 7)
    rgb[0, 5] = (255, 0, 0)  # a colour in two places stays one label
    Image.fromarray(rgb).save(tmp_path / "m.png")
    lab = load_instance_png(tmp_path / "m.png")
    assert lab.dtype == np.int32 and lab.max() == 2
    assert np.array_equal(lab > 0, rgb.any(-1))
    assert len(np.unique(lab[rgb[..., 0] == 255])) == 1

    ints = np.zeros((5, 7), np.uint16)
    ints[1:3, 1:3] = 300
    ints[4, 6] = 2
    tifffile.imwrite(tmp_path / "x_labels.tif", ints)
    np.testing.assert_array_equal(
        load_label_image(tmp_path / "x_labels.tif"), ints.astype(np.int32)
    )
    Image.fromarray(ints.astype(np.uint8)).save(tmp_path / "x.png")
    assert (
        load_label_image(tmp_path / "x.png").max() == 44
    )  # 300 wraps in uint8; values kept as read
    assert load_label_image(tmp_path / "m.png").max() == 2  # RGB is read as a colour mask

    tifffile.imwrite(tmp_path / "f.tif", np.full((3, 3), 0.5, np.float32))
    with pytest.raises(AnnotationError, match="non-integer"):
        load_label_image(tmp_path / "f.tif")
    with pytest.raises(AnnotationError, match="not found"):
        load_label_image(tmp_path / "nothing.tif")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(AnnotationError, match="cannot read"):
        load_label_image(tmp_path / "junk.png")


def test_additive_overlap_fragments_merge(tmp_path: Path) -> None:
    a, b, c = np.array([200, 10, 30]), np.array([100, 20, 40]), np.array([5, 5, 5])
    rgb = np.zeros((8, 13, 3), np.int64)
    rgb[1:7, 1:5] = a  # 24 px
    rgb[1:7, 6:12] = b  # 36 px
    rgb[1:7, 5] = (a + b) % 256 + [
        1,
        0,
        0,
    ]  # overlap column: the sum, off by one as in the real masks
    rgb[7, 0:3] = c  # an unrelated object
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "add.png")
    raw = load_instance_png(tmp_path / "add.png")
    assert raw.max() == 4
    lab = load_instance_png(tmp_path / "add.png", merge_overlaps=True)
    assert lab.max() == 3
    assert np.array_equal(lab > 0, raw > 0)
    # equal borders (6 px each side): the fragment goes to the larger nucleus, b
    assert lab[4, 5] == lab[4, 8] != lab[4, 2]


# --------------------------------------------------------------------------- real data


def test_monuseg_cases(monuseg_dir: Path) -> None:
    cases = monuseg_cases(monuseg_dir)
    assert len(cases) == 30
    assert sum(c.has_xml for c in cases) == 13
    assert [c.stem for c in cases] == sorted(c.stem for c in cases)
    assert all(c.image.is_file() and c.annotation.is_file() for c in cases)
    assert len(monuseg_cases(monuseg_dir, xml_only=True)) == 13


def test_monuseg_xml_agrees_with_derived_masks(monuseg_dir: Path) -> None:
    """Rasterised XMLs against the third-party colour masks: the README's check, at the chosen convention."""
    mask_dir = monuseg_dir / "derived_instance_color_masks_ykrmm"
    dice = {}
    for case in monuseg_cases(monuseg_dir, xml_only=True):
        lab = load_monuseg_labels(case)
        assert lab.shape == (1000, 1000) and lab.dtype == np.int32
        assert lab.max() == len(np.unique(lab)) - 1 == len(monuseg_polygons(case.annotation))
        mask = load_instance_png(mask_dir / f"{case.stem}.png", merge_overlaps=True)
        dice[case.stem] = pixel_f1(lab > 0, mask > 0)
        # with overlap colours given back, the mask holds (nearly) the XML's nuclei
        assert abs(int(mask.max()) - int(lab.max())) <= 5
        assert panoptic_quality(mask, lab)["pq"] > 0.88
    odd = "TCGA-B0-5710-01Z-00-DX1"  # that mask was drawn half a pixel off (and misses a nucleus)
    assert dice.pop(odd) > 0.94
    assert min(dice.values()) > 0.985
    # degenerate regions documented in the README are skipped
    assert len(monuseg_polygons(monuseg_dir / "annotations" / "TCGA-50-5931-01Z-00-DX1.xml")) == 444
    assert len(monuseg_polygons(monuseg_dir / "annotations" / "TCGA-E2-A1B5-01Z-00-DX1.xml")) == 328
    assert monuseg_mpp(monuseg_dir / "annotations" / "TCGA-NH-A8F7-01A-01-TS1.xml") is None
    assert monuseg_mpp(
        monuseg_dir / "annotations" / "TCGA-21-5784-01Z-00-DX1.xml"
    ) == pytest.approx(0.2527)


def test_derived_mask_labels(monuseg_dir: Path) -> None:
    case = next(c for c in monuseg_cases(monuseg_dir) if not c.has_xml)
    lab = load_monuseg_labels(case)
    assert lab.shape == (1000, 1000)
    areas = np.bincount(lab.ravel())[1:]
    assert (areas >= 20).sum() > 300  # every mask holds hundreds of nuclei


def test_bcdata_points(bcdata_dir: Path) -> None:
    cases = bcdata_cases(bcdata_dir)
    assert [c.stem for c in cases] == [str(i) for i in range(26)]
    totals = {"Positive": 0, "Negative": 0}
    rb = {"Positive": [], "Negative": []}
    for case in cases:
        pts = load_bcdata_points(case.annotation, case.stem)
        img = np.asarray(Image.open(case.image).convert("RGB")).astype(float)
        for name, xy in pts.items():
            assert xy.ndim == 2 and xy.shape[1] == 2
            totals[name] += len(xy)
            if len(xy):
                x, y = xy[:, 0].astype(int), xy[:, 1].astype(int)
                rb[name].extend(img[y, x, 0] - img[y, x, 2])
    assert totals == {"Positive": 1371, "Negative": 1648}
    # (x, y) order: positive points sit on brown DAB (red > blue), negative ones on blue haematoxylin
    assert np.mean(rb["Positive"]) > 20 > 5 > np.mean(rb["Negative"])
    # the dataset root and the annotations folder are accepted as well
    a = load_bcdata_points(bcdata_dir, 3)["Positive"]
    b = load_bcdata_points(bcdata_dir / "annotations", "3")["Positive"]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(AnnotationError, match="not found"):
        load_bcdata_points(bcdata_dir, 999)
