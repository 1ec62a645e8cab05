"""The downstream segmentation network: a small U-Net trained from scratch on pseudo masks.

Small on purpose: it must train in minutes on two CPU cores and run fast on a slide. Four
resolutions (stride 1, 2, 4, 8), two 3x3 convolutions per level with batch norm, bilinear
upsampling and skip concatenation. At 0.5 µm/px a nucleus is 8-20 px across, so the stride-8 level
sees about 90 px (45 µm) of context, enough to tell a nucleus from a dark speck of stroma.

Output channels (logits, same size as the input):

- 0, ``FG``: nucleus foreground;
- 1, ``DIST``: the normalised distance to the nucleus edge (0 at the edge, 1 at the centre), the
  relief the watershed floods, so touching nuclei separate along the valleys between their centres.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from wsi_psm.atomic import torch_save_atomic

FG, DIST = 0, 1
OUT_CHANNELS = 2


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """U-Net with ``depth`` downsamplings and ``width`` channels at full resolution (doubling per level).

    Inputs are what :func:`wsi_psm.preprocess.to_network_input` returns; height and width must be
    multiples of ``2**depth`` (:attr:`multiple`); callers pad.
    """

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.arch: dict[str, Any] = {"width": width, "depth": depth}
        chans = [width * 2**i for i in range(depth + 1)]
        self.enc = nn.ModuleList([_block(3, chans[0])])
        self.enc.extend(_block(chans[i], chans[i + 1]) for i in range(depth))
        self.dec = nn.ModuleList(
            _block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(chans[0], OUT_CHANNELS, 1)

    @property
    def multiple(self) -> int:
        return 2 ** self.arch["depth"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, blk in enumerate(self.enc):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = blk(h)
            skips.append(h)
        skips.pop()
        for blk in self.dec:
            s = skips.pop()
            h = F.interpolate(h, size=s.shape[-2:], mode="bilinear", align_corners=False)
            h = blk(torch.cat([h, s], dim=1))
        return self.head(h)


class SegEnsemble(nn.Module):
    """Several :class:`SegNet` whose probabilities are averaged; ``forward`` returns the logits of
    the mean probabilities, so it stands in for a single net everywhere.

    The label-free fit keeps the net trained on the pseudo masks and the net trained on its
    point/Voronoi refinement: the first follows the pseudo masks' extent, the second separates and
    rounds nuclei; their average scores better than either (benchmarks/README.md).
    """

    def __init__(self, members: list[SegNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one net")
        self.members = nn.ModuleList(members)
        self.arch: dict[str, Any] = {"ensemble": [dict(m.arch) for m in members]}

    @property
    def multiple(self) -> int:
        return max(m.multiple for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-6)


Segmenter = SegNet | SegEnsemble


def build_segmenter(arch: dict[str, Any]) -> Segmenter:
    """An untrained net (or ensemble) of the given architecture (``net.arch``)."""
    if "ensemble" in arch:
        return SegEnsemble([SegNet(**a) for a in arch["ensemble"]])
    return SegNet(**arch)


# ------------------------------------------------------------------------------ saving / loading

STATE_FORMAT = "wsi-psm-segmenter"
STATE_VERSION = 1


def segmenter_state(net: Segmenter, **meta: Any) -> dict[str, Any]:
    """A plain, ``torch.load(weights_only=True)``-safe description of a trained net.

    ``{"meta": {"format", "version", "arch", **meta} (JSON-able), "tensors": {name: tensor}}``;
    extra keyword arguments (processing mpp, provenance...) go into ``meta``. For a model bundle:
    ``components["segmenter"] = state["tensors"]``, ``component_meta["segmenter"] = state["meta"]``.
    """
    return {
        "meta": {"format": STATE_FORMAT, "version": STATE_VERSION, "arch": dict(net.arch), **meta},
        "tensors": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }


def segmenter_from_state(state: dict[str, Any]) -> Segmenter:
    """Rebuild the net (eval mode, CPU) from :func:`segmenter_state`; ValueError when inconsistent."""
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ValueError("not a wsi-psm segmenter state")
    if not isinstance(meta.get("version"), int) or meta["version"] > STATE_VERSION:
        raise ValueError(
            f"segmenter state version {meta.get('version')!r} is newer than this wsi-psm reads"
        )
    net = build_segmenter(meta["arch"])
    net.load_state_dict(state["tensors"], strict=True)
    return net.eval()


def save_segmenter(path: str | Path, net: Segmenter, **meta: Any) -> Path:
    """Write a stand-alone segmenter file atomically (temporary name, then rename).

    ``torch.save`` of ``{"format", "version", "meta": <JSON string>, "tensors": {name: tensor}}``,
    loadable with ``torch.load(weights_only=True)`` (no code runs on load).
    """
    path = Path(path)
    state = segmenter_state(net, **meta)
    payload = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "meta": json.dumps(state["meta"]),
        "tensors": state["tensors"],
    }
    return torch_save_atomic(payload, path)


def _load_payload(path: str | Path) -> Any:
    # weights only: no code runs on load
    return torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)


def is_segmenter_file(path: str | Path) -> bool:
    """Whether ``path`` is a stand-alone segmenter file (:func:`save_segmenter`), not a bundle."""
    try:
        data = _load_payload(path)
    except Exception:  # unreadable or foreign: not one
        return False
    return isinstance(data, dict) and data.get("format") == STATE_FORMAT


def read_segmenter_file(path: str | Path) -> tuple[Segmenter, dict[str, Any]]:
    """Load a file written by :func:`save_segmenter`, or a model bundle (``wsi-psm-model``) holding a
    ``segmenter`` component. Returns the net (eval, CPU) and its meta; ValueError when it is neither."""
    try:
        data = _load_payload(path)
    except Exception as exc:  # torch raises many types (and unsafe advice) for foreign files
        raise ValueError(f"not a wsi-psm segmenter or model file ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise ValueError("not a wsi-psm segmenter or model file")
    if data.get("format") == STATE_FORMAT:
        state = {"meta": json.loads(data["meta"]), "tensors": data["tensors"]}
    elif data.get("format") == "wsi-psm-model":
        meta = json.loads(data["meta"]).get("components", {}).get("segmenter")
        tensors = data.get("components", {}).get("segmenter")
        if meta is None or tensors is None:
            raise ValueError("the model bundle holds no downstream segmenter")
        state = {"meta": meta, "tensors": tensors}
    else:
        raise ValueError("not a wsi-psm segmenter or model file")
    return segmenter_from_state(state), state["meta"]
