"""Throughput of the slide pipeline as ratios from one run: pipeline time / raw tile-decode time.

    python benchmarks/throughput.py ../shared/data/wsi/aperio-svs/CMU-1-Small-Region.svs [--model M.pt]

1. decodes every tissue tile of the slide at the processing resolution through the same Dask stream
   the pipeline uses (same threads, batches, prefetch), doing nothing else: the raw decode time;
2. runs the whole pipeline on the same tiles (a model is fitted on the slide first unless --model is
   given; the fit is timed separately) and reads its stage timings from summary.json. With --model
   one batch goes through the network first, so that a run with a model file starts as warm as a
   run after a fit (CUDA's kernels loaded, cuDNN's choices made: about a second on a GPU, which
   made an older code with its own fit look ~11% faster; benchmarks/README.md, "Sixth GPU check").

Printed ratios (machine-independent enough to compare runs): pipeline / decode (1.0 would mean the
network and post-processing are free), the share of pipeline time the network waited for decoded
tiles (starvation; ~0 means decoding keeps up), and the network's share. Peak RSS is printed too.
Also the steady rate (the middle 60% of the tiles, as the writer finishes them: a short run's
worker start-up, first network call and final drain left out) against the pool's CPU ceiling
(workers / busy seconds per tile): a steady rate near the ceiling means the post-processing CPU,
not the way to and from the workers, is what the network waits for.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


class TileClock:
    """A progress hook that stamps each tile as the writer finishes it."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, stage: str, n: int = 1) -> None:
        if stage == "cells":
            self.stamps.extend([time.perf_counter()] * n)

    def done(self, stage: str) -> None:
        pass

    def steady_rate(self) -> float | None:
        """Tiles per second over the middle 60% of the tiles (None: too few to tell)."""
        a, b = len(self.stamps) // 5, len(self.stamps) * 4 // 5
        if b - a < 5 or self.stamps[b] <= self.stamps[a]:
            return None
        return (b - a) / (self.stamps[b] - self.stamps[a])


def main() -> None:
    # imported here, not at the top: spawned post-processing workers re-run this module's top
    # level, and should import no torch (as under the `wsi-psm` CLI, whose main module is light)
    from wsi_psm.allocator import tune_malloc
    from wsi_psm.config import RunConfig
    from wsi_psm.device import select_device
    from wsi_psm.fit import fit_model_on_context
    from wsi_psm.inference import make_predictor
    from wsi_psm.model import ModelBundle
    from wsi_psm.pipeline import decode_workers, prepare_slide, read_tile, run_slide
    from wsi_psm.stream import stream_batches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("--model", help="model bundle from `wsi-psm fit` (default: fit on the slide)")
    ap.add_argument("--mpp", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a config change, e.g. tiles.batch_size=32 (repeatable)")  # fmt: skip
    args = ap.parse_args()
    tune_malloc()  # as the CLI does

    sets = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    cfg = RunConfig().with_updates(device=args.device, **{"tiles.batch_size": args.batch_size,
                                                          "tiles.decode_workers": args.workers}, **sets)  # fmt: skip
    device = select_device(cfg.device)
    ctx = prepare_slide(args.slide, cfg, mpp=args.mpp)
    try:
        tiles = ctx.grid.tiles
        t = time.perf_counter()
        n = 0
        for batch in stream_batches(
            lambda tile: read_tile(ctx.slide, tile, cfg.target_mpp), tiles,
            batch_size=cfg.tiles.batch_size, workers=decode_workers(cfg, device.type == "cuda"),
            prefetch=cfg.tiles.prefetch_batches,
        ):  # fmt: skip
            n += len(batch.tiles)
        t_decode = time.perf_counter() - t

        t = time.perf_counter()
        bundle = (
            ModelBundle.load(args.model)
            if args.model
            else fit_model_on_context(ctx, cfg, device=device)
        )
        t_fit = time.perf_counter() - t
        predictor, annotator, extras = make_predictor(bundle, device=device, cfg=cfg)
        if args.model:  # a fit has already run the device's kernels; a model file has not
            import numpy as np

            first = tiles[: cfg.tiles.batch_size]
            predictor.network(np.stack([read_tile(ctx.slide, t, cfg.target_mpp) for t in first]))
        clock = TileClock()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = run_slide(
                ctx, Path(tmp) / "out", predictor, cfg, annotator=annotator, summary_extras=extras,
                progress=clock,
            )  # fmt: skip
            t_pipe = time.perf_counter() - t
            timings = json.loads((Path(tmp) / "out" / "summary.json").read_text())["timings_s"]
    finally:
        ctx.slide.close()

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"slide {ctx.slide.name}: {n} tiles of {ctx.grid.tile_px}px at {cfg.target_mpp} µm/px, "
          f"device {device}, {res.cells} cells")  # fmt: skip
    print(f"raw decode            {t_decode:8.2f} s   ({n / t_decode:.1f} tiles/s)")
    print(f"fit on slide          {t_fit:8.2f} s" + ("  (model file)" if args.model else ""))
    print(
        f"pipeline (tiles)      {t_pipe:8.2f} s   ({n / t_pipe:.1f} tiles/s, {res.cells / t_pipe:.0f} cells/s)"
    )
    print(f"ratio pipeline/decode {t_pipe / t_decode:8.2f}")
    print(f"network share         {timings['network'] / t_pipe:8.2%}")
    print(
        f"waiting for decode    {timings['waiting_for_decode'] / t_pipe:8.2%}   (GPU/CPU starved by decoding)"
    )
    print(
        f"waiting for post-proc {timings['waiting_for_postprocessing'] / t_pipe:8.2%}   (network blocked by CPU read-out)"
    )
    print(
        f"writing outputs       {timings['writing'] / t_pipe:8.2%}   (writer thread, beside the network)"
    )
    n_post = res.summary["counters"]["post_workers"]
    busy = timings["postprocessing_busy"]
    print(
        f"post-processing busy  {busy:8.2f} s   ({busy * 1000 / n:.0f} ms per tile, summed over workers)"
    )
    print(f"post-processing pool  {busy / (n_post * t_pipe):8.2%}   busy ({n_post} workers)")
    steady = clock.steady_rate()
    if clock.stamps:
        print(f"first tile written    {clock.stamps[0] - t:8.2f} s after the pipeline began")
    if steady is not None and busy > 0:
        print(f"steady rate           {steady:8.1f} tiles/s (middle 60% of tiles); pool ceiling "
              f"{n_post * n / busy:.1f} tiles/s (workers / busy s per tile)")  # fmt: skip
    to_w, from_w = (
        timings.get("postprocessing_to_worker"),
        timings.get("postprocessing_from_worker"),
    )
    if to_w is not None and from_w is not None:  # (older code did not time them)
        print(f"to a worker / back    {to_w * 1000 / n:5.0f} / {from_w * 1000 / n:.0f} ms per tile   "
              "(queueing + input transfer / result transfer)")  # fmt: skip
    print(f"peak RSS              {rss_mb:8.0f} MB")
    if device.type == "cuda":
        import torch

        print(f"peak GPU memory       {torch.cuda.max_memory_allocated(device) / 2**20:8.0f} MB")


if __name__ == "__main__":
    main()
