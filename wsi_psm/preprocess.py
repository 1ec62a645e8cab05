"""The one function that turns uint8 RGB pixels into network input.

Used by the self-supervised fit, the PSM engine and the downstream segmenter alike, so that the
scaling and channel order can never differ between stages (the reference code mixed 0-255 and 0-1
input and flipped RGB/BGR between training and inference).

Convention: channels stay in **RGB order**; values are mapped linearly from ``[0, 255]`` to
``[-1, 1]`` (``x / 127.5 - 1``), so a white (background) pixel is +1 and black is -1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SCALE = 127.5
OFFSET = 1.0

# pixels per network forward on a CPU. At 512² the segmenter's 16-channel activations (16 MiB) stay
# under glibc's 32 MiB mmap threshold as wsi_psm.allocator sets it, and are reused rather than
# faulted in afresh; a batch of 8 tiles took twice the time per pixel, and 256² forwards gain
# nothing more (benchmarks/README.md, "CPU inference")
CPU_FORWARD_PIXELS = 512 * 512


def to_network_input(rgb: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` or ``(B, H, W, 3)`` -> float32 tensor ``(B, 3, H, W)`` in ``[-1, 1]``.

    With ``device``, the uint8 pixels move there first and are converted there: a quarter of the
    bytes over the bus, and no CPU threads busy beside a GPU (same values as on the CPU).

    Only uint8 is accepted: a float array is ambiguous (0-1 or 0-255?), and that ambiguity is the
    bug this function exists to prevent. A single image gains a batch axis of length 1.
    """
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise TypeError(f"to_network_input expects uint8 RGB, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(
            f"to_network_input expects (H, W, 3) or (B, H, W, 3) RGB, got shape {a.shape}"
        )
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device is not None:
        t = t.to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).to(torch.float32).div_(SCALE).sub_(OFFSET).contiguous()


def from_network_input(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_network_input` (for tests and debugging): ``(B,3,H,W)`` -> uint8 ``(B,H,W,3)``."""
    a = ((x.detach().cpu().float() + OFFSET) * SCALE).round().clamp(0, 255).to(torch.uint8)
    return a.permute(0, 2, 3, 1).numpy()


def forward_in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a (B, C, H, W) batch whose images are independent: in one call on a GPU, on a
    CPU a few images at a time (as many as fit in ``CPU_FORWARD_PIXELS``, at least one), the
    results concatenated along the batch."""
    n = len(x)
    step = (
        n
        if x.device.type != "cpu"
        else max(1, CPU_FORWARD_PIXELS // max(1, x.shape[-2] * x.shape[-1]))
    )
    if step >= n:
        return fn(x)
    return torch.cat([fn(x[i : i + step]) for i in range(0, n, step)])
