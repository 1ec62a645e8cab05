"""Which route a fitted bundle takes to cells, and the picklable CPU half sent to workers."""

from __future__ import annotations

import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch

from wsi_psm.config import RunConfig
from wsi_psm.inference import MapsLabeller, NetworkPredictor
from wsi_psm.networks import DEFAULT_MODEL, attach_segmenter, bundle_segmenter, default_model
from wsi_psm.segmenter.network import SegNet

CPU = torch.device("cpu")


def _bundle(stain: str) -> SimpleNamespace:
    return SimpleNamespace(stain=stain, components={}, component_meta={})


def test_he_bundle_gets_the_shipped_segmenter() -> None:
    assert DEFAULT_MODEL.is_file(), "the package ships its default segmenter"
    b = _bundle("he")
    assert attach_segmenter(b, [], RunConfig(), device=CPU) == "shipped"
    net = bundle_segmenter(b)  # rebuilt from the tensors stored in the bundle
    assert net is not None
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    # compared as probabilities: the ensemble's logit of a mean probability near 0 or 1 magnifies
    # float noise from the convolution algorithm chosen at run time
    torch.testing.assert_close(
        torch.sigmoid(net(x)), torch.sigmoid(default_model()(x)), atol=1e-5, rtol=0
    )


def test_none_keeps_the_pseudo_mask_route() -> None:
    b = _bundle("he")
    cfg = RunConfig().with_updates(**{"segmenter.default_model": "none"})
    assert attach_segmenter(b, [], cfg, device=CPU).startswith("none")
    assert bundle_segmenter(b) is None


def test_network_predictor_labeller_is_picklable_and_agrees() -> None:
    torch.manual_seed(0)
    cfg = RunConfig().with_updates(**{"segmenter.tta": False})
    pred = NetworkPredictor(SegNet(width=4, depth=2).eval(), CPU, cfg)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    raws = pred.network(tiles)
    lab = pickle.loads(pickle.dumps(pred.labeller()))
    assert isinstance(lab, MapsLabeller)
    for t, r in zip(tiles, raws, strict=True):
        np.testing.assert_array_equal(lab.labels(t, r), pred.labels(t, r))


def test_fitted_networks_average_test_time_magnifications() -> None:
    """A fitted network's predictor averages ``segmenter.fitted_scales``; the shipped network's
    does not (it has the magnification check)."""
    from wsi_psm.inference import make_predictor
    from wsi_psm.networks import set_segmenter

    cfg = RunConfig().with_updates(**{"classes.enabled": False})
    shipped = SimpleNamespace(stain="he", components={}, component_meta={}, provenance={})
    attach_segmenter(shipped, [], RunConfig(), device=CPU)
    fitted = SimpleNamespace(stain="he", components={}, component_meta={}, provenance={})
    set_segmenter(fitted, SegNet(width=4, depth=2).eval(), target_mpp=0.5)
    for b, scales in ((shipped, (1.0,)), (fitted, (1.0, 1.41))):
        pred, _, _ = make_predictor(b, device=CPU, cfg=cfg)
        assert isinstance(pred, NetworkPredictor) and pred.scales == scales
    assert tuple(RunConfig().segmenter.fitted_scales) == (1.0, 1.41)


def test_the_shipped_network_is_known_by_its_weights_however_it_arrives(tmp_path) -> None:
    """``segment --model`` and ``run --model`` give the shipped network its own route (the
    magnification check) whether it comes as the default, a copy of its file or a ``wsi-psm fit``
    bundle; a network that differs in one weight is a fitted one."""
    import shutil

    from wsi_psm.networks import is_shipped_network, load_segmenter

    copy = tmp_path / "copy.pt"
    shutil.copy(DEFAULT_MODEL, copy)
    b = _bundle("he")
    attach_segmenter(b, [], RunConfig(), device=CPU)
    for net in (default_model(), load_segmenter(copy), bundle_segmenter(b)):
        assert is_shipped_network(net)
    changed = default_model()
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert not is_shipped_network(changed)
    assert not is_shipped_network(SegNet(width=4, depth=2)) and not is_shipped_network(None)


def test_worker_side_of_the_network_route_does_not_import_torch() -> None:
    # GPU runs spawn one post-processing process per core, each importing what the labeller needs:
    # torch (seconds per process) must not be among it
    code = (
        "import pickle, sys; from wsi_psm.config import RunConfig; "
        "from wsi_psm.segmenter.readout import MapsLabeller; import wsi_psm.pipeline, wsi_psm.classes; "
        "pickle.loads(pickle.dumps(MapsLabeller(RunConfig()))); "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_ihc_bundle_gets_a_network_fitted_on_its_tiles(tmp_path) -> None:
    # the shipped network is H&E-only: an IHC bundle trains one on its own pseudo masks, and the
    # saved bundle carries it (short schedules here; the real ones are in RunConfig)
    from skimage import data

    from wsi_psm.model import ModelBundle, fit_model

    img = data.immunohistochemistry()
    tiles = [img[:256, :256].copy(), img[256:, 256:].copy()]
    cfg = RunConfig().with_updates(
        **{"psm.fit_steps": 10, "segmenter.fit_steps": 10, "segmenter.refine_rounds": 0,
           "segmenter.fit_crop_px": 64}
    )  # fmt: skip
    bundle = fit_model(tiles, cfg, device=CPU)
    assert bundle.stain == "ihc-dab"
    assert attach_segmenter(bundle, tiles, cfg, device=CPU).startswith("fitted")
    bundle.save(tmp_path / "m.pt")
    net = bundle_segmenter(ModelBundle.load(tmp_path / "m.pt"))
    assert net is not None
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(
        torch.sigmoid(net(x)), torch.sigmoid(bundle_segmenter(bundle)(x)), atol=1e-5, rtol=0
    )


def test_a_model_file_keeps_its_training_and_read_out_but_the_run_chooses_how_to_apply_it() -> None:
    from wsi_psm.pipeline import model_run_config

    model = RunConfig().with_updates(
        target_mpp=0.25, **{"segmenter.fg_threshold": 0.6, "segmenter.tta": False}
    )
    run = RunConfig().with_updates(
        **{"segmenter.fg_threshold": 0.3, "segmenter.tta": True, "segmenter.zoom_check": False,
           "tiles.batch_size": 3}
    )  # fmt: skip
    cfg = model_run_config(run, model)
    assert cfg.target_mpp == 0.25 and cfg.segmenter.fg_threshold == 0.6  # the model's
    assert cfg.segmenter.tta and not cfg.segmenter.zoom_check  # the run's
    assert cfg.tiles.batch_size == 3


def test_the_shipped_file_as_run_model_keeps_todays_defaults() -> None:
    """`run --model wsi_psm/models/default.pt` applies the model's stored settings: they must be the
    defaults a plain `run` uses, or the same network gives two read-outs (a default changed without
    the shipped file's settings following it)."""
    from wsi_psm.model import ModelBundle
    from wsi_psm.pipeline import model_run_config

    stored = ModelBundle.load(DEFAULT_MODEL).config
    assert model_run_config(RunConfig(), stored) == RunConfig()
