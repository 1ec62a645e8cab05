"""One-shot GPU check of the engine: CUDA vs CPU agreement, mixed precision, throughput, utilisation.

    python benchmarks/gpu_check.py SLIDE [--mosaic K] [--out DIR]

1. Agreement: the shipped segmenter on the slide's first tissue tiles on the CPU (float32), CUDA
   float32 and CUDA float16 autocast (the default on CUDA): largest map difference, and the cells
   read out from each compared with the CPU's (AJI, pixel F1, cell counts). The PSM engine
   (gradient maps of a bundle fitted on the slide) is compared the same way.
2. Throughput: benchmarks/throughput.py on the slide and on a K x K mosaic of it (decode vs
   pipeline, network share, time blocked on decoding / on post-processing), with nvidia-smi's GPU
   utilisation sampled during the mosaic run.

Prints one report; needs a CUDA device (exits 2 without one).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def agreement(slide: str, n_tiles: int, device: str) -> None:
    from wsi_psm.config import RunConfig
    from wsi_psm.fit import fit_model_on_context
    from wsi_psm.metrics import aji, pixel_f1
    from wsi_psm.pipeline import prepare_slide, read_tile
    from wsi_psm.psm.maps import compute_psm
    from wsi_psm.segment import default_model
    from wsi_psm.segmenter.predict import instances_from_maps, network_maps

    cfg = RunConfig()
    ctx = prepare_slide(slide, cfg)
    try:
        imgs = np.stack([read_tile(ctx.slide, t, cfg.target_mpp) for t in ctx.grid.tiles[:n_tiles]])
        cpu, gpu = torch.device("cpu"), torch.device(device)
        net = default_model().eval()
        runs = {}
        for name, dev, amp in (
            ("cpu fp32", cpu, False),
            ("gpu fp32", gpu, False),
            ("gpu amp", gpu, True),
        ):
            net.to(dev)
            network_maps(net, imgs[:1], dev, tta=False, amp=amp)  # warm-up (cuDNN autotune)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            maps = network_maps(net, imgs, dev, tta=False, amp=amp)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            runs[name] = (maps, time.perf_counter() - t)
        ref_maps, _ = runs["cpu fp32"]
        ref_labels = [instances_from_maps(m, mpp=cfg.target_mpp, cfg=cfg) for m in ref_maps]
        print(f"segmenter on {len(imgs)} tiles of {imgs.shape[1]} px (no TTA); reference: cpu fp32")
        for name, (maps, dt) in runs.items():
            labels = [instances_from_maps(m, mpp=cfg.target_mpp, cfg=cfg) for m in maps]
            diff = np.abs(maps.astype(np.float32) - ref_maps.astype(np.float32))
            a = np.mean([aji(p, r) for p, r in zip(labels, ref_labels, strict=True)])
            f = np.mean([pixel_f1(p > 0, r > 0) for p, r in zip(labels, ref_labels, strict=True)])
            cells = sum(int(lab.max()) for lab in labels)
            print(f"  {name:9s} {dt * 1000 / len(imgs):7.1f} ms/tile  max|dmap| {diff.max():.4f}  "
                  f"mean|dmap| {diff.mean():.5f}  AJI vs cpu {a:.4f}  pixel F1 vs cpu {f:.4f}  cells {cells}")  # fmt: skip

        t = time.perf_counter()
        bundle = fit_model_on_context(ctx, cfg, device=gpu)
        if gpu.type == "cuda":
            torch.cuda.synchronize()
        print(f"fit on slide (PSM net + classes) on {gpu}: {time.perf_counter() - t:.1f} s")
        psm = {}
        for name, dev in (("cpu", cpu), ("gpu", gpu)):
            bundle.net.to(dev).eval()
            psm[name] = np.asarray(compute_psm(bundle.net, imgs, dev, stain=bundle.pseudo.stain))
        d = np.abs(psm["gpu"] - psm["cpu"])
        print(f"PSM maps gpu vs cpu: max|d| {d.max():.5f} mean|d| {d.mean():.6f} "
              f"(maps in [0, 1]; shape {psm['cpu'].shape})")  # fmt: skip
    finally:
        ctx.slide.close()


def sampled(cmd: list[str]) -> tuple[str, list[float], list[float]]:
    """Run ``cmd``, sampling GPU utilisation (%) and memory (MiB) every 200 ms."""
    if shutil.which("nvidia-smi") is None:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout, [], []
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
         "-lms", "200"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        smi.terminate()
    util, mem = [], []
    for line in smi.communicate()[0].splitlines():
        try:
            u, m = (float(v) for v in line.split(","))
        except ValueError:
            continue
        util.append(u)
        mem.append(m)
    return out, util, mem


def throughput(slide: str, mosaic: int, batch_sizes: list[int], device: str) -> None:
    sys.path.insert(0, str(HERE))
    from memory_scaling import make_mosaic

    with tempfile.TemporaryDirectory() as tmp:
        targets = [("slide", slide)]
        if mosaic > 1:
            path = Path(tmp) / f"mosaic{mosaic}.tiff"
            w, h, _ = make_mosaic(Path(slide), mosaic, path, compression="zlib")
            targets.append((f"{mosaic}x{mosaic} mosaic {w}x{h} px", str(path)))
        runs = [(targets[0], batch_sizes[0])] + [(t, bs) for t in targets[1:] for bs in batch_sizes]
        for (name, path), bs in runs:
            cmd = [sys.executable, str(HERE / "throughput.py"), path, "--device", device,
                   "--batch-size", str(bs)]  # fmt: skip
            out, util, mem = sampled(cmd)
            print(f"--- throughput, {name}, batch size {bs}", flush=True)
            print(out.rstrip())
            busy = [u for u in util if u > 0]
            if util:
                print(f"nvidia-smi over the run ({len(util)} samples, fit included): GPU util mean "
                      f"{statistics.mean(util):.0f}%, median while busy "
                      f"{statistics.median(busy) if busy else 0:.0f}%, memory max {max(mem):.0f} MiB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("--tiles", type=int, default=8, help="tiles for the agreement check")
    ap.add_argument("--mosaic", type=int, default=4, help="K for the K x K mosaic throughput run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} CPU threads", flush=True)
    agreement(args.slide, args.tiles, args.device)
    throughput(args.slide, args.mosaic, args.batch_sizes, args.device)


if __name__ == "__main__":
    main()
