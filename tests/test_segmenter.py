"""The downstream segmenter: network shapes, targets, augmentation, the fit, tiled inference, the
instance read-out and saving / loading. Tiny nets and few steps: the whole file runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from wsi_psm.config import RunConfig
from wsi_psm.segmenter.crops import (
    DeviceCrops,
    _apply_jitter,
    _apply_jitter_batch,
    _draw_jitter,
    colour_jitter,
    sample_batch,
)
from wsi_psm.segmenter.network import (
    SegEnsemble,
    SegNet,
    read_segmenter_file,
    save_segmenter,
    segmenter_from_state,
    segmenter_state,
)
from wsi_psm.segmenter.predict import SegmenterPredictor, network_maps, predict_maps
from wsi_psm.segmenter.readout import _h_maxima_above, maps_to_instances
from wsi_psm.segmenter.train import (
    distance_peaks,
    distance_target,
    fit_on_pseudo_masks,
    fit_segmenter,
    label_centroids,
    sample_from_labels,
    voronoi_sample,
)

CPU = torch.device("cpu")


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def synthetic_tile(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink background with dark purple discs (some touching), and their instance labels."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 190, 215)
    labels = np.zeros((size, size), np.int32)
    centres = [(20, 20), (20, 34), (60, 60), (70, 25), (30, 75)]
    for i, (cy, cx) in enumerate(centres, start=1):
        m = disc((size, size), cy, cx, 7.5) & (labels == 0)
        labels[m] = i
        img[m] = (90, 60, 140)
    noise = rng.integers(-6, 7, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), labels


def tiny_net(seed: int = 0) -> SegNet:
    torch.manual_seed(seed)
    return SegNet(width=4, depth=2).eval()


def test_network_output_shape_any_size() -> None:
    net = tiny_net()
    imgs = np.zeros((2, 37, 50, 3), np.uint8)  # not multiples of the net's stride: padded inside
    maps = network_maps(net, imgs, CPU, tta=True)
    assert maps.shape == (2, 2, 37, 50)
    assert maps.dtype == np.float32
    assert (maps >= 0).all() and (maps <= 1).all()


def test_tta_is_rotation_equivariant() -> None:
    """Averaging the 8 dihedral variants makes the maps of a rotated image the rotated maps."""
    net = tiny_net()
    img, _ = synthetic_tile(64)
    a = network_maps(net, img[None], CPU, tta=True)[0]
    b = network_maps(net, np.rot90(img).copy()[None], CPU, tta=True)[0]
    np.testing.assert_allclose(np.rot90(a, axes=(1, 2)), b, atol=1e-5)


def test_tiled_prediction_matches_whole_image() -> None:
    net = tiny_net()
    img, _ = synthetic_tile(200)
    whole = predict_maps(net, img, CPU, window=256, tta=False)
    tiled = predict_maps(net, img, CPU, window=96, margin=24, batch=3, tta=False)
    assert tiled.shape == whole.shape == (2, 200, 200)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)


def test_cpu_forwards_in_chunks_give_the_batch_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU a batch goes through the net a few images at a time (``CPU_FORWARD_PIXELS``, see
    wsi_psm.allocator); the maps are those of the batch in one forward."""
    from wsi_psm import preprocess

    net = tiny_net()
    sizes: list[int] = []
    net.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    imgs = np.stack([synthetic_tile(64, seed=s)[0] for s in range(5)])
    whole = network_maps(net, imgs, CPU, tta=True)
    assert sizes == [5] * 8  # 64² images: the whole batch in one forward per dihedral variant
    sizes.clear()
    monkeypatch.setattr(preprocess, "CPU_FORWARD_PIXELS", 2 * 64 * 64)
    chunked = network_maps(net, imgs, CPU, tta=True)
    assert sizes == [2, 2, 1] * 8
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_cpu_forwards_run_channels_last_with_the_same_maps() -> None:
    """On a CPU every dihedral variant reaches the net in the channels-last layout (a rotation
    copies to the plain layout, so it is set after it), with the maps of the plain layout."""
    net = tiny_net()
    seen: list[bool] = []
    net.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    imgs = np.stack([synthetic_tile(64, seed=s)[0] for s in range(2)])
    fast = network_maps(net, imgs, CPU, tta=True)
    assert seen == [True] * 8
    seen.clear()
    plain = network_maps(net, imgs, CPU, tta=True, channels_last=False)
    assert seen == [False] * 8
    np.testing.assert_allclose(fast, plain, atol=1e-5)


def test_test_time_magnification_averages_the_magnified_maps() -> None:
    """``scales``: the batch also goes through magnified (bilinear, 1.5x here) and those maps,
    resampled back to the input's pixels, are averaged with the plain ones."""
    from torch.nn.functional import interpolate

    from wsi_psm.preprocess import to_network_input

    net = tiny_net()
    imgs = np.stack([synthetic_tile(64, seed=s)[0] for s in range(2)])
    plain = network_maps(net, imgs, CPU, tta=False)
    both = network_maps(net, imgs, CPU, tta=False, scales=(1.0, 1.5))
    assert both.shape == plain.shape == (2, 2, 64, 64)
    with torch.no_grad():  # 96 px: a multiple of the net's stride, so no padding to undo
        x = interpolate(to_network_input(imgs, CPU), size=(96, 96), mode="bilinear")
        up = interpolate(torch.sigmoid(net(x)), size=(64, 64), mode="bilinear").numpy()
    np.testing.assert_allclose(both, (plain + up) / 2, atol=1e-5)
    assert np.abs(both - plain).max() > 1e-4  # it changes them (an untrained net: nearly flat)
    np.testing.assert_allclose(network_maps(net, imgs, CPU, tta=False, scales=(1.0, 1.0)), plain)


def test_magnified_views_of_a_thin_image_and_windows_that_keep_nothing() -> None:
    from wsi_psm.config import RunConfig
    from wsi_psm.segmenter.predict import network_maps, predict_maps

    torch.manual_seed(0)
    net = SegNet(width=4, depth=2).eval()
    thin = np.full((1, 1, 40, 3), 128, np.uint8)  # a factor under 1 would round a side to 0 px
    maps = network_maps(net, thin, torch.device("cpu"), tta=False, scales=(1.0, 0.3))
    assert maps.shape == (1, 2, 1, 40) and np.isfinite(maps).all()
    with pytest.raises(ValueError, match="nothing inside"):
        predict_maps(net, np.zeros((100, 100, 3), np.uint8), torch.device("cpu"), window=64)
    with pytest.raises(ValueError):
        RunConfig().with_updates(**{"segmenter.window_px": 64})
    with pytest.raises(ValueError, match="repeats"):
        RunConfig().with_updates(**{"segmenter.fitted_scales": [1.0, 1.0]})
    with pytest.raises(ValueError, match="less than or equal to 2"):  # memory: the pixels squared
        RunConfig().with_updates(**{"segmenter.fitted_scales": [1.0, 4.0]})


def test_distance_target_per_nucleus() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:13] = 1
    labels[5:15, 13:23] = 2  # touching its neighbour
    d = distance_target(labels)
    assert d[labels == 0].max() == 0
    for i in (1, 2):
        assert d[labels == i].max() == pytest.approx(1.0)
        assert d[labels == i].min() > 0
    # a valley on the shared edge: the pixels next to it are low for both nuclei
    assert d[10, 12] < 0.3 and d[10, 13] < 0.3


def test_colour_jitter_keeps_shape_and_type() -> None:
    img, _ = synthetic_tile(48)
    out = colour_jitter(img, np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_sample_batch_shapes_and_consistency() -> None:
    img, labels = synthetic_tile(96)
    s = sample_from_labels(img, labels)
    x, y = sample_batch([s], np.random.default_rng(0), 4, 48, colour=0.0)
    assert x.shape == (4, 3, 48, 48) and y.shape == (4, 3, 48, 48)
    # image and targets went through the same warp: dark pixels are where the foreground is
    dark = x.mean(dim=1) < -0.2
    fg = y[:, 0] > 0.5
    agree = (dark == fg).float().mean()
    assert agree > 0.9
    assert torch.allclose(y[:, 2], torch.ones_like(y[:, 2]), atol=1e-5)  # no weight map: all count


def test_sample_batch_pads_small_images() -> None:
    img, labels = synthetic_tile(40)
    x, y = sample_batch([sample_from_labels(img, labels)], np.random.default_rng(0), 2, 64)
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(y).all()


def test_maps_to_instances_separates_touching_discs() -> None:
    shape = (60, 80)
    a, b = disc(shape, 30, 28, 12), disc(shape, 30, 50, 12)
    labels = np.zeros(shape, np.int32)
    labels[a] = 1
    labels[b & ~a] = 2
    fg = (labels > 0).astype(np.float32)
    out = maps_to_instances(fg, distance_target(labels), mpp=0.5, min_area_um2=1)
    assert out.max() == 2
    assert out.dtype == np.int32
    assert set(np.unique(out[a & ~b])) == {out[30, 20]}
    assert out[30, 20] != out[30, 58]


def test_marker_h_splits_a_core_with_two_peaks() -> None:
    # two overlapping discs whose distance valley (0.625) stays above the marker threshold: one core
    shape = (60, 80)
    a, b = disc(shape, 30, 30, 12), disc(shape, 30, 48, 12)
    yy, xx = np.mgrid[:60, :80]
    cone = np.maximum(1 - np.hypot(yy - 30, xx - 30) / 24, 1 - np.hypot(yy - 30, xx - 48) / 24)
    dist = (cone * (a | b)).astype(np.float32)
    fg = (a | b).astype(np.float32)
    kw = {"mpp": 0.5, "min_area_um2": 1, "smooth_um": 0}
    assert maps_to_instances(fg, dist, **kw).max() == 1
    out = maps_to_instances(fg, dist, marker_h=0.1, **kw)
    assert out.max() == 2 and out[30, 22] != out[30, 56]
    # a lone disc keeps one label
    one = disc(shape, 30, 40, 10).astype(np.float32)
    assert maps_to_instances(one, one, marker_h=0.1, **kw).max() == 1


def test_h_maxima_above_equals_skimage() -> None:
    # clusters of touching blobs of a quantised distance-like map, the way _split_cores calls it:
    # smooth (few maxima per cluster), rough (many, at many levels) and with plateaus (ties)
    from skimage.morphology import h_maxima

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:160, :160]
    checked = 0
    for _ in range(6):
        q = np.zeros((160, 160))
        for _ in range(40):
            cy, cx, r = rng.uniform(0, 160), rng.uniform(0, 160), rng.uniform(3, 9)
            q = np.maximum(q, 1000 * (1 - np.hypot(yy - cy, xx - cx) / r))
        for noise in (0, 5, 30, 100):
            qn = np.round(q + rng.uniform(0, noise, q.shape) * (q > 0)).astype(np.int32)
            qn = np.minimum(qn, 900)  # flat tops: plateaus, some at one level in one cluster
            for h in (1, 20, 100, 400):
                for base in (0, 250):
                    ref = h_maxima(qn, h).astype(bool) & (qn >= max(h, base))
                    got = _h_maxima_above(qn, h, base)
                    assert np.array_equal(got, ref), (noise, h, base)
                    checked += int(ref.any())
    assert checked > 150  # the comparisons were not all of empty sets


def test_distance_peaks_one_point_per_nucleus() -> None:
    _, labels = synthetic_tile(96)
    maps = np.stack([(labels > 0).astype(np.float32), distance_target(labels)])
    pts = distance_peaks(maps, mpp=0.5)
    assert pts.shape == (5, 2) and pts.dtype == np.int64
    assert len(np.unique(labels[pts[:, 0], pts[:, 1]])) == 5  # the two touching discs included
    assert distance_peaks(np.zeros((2, 16, 16), np.float32), mpp=0.5).shape == (0, 2)


def test_shrink_takes_off_the_edge_in_micrometres() -> None:
    # two touching discs and a lone one, read out at 0.25 µm/px with and without a 0.25 µm shrink
    shape = (60, 100)
    a, b, c = disc(shape, 30, 25, 12), disc(shape, 30, 48, 12), disc(shape, 30, 80, 8)
    labels = np.zeros(shape, np.int32)
    labels[a], labels[b & ~a], labels[c] = 1, 2, 3
    fg, dist = (labels > 0).astype(np.float32), distance_target(labels)
    kw = {"min_area_um2": 1.0, "smooth_um": 0.0}
    plain = maps_to_instances(fg, dist, mpp=0.25, **kw)
    shrunk = maps_to_instances(fg, dist, mpp=0.25, shrink_um=0.25, **kw)
    assert plain.max() == shrunk.max() == 3 and shrunk.dtype == np.int32
    # one pixel off every edge: the outer ring, and a gap between the touching pair
    ring = (plain > 0) & ~ndi.binary_erosion(plain > 0, ndi.generate_binary_structure(2, 1))
    assert not (shrunk[ring] > 0).any()
    assert 0 < (plain > 0).sum() - (shrunk > 0).sum() < 2 * ring.sum()
    lone = plain == plain[30, 80]
    assert (shrunk[lone] > 0).sum() == (
        ndi.binary_erosion(lone, ndi.generate_binary_structure(2, 1))
    ).sum()
    assert shrunk[30, 36] == 0 or shrunk[30, 37] == 0  # the pair now parts along a line of zeros
    # at 0.5 µm/px the edge pixels' centres are 0.25 µm in: nothing is taken off
    np.testing.assert_array_equal(
        maps_to_instances(fg, dist, mpp=0.5, shrink_um=0.25, **kw),
        maps_to_instances(fg, dist, mpp=0.5, **kw),
    )


def test_maps_to_instances_empty() -> None:
    z = np.zeros((16, 16), np.float32)
    assert maps_to_instances(z, z, mpp=0.5).max() == 0


def test_label_centroids() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[2:5, 2:5] = 1
    labels[10:15, 12:17] = 2
    np.testing.assert_array_equal(label_centroids(labels), [[3, 3], [12, 14]])
    assert label_centroids(np.zeros((4, 4), np.int32)).shape == (0, 2)


def test_voronoi_sample_parts_neighbours() -> None:
    img, labels = synthetic_tile(96)
    pts = label_centroids(labels)
    s = voronoi_sample(img, pts, mpp=0.5, seed=0)
    assert s.fg.shape == labels.shape and s.weight is not None
    # every point is nucleus, and the two touching discs are apart (a background line between)
    assert all(s.fg[y, x] == 1 for y, x in pts)
    x0, x1 = pts[0][1], pts[1][1]
    between = [(s.fg[20, x], s.weight[20, x]) for x in range(x0 + 1, x1)]
    assert (0.0, 1.0) in between
    # background far from any point is background, with full weight
    assert s.fg[90, 90] == 0 and s.weight[90, 90] == 1
    assert s.dist.max() == pytest.approx(1.0)


def test_fit_is_seeded_and_learns() -> None:
    torch.set_num_threads(1)
    img, labels = synthetic_tile(96)
    samples = [sample_from_labels(img, labels)]
    kw = {"width": 4, "depth": 2, "steps": 30, "batch": 4, "crop": 48, "lr": 5e-3, "colour": 0.3}
    a = fit_segmenter(samples, seed=3, **kw)
    b = fit_segmenter(samples, seed=3, **kw)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    maps = predict_maps(a, img, CPU, tta=False)
    fg = maps[0] > 0.5
    # better than chance after a few steps: nucleus pixels score higher than background ones
    assert maps[0][labels > 0].mean() > maps[0][labels == 0].mean() + 0.2
    assert fg.any()


def test_fit_with_crops_made_on_the_device_learns() -> None:
    """The GPU fit's crop path (DeviceCrops), run on the CPU: seeded, and it learns the discs."""
    torch.set_num_threads(1)
    img, labels = synthetic_tile(96)
    samples = [sample_from_labels(img, labels)]
    kw = {"width": 4, "depth": 2, "steps": 30, "batch": 4, "crop": 48, "lr": 5e-3, "colour": 1.0}
    a = fit_segmenter(samples, seed=3, device_crops=True, **kw)
    b = fit_segmenter(samples, seed=3, device_crops=True, **kw)
    assert all(
        torch.equal(va, vb)
        for va, vb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    maps = predict_maps(a, img, CPU, tta=False)
    assert maps[0][labels > 0].mean() > maps[0][labels == 0].mean() + 0.2


def test_cpu_batches_are_those_the_shipped_model_was_fitted_on() -> None:
    """sample_batch's stream is pinned (sums of one seeded batch, as 3813df1 made it): a change to
    the draws or their order would make the CPU fit another fit than the shipped model's."""
    img, labels = synthetic_tile(96)
    x, y = sample_batch([sample_from_labels(img, labels)], np.random.default_rng(7), 4, 48)
    assert float(x.double().sum()) == pytest.approx(14365.0790, rel=1e-6)
    assert float(x.double().abs().sum()) == pytest.approx(16083.7503, rel=1e-6)
    assert float(y.double().sum()) == pytest.approx(10446.0589, rel=1e-6)


def off_square_samples() -> list:
    """Samples smaller than a 48-px crop's window in one side or both, or one pixel wide."""
    out = []
    for h, w in [(20, 200), (200, 33), (40, 40), (1, 120)]:
        img, labels = synthetic_tile(max(h, w))
        out.append(sample_from_labels(img[:h, :w].copy(), labels[:h, :w].copy()))
    return out


@pytest.mark.parametrize("size", [96, 40])
def test_device_crops_without_jitter_are_the_cpu_batches(size: int) -> None:
    """Cut and warped on the device, the batch is sample_batch's exactly (the same draws), a
    weight map and images smaller than the window (reflect-padded) included."""
    img, labels = synthetic_tile(size)
    weighted = sample_from_labels(
        img, labels, weight=np.linspace(0, 1, size * size).reshape(size, -1).astype(np.float32)
    )
    samples = [sample_from_labels(img, labels), weighted, *off_square_samples()]
    crops = DeviceCrops(samples, CPU)
    for seed in range(6):
        a = sample_batch(samples, np.random.default_rng(seed), 5, 48, colour=0.0)
        b = crops.batch(np.random.default_rng(seed), 5, 48, colour=0.0)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_jittered_device_crops_are_the_cpu_batches(monkeypatch) -> None:
    """With colour jitter (crops drawn without noise, so both streams stay together): the same
    windows, warps and targets as sample_batch, the images within one grey level; and the jitter
    did change them."""
    from dataclasses import replace

    import wsi_psm.segmenter.crops as crops_mod

    draw = crops_mod._draw_jitter
    monkeypatch.setattr(
        crops_mod, "_draw_jitter",
        lambda rng, shape, s: replace(draw(rng, None, s), noise_sigma=None, noise=None),
    )  # fmt: skip
    img, labels = synthetic_tile(96)
    samples = [sample_from_labels(img, labels), *off_square_samples()]
    crops = DeviceCrops(samples, CPU)
    for seed in range(4):
        xa, ya = sample_batch(samples, np.random.default_rng(seed), 6, 48, colour=1.0)
        xb, yb = crops.batch(np.random.default_rng(seed), 6, 48, colour=1.0)
        plain, _ = crops.batch(np.random.default_rng(seed), 6, 48, colour=0.0)
        assert torch.equal(ya, yb)
        assert (xa - xb).abs().max() <= 1 / 127.5 + 1e-6
        assert (xb - plain).abs().mean() > 0.02


def test_device_crops_add_noise(monkeypatch) -> None:
    """A crop drawn with noise gets it, at its sigma (grey levels; the warp smooths it a little)."""
    from dataclasses import replace

    import wsi_psm.segmenter.crops as crops_mod

    draw = crops_mod._draw_jitter

    def with_sigma(sigma):
        return lambda rng, shape, s: replace(draw(rng, None, s), noise_sigma=sigma, noise=None)

    img, labels = synthetic_tile(96)
    flat = np.full_like(img, 128)  # mid-grey: no clipping
    samples = [sample_from_labels(flat, labels)]
    monkeypatch.setattr(crops_mod, "_draw_jitter", with_sigma(None))
    clean, _ = DeviceCrops(samples, CPU).batch(np.random.default_rng(0), 4, 48)
    monkeypatch.setattr(crops_mod, "_draw_jitter", with_sigma(6.0))
    noisy, _ = DeviceCrops(samples, CPU).batch(np.random.default_rng(0), 4, 48)
    std = float((noisy - clean).std()) * 127.5
    assert 2.0 < std < 6.5


def test_device_crops_make_no_float64_tensors() -> None:
    """MPS has no float64: the device path (jitter, blur, warp) creates none."""
    from torch.overrides import TorchFunctionMode

    class NoDouble(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                self.seen.add(getattr(func, "__name__", str(func)))
            return out

    img, labels = synthetic_tile(96)
    crops = DeviceCrops([sample_from_labels(img, labels)], CPU)
    with NoDouble() as mode:
        for seed in range(4):  # blurred and noisy crops among them
            crops.batch(np.random.default_rng(seed), 8, 48)
    assert not mode.seen


def test_device_jitter_is_the_cpu_jitter() -> None:
    """The batch jitter in torch gives the numpy jitter's crops (the same draws and noise): at
    most one grey level apart (float rounding at .5), blur and noise included."""
    img, _ = synthetic_tile(64)
    rng = np.random.default_rng(5)
    draws = [_draw_jitter(rng, img.shape, 1.0) for _ in range(24)]
    assert any(d.blur for d in draws) and any(d.noise is not None for d in draws)
    want = np.stack([_apply_jitter(img, d) for d in draws]).astype(np.float32)
    noise = torch.from_numpy(
        np.stack(
            [d.noise / d.noise_sigma if d.noise is not None else np.zeros(img.shape) for d in draws]
        )
    ).float()
    x = torch.from_numpy(np.repeat(img[None], len(draws), 0)).float()
    got = _apply_jitter_batch(x, draws, noise).numpy()
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(want[0], img)  # the jitter did something


def test_batch_does_not_depend_on_the_jitter_threads() -> None:
    """The crops' colour jitter runs in threads after its numbers are drawn in order: one thread or
    three give the same batch."""
    from concurrent.futures import ThreadPoolExecutor

    class Counting(ThreadPoolExecutor):
        jobs = 0

        def submit(self, fn, /, *args, **kwargs):
            self.jobs += 1
            return super().submit(fn, *args, **kwargs)

    img, labels = synthetic_tile(96)
    samples = [sample_from_labels(img, labels)]
    one, three = Counting(1), Counting(3)
    for seed in range(3):
        a = sample_batch(samples, np.random.default_rng(seed), 6, 48, pool=one)
        b = sample_batch(samples, np.random.default_rng(seed), 6, 48, pool=three)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert one.jobs == three.jobs == 3 * 6  # every crop was jittered on the pool


def two_tiles() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two synthetic tiles: 10 nuclei, what a label-free fit needs at least (MIN_PSEUDO_NUCLEI)."""
    tiles = [synthetic_tile(96, seed) for seed in (0, 1)]
    return [img for img, _ in tiles], [labels > 0 for _, labels in tiles]


def test_fit_on_pseudo_masks_runs_refinement() -> None:
    imgs, masks = two_tiles()
    cfg = RunConfig().with_updates(
        **{"segmenter.width": 4, "segmenter.depth": 2, "segmenter.fit_steps": 5,
           "segmenter.fit_batch": 2, "segmenter.fit_crop_px": 48, "segmenter.refine_rounds": 1}
    )  # fmt: skip
    stages = []
    net = fit_on_pseudo_masks(imgs, masks, cfg, progress=lambda s, i, n: stages.append(s))
    assert isinstance(net, SegEnsemble) and len(net.members) == 2  # pseudo-mask net + refined net
    assert len(stages) == 10 and stages[0] != stages[-1]
    single = fit_on_pseudo_masks(imgs, masks, cfg.with_updates(**{"segmenter.ensemble": False}))
    assert isinstance(single, SegNet)


def test_fit_on_pseudo_masks_warm_start_per_member() -> None:
    """With ``init``, round r starts from a copy of member r: a tiny learning rate stays near it."""
    imgs, masks = two_tiles()
    cfg = RunConfig().with_updates(
        **{"segmenter.fit_steps": 2, "segmenter.fit_batch": 2, "segmenter.fit_crop_px": 48,
           "segmenter.lr": 1e-7, "segmenter.refine_rounds": 1}
    )  # fmt: skip
    start = SegEnsemble([tiny_net(1), tiny_net(2)])
    before = {k: v.clone() for k, v in start.state_dict().items()}
    net = fit_on_pseudo_masks(imgs, masks, cfg, init=start)
    assert isinstance(net, SegEnsemble) and len(net.members) == 2
    for got, ref in zip(net.members, start.members, strict=True):
        w, r = got.head.weight, ref.head.weight
        assert w.shape == r.shape and torch.allclose(w, r, atol=1e-4)
    # the starting nets are copied, never trained in place
    for k, v in start.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ensemble_averages_probabilities_and_round_trips() -> None:
    a, b = tiny_net(1), tiny_net(2)
    ens = SegEnsemble([a, b]).eval()
    img, _ = synthetic_tile(64)
    pa = network_maps(a, img[None], CPU, tta=False)
    pb = network_maps(b, img[None], CPU, tta=False)
    pe = network_maps(ens, img[None], CPU, tta=False)
    np.testing.assert_allclose(pe, (pa + pb) / 2, atol=1e-5)
    again = segmenter_from_state(segmenter_state(ens))
    assert isinstance(again, SegEnsemble)
    np.testing.assert_allclose(network_maps(again, img[None], CPU, tta=False), pe, atol=1e-6)


def test_state_round_trip(tmp_path) -> None:
    net = tiny_net(1)
    img, _ = synthetic_tile(64)
    ref = network_maps(net, img[None], CPU, tta=False)
    state = segmenter_state(net, target_mpp=0.5)
    assert state["meta"]["arch"] == {"width": 4, "depth": 2}
    again = segmenter_from_state(state)
    np.testing.assert_allclose(network_maps(again, img[None], CPU, tta=False), ref, atol=1e-6)
    path = save_segmenter(tmp_path / "seg.pt", net, provenance={"trained_on": "synthetic"})
    loaded, meta = read_segmenter_file(path)
    assert meta["provenance"] == {"trained_on": "synthetic"}
    np.testing.assert_allclose(network_maps(loaded, img[None], CPU, tta=False), ref, atol=1e-6)
    with pytest.raises(ValueError):
        segmenter_from_state({"meta": {"format": "something else"}, "tensors": {}})


def test_predictor_protocol() -> None:
    cfg = RunConfig().with_updates(**{"segmenter.tta": False})
    pred = SegmenterPredictor(tiny_net(), CPU, cfg)
    imgs = np.stack([synthetic_tile(64, s)[0] for s in range(3)])
    raws = pred.network(imgs)
    assert len(raws) == 3 and raws[0].shape == (2, 64, 64)
    # float16 for the trip to the post-processing workers, rounded from the float32 maps
    assert raws[0].dtype == np.float16
    full = network_maps(pred.net, imgs, CPU, tta=False)
    np.testing.assert_array_equal(np.stack(raws), full.astype(np.float16))
    lab = pred.labels(imgs[0], raws[0])
    assert lab.shape == (64, 64) and lab.dtype == np.int32
