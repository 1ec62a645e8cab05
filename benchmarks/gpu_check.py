"""One-shot GPU check of the engine: CUDA vs CPU agreement, mixed precision, throughput, utilisation.

    python benchmarks/gpu_check.py SLIDE [--mosaic K] [--batch-sizes B ...] [--baseline OLD_CHECKOUT]

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
import os
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
    from wsi_psm.networks import default_model
    from wsi_psm.pipeline import prepare_slide, read_tile
    from wsi_psm.psm.maps import compute_psm
    from wsi_psm.segmenter.predict import network_maps
    from wsi_psm.segmenter.readout import instances_from_maps

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

        if gpu.type == "cuda":
            memory_layouts(net, imgs, gpu)

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


@torch.no_grad()
def memory_layouts(net: torch.nn.Module, imgs: np.ndarray, device: torch.device) -> None:
    """The segmenter's float16 forward on CUDA in NCHW and in channels-last, batch 8 and 32."""
    from wsi_psm.segmenter.predict import to_network_input

    x = to_network_input(np.concatenate([imgs] * (32 // len(imgs) + 1))[:32], device)
    outs = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        net.to(memory_format=layout)
        for bs in (8, 32):
            xb = x[:bs].contiguous(memory_format=layout)
            with torch.autocast("cuda", dtype=torch.float16):
                for _ in range(3):
                    y = net(xb)  # warm-up, cuDNN's algorithm choice
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    y = net(xb)
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / 20 / bs
            outs[(layout, bs)] = torch.sigmoid(y.float())
            print(f"  forward fp16 {str(layout).split('.')[-1]:18s} batch {bs:2d}: "
                  f"{dt * 1000:6.2f} ms/tile")  # fmt: skip
    d = (outs[(torch.channels_last, 32)] - outs[(torch.contiguous_format, 32)]).abs().max()
    print(f"  channels-last vs NCHW max|d prob| {float(d):.5f}")
    net.to(memory_format=torch.contiguous_format)


def sampled(
    cmd: list[str], env: dict[str, str] | None = None
) -> tuple[str, list[float], list[float]]:
    """Run ``cmd``, sampling GPU utilisation (%) and memory (MiB) every 200 ms."""

    def run() -> str:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        return res.stdout

    if shutil.which("nvidia-smi") is None:
        return run(), [], []
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
         "-lms", "200"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out = run()
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


def throughput(
    slide: str, mosaic: int, batch_sizes: list[int], device: str, baseline: Path | None
) -> None:
    sys.path.insert(0, str(HERE))
    from memory_scaling import make_mosaic

    from wsi_psm.config import RunConfig
    from wsi_psm.fit import fit_model_on_slides

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"  # one fit on the slide serves every run (mosaics are copies)
        fit_model_on_slides([slide], RunConfig().with_updates(device=device)).save(model)
        targets = [("slide", slide)]
        if mosaic > 1:
            path = Path(tmp) / f"mosaic{mosaic}.tiff"
            w, h, _ = make_mosaic(Path(slide), mosaic, path, compression="zlib")
            targets.append((f"{mosaic}x{mosaic} mosaic {w}x{h} px", str(path)))
        runs = [(targets[0], batch_sizes[0], None)]
        if baseline is not None:  # an older checkout on the same data and machine
            runs.append((targets[-1], batch_sizes[0], baseline))
        runs += [(t, bs, None) for t in targets[1:] for bs in batch_sizes]
        for (name, path), bs, code in runs:
            script = (code or HERE.parent) / "benchmarks" / "throughput.py"
            cmd = [sys.executable, str(script), path, "--device", device, "--batch-size", str(bs)]
            if code is None:  # the baseline fits its own (bundles carry their code's config)
                cmd += ["--model", str(model)]
            env = (
                None
                if code is None
                else {**os.environ, "PYTHONPATH": f"{code}:{os.environ.get('PYTHONPATH', '')}"}
            )
            out, util, mem = sampled(cmd, env)
            tag = f" (baseline code {code})" if code else ""
            print(f"--- throughput, {name}, batch size {bs}{tag}", flush=True)
            print(out.rstrip())
            busy = [u for u in util if u > 0]
            if util:
                print(f"nvidia-smi over the run ({len(util)} samples, decode pass included): GPU util mean "
                      f"{statistics.mean(util):.0f}%, median while busy "
                      f"{statistics.median(busy) if busy else 0:.0f}%, memory max {max(mem):.0f} MiB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("--tiles", type=int, default=8, help="tiles for the agreement check")
    ap.add_argument("--mosaic", type=int, default=4, help="K for the K x K mosaic throughput run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument(
        "--baseline", type=Path, help="older checkout (wsi_psm/, benchmarks/) to time too"
    )
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} CPU threads", flush=True)
    if not args.skip_agreement:
        agreement(args.slide, args.tiles, args.device)
    throughput(args.slide, args.mosaic, args.batch_sizes, args.device, args.baseline)


if __name__ == "__main__":
    main()
