"""Model bundle: fit, save/load round trip (identical predictions), extensibility, bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.test_psm import blob_tile
from wsi_psm.config import RunConfig
from wsi_psm.errors import ModelError
from wsi_psm.model import FORMAT, FORMAT_VERSION, ModelBundle, fit_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    cfg = RunConfig().with_updates(
        **{
            "psm.width": 4,
            "psm.fit_steps": 3,
            "psm.fit_batch": 4,
            "psm.fit_crop_px": 32,
            "cluster.sample_pixels": 5000,
        }
    )
    tiles = [blob_tile(s, size=64)[0] for s in range(4)]
    return fit_model(tiles, cfg, device=CPU, sources=["synthetic blobs"])


def test_round_trip_identical_predictions(bundle: ModelBundle, tmp_path) -> None:
    rgb = np.stack([blob_tile(s, size=64)[0] for s in (10, 11)])
    path = bundle.save(tmp_path / "m.pt")
    again = ModelBundle.load(path)
    np.testing.assert_array_equal(again.psm(rgb, CPU), bundle.psm(rgb, CPU))
    np.testing.assert_array_equal(again.pseudo_masks(rgb, CPU), bundle.pseudo_masks(rgb, CPU))
    assert again.config == bundle.config
    assert again.provenance["fitted_on"] == ["synthetic blobs"]
    assert again.provenance["stain"] == "he" and "torch" in again.provenance["versions"]
    assert again.net.calibrated and not again.net.training
    # the file holds only plain types: it loads with weights_only=True
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == FORMAT_VERSION
    assert (
        json.loads(raw["meta"])["psm_calibration"]["cam_hi"]
        > json.loads(raw["meta"])["psm_calibration"]["cam_lo"]
    )


def test_pseudo_masks_find_blobs(bundle: ModelBundle) -> None:
    rgb, mask = blob_tile(21, size=64)
    pred = bundle.pseudo_masks(rgb, CPU)[0]
    inter = (pred & mask).sum()
    assert 2 * inter / (pred.sum() + mask.sum()) > 0.8


def test_fit_without_psm_stages(bundle: ModelBundle, tmp_path) -> None:
    """A route that uses no pseudo masks gets the stain and the same stain vectors, no net."""
    tiles = [blob_tile(s, size=64)[0] for s in range(4)]
    asked: list[str] = []
    light = fit_model(tiles, bundle.config, device=CPU, psm_needed=lambda s: bool(asked.append(s)))
    assert asked == ["he"] and light.net is None and light.pseudo is None
    assert light.stain == bundle.stain and light.provenance["psm"].startswith("not fitted")
    np.testing.assert_array_equal(light.stain_matrix, bundle.stain_matrix)
    with pytest.raises(ModelError, match="without its PSM stages"):
        light.pseudo_masks(tiles[0], CPU)
    with pytest.raises(ModelError, match="without its PSM stages"):
        light.save(tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_extra_components_round_trip(bundle: ModelBundle, tmp_path) -> None:
    bundle.components["segmenter"] = {"w": torch.arange(6.0).reshape(2, 3)}
    bundle.component_meta["segmenter"] = {"arch": "unet", "epochs": 2}
    try:
        again = ModelBundle.load(bundle.save(tmp_path / "m.pt"))
    finally:
        bundle.components.clear()
        bundle.component_meta.clear()
    assert torch.equal(again.components["segmenter"]["w"], torch.arange(6.0).reshape(2, 3))
    assert again.component_meta["segmenter"] == {"arch": "unet", "epochs": 2}


def test_bad_model_files(bundle: ModelBundle, tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        ModelBundle.load(tmp_path / "missing.pt")
    good = bundle.save(tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="cannot read"):
        ModelBundle.load(tmp_path / "truncated.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelError):
        ModelBundle.load(tmp_path / "text.pt")
    torch.save({"some": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelError, match="not a wsi-psm model"):
        ModelBundle.load(tmp_path / "foreign.pt")
    raw = torch.load(tmp_path / "good.pt", weights_only=True)
    torch.save({**raw, "version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="upgrade"):
        ModelBundle.load(tmp_path / "future.pt")
    torch.save({**raw, "net": {}}, tmp_path / "empty_net.pt")
    with pytest.raises(ModelError, match="incomplete"):
        ModelBundle.load(tmp_path / "empty_net.pt")


def test_save_leaves_no_partial_file(bundle: ModelBundle, tmp_path) -> None:
    bundle.save(tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    # readable as any other output under the umask (a temporary file's 0o600 would hide it)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o666 & ~umask
