"""Slide reading: every real slide opens and reads; mpp rules; best-level reads; white padding; errors."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import data_path
from PIL import Image
from skimage.transform import resize

from wsi_psm import slide as slide_mod
from wsi_psm.errors import MissingMppError, SlideOpenError, SlideReadError
from wsi_psm.slide import Slide

CMU_MPP = 0.499


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def dicom_dir() -> Path:
    return data_path("wsi", "dicom-CMU-1-Small-Region")


# ---- every real slide opens with the expected size, mpp and vendor, and decodes ---------------------

REAL = [
    # path parts, backend, vendor, (w, h), levels, mpp, mpp_source
    (("aperio-svs", "CMU-1-Small-Region.svs"), "aperio", (2220, 2967), 1, 0.499, "metadata"),
    (("dicom-CMU-1-Small-Region",), "dicom", (2220, 2967), 12, 0.499, "metadata"),
    (
        ("dicom-CMU-1-Small-Region", "level-5-frames-0-1.dcm"),
        "dicom",
        (2220, 2967),
        12,
        0.499,
        "metadata",
    ),
    (
        ("hamamatsu-ndpi-fluorescence", "test3-DAPI-2-(387).ndpi"),
        "hamamatsu",
        (3968, 4864),
        7,
        0.22818,
        "metadata",
    ),
    (
        ("hamamatsu-ndpi-fluorescence", "test3-TRITC 2 (560).ndpi"),
        "hamamatsu",
        (3968, 4864),
        7,
        0.22818,
        "metadata",
    ),
    (
        ("synthetic-openslide-python-fixtures", "small.svs"),
        "aperio",
        (16, 16),
        1,
        0.499,
        "metadata",
    ),
    (
        ("synthetic-openslide-python-fixtures", "boxes.tiff"),
        "generic-tiff",
        (300, 250),
        4,
        None,
        "none",
    ),
    (
        ("synthetic-openslide-python-fixtures", "boxes_0.dcm"),
        "dicom",
        (16, 16),
        1,
        0.499,
        "metadata",
    ),
    (
        ("synthetic-openslide-python-fixtures", "boxes_1.dcm"),
        "dicom",
        (16, 16),
        1,
        0.499,
        "metadata",
    ),
]


@pytest.mark.parametrize(
    ("parts", "vendor", "size", "levels", "mpp", "source"), REAL, ids=[r[0][-1] for r in REAL]
)
def test_real_slide_opens_and_reads(parts, vendor, size, levels, mpp, source) -> None:
    path = data_path("wsi", *parts)
    with Slide.open(path) as s:
        info = s.info
        assert info.backend == "openslide"
        assert info.vendor == vendor
        assert s.dimensions == size == (info.width, info.height)
        assert (
            info.level_count == levels == len(info.level_dimensions) == len(info.level_downsamples)
        )
        assert info.mpp_source == source
        if mpp is None:
            assert info.mpp is None
        else:
            assert info.mpp == pytest.approx(mpp, rel=1e-3)
        json.dumps(info.to_dict())  # what summary.json records
        w, h = min(size[0], 64), min(size[1], 64)
        region = s.read_region(size[0] - w, size[1] - h, w, h)  # the far corner decodes too
        assert region.shape == (h, w, 3) and region.dtype == np.uint8
        assert region.flags.writeable


def test_cmu_objective_power_and_name(cmu_svs: Path, dicom_dir: Path) -> None:
    with Slide.open(cmu_svs) as s:
        assert s.info.objective_power == 20.0
        assert s.name == "CMU-1-Small-Region"
    with Slide.open(dicom_dir) as s:  # a DICOM folder is named after the folder
        assert s.name == "dicom-CMU-1-Small-Region"


def test_tiffslide_backend_reads_like_openslide(cmu_svs: Path) -> None:
    with Slide.open(cmu_svs) as a, Slide.open(cmu_svs, backend="tiffslide") as b:
        assert b.info.backend == "tiffslide"
        assert b.info.mpp == pytest.approx(CMU_MPP) and b.info.mpp_source == "metadata"
        assert np.array_equal(a.read_region(300, 400, 200, 150), b.read_region(300, 400, 200, 150))
        assert np.array_equal(
            a.read_at_mpp(333, 444, 600, 500, 1.3), b.read_at_mpp(333, 444, 600, 500, 1.3)
        )


def test_monuseg_tiff_has_no_resolution() -> None:
    """The MoNuSeg TIFFs carry no resolution tags (their 0.25 µm/px lives only in the XMLs)."""
    path = data_path("monuseg-train", "images", "TCGA-21-5784-01Z-00-DX1.tif")
    with Slide.open(path) as s:
        assert s.info.backend == "tiffslide"
        assert s.dimensions == (1000, 1000)
        assert s.info.mpp is None and s.info.mpp_source == "none"
    with Slide.open(path, backend="image") as s:  # Pillow reports a placeholder 1 dpi: rejected
        assert s.info.mpp is None
    with Slide.open(path, mpp=0.2527) as s:
        assert s.read_at_mpp(0, 0, 1000, 1000, 0.5).shape == (505, 505, 3)


# ---- read_at_mpp -------------------------------------------------------------------------------------


def test_read_at_mpp_shape_and_matches_downsampled_level0(cmu_svs: Path) -> None:
    x, y, w, h = 400, 600, 1000, 800
    with Slide.open(cmu_svs) as s:
        out = s.read_at_mpp(x, y, w, h, 1.0)
        assert out.shape == (round(h * CMU_MPP), round(w * CMU_MPP), 3) == (399, 499, 3)
        assert out.dtype == np.uint8
        ref = resize(
            s.read_region(x, y, w, h), out.shape[:2], anti_aliasing=True, preserve_range=True
        )
        assert _mad(out, ref.round().astype(np.uint8)) < 2.5
        # same resolution as level 0: no resampling at all
        assert np.array_equal(s.read_at_mpp(x, y, w, h, CMU_MPP), s.read_region(x, y, w, h))


def test_read_at_mpp_is_aligned_across_pyramid_levels(cmu_svs: Path, dicom_dir: Path) -> None:
    """The DICOM read at 1 µm/px comes from its level 1; the SVS one from level 0 resized. Same place."""
    box = (400, 600, 1000, 800)
    with Slide.open(cmu_svs) as svs, Slide.open(dicom_dir) as dcm:
        a, b = svs.read_at_mpp(*box, 1.0), dcm.read_at_mpp(*box, 1.0)
        assert a.shape == b.shape
        aligned = _mad(a, b)
        assert aligned < 8
        for dx, dy in [(1, 0), (0, 1), (-1, 0), (0, -1)]:  # any one-pixel shift matches worse
            assert aligned < _mad(np.roll(a, (dy, dx), (0, 1))[4:-4, 4:-4], b[4:-4, 4:-4])


def test_dicom_colours_match_the_svs(cmu_svs: Path, dicom_dir: Path) -> None:
    """This DICOM says RGB but holds YCbCr JPEG frames; read as stored, white glass turns salmon."""
    with Slide.open(cmu_svs) as svs, Slide.open(dicom_dir) as dcm:
        a, b = svs.read_region(100, 200, 300, 250), dcm.read_region(100, 200, 300, 250)
        assert _mad(a, b) < 3
        glass = dcm.read_region(1800, 100, 100, 100).reshape(-1, 3).mean(0)  # background, top right
        assert (
            glass.min() > 230 and glass.max() - glass.min() < 10
        )  # white, not salmon (255, 128, 128)


def test_dicom_level_choice(dicom_dir: Path) -> None:
    with Slide.open(dicom_dir) as s:
        ds = s.level_downsamples
        assert ds[1] == pytest.approx(2.0, rel=1e-3) and ds[2] == pytest.approx(4.0, rel=1e-3)
        assert s.best_level(0.3) == 0  # finer than level 0: level 0 (upsampled)
        assert s.best_level(CMU_MPP) == 0
        assert s.best_level(0.9) == 0  # level 1 (0.998) is coarser than 0.9
        assert s.best_level(1.0) == 1  # 0.998 is fine enough
        assert s.best_level(2.0) == 2
        assert s.best_level(3.9) == 2
        assert s.best_level(4.0) == 3  # 4.0 µm/px vs 8.0167 * 0.499 = 4.0003: within tolerance
        assert s.best_level(1e4) == s.level_count - 1

        levels: list[int] = []
        real_read = s._b.read

        def spy(level, *args):
            levels.append(level)
            return real_read(level, *args)

        s._b.read = spy
        out = s.read_at_mpp(0, 0, s.width, s.height, 2.0)
        assert set(levels) == {2}
        assert out.shape == (round(s.height * CMU_MPP / 2), round(s.width * CMU_MPP / 2), 3)


def test_single_level_slide_reads_coarse_from_level0(cmu_svs: Path) -> None:
    with Slide.open(cmu_svs) as s:
        assert s.best_level(8.0) == 0
        out = s.read_at_mpp(0, 0, s.width, s.height, 8.0)
        assert out.shape == (round(2967 * CMU_MPP / 8), round(2220 * CMU_MPP / 8), 3)


# ---- edges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_regions_outside_the_slide_are_white(cmu_svs: Path, backend: str) -> None:
    with Slide.open(cmu_svs, backend=backend) as s:
        f = 0.998  # 2 level-0 px per output px
        tl = s.read_at_mpp(-100, -100, 400, 400, f)
        assert tl.shape == (200, 200, 3)
        assert tl[:49].min() == 255 and tl[:, :49].min() == 255  # the 100 px outside = 50 output px
        assert tl[52:, 52:].min() < 200  # tissue inside
        br = s.read_at_mpp(2100, 2900, 400, 400, f)  # slide ends 120 / 67 px into this box
        assert br[:, 61:].min() == 255 and br[35:].min() == 255
        assert s.read_at_mpp(5000, 5000, 256, 256, 1.0).min() == 255  # wholly outside
        corner = s.read_region(-10, -10, 20, 20)
        assert corner[:10].min() == 255 and corner[:, :10].min() == 255


def test_dicom_edges_white_on_a_coarse_level(dicom_dir: Path) -> None:
    with Slide.open(dicom_dir) as s:
        out = s.read_at_mpp(2000, 2800, 600, 600, 2.0)
        assert out.shape == (150, 150, 3)
        assert out[-60:].min() == 255 and out[:, -60:].min() == 255


# ---- mpp ---------------------------------------------------------------------------------------------


def test_implausible_72dpi_resolution_is_not_an_mpp(fixtures_dir: Path) -> None:
    path = fixtures_dir / "boxes.tiff"  # OpenSlide reports 352.8 µm/px from its 72 dpi tags
    with Slide.open(path) as s:
        assert s.info.mpp is None and s.info.mpp_source == "none"
        with pytest.raises(MissingMppError) as err:
            _ = s.mpp
        msg = _one_line(err)
        assert "--mpp" in msg and "boxes" in msg
        with pytest.raises(MissingMppError):
            s.read_at_mpp(0, 0, 100, 100, 1.0)
        assert s.read_region(0, 0, 300, 250).shape == (250, 300, 3)  # pixels still readable


def test_user_mpp_overrides(cmu_svs: Path, fixtures_dir: Path, caplog) -> None:
    """The user's mpp wins (metadata can be wrong), with a warning where the file says otherwise;
    a value no slide has (a typo such as 25 for 0.25) is refused."""
    from wsi_psm import slide

    slide._warn_mpp_override.cache_clear()  # said once per process: not before this test
    with caplog.at_level("WARNING", logger="wsi_psm"), Slide.open(cmu_svs, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.info.mpp_source == "user"
        assert s.info.overridden_mpp == (pytest.approx(0.499), "metadata")
        assert s.read_at_mpp(0, 0, 1000, 1000, 0.5).shape == (500, 500, 3)
        assert "overrides" not in caplog.text  # said once the input has passed its checks
        slide.warn_mpp_override(s.info)
    with caplog.at_level("WARNING", logger="wsi_psm"), Slide.open(cmu_svs, mpp=0.25) as s:
        slide.warn_mpp_override(s.info)  # segment opens an image up to three times: one warning
    assert caplog.text.count("--mpp 0.25 overrides the file's own 0.499") == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_psm"), Slide.open(cmu_svs, mpp=0.4995) as s:
        assert s.mpp == 0.4995 and s.info.overridden_mpp is None
        slide.warn_mpp_override(s.info)
    with Slide.open(fixtures_dir / "boxes.tiff", mpp=2.0) as s:
        assert s.mpp == 2.0 and s.info.mpp_source == "user" and s.info.overridden_mpp is None
        assert s.best_level(4.0) == 1  # its pyramid is used once it has an mpp
    assert "overrides" not in caplog.text  # the same value, or a file that says nothing: no warning
    for bad in (-1, 0, 25, 1e-6):
        with pytest.raises(ValueError, match=r"between 0\.05 and 20"):
            Slide.open(cmu_svs, mpp=bad)


def test_plausible_tiff_resolution_is_used(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "plain.tif"  # a simple strip TIFF at 0.25 µm/px = 40000 px/cm
    tifffile.imwrite(
        path, img, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    with Slide.open(path) as s:
        assert s.info.mpp == pytest.approx(0.25) and s.info.mpp_source == "tiff-resolution"
        assert np.array_equal(s.read_region(0, 0, 400, 300), img)


def test_png_72dpi_has_no_mpp(tmp_path: Path) -> None:
    path = tmp_path / "shot.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(path, dpi=(72, 72))
    with Slide.open(path) as s:
        assert s.info.mpp is None and s.info.mpp_source == "none"


# ---- plain images ------------------------------------------------------------------------------------


def test_png_opens_via_image_backend(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    path = tmp_path / "tile.png"
    Image.fromarray(rgb).save(path)
    with Slide.open(path, mpp=0.5) as s:
        assert s.info.backend == "image" and s.info.vendor is None
        assert s.dimensions == (160, 120) and s.level_count == 1
        assert np.array_equal(s.read_region(0, 0, 160, 120), rgb)
        assert np.array_equal(s.read_region(10, 20, 30, 40), rgb[20:60, 10:40])
        assert s.read_at_mpp(0, 0, 160, 120, 1.0).shape == (60, 80, 3)
        assert s.read_region(150, 110, 20, 20)[10:, :].min() == 255  # padded white


def test_transparent_pixels_composite_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    with Slide.open(path) as s:
        px = s.read_region(0, 0, 8, 8)
        assert (px[:4] == (200, 0, 0)).all()
        assert (px[4:] == 255).all()


# ---- errors ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError) as err:
        Slide.open(tmp_path / "nope.svs")
    assert "no such file" in _one_line(err) and "nope.svs" in str(err.value)


def test_not_a_slide(tmp_path: Path) -> None:
    path = tmp_path / "x.svs"
    path.write_text("this is a text file, not a slide\n")
    with pytest.raises(SlideOpenError) as err:
        Slide.open(path)
    msg = _one_line(err)
    assert str(path) in msg and "not a whole-slide image" in msg


def test_folder_without_dicom(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError) as err:
        Slide.open(tmp_path)
    assert "folder" in _one_line(err)


def test_truncated_svs_fails_at_open(cmu_svs: Path, tmp_path: Path) -> None:
    data = cmu_svs.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * 0.4)])  # the TIFF directories live at the end: gone
    with pytest.raises(SlideOpenError) as err:
        Slide.open(path)
    msg = _one_line(err)
    assert str(path) in msg and "truncated" in msg


def test_truncated_tiled_tiff_fails_at_open(tmp_path: Path) -> None:
    """Directories first, tiles after: the header survives truncation, the last tiles do not."""
    img = np.random.default_rng(2).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    full = tmp_path / "tiled.tif"
    tifffile.imwrite(full, img, tile=(256, 256), compression="jpeg", photometric="rgb")
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    for backend in ("auto", "openslide", "tiffslide"):
        with pytest.raises((SlideOpenError, SlideReadError)) as err:
            Slide.open(cut, backend=backend)
        assert str(cut) in _one_line(err)
    with pytest.raises(SlideReadError, match="truncated"):
        Slide.open(cut, backend="tiffslide")


def test_decoder_error_during_a_tile_read_is_a_slide_read_error(
    tmp_path: Path, monkeypatch
) -> None:
    """Tiles that fail after a good open (the probe saw only a corner) raise SlideReadError."""
    img = np.random.default_rng(3).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    full = tmp_path / "tiled.tif"
    tifffile.imwrite(full, img, tile=(256, 256), compression="jpeg", photometric="rgb")
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    # only the probe of one corner stands guard now
    monkeypatch.setattr(slide_mod, "_tiff_truncation", lambda path: None)
    with Slide.open(cut, backend="tiffslide", mpp=0.5) as s:
        assert s.read_region(0, 0, 64, 64).shape == (64, 64, 3)
        with pytest.raises(SlideReadError) as err:
            s.read_at_mpp(768, 768, 256, 256, 1.0)
        msg = _one_line(err)
        assert str(cut) in msg and "level 0" in msg


def test_unopenable_tiff(fixtures_dir: Path) -> None:
    with pytest.raises(SlideOpenError) as err:
        Slide.open(fixtures_dir / "unopenable.tiff")
    msg = _one_line(err)
    assert "unopenable.tiff" in msg and "Unsupported TIFF compression" in msg


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_unreadable_svs_fails_at_open(fixtures_dir: Path, backend: str) -> None:
    with pytest.raises(SlideReadError) as err:
        Slide.open(fixtures_dir / "unreadable.svs", backend=backend)
    msg = _one_line(err)
    assert "unreadable.svs" in msg and "Bogus marker length" in msg


def test_forced_backend_that_cannot_read_the_format(dicom_dir: Path) -> None:
    with pytest.raises(SlideOpenError, match="tried tiffslide"):
        Slide.open(dicom_dir / "level-0-frames-0-30.dcm", backend="tiffslide")
    with pytest.raises(ValueError):
        Slide.open(dicom_dir, backend="bioformats")


# ---- lifetime, pickling, threads, thumbnails ---------------------------------------------------------


def test_pickling_raises(cmu_svs: Path) -> None:
    with Slide.open(cmu_svs) as s:
        with pytest.raises(TypeError, match=r"Slide\.open"):
            pickle.dumps(s)


def test_closed_slide_refuses_reads(cmu_svs: Path) -> None:
    with Slide.open(cmu_svs) as s:
        pass
    with pytest.raises(ValueError, match="closed"):
        s.read_region(0, 0, 10, 10)
    s.close()  # twice is fine


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_reads_from_several_threads_match_sequential_reads(cmu_svs: Path, backend: str) -> None:
    rng = np.random.default_rng(4)
    boxes = [
        (int(rng.integers(-100, 2100)), int(rng.integers(-100, 2800)), 200, 200) for _ in range(24)
    ]
    with Slide.open(cmu_svs, backend=backend) as s:
        seq = [s.read_at_mpp(*b, 0.7) for b in boxes]
        with ThreadPoolExecutor(4) as pool:
            par = list(pool.map(lambda b: s.read_at_mpp(*b, 0.7), boxes))
    assert all(np.array_equal(a, b) for a, b in zip(seq, par, strict=True))


def test_thumbnail_scale_and_chunking(cmu_svs: Path, monkeypatch) -> None:
    with Slide.open(cmu_svs) as s:
        thumb, scale = s.thumbnail(8.0)
        assert scale == pytest.approx(8.0 / CMU_MPP)
        assert thumb.shape == (int(np.ceil(2967 / scale)), int(np.ceil(2220 / scale)), 3)
        assert thumb[0, 0].min() > 200 and thumb.min() < 150  # glass and tissue
        monkeypatch.setattr(slide_mod, "_THUMB_CHUNK", 300)  # force many chunks on this one level
        chunked, _ = s.thumbnail(8.0)
        assert chunked.shape == thumb.shape
        assert np.abs(chunked.astype(int) - thumb).max() <= 2
