"""Self-supervised, label-free fit of the activation network on tiles sampled from a slide or cohort.

Tasks (``PSMConfig.task``):

- ``rot180-similarity`` (the reference's task): the scalar output of a crop should equal that of the
  same crop rotated by 180 degrees, ``|f(x) - f(rot180 x)|``. On its own this is solved by a constant
  f; a VICReg-style variance hinge ``relu(1 - std_batch(f))`` rules that solution out.
- ``rotation``: 4-way prediction of the rotation (0/90/180/270) applied to a crop.
- ``contrastive``: SimCLR (NT-Xent, temperature 0.2) between two overlapping, independently
  flipped/rotated crops of the same region, against the other crops of the batch.
- ``stain-regression`` (default): regress a crop's mean haematoxylin optical density, computed from
  the crop itself by colour deconvolution (no annotation), from the crop shown in grey half of the
  time, so the net must find nuclei by shape as well as by colour.

Which task, measured (benchmarks/README.md, MoNuSeg, PSM pixel AUC against the annotation): only
stain-regression gives a PSM whose sign and scale hold across images (AUC 0.92 with one calibration
per net); the reference's rot180 similarity, rotation (which does not learn: tissue has no "up")
and contrastive give maps whose sign flips from image to image (AUC 0.40-0.77).

``colour_jitter`` scales each crop's optical density per channel at random (used by all tasks);
similarity and contrastive otherwise solve their task with colour statistics, but it lowers the
stain-regression PSM (AUC 0.83 at 0.3), so it is off by default.

Speed: denormal floats appear in the first ~100 steps and made each step ~35x slower on x86 CPUs
(measured: 300 steps 190 s -> 16 s on 2 cores), so the fit runs with denormals flushed to zero.

Seeded: crops come from a numpy Generator and weights from a forked torch RNG, so two fits with the
same seed, tiles and config give identical weights on CPU (the global RNG state is left untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn import functional as F

from wsi_psm.config import PSMConfig
from wsi_psm.errors import SlideTooSmallError
from wsi_psm.preprocess import to_network_input
from wsi_psm.psm.maps import calibrate_psm
from wsi_psm.psm.network import ActivationNet
from wsi_psm.stain import Stain, stain_channels

Progress = Callable[[int, int, float], None]

# Tiles used to calibrate the PSM (polarity, scale) after the fit.
CALIBRATION_TILES = 16


def _check_tiles(tiles: Sequence[np.ndarray], crop: int) -> list[np.ndarray]:
    out = []
    for t in tiles:
        a = np.asarray(t)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"fit tiles must be uint8 (H, W, 3) RGB, got {a.dtype} {a.shape}")
        if min(a.shape[:2]) >= crop:
            out.append(a)
    if not out:
        raise SlideTooSmallError(
            f"too small to fit a network on: no image or tile is at least {crop} px a side at the "
            "processing resolution"
        )
    return out


def _crop(t: np.ndarray, y: int, x: int, s: int) -> np.ndarray:
    return t[y : y + s, x : x + s]


def _random_crops(tiles: list[np.ndarray], n: int, s: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, s, s, 3), np.uint8)
    for i in range(n):
        t = tiles[rng.integers(len(tiles))]
        y = rng.integers(t.shape[0] - s + 1)
        x = rng.integers(t.shape[1] - s + 1)
        out[i] = _crop(t, y, x, s)
    return out


def _dihedral(x: np.ndarray, rng: np.random.Generator, rotate: bool = True) -> np.ndarray:
    """Random flip (and 90-degree rotation) per crop; (N, s, s, 3)."""
    out = np.empty_like(x)
    for i in range(len(x)):
        a = x[i]
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if rotate:
            a = np.rot90(a, int(rng.integers(4)))
        out[i] = a
    return out


def _colour_jitter(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Independent random stain-intensity jitter per crop, in optical density: each RGB channel's OD
    is scaled by U(1 - s, 1 + s) and the whole crop's OD by another such factor. Views of one region
    with different jitter can only be matched by structure, not by colour."""
    if strength <= 0:
        return x
    od = -np.log((x.astype(np.float32) + 1.0) / 256.0)
    n = len(x)
    scale = rng.uniform(1 - strength, 1 + strength, size=(n, 1, 1, 3)) * rng.uniform(
        1 - strength, 1 + strength, size=(n, 1, 1, 1)
    )
    out = 256.0 * np.exp(-od * scale.astype(np.float32)) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _grayscale(x: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Replace each crop by its grey level (kept as 3 equal channels) with probability p."""
    out = x.copy()
    for i in range(len(x)):
        if rng.random() < p:
            g = np.rint(x[i].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
            out[i] = np.clip(g, 0, 255).astype(np.uint8)[..., None]
    return out


def _contrastive_pairs(
    tiles: list[np.ndarray], n: int, s: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping crops (shifted by up to s/4) of the same region, independently flipped/rotated."""
    a = np.empty((n, s, s, 3), np.uint8)
    b = np.empty_like(a)
    m = s // 4
    for i in range(n):
        t = tiles[rng.integers(len(tiles))]
        y = rng.integers(t.shape[0] - s + 1)
        x = rng.integers(t.shape[1] - s + 1)
        a[i] = _crop(t, y, x, s)
        y2 = int(np.clip(y + rng.integers(-m, m + 1), 0, t.shape[0] - s))
        x2 = int(np.clip(x + rng.integers(-m, m + 1), 0, t.shape[1] - s))
        b[i] = _crop(t, y2, x2, s)
    return _dihedral(a, rng), _dihedral(b, rng)


def _nt_xent(za: torch.Tensor, zb: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    z = F.normalize(torch.cat([za, zb]), dim=1)
    sim = z @ z.t() / tau
    n = za.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _step_loss(
    net: ActivationNet,
    task: str,
    tiles: list[np.ndarray],
    cfg: PSMConfig,
    rng: np.random.Generator,
    device: torch.device,
) -> torch.Tensor:
    n, s = cfg.fit_batch, cfg.fit_crop_px
    j = cfg.colour_jitter
    if task == "rot180-similarity":
        c = _dihedral(_random_crops(tiles, n, s, rng), rng)
        pair = np.concatenate(
            [_colour_jitter(c, rng, j), _colour_jitter(np.rot90(c, 2, axes=(1, 2)), rng, j)]
        )
        f = net(to_network_input(pair, device))[:, 0]
        fa, fb = f[:n], f[n:]
        return (fa - fb).abs().mean() + F.relu(1.0 - fa.std())
    if task == "rotation":
        c = _colour_jitter(_dihedral(_random_crops(tiles, n, s, rng), rng, rotate=False), rng, j)
        x = to_network_input(c, device)
        k = torch.from_numpy(rng.integers(4, size=n))
        xr = torch.stack([torch.rot90(x[i], int(k[i]), dims=(1, 2)) for i in range(n)])
        return F.cross_entropy(net(xr), k.to(device))
    if task == "contrastive":
        a, b = _contrastive_pairs(tiles, n, s, rng)
        a, b = _colour_jitter(a, rng, j), _colour_jitter(b, rng, j)
        z = net(to_network_input(np.concatenate([a, b]), device))
        return _nt_xent(z[:n], z[n:])
    if task == "stain-regression":
        c = _dihedral(_random_crops(tiles, n, s, rng), rng)
        target = torch.from_numpy(
            np.array([stain_channels(t, "he")["haematoxylin"].mean() for t in c], np.float32)
        )
        x = _grayscale(_colour_jitter(c, rng, j), rng, 0.5)
        pred = net(to_network_input(x, device))[:, 0]
        t = target.to(device)
        return F.mse_loss(pred, (t - t.mean()) / t.std().clamp_min(1e-3))
    raise ValueError(f"unknown self-supervised task {task!r}")


@contextmanager
def _flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero for the duration (restored afterwards where supported)."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def one_cycle(
    opt: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle schedule (10% warm-up) for any step count: torch's OneCycleLR divides by zero when
    a phase is shorter than one step (e.g. exactly 10 steps), so the warm-up is at least 2 steps and
    fewer than 4 steps keep a constant rate."""
    if steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2.0 / steps)
    )


def fit_activation_net(
    tiles: Sequence[np.ndarray],
    cfg: PSMConfig,
    *,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
    stain: Stain = "he",
) -> ActivationNet:
    """Fit an :class:`ActivationNet` on uint8 RGB tiles (at the processing mpp) without labels, then
    calibrate its PSM (polarity against haematoxylin, scale) on up to 16 of the tiles.

    ``progress(step, total, loss)`` is called after every optimiser step.
    """
    usable = _check_tiles(tiles, cfg.fit_crop_px)
    rng = np.random.default_rng(seed)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _flush_denormals():
        torch.manual_seed(seed)
        net = ActivationNet(width=cfg.width, shallow_blocks=cfg.shallow_blocks, task=cfg.task).to(
            device
        )
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        sched = one_cycle(opt, cfg.lr, cfg.fit_steps)
        net.train()
        for step in range(cfg.fit_steps):
            loss = _step_loss(net, cfg.task, usable, cfg, rng, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(step + 1, cfg.fit_steps, float(loss.detach()))
    net.eval()
    pick = rng.choice(len(usable), min(CALIBRATION_TILES, len(usable)), replace=False)
    return calibrate_psm(net, [usable[i] for i in sorted(pick)], device, stain=stain, seed=seed)
