"""Training crops for the downstream network: cut, colour-jittered and warped, image and targets alike.

Augmentation is strong, because one fit must serve other organs, stains and scanners: stain-space
colour jitter (haematoxylin / eosin amounts scaled and shifted), brightness, contrast, saturation,
blur and noise on the crop, then one random affine per crop (any rotation, a flip, a scale in
``segmenter.fit_scale``, 0.8-1.25 by default) applied to image and targets together with
``grid_sample``.

Two ways to make a batch, with the same arithmetic:

- :func:`sample_batch` (a CPU fit): windows cut and jittered in numpy (the jitter on a thread
  pool), warped by torch. Bit-reproducible on one CPU type: the shipped model was fitted this way.
- :class:`DeviceCrops` (a fit on a GPU): the samples are copied to the device once, and every
  batch is cut, jittered and warped there. Made on the CPU, a batch took ~20-65 ms of one core
  while the GPU's training step takes a few: the fit waited on the crops (GPU 5% busy). It draws
  the same numbers in the same order from the numpy Generator, but not the noise arrays (a
  229² crop's noise is ~2.5 ms of one core), which a torch Generator makes on the device: its
  stream parts from :func:`sample_batch`'s at the first noisy crop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from wsi_psm.cores import usable_cores
from wsi_psm.preprocess import OFFSET, SCALE, to_network_input
from wsi_psm.stain import default_stain_matrix, rgb_to_od


@dataclass
class Sample:
    """One training image at the processing resolution with its targets (all the same H x W)."""

    image: np.ndarray  # uint8 (H, W, 3)
    fg: np.ndarray  # float32 in [0, 1]
    dist: np.ndarray  # float32 in [0, 1]
    weight: np.ndarray | None = None  # float32 >= 0; None = all ones

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + 3 * self.fg.size * 4


_HE = default_stain_matrix("he")
_M = np.vstack([_HE, np.cross(_HE[0], _HE[1]) / np.linalg.norm(np.cross(_HE[0], _HE[1]))]).astype(
    np.float32
)
_M_INV = np.linalg.inv(_M).astype(np.float32)


@dataclass(frozen=True)
class _JitterDraw:
    """One crop's random colour-jitter numbers (:func:`colour_jitter`), drawn apart from its
    arithmetic: a batch's draws are made in order on one Generator, then its crops are jittered in
    threads (or on the device), so a CPU batch does not depend on the threads that jitter it."""

    alpha: np.ndarray  # per stain: amount factor
    beta: np.ndarray  # per stain: shift
    contrast: float
    brightness: float
    saturation: float
    blur: float | None  # Gaussian sigma, px
    noise_sigma: float | None  # additive Gaussian noise, grey levels
    noise: np.ndarray | None  # that noise, the crop's shape (None when the device draws it)


def _draw_jitter(rng: np.random.Generator, shape: tuple[int, ...] | None, s: float) -> _JitterDraw:
    """``shape``: the crop's, to draw its noise array here; None leaves the array to the caller."""
    alpha = rng.uniform(1 - 0.35 * s, 1 + 0.35 * s, size=3).astype(np.float32)
    beta = rng.uniform(-0.05 * s, 0.05 * s, size=3).astype(np.float32)
    contrast = rng.uniform(1 - 0.2 * s, 1 + 0.2 * s)
    brightness = rng.uniform(-15, 15) * s
    saturation = rng.uniform(1 - 0.3 * s, 1 + 0.3 * s)
    blur = rng.uniform(0.3, 1.2) if rng.random() < 0.25 * s else None
    sigma = noise = None
    if rng.random() < 0.25 * s:
        sigma = rng.uniform(2, 8)
        noise = None if shape is None else rng.normal(0, sigma, size=shape)
    return _JitterDraw(alpha, beta, contrast, brightness, saturation, blur, sigma, noise)


def _apply_jitter(rgb: np.ndarray, j: _JitterDraw) -> np.ndarray:
    od = rgb_to_od(rgb)
    conc = od @ _M_INV
    conc = conc * j.alpha + j.beta
    od = np.maximum(conc @ _M, 0.0)
    img = 256.0 * np.power(10.0, -od) - 1.0
    # brightness / contrast around the mean, saturation against the grey value
    mean = img.mean()
    img = (img - mean) * j.contrast + mean + j.brightness
    grey = img.mean(axis=-1, keepdims=True)
    img = grey + (img - grey) * j.saturation
    if j.blur is not None:
        img = ndi.gaussian_filter(img, (j.blur, j.blur, 0))
    if j.noise is not None:
        img = img + j.noise
    return np.clip(img, 0, 255).round().astype(np.uint8)


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A randomly restained copy of a uint8 RGB crop (stain amounts, brightness, contrast, saturation)."""
    return _apply_jitter(rgb, _draw_jitter(rng, rgb.shape, strength))


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(img, (sigma, sigma, 0))`` for one (H, W, 3) float crop:
    the same kernel (truncated at 4 sigma) and borders (``reflect``: the edge pixel repeated)."""
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    # (built in numpy: MPS has no float64)
    k = torch.as_tensor(k / k.sum(), dtype=img.dtype, device=img.device)
    x = img.permute(2, 0, 1)[None]  # (1, 3, H, W)
    for dim in (2, 3):
        n = x.shape[dim]
        # reflect-pad r pixels (the edge repeated, as scipy): for crops larger than the kernel
        lo = x.narrow(dim, 0, min(r, n)).flip(dim)
        hi = x.narrow(dim, n - min(r, n), min(r, n)).flip(dim)
        x = torch.cat([lo, x, hi], dim)
        w = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
        x = F.conv2d(x, w.expand(3, 1, *w.shape[2:]), groups=3)
    return x[0].permute(1, 2, 0)


def _apply_jitter_batch(
    x: torch.Tensor, draws: Sequence[_JitterDraw], noise: torch.Tensor | None
) -> torch.Tensor:
    """:func:`_apply_jitter` for a whole float (B, H, W, 3) batch of 0-255 values at once, on its
    device; ``noise``: standard normal (B, H, W, 3), scaled by each draw's sigma (None: none).
    Returns 0-255 integral float values."""
    dev = x.device

    def per_crop(values: Sequence[float] | np.ndarray, dims: int = 3) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(values, np.float32), device=dev)
        return a.view(len(draws), *([1] * dims), *a.shape[1:])

    m = torch.as_tensor(_M, device=dev)
    m_inv = torch.as_tensor(_M_INV, device=dev)
    od = -torch.log10((x + 1.0) / 256.0)
    conc = od @ m_inv
    conc = conc * per_crop([d.alpha for d in draws], 2) + per_crop([d.beta for d in draws], 2)
    img = 256.0 * torch.pow(10.0, -(conc @ m).clamp_min(0.0)) - 1.0
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * per_crop([d.contrast for d in draws]) + mean
    img = img + per_crop([d.brightness for d in draws])
    grey = img.mean(dim=-1, keepdim=True)
    img = grey + (img - grey) * per_crop([d.saturation for d in draws])
    for i, d in enumerate(draws):
        if d.blur is not None:
            img[i] = _gaussian_blur(img[i], d.blur)
    if noise is not None:
        img = img + noise * per_crop([d.noise_sigma or 0.0 for d in draws])
    return img.clamp_(0.0, 255.0).round_()


@functools.cache
def _jitter_pool() -> ThreadPoolExecutor:
    # numpy releases the GIL on whole-crop arithmetic: beside a GPU, whose training step takes a
    # few ms, jittering a batch's crops one after another on one core was most of a step
    return ThreadPoolExecutor(min(8, usable_cores()), thread_name_prefix="wsi-psm-jitter")


def _affine_batch(
    x: torch.Tensor, y: torch.Tensor, out: int, rng: np.random.Generator, scale: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rotation / flip / scale per sample, the same for image and targets; centre ``out``^2."""
    b, _, h, w = x.shape
    theta = np.zeros((b, 2, 3), np.float32)
    for i in range(b):
        a = rng.uniform(0, 2 * math.pi)
        s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))
        f = -1.0 if rng.random() < 0.5 else 1.0
        # output pixel grid spans out px; in input normalised coords that is out/w * s
        sx, sy = out / w / s, out / h / s
        c, si = math.cos(a), math.sin(a)
        theta[i] = [[c * sx * f, -si * sy, 0.0], [si * sx * f, c * sy, 0.0]]
    grid = F.affine_grid(
        torch.from_numpy(theta).to(x.device), [b, 1, out, out], align_corners=False
    )
    xo = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    yo = F.grid_sample(y, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return xo, yo


def _window(crop: int, scale: tuple[float, float]) -> int:
    # a window large enough that any rotation at the smallest scale stays inside it
    return math.ceil(crop * math.sqrt(2) / scale[0]) + 2


def _draw_window(
    rng: np.random.Generator, shapes: Sequence[tuple[int, int]], win: int
) -> tuple[int, int, int]:
    """A random sample and the top-left corner of a ``win`` window in it."""
    k = int(rng.integers(len(shapes)))
    h, w = shapes[k]
    return k, int(rng.integers(max(h - win, 0) + 1)), int(rng.integers(max(w - win, 0) + 1))


def _cut(a: np.ndarray, box: tuple[slice, slice], win: int) -> np.ndarray:
    """``a[box]``, reflect-padded to ``win`` x ``win`` when the image is smaller than the window."""
    c = a[box]
    if c.shape[0] < win or c.shape[1] < win:
        pad = [(0, win - c.shape[0]), (0, win - c.shape[1])] + [(0, 0)] * (c.ndim - 2)
        c = np.pad(c, pad, mode="reflect")
    return c


def sample_batch(
    samples: Sequence[Sample],
    rng: np.random.Generator,
    batch: int,
    crop: int,
    *,
    colour: float = 1.0,
    scale: tuple[float, float] = (0.8, 1.25),
    pool: Executor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of augmented crops: inputs (B, 3, crop, crop) and targets (B, 3, crop, crop) =
    (foreground, distance, weight), on ``device`` (the warp runs there). The crops' colour jitter
    runs on ``pool`` (default: a shared thread pool); the batch does not depend on it."""
    win = _window(crop, scale)
    shapes = [s.fg.shape for s in samples]
    imgs = np.empty((batch, win, win, 3), np.uint8)
    tg = np.empty((batch, 3, win, win), np.float32)
    draws: list[_JitterDraw] = []
    for i in range(batch):
        k, y0, x0 = _draw_window(rng, shapes, win)
        s = samples[k]
        box = (slice(y0, y0 + win), slice(x0, x0 + win))
        imgs[i] = _cut(s.image, box, win)
        if colour > 0:
            draws.append(_draw_jitter(rng, imgs[i].shape, colour))
        tg[i, 0] = _cut(s.fg, box, win)
        tg[i, 1] = _cut(s.dist, box, win)
        tg[i, 2] = 1.0 if s.weight is None else _cut(s.weight, box, win)
    if draws:

        def jitter(i: int) -> None:
            imgs[i] = _apply_jitter(imgs[i], draws[i])

        list((pool or _jitter_pool()).map(jitter, range(batch)))
    x = to_network_input(imgs, device)
    y = torch.from_numpy(tg) if device is None else torch.from_numpy(tg).to(device)
    return _affine_batch(x, y, crop, rng, scale)


class DeviceCrops:
    """The samples held on ``device``, each batch cut, jittered and warped there (:func:`sample_batch`
    otherwise). The draws from ``rng`` are :func:`sample_batch`'s but the noise arrays, which come
    from a torch Generator on the device seeded with ``seed``: with ``colour=0``, or crops without
    noise, the batches are :func:`sample_batch`'s (to float rounding once jittered)."""

    def __init__(self, samples: Sequence[Sample], device: torch.device, *, seed: int = 0) -> None:
        if not samples:
            raise ValueError("DeviceCrops needs at least one training sample")
        self.device = device
        self.shapes = [s.fg.shape for s in samples]
        self.images = [torch.from_numpy(np.ascontiguousarray(s.image)).to(device) for s in samples]
        self.targets = []
        for s in samples:
            w = np.ones_like(s.fg) if s.weight is None else s.weight
            tg = np.stack([s.fg, s.dist, w]).astype(np.float32, copy=False)
            self.targets.append(torch.from_numpy(tg).to(device))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @staticmethod
    def _cut(a: torch.Tensor, y0: int, x0: int, win: int, hw_dims: tuple[int, int]) -> torch.Tensor:
        """As :func:`_cut` (``numpy.pad``'s "reflect": the edge pixel not repeated)."""
        dy, dx = hw_dims
        c = a.narrow(dy, y0, min(win, a.shape[dy] - y0)).narrow(dx, x0, min(win, a.shape[dx] - x0))
        for dim in hw_dims:
            if c.shape[dim] == 1:  # (np.pad repeats a lone pixel)
                c = torch.cat([c] * win, dim)
            while c.shape[dim] < win:  # np.pad reflects again off the new edge when a pass is short
                n = min(win - c.shape[dim], c.shape[dim] - 1)
                c = torch.cat([c, c.narrow(dim, c.shape[dim] - 1 - n, n).flip(dim)], dim)
        return c

    def batch(
        self,
        rng: np.random.Generator,
        batch: int,
        crop: int,
        *,
        colour: float = 1.0,
        scale: tuple[float, float] = (0.8, 1.25),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`sample_batch`, made on the device."""
        win = _window(crop, scale)
        imgs, tgs, draws = [], [], []
        for _ in range(batch):
            k, y0, x0 = _draw_window(rng, self.shapes, win)
            imgs.append(self._cut(self.images[k], y0, x0, win, (0, 1)))
            if colour > 0:
                draws.append(_draw_jitter(rng, None, colour))
            tgs.append(self._cut(self.targets[k], y0, x0, win, (1, 2)))
        x = torch.stack(imgs).to(torch.float32)  # (B, win, win, 3), 0-255
        if draws:
            noise = None
            if any(d.noise_sigma is not None for d in draws):
                noise = torch.randn(x.shape, generator=self.generator, device=self.device)
            x = _apply_jitter_batch(x, draws, noise)
        x = x.permute(0, 3, 1, 2).div_(SCALE).sub_(OFFSET).contiguous()
        return _affine_batch(x, torch.stack(tgs), crop, rng, scale)
