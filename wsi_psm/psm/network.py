"""The small self-supervised activation network whose shallow blocks give the PSM.

Only the shallow blocks matter for the map (PSM-METHOD.md), so the network is small: a two-conv
stem that halves the resolution, ``shallow_blocks`` residual blocks at that resolution (the blocks the
PSM is read from: at the default 0.5 um/px, one feature pixel is 1 um, the same physical grain as the
reference's stride-4 layer1 at 0.25 um/px), then a short strided trunk, global average pooling and a
linear head. Batch norm is used for training; the PSM is always computed in eval mode, so each tile's
map is independent of the others in its batch.

The module also carries, as buffers saved with its weights, the PSM calibration fixed at fit time:
``block_sign`` (+1 or -1 per shallow block, so that nuclei come out high), ``block_scale`` (per-block
scale) and ``cam_lo``/``cam_hi`` (the averaged map's range mapped to [0, 1]; lo == hi means "not
calibrated": a per-tile polarity check and min-max are used instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# Output dimension of the head for each self-supervised task.
TASK_OUT = {"rot180-similarity": 1, "rotation": 4, "contrastive": 64, "stain-regression": 1}


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """Basic residual block (two 3x3 convs), same channels and resolution in and out."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(ch)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(x + self.b2(self.c2(h)))


class ActivationNet(nn.Module):
    """Small CNN: ``forward(x)`` returns the head output (B, out_dim); ``forward_with_shallow`` also
    returns the activations of the shallow blocks, which the PSM is computed from.

    ``task`` fixes the head size and how the head output is reduced to the one scalar per image that
    Grad-CAM differentiates (:meth:`score`).
    """

    def __init__(
        self, width: int = 16, shallow_blocks: int = 2, task: str = "rot180-similarity"
    ) -> None:
        super().__init__()
        if task not in TASK_OUT:
            raise ValueError(f"unknown self-supervised task {task!r}: one of {sorted(TASK_OUT)}")
        self.arch: dict[str, Any] = {"width": width, "shallow_blocks": shallow_blocks, "task": task}
        self.task = task
        w = width
        self.stem = nn.Sequential(_conv_bn(3, w), _conv_bn(w, 2 * w, stride=2))
        self.shallow = nn.ModuleList([ResBlock(2 * w) for _ in range(shallow_blocks)])
        self.trunk = nn.Sequential(
            _conv_bn(2 * w, 4 * w, stride=2),
            ResBlock(4 * w),
            _conv_bn(4 * w, 8 * w, stride=2),
            ResBlock(8 * w),
        )
        self.head = nn.Linear(8 * w, TASK_OUT[task])
        self.register_buffer("block_sign", torch.ones(shallow_blocks))
        self.register_buffer("block_scale", torch.ones(shallow_blocks))
        self.register_buffer("cam_lo", torch.tensor(0.0))
        self.register_buffer("cam_hi", torch.tensor(0.0))

    # Total stride of the shallow blocks relative to the input.
    shallow_stride = 2

    def forward_with_shallow(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.stem(x)
        acts = []
        for blk in self.shallow:
            h = blk(h)
            acts.append(h)
        h = self.trunk(h)
        return self.head(h.mean(dim=(2, 3))), acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_shallow(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """One scalar per image for Grad-CAM: the output itself (similarity), the logit of "not
        rotated" (rotation; PSM inputs are never rotated), or the embedding norm (contrastive)."""
        if self.task in ("rot180-similarity", "stain-regression"):
            return out[:, 0]
        if self.task == "rotation":
            return out[:, 0]
        return out.norm(dim=1)

    @property
    def calibrated(self) -> bool:
        return bool(self.cam_hi > self.cam_lo)
