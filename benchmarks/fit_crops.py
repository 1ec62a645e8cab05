"""The label-free U-Net fit's two costs per step, on one device: making a batch of training crops
(on the CPU with ``sample_batch``, or on the device with ``DeviceCrops``) and one training step in
the plain and the channels-last layout.

    python benchmarks/fit_crops.py [IMAGES_DIR] [--device auto|cpu|cuda|mps] [--batches N]

IMAGES_DIR: image tiles (default: the BCData sample's test images), read at half size as
``segment --mpp 0.25`` would; their targets are a dark-pixel threshold (the timing does not depend
on what the targets say). Prints milliseconds and the ratios of one run; on a GPU the fit's step is
the crops plus the training step, so the first ratio is what the device crops save.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from wsi_psm.device import select_device
from wsi_psm.segmenter.crops import DeviceCrops, Sample, sample_batch
from wsi_psm.segmenter.network import SegNet
from wsi_psm.segmenter.train import sample_from_labels, segmentation_loss

DEFAULT = Path(__file__).resolve().parents[1] / "../shared/data/bcdata-sample/images/test"


def load(folder: Path) -> list[Sample]:
    out = []
    for p in sorted(folder.glob("*.png")) + sorted(folder.glob("*.tif")):
        im = np.asarray(Image.open(p).convert("RGB"))[::2, ::2].copy()
        labels, _ = ndi.label(im.mean(axis=-1) < 120)
        out.append(sample_from_labels(im, labels))
    if not out:
        raise SystemExit(f"no .png or .tif images in {folder}")
    return out


def ms_per_call(f: Callable[[], object], n: int, sync: Callable[[], None]) -> float:
    for _ in range(5):
        f()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        f()
    sync()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    a = ap.parse_args()
    dev = select_device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    samples = load(a.images)
    print(f"{len(samples)} images, device {dev}, batch {a.batch} of {a.crop}² crops")

    rng = np.random.default_rng(0)
    crops = DeviceCrops(samples, dev)
    cpu = ms_per_call(
        lambda: sample_batch(samples, rng, a.batch, a.crop, device=dev), a.batches, sync
    )
    on_dev = ms_per_call(lambda: crops.batch(rng, a.batch, a.crop), a.batches, sync)
    print(f"a batch of crops: made on the CPU {cpu:.1f} ms, on the device {on_dev:.1f} ms "
          f"(ratio {cpu / on_dev:.2f})")  # fmt: skip

    x, y = crops.batch(rng, a.batch, a.crop)
    step_ms = {}
    for name, layout in (
        ("plain", torch.contiguous_format),
        ("channels-last", torch.channels_last),
    ):
        torch.manual_seed(0)
        net = SegNet(width=16, depth=3).to(dev).to(memory_format=layout).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step(net: SegNet = net, opt: torch.optim.Optimizer = opt, layout=layout) -> None:
            loss = segmentation_loss(net(x.contiguous(memory_format=layout)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step_ms[name] = ms_per_call(step, max(10, a.batches // 2), sync)
    print(f"a training step: plain {step_ms['plain']:.1f} ms, channels-last "
          f"{step_ms['channels-last']:.1f} ms (ratio {step_ms['plain'] / step_ms['channels-last']:.2f})")  # fmt: skip
    best = min(step_ms.values())
    print(f"a fit's step: crops on the CPU {cpu + best:.1f} ms, on the device {on_dev + best:.1f} ms "
          f"(ratio {(cpu + best) / (on_dev + best):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
