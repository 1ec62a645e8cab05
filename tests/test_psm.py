"""Activation net, self-supervised fit (seeded, deterministic on CPU) and the PSM (shape, range, polarity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_psm.config import PSMConfig
from wsi_psm.psm.maps import calibrate_psm, compute_psm
from wsi_psm.psm.network import ActivationNet
from wsi_psm.psm.train import fit_activation_net

CPU = torch.device("cpu")


def blob_tile(seed: int, size: int = 96, n_blobs: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Dark purple discs (nuclei) on a pink background, with mild noise; returns (rgb, blob mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(n_blobs):
        cy, cx = rng.integers(6, size - 6, 2)
        r = rng.uniform(3.0, 5.5)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    rgb = np.empty((size, size, 3), np.float32)
    rgb[:] = (235, 170, 200)  # eosin-pink
    rgb[mask] = (80, 50, 130)  # haematoxylin-dark
    rgb += rng.normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def tiny_cfg(**kw) -> PSMConfig:
    base = dict(
        width=4, shallow_blocks=2, fit_steps=3, fit_batch=4, fit_crop_px=32, task="stain-regression"
    )
    base.update(kw)
    return PSMConfig(**base)


def test_network_shapes_and_tasks() -> None:
    x = torch.zeros(2, 3, 40, 56)
    for task, dim in [
        ("rot180-similarity", 1),
        ("rotation", 4),
        ("contrastive", 64),
        ("stain-regression", 1),
    ]:
        net = ActivationNet(width=4, shallow_blocks=3, task=task)
        out, acts = net.forward_with_shallow(x)
        assert out.shape == (2, dim)
        assert len(acts) == 3 and all(a.shape == (2, 8, 20, 28) for a in acts)  # stride 2
        assert net.score(out).shape == (2,)
    with pytest.raises(ValueError):
        ActivationNet(task="jigsaw")


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 67, 45, 3), (50, 70, 3)])
def test_compute_psm_shape_and_range(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = ActivationNet(width=4, shallow_blocks=2)
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    psm = compute_psm(net, rgb, CPU)
    b = shape[0] if len(shape) == 4 else 1
    assert psm.shape == (b, *shape[-3:-1]) and psm.dtype == np.float32
    assert psm.min() >= 0.0 and psm.max() <= 1.0


def test_psm_batch_independent_of_batch_mates() -> None:
    torch.manual_seed(0)
    net = ActivationNet(width=4, shallow_blocks=2)
    a, _ = blob_tile(1)
    b, _ = blob_tile(2)
    together = compute_psm(net, np.stack([a, b]), CPU)
    alone = compute_psm(net, a, CPU)
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)


def test_psm_of_a_batch_in_cpu_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the Grad-CAMs of a batch are taken a few images at a time (wsi_psm.allocator):
    the same maps as the batch at once, in the batch's order."""
    from wsi_psm import preprocess

    torch.manual_seed(0)
    net = ActivationNet(width=4, shallow_blocks=2)
    tiles = np.stack([blob_tile(s)[0] for s in range(3)])  # 96² each
    whole = compute_psm(net, tiles, CPU)
    sizes: list[int] = []
    net.shallow[0].register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    monkeypatch.setattr(preprocess, "CPU_FORWARD_PIXELS", 96 * 96)
    chunked = compute_psm(net, tiles, CPU)
    assert sizes == [1, 1, 1]
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


@pytest.mark.parametrize("flip_head", [False, True])
def test_polarity_nuclei_high(flip_head: bool) -> None:
    """Whatever sign the network gives, the checked map is higher on the dark blobs, uncalibrated
    (per-tile check) and calibrated (fixed at fit time)."""
    torch.manual_seed(3)
    net = ActivationNet(width=4, shallow_blocks=2)
    if flip_head:  # negating the output negates every Grad-CAM: the check must undo it
        with torch.no_grad():
            net.head.weight.neg_()
            net.head.bias.neg_()
    rgb, mask = blob_tile(7)
    psm = compute_psm(net, rgb, CPU)[0]
    assert psm[mask].mean() > psm[~mask].mean() + 0.1
    calibrate_psm(net, [blob_tile(s)[0] for s in range(4)], CPU)
    assert net.calibrated
    psm = compute_psm(net, rgb, CPU)[0]
    assert psm[mask].mean() > psm[~mask].mean() + 0.1


def test_psm_under_inference_mode() -> None:
    torch.manual_seed(0)
    net = ActivationNet(width=4, shallow_blocks=2)
    rgb, _ = blob_tile(4)
    ref = compute_psm(net, rgb, CPU)
    with torch.inference_mode():
        np.testing.assert_allclose(compute_psm(net, rgb, CPU), ref, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(compute_psm(net, rgb, CPU), ref, atol=1e-6)


def test_flipped_head_gives_same_map() -> None:
    torch.manual_seed(5)
    net = ActivationNet(width=4, shallow_blocks=2)
    rgb, _ = blob_tile(9)
    ref = compute_psm(net, rgb, CPU)
    with torch.no_grad():
        net.head.weight.neg_()
        net.head.bias.neg_()
    np.testing.assert_allclose(compute_psm(net, rgb, CPU), ref, atol=1e-5)


def _weights(net: ActivationNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "task", ["stain-regression", "rot180-similarity", "contrastive", "rotation"]
)
def test_fit_is_seeded_and_deterministic(task: str) -> None:
    tiles = [blob_tile(s, size=48)[0] for s in range(4)]
    cfg = tiny_cfg(task=task)
    state = torch.random.get_rng_state()
    a = fit_activation_net(tiles, cfg, seed=11, device=CPU)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    b = fit_activation_net(tiles, cfg, seed=11, device=CPU)
    c = fit_activation_net(tiles, cfg, seed=12, device=CPU)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    np.testing.assert_array_equal(compute_psm(a, tiles[0], CPU), compute_psm(b, tiles[0], CPU))
    assert a.calibrated and a.arch["task"] == task


def test_fit_reports_progress_and_rejects_bad_tiles() -> None:
    tiles = [blob_tile(s, size=48)[0] for s in range(2)]
    seen: list[tuple[int, int]] = []
    fit_activation_net(
        tiles,
        tiny_cfg(fit_steps=2),
        seed=0,
        device=CPU,
        progress=lambda s, t, _l: seen.append((s, t)),
    )
    assert seen == [(1, 2), (2, 2)]
    from wsi_psm.errors import SlideTooSmallError

    with pytest.raises(SlideTooSmallError, match="at least 32 px"):  # a user's error: one line
        fit_activation_net([np.zeros((16, 16, 3), np.uint8)], tiny_cfg(), seed=0, device=CPU)
    with pytest.raises(ValueError, match="uint8"):
        fit_activation_net([np.zeros((48, 48, 3), np.float32)], tiny_cfg(), seed=0, device=CPU)
