"""Train the segmentation model shipped with wsi-psm (``wsi_psm/models/default.pt``), label-free.

Data: the 17 MoNuSeg 2018 training images that have NO XML annotation (their pixels only; no
annotation of any kind is read), so the 13 images with XML stay unseen for measuring
(benchmarks/monuseg_segment.py). MoNuSeg: Kumar et al., IEEE TMI 2017/2020; licence CC BY-NC-SA 4.0,
so the shipped weights are for non-commercial research use.

Chain (``wsi_psm.networks.fit_on_images``, the same that ``segment`` runs with
``segmenter.default_model = "fit"``): images read at ``RunConfig().target_mpp`` (0.5 µm/px, from
0.25) -> self-supervised activation net fitted on all 17 -> PSM -> one PSM + haematoxylin k-means
clustering per image -> pseudo masks -> downstream U-Net trained on them -> one point/Voronoi
refinement round (teacher points: the centroids of the first net's threshold-marker instances) ->
the two nets averaged (``segmenter.ensemble``) -> saved as a model bundle (PSM net + clustering +
segmenter component), whose provenance names the images, the config and the timings.
Deterministic for a given seed on one CPU type. Since 2026-11-27 the U-Nets train in channels-last
layout on a CPU (~1.35x faster per step), another float path than the shipped file's fit: a rerun
gives other weights to float rounding, as another CPU type does.

The shipped file (2026-11-25) was assembled in two parts under this same chain and seeds: the
refined net from a full run of this script (single-net era, commit 9666e39), the pseudo-mask net
refit from that bundle's pseudo masks with ``fit_segmenter`` (seed 0, same schedule), because a
full rerun did not fit in the session on a shared 2-core machine (benchmarks/README.md).

    .venv/bin/python benchmarks/train_default_model.py [--data ../shared/data/monuseg-train]
        [--out wsi_psm/models/default.pt] [--threads 2] [--target-mpp 0.5] [--set KEY=JSON ...]

About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from wsi_psm.allocator import tune_malloc
from wsi_psm.config import RunConfig
from wsi_psm.groundtruth import monuseg_cases
from wsi_psm.model import ModelBundle
from wsi_psm.networks import DEFAULT_MODEL, fit_on_images, read_processing_images

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg-train"
MONUSEG_MPP = 0.25


class PrintProgress:
    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.total: dict[str, int | None] = {}
        self.t0 = time.perf_counter()

    def start(self, stage: str, total: int | None) -> None:
        self.n[stage], self.total[stage] = 0, total
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {stage} ...", flush=True)

    def advance(self, stage: str, n: int = 1) -> None:
        self.n[stage] += n
        tot = self.total.get(stage)
        if tot and self.n[stage] % 100 == 0:
            print(
                f"[{time.perf_counter() - self.t0:7.1f} s] {stage} {self.n[stage]}/{tot}",
                flush=True,
            )

    def done(self, stage: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {stage} done", flush=True)


def store_half(bundle: ModelBundle) -> None:
    """Keep the segmenter's float weights as float16 in the file (half the size: the ensemble is
    5.7 MiB in float32); loading copies them back into float32 parameters."""
    seg = bundle.components["segmenter"]
    for name, t in seg.items():
        if t.is_floating_point():
            seg[name] = t.half()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the monuseg-train folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--target-mpp", type=float, default=None,
        help="processing resolution, µm/px (default: RunConfig().target_mpp); crop sizes stay in px",
    )  # fmt: skip
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON",
        help="a config change for experiments, e.g. segmenter.fit_steps=1800 (repeatable)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    tune_malloc()  # as the CLI does
    if not args.data.is_dir():
        print(f"MoNuSeg data not found: {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = RunConfig().with_updates(device="cpu", target_mpp=args.target_mpp)
    cfg = cfg.with_updates(**{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    # images only: the case list is used to tell which images have an XML, never to read one
    paths = [c.image for c in monuseg_cases(args.data) if not c.has_xml]
    print(f"training on {len(paths)} unannotated MoNuSeg images at {cfg.target_mpp} µm/px")
    images = read_processing_images(paths, cfg, MONUSEG_MPP)
    t0 = time.perf_counter()
    bundle = fit_on_images(
        images, cfg, device=torch.device("cpu"), progress=PrintProgress(),
        sources=[f"MoNuSeg 2018 train (CC BY-NC-SA 4.0): {p.name}" for p in paths],
    )  # fmt: skip
    bundle.provenance["trained_by"] = "benchmarks/train_default_model.py"
    bundle.provenance["torch_threads"] = args.threads
    store_half(bundle)
    bundle.save(args.out)
    size = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
