"""Memory stays bounded as slides grow: peak RSS of `run` on k x k mosaics of a real slide.

    python benchmarks/memory_scaling.py ../shared/data/wsi/aperio-svs/CMU-1-Small-Region.svs --sizes 1 2 3

Builds tiled pyramidal TIFF mosaics (k x k copies, alternately mirrored so seams look like tissue) of
the slide, fits one model on the original, then runs the pipeline on each mosaic in a fresh process
and prints its peak RSS, time per tile and cells. With bounded in-flight work the peak RSS of the
9x-area slide stays close to the 1x one (ratio printed), while the time grows with the tile count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile


def make_mosaic(src: Path, k: int, out: Path, compression: str = "jpeg") -> tuple[int, int, float]:
    from wsi_psm.slide import Slide

    with Slide.open(src) as s:
        img = s.read_region(0, 0, s.width, s.height)
        mpp = s.mpp
    rows = []
    for r in range(k):
        row = [img[:, ::-1] if (r + c) % 2 else img for c in range(k)]
        rows.append(np.concatenate(row, axis=1))
    mosaic = np.concatenate(
        [row if r % 2 == 0 else row[::-1] for r, row in enumerate(rows)], axis=0
    )
    res = 1e4 / mpp
    with tifffile.TiffWriter(out, bigtiff=True) as tif:
        level = mosaic
        for i in range(4):
            tif.write(level, tile=(256, 256), photometric="rgb", compression=compression,
                      subfiletype=0 if i == 0 else 1, resolution=(res / 2**i, res / 2**i),
                      resolutionunit="CENTIMETER")  # fmt: skip
            level = level[::2, ::2]
    return mosaic.shape[1], mosaic.shape[0], mpp


def child(slide: str, model: str, out: str) -> None:
    from wsi_psm.allocator import tune_malloc
    from wsi_psm.config import RunConfig
    from wsi_psm.model import ModelBundle
    from wsi_psm.pipeline import process_slide

    tune_malloc()  # as the CLI does
    t = time.perf_counter()
    res = process_slide(slide, out, RunConfig(), model=ModelBundle.load(model), overwrite=True)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "cells": res.cells,
                "seconds": dt,
                "peak_rss_mb": rss,
                "tiles": res.summary["counters"]["tiles"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--config", type=Path, help="run configuration JSON (default: RunConfig())")
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "MODEL", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from wsi_psm.config import RunConfig
    from wsi_psm.fit import fit_model_on_slides

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model.pt"
        cfg = RunConfig.load(args.config) if args.config else RunConfig()
        fit_model_on_slides([args.slide], cfg).save(model)
        rows = []
        for k in args.sizes:
            path = tmp / f"mosaic{k}.tiff"
            w, h, _mpp = make_mosaic(Path(args.slide), k, path)
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(model), str(tmp / f"out{k}")],
                                 check=True, capture_output=True, text=True)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((k, w, h, r))
            print(f"{k}x{k}: {w}x{h} px, {r['tiles']} tiles, {r['cells']} cells, {r['seconds']:.1f} s "
                  f"({r['seconds'] / r['tiles']:.2f} s/tile), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            print(f"area ratio {b[0] ** 2 / a[0] ** 2:.0f}x -> peak RSS ratio {b[3]['peak_rss_mb'] / a[3]['peak_rss_mb']:.2f}, "
                  f"time ratio {b[3]['seconds'] / a[3]['seconds']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
