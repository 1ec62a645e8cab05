"""Running the downstream network: batched, tiled, test-time-augmented maps (read out into
instances by :mod:`wsi_psm.segmenter.readout`).

``predict_maps`` turns a uint8 RGB image of any size into two probability maps (nucleus foreground,
normalised distance to the nucleus edge) at the same pixels. Large images go in overlapping windows
whose centres are kept; windows are batched on the device, each with its 8 dihedral variants
averaged (test-time augmentation) when asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from wsi_psm.allocator import large_blocks_reused
from wsi_psm.config import RunConfig
from wsi_psm.preprocess import CPU_FORWARD_PIXELS, forward_in_chunks, to_network_input
from wsi_psm.segmenter.network import Segmenter
from wsi_psm.segmenter.readout import MapsLabeller


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 rotations/flips of a (B, C, H, W) batch (k < 4: rotations)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    y = torch.rot90(y, -(k % 4), dims=(-2, -1))
    if k >= 4:
        y = y.flip(-1)
    return y


@torch.no_grad()
def network_maps(
    net: Segmenter,
    images: np.ndarray,
    device: torch.device,
    *,
    tta: bool = True,
    amp: bool = False,
    half: bool = False,
    channels_last: bool = True,
    scales: Sequence[float] = (1.0,),
) -> np.ndarray:
    """Probabilities (B, 2, H, W) of a (B, H, W, 3) uint8 batch; H and W any size (padded).

    float32, or float16 with ``half`` (rounded on the device: half the bytes back to the host).
    ``scales``: the batch is also shown magnified by each factor (bilinear, on the device) and
    the maps, resampled back, are averaged with the others (test-time magnification; see
    ``segmenter.fitted_scales``).
    ``channels_last``: on a CPU or CUDA device the batch goes through in that memory format, which
    oneDNN's convolutions run 1.2-1.6x faster on a CPU (same maps up to float rounding, ~1e-5) and
    cuDNN's float16 ones ~1.2x faster on an H100 (max |d| 4e-4); elsewhere (MPS: not measured) the
    plain layout.
    """
    x0 = to_network_input(images, device)
    fast = channels_last and device.type in ("cpu", "cuda")
    layout = torch.channels_last if fast else torch.contiguous_format
    h, w = x0.shape[-2:]
    autocast = (
        torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else None
    )
    # a CPU forward of a large image allocates blocks over glibc's mmap ceiling: reuse them, over
    # all the variants (one scope: the heap is handed back once, not per variant)
    big = device.type == "cpu" and h * w * max(scales) ** 2 > CPU_FORWARD_PIXELS
    acc, n = None, 0
    with large_blocks_reused() if big else contextlib.nullcontext():
        for scale in scales:
            hs, ws = (h, w) if scale == 1 else (max(1, round(h * scale)), max(1, round(w * scale)))
            x = x0 if (hs, ws) == (h, w) else _resample(x0, (hs, ws))
            m = net.multiple
            ph, pw = (-hs) % m, (-ws) % m
            if ph or pw:
                mode = "reflect" if ph < hs and pw < ws else "replicate"
                x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
            ks = range(8) if tta and x.shape[-1] == x.shape[-2] else ((0, 4) if tta else (0,))
            for k in ks:
                with autocast if autocast is not None else contextlib.nullcontext():
                    # the layout last: a rotation or flip gives a plain contiguous copy
                    y = forward_in_chunks(net, _dihedral(x, k).contiguous(memory_format=layout))
                y = _undo_dihedral(torch.sigmoid(y.float()), k)[:, :, :hs, :ws]
                y = y if (hs, ws) == (h, w) else _resample(y, (h, w))
                acc = y if acc is None else acc + y
                n += 1
    assert acc is not None
    acc = acc / n
    return (acc.half() if half else acc).cpu().numpy()


def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of a (B, C, H, W) batch to ``size`` (pixel-area geometry)."""
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _windows(n: int, win: int, core: int) -> Iterator[tuple[int, int, int]]:
    """(start of window, start of kept part, end of kept part) along one axis of length n."""
    if n <= win:
        yield 0, 0, n
        return
    margin = (win - core) // 2
    pos = 0
    while pos < n:
        end = min(pos + core, n)
        start = min(max(pos - margin, 0), n - win)
        yield start, pos, end
        pos = end


@torch.no_grad()
def predict_maps(
    net: Segmenter,
    image: np.ndarray,
    device: torch.device,
    *,
    window: int = 512,
    margin: int = 32,
    batch: int = 4,
    tta: bool = True,
    amp: bool = False,
    channels_last: bool = True,
    scales: Sequence[float] = (1.0,),
) -> np.ndarray:
    """(2, H, W) float32 probability maps of one uint8 RGB image of any size.

    Images up to ``window`` px a side go through whole; larger ones in ``window``-px windows that
    overlap by ``2 * margin`` px, of which only the centre is kept (no seams from border effects).
    ``channels_last``, ``scales``: see :func:`network_maps` (each window magnified whole).
    """
    img = np.ascontiguousarray(image[..., :3])
    h, w = img.shape[:2]
    net.eval()
    if h <= window and w <= window:
        maps = network_maps(
            net, img[None], device, tta=tta, amp=amp, channels_last=channels_last, scales=scales
        )
        return maps[0]
    out = np.zeros((2, h, w), np.float32)
    core = window - 2 * margin
    if core < 1:  # (the windows would not advance)
        raise ValueError(f"window {window} px leaves nothing inside its {margin}-px margins")
    boxes = [(ys, yk0, yk1, xs, xk0, xk1) for ys, yk0, yk1 in _windows(h, window, core)
             for xs, xk0, xk1 in _windows(w, window, core)]  # fmt: skip
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        wins = np.stack([img[ys : ys + window, xs : xs + window] for ys, _, _, xs, _, _ in chunk])
        maps = network_maps(
            net, wins, device, tta=tta, amp=amp, channels_last=channels_last, scales=scales
        )
        for (ys, yk0, yk1, xs, xk0, xk1), m in zip(chunk, maps, strict=True):
            out[:, yk0:yk1, xk0:xk1] = m[:, yk0 - ys : yk1 - ys, xk0 - xs : xk1 - xs]
    return out


class SegmenterPredictor:
    """The pipeline's ``TilePredictor`` for the downstream network.

    ``network(images)`` runs the batched (test-time-augmented) net on the device and returns one
    (2, H, W) float16 map pair per tile; ``labels(image, raw)`` is the CPU read-out
    (:func:`maps_to_instances` at the tile's processing resolution ``cfg.target_mpp``).
    """

    def __init__(
        self,
        net: Segmenter,
        device: torch.device,
        cfg: RunConfig,
        *,
        scales: Sequence[float] = (1.0,),
    ) -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.cfg = cfg
        self.scales = tuple(scales)  # test-time magnifications (see network_maps)

    def network(self, images: np.ndarray) -> list[np.ndarray]:
        sc = self.cfg.segmenter
        maps = network_maps(
            self.net, np.asarray(images), self.device, tta=sc.tta, amp=sc.amp, half=True,
            scales=self.scales,
        )  # fmt: skip
        return list(maps)

    def labels(self, image: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return MapsLabeller(self.cfg).labels(image, raw)
