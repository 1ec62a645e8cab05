"""Preprocessing (scaling, channel order, shapes), device choice, optical density and stain detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_psm.device import DeviceError, select_device
from wsi_psm.preprocess import from_network_input, to_network_input
from wsi_psm.stain import (
    default_stain_matrix,
    detect_stain,
    estimate_stain_matrix,
    rgb_to_od,
    stain_channels,
    white_balanced_od,
)


def _read_rgb(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------- preprocess
def test_to_network_input_scaling_and_channel_order() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[0, 0] = (0, 128, 255)
    x = to_network_input(rgb)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 4, 5)
    assert torch.allclose(x[0, 0, 1:, :], torch.tensor(1.0))  # red channel first, 255 -> +1
    assert torch.allclose(x[0, 1:, 1:, :], torch.tensor(-1.0))  # 0 -> -1
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_to_network_input_batch_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 7, 6, 3), dtype=np.uint8)
    x = to_network_input(rgb)
    assert x.shape == (3, 3, 7, 6) and x.is_contiguous()
    np.testing.assert_array_equal(from_network_input(x), rgb)
    # a single image and the same image in a batch give the same values
    assert torch.equal(to_network_input(rgb[1])[0], x[1])


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.uint16)])
def test_to_network_input_rejects_non_uint8(bad: np.ndarray) -> None:
    with pytest.raises(TypeError):
        to_network_input(bad)


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (2, 4, 4, 1), (1, 2, 4, 4, 3)])
def test_to_network_input_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        to_network_input(np.zeros(shape, np.uint8))


# ---------------------------------------------------------------- device
def test_select_device_auto_and_cpu() -> None:
    assert select_device("cpu") == torch.device("cpu")
    dev = select_device("auto")
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif torch.backends.mps.is_available():
        assert dev.type == "mps"
    else:
        assert dev == torch.device("cpu")


def test_select_device_unavailable_or_unknown() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            select_device("cuda")
    else:
        with pytest.raises(DeviceError):
            select_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu-please")


# ---------------------------------------------------------------- optical density and stains
def test_rgb_to_od_values() -> None:
    od = rgb_to_od(np.array([[[255, 255, 255], [0, 0, 0], [127, 255, 31]]], np.uint8))
    assert od.dtype == np.float32
    np.testing.assert_allclose(od[0, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(od[0, 1], np.log10(256), rtol=1e-6)
    np.testing.assert_allclose(od[0, 2], -np.log10(np.array([128, 256, 32]) / 256), rtol=1e-6)


def _synthetic_he(h_amount: float, e_amount: float) -> np.ndarray:
    """One pixel whose OD is a known mix of the Ruifrok H and E vectors."""
    m = default_stain_matrix("he")
    od = h_amount * m[0] + e_amount * m[1]
    return np.clip(np.rint(256 * 10 ** (-od) - 1), 0, 255).astype(np.uint8)[None, None]


def test_stain_channels_recover_known_mix() -> None:
    ch = stain_channels(_synthetic_he(0.6, 0.2), "he")
    assert set(ch) == {"haematoxylin", "eosin"}
    assert ch["haematoxylin"][0, 0] == pytest.approx(0.6, abs=0.02)
    assert ch["eosin"][0, 0] == pytest.approx(0.2, abs=0.02)
    white = stain_channels(np.full((2, 2, 3), 255, np.uint8), "ihc-dab")
    assert set(white) == {"haematoxylin", "dab"}
    assert all(float(v.max()) == 0.0 for v in white.values())


def test_monuseg_stain_estimate_and_detection(monuseg_dir) -> None:
    import tifffile

    paths = sorted((monuseg_dir / "images").glob("*.tif"))[:3]
    ims = [tifffile.imread(p)[..., :3] for p in paths]
    m = estimate_stain_matrix(ims, "he")
    ref = default_stain_matrix("he")
    assert m.shape == (2, 3)
    assert np.all(np.sum(m * ref, axis=1) > 0.8)  # each vector close to its Ruifrok counterpart
    assert detect_stain(ims) == "he"
    # haematoxylin is higher on the darkest (nuclear) pixels than on the tissue overall
    h = stain_channels(ims[0], "he", m)["haematoxylin"]
    dark = ims[0].sum(-1) < np.percentile(ims[0].sum(-1), 10)
    assert h[dark].mean() > 2 * h.mean()


def test_bcdata_detected_as_dab(bcdata_dir) -> None:
    paths = sorted((bcdata_dir / "images" / "test").glob("*.png"))[:3]
    assert detect_stain([_read_rgb(p) for p in paths]) == "ihc-dab"


def _cast(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(rgb * np.array(gains), 0, 255).round().astype(np.uint8)


def test_stain_detection_survives_a_scanner_colour_cast(monuseg_dir, bcdata_dir) -> None:
    """A bluish white balance (red x 0.9, blue x 1.06) took TCGA-21-5786's pink share from
    0.88 to 0.02 against 255, and `segment` sent it down the Ki-67 route (2 cells, all
    Positive); against the image's own white it stays H&E. A magenta one (green x 0.9) made
    Ki-67 tiles pink against 255; their own white shows their DAB, and they stay Ki-67."""
    import tifffile

    he = tifffile.imread(monuseg_dir / "images" / "TCGA-21-5786-01Z-00-DX1.tif")[..., :3]
    ihc = [_read_rgb(p) for p in sorted((bcdata_dir / "images" / "test").glob("*.png"))[:3]]
    for gains in [
        (0.9, 1.0, 1.06),
        (1.0, 1.0, 1.0),
        (1.06, 1.0, 0.9),
        (0.95, 0.95, 1.0),
        (1.0, 0.9, 1.0),
    ]:
        assert detect_stain(_cast(he, gains)) == "he", gains
        assert detect_stain([_cast(x, gains) for x in ihc]) == "ihc-dab", gains
    # a tile of pink stroma with no glass has pink tissue as its own white: still H&E (its pink
    # shows against 255)
    stroma = np.tile(np.array([235, 190, 215], np.uint8), (96, 96, 1))
    stroma[30:50, 30:50] = (90, 60, 140)
    assert detect_stain(stroma) == "he"
    # the cast moves every pixel's OD by one constant, which the sample's own white takes off
    od = white_balanced_od(_cast(he, (0.9, 1.0, 1.06)))
    np.testing.assert_allclose(np.median(od, 0), np.median(white_balanced_od(he), 0), atol=0.02)


def test_an_image_of_one_colour_gets_the_fixed_vectors() -> None:
    """A brown square on white: every stained pixel has the same OD, so both Macenko vectors came
    out the same and the deconvolution matrix did not invert (LinAlgError in a user's fit)."""
    img = np.full((64, 64, 3), 235, np.uint8)
    img[16:48, 16:48] = (120, 90, 60)
    for stain in ("he", "ihc-dab"):
        m = estimate_stain_matrix(img, stain)
        np.testing.assert_array_equal(m, default_stain_matrix(stain))
        ch = stain_channels(img, stain, m)
        assert all(np.isfinite(v).all() for v in ch.values())


def test_detect_stain_blank_is_he() -> None:
    assert detect_stain(np.full((32, 32, 3), 250, np.uint8)) == "he"


def test_colour_check_passes_real_stains_and_refuses_grey(monuseg_dir, bcdata_dir) -> None:
    """Every MoNuSeg H&E and BCData Ki-67 image has stain colour; the same images in grey do not
    (they would otherwise be taken for IHC and get a network fitted on nonsense)."""
    from PIL import Image

    from wsi_psm.errors import UnsupportedSlideError
    from wsi_psm.tissue import check_colour

    paths = sorted((monuseg_dir / "images").glob("*.tif"))[:6]
    paths += sorted((bcdata_dir / "images" / "test").glob("*.png"))[:6]
    assert len(paths) == 12
    for p in paths:
        rgb = np.asarray(Image.open(p).convert("RGB"))[::2, ::2]
        check_colour(rgb, p.name)
        grey = np.repeat(rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
        with pytest.raises(UnsupportedSlideError, match="greyscale"):
            check_colour(grey, p.name)
    check_colour(np.full((64, 64, 3), 250, np.uint8), "blank")  # nothing stained: not judged here
