"""Prior self-activation maps: batched Grad-CAM over the activation net's shallow blocks.

For each shallow block b with activation A (B, C, h, w) and G = d(score)/dA, the block map is
``cam_b = sum_c mean_xy(G_c) * A_c`` (no ReLU, as the method). Block maps are sign-aligned and scaled
(see below), averaged, mapped to [0, 1] and bilinearly upsampled to the input size.

Calibration (:func:`calibrate_psm`, run once after fitting on the fit tiles) fixes, per block, the
sign that makes the map higher on haematoxylin-rich pixels than on typical tissue ("nuclei high":
the self-supervised task does not fix the sign) and a scale, plus the global range of the averaged map
(1st-99th percentile -> [0, 1]). Maps of a calibrated net are therefore on one scale across a whole
slide: a tile without nuclei stays low instead of being stretched to [0, 1]. An uncalibrated net
falls back to a per-tile polarity check against the tile's haematoxylin and per-tile min-max.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from wsi_psm.preprocess import forward_in_chunks, to_network_input
from wsi_psm.psm.network import ActivationNet
from wsi_psm.stain import Stain, stain_channels, stained_pixels


def _block_cams(net: ActivationNet, x: torch.Tensor) -> torch.Tensor:
    """Raw per-block Grad-CAMs at shallow resolution: (B, n_blocks, h, w) float32."""
    net.eval()
    # Grad-CAM needs autograd even when a caller runs under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        if x.is_inference():
            x = x.clone()
        out, acts = net.forward_with_shallow(x)
        # Images are independent in eval mode, so the gradient of the sum gives each its own gradient.
        grads = torch.autograd.grad(net.score(out).sum(), acts)
    cams = [
        (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1) for a, g in zip(acts, grads, strict=True)
    ]
    return torch.stack(cams, dim=1).detach().float()


def _upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def _minmax(m: torch.Tensor) -> torch.Tensor:
    """Min-max each (B, K, h, w) map over its own pixels."""
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def _polarity(maps: np.ndarray, hema: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """+1/-1 per map (K, N) so that the map is higher on haematoxylin-rich pixels than on typical tissue.

    Compares each map's median over the top decile of haematoxylin OD with its median over all
    stained pixels. A plain correlation over the whole tile is not used: it is dominated by the
    tissue-versus-glass contrast and can keep nuclei low in a map whose tissue is high (measured on
    CMU-1 tiles). Returns +1 where undecidable (no stained pixels).
    """
    if tissue.sum() < 20:
        return np.ones(len(maps))
    h = hema[tissue]
    top = h >= np.percentile(h, 90)
    m = maps[:, tissue]
    d = np.median(m[:, top], axis=1) - np.median(m, axis=1)
    return np.where(d < 0, -1.0, 1.0)


def _haematoxylin(rgb: np.ndarray, stain: Stain) -> np.ndarray:
    return stain_channels(rgb, stain)["haematoxylin"]


@torch.no_grad()
def _to_device(rgb_batch: np.ndarray, device: torch.device) -> torch.Tensor:
    return to_network_input(rgb_batch, device)


def compute_psm(
    net: ActivationNet, rgb_batch: np.ndarray, device: torch.device, *, stain: Stain = "he"
) -> np.ndarray:
    """PSM of a batch of uint8 RGB tiles (B, H, W, 3) or one tile (H, W, 3) -> (B, H, W) float32 in
    [0, 1], nuclei high. ``stain`` only matters for an uncalibrated net (per-tile polarity check)."""
    rgb = np.asarray(rgb_batch)
    if rgb.ndim == 3:
        rgb = rgb[None]
    b, h, w = rgb.shape[:3]
    net = net.to(device)
    x = _to_device(rgb, device)
    cams = forward_in_chunks(lambda xs: _block_cams(net, xs), x)  # (B, K, h', w')
    if net.calibrated:
        sign = net.block_sign.to(cams.device).view(1, -1, 1, 1)
        scale = net.block_scale.to(cams.device).view(1, -1, 1, 1)
        m = (cams * sign / scale).mean(dim=1, keepdim=True)
        m = (m - net.cam_lo) / (net.cam_hi - net.cam_lo)
        m = _upsample(m, (h, w)).clamp_(0.0, 1.0)
        return m[:, 0].cpu().numpy().astype(np.float32)
    # Uncalibrated: per-tile, per-block polarity against the tile's haematoxylin, then min-max.
    up = _upsample(cams, (h, w)).cpu().numpy()
    outs = np.empty((b, h, w), np.float32)
    for i in range(b):
        hema = _haematoxylin(rgb[i], stain).ravel()
        sign = _polarity(up[i].reshape(up.shape[1], -1), hema, stained_pixels(rgb[i]).ravel())
        m = _minmax(torch.from_numpy(up[i] * sign[:, None, None])).mean(dim=0, keepdim=True)
        outs[i] = _minmax(m)[0].numpy()
    return outs


def calibrate_psm(
    net: ActivationNet,
    tiles: Sequence[np.ndarray],
    device: torch.device,
    *,
    stain: Stain = "he",
    batch_size: int = 4,
    lo_pct: float = 1.0,
    hi_pct: float = 99.0,
    max_pixels_per_tile: int = 20000,
    seed: int = 0,
) -> ActivationNet:
    """Fix the net's PSM polarity and normalisation from sample tiles (label-free); returns ``net``.

    Per block: sign such that the map is higher on the most haematoxylin-rich decile of stained
    pixels than on stained pixels overall (:func:`_polarity`); scale = standard deviation of the raw
    map. Then the averaged map's ``lo_pct``/``hi_pct`` percentiles
    become 0 and 1.
    """
    rng = np.random.default_rng(seed)
    net = net.to(device)
    n_blocks = len(net.shallow)
    raws, hemas, tissues = [], [], []
    for i in range(0, len(tiles), batch_size):
        chunk = [np.asarray(t) for t in tiles[i : i + batch_size]]
        for t in chunk:  # tiles may differ in size: run them one shape at a time
            cams = _block_cams(net, _to_device(t[None], device))
            up = _upsample(cams, t.shape[:2])[0].cpu().numpy().reshape(n_blocks, -1)
            hema = _haematoxylin(t, stain).ravel()
            idx = rng.choice(up.shape[1], min(max_pixels_per_tile, up.shape[1]), replace=False)
            raws.append(up[:, idx])
            hemas.append(hema[idx])
            tissues.append(stained_pixels(t).ravel()[idx])
    raw = np.concatenate(raws, axis=1).astype(np.float64)
    hema = np.concatenate(hemas).astype(np.float64)
    sign = _polarity(raw, hema, np.concatenate(tissues))
    scale = np.maximum(raw.std(axis=1), 1e-12)
    avg = (raw * sign[:, None] / scale[:, None]).mean(axis=0)
    lo, hi = np.percentile(avg, [lo_pct, hi_pct])
    if not hi > lo:
        hi = lo + 1.0
    net.block_sign = torch.tensor(sign, dtype=torch.float32, device=net.cam_lo.device)
    net.block_scale = torch.tensor(scale, dtype=torch.float32, device=net.cam_lo.device)
    net.cam_lo.fill_(float(lo))
    net.cam_hi.fill_(float(hi))
    return net
