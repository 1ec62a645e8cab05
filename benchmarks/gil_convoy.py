"""How fast a process pool takes tile-sized tasks while other threads of the parent are busy.

    python benchmarks/gil_convoy.py [--tasks 200]

The slide pipeline on a GPU sends each tile (uint8 RGB 592², float16 maps 2 x 592², ~2.4 MB) to a
post-processing worker process. The pool's feeder thread writes that through a pipe in chunks of
the pipe's buffer and takes the GIL back after every write; when other threads of the parent run
Python (the writer, decoding, the network loop), each take-back can wait for the switch interval
(5 ms by default): a convoy. This prints tasks per second (one worker, trivial work) with 0, 1 and 2
busy threads in the parent, at Python's default switch interval and at 0.5 ms (the pipeline's
``tiles.gil_switch_ms``), so the ratios come from one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def _work(img: np.ndarray, maps: np.ndarray) -> int:
    return int(img[0, 0, 0]) + len(maps)


def _busy(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i * i


def rate(n_busy: int, n_tasks: int) -> float:
    img = np.zeros((592, 592, 3), np.uint8)
    maps = np.zeros((2, 592, 592), np.float16)
    stop = threading.Event()
    threads = [threading.Thread(target=_busy, args=(stop,)) for _ in range(n_busy)]
    for t in threads:
        t.start()
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            pool.submit(_work, img, maps).result()  # the worker is up
            t0 = time.perf_counter()
            for f in [pool.submit(_work, img, maps) for _ in range(n_tasks)]:
                f.result()
            return n_tasks / (time.perf_counter() - t0)
    finally:
        stop.set()
        for t in threads:
            t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=200)
    args = ap.parse_args()
    default = sys.getswitchinterval()
    for interval in (default, 0.0005):
        sys.setswitchinterval(interval)
        rates = [rate(n, args.tasks) for n in (0, 1, 2)]
        print(f"switch interval {interval * 1000:.1f} ms: tasks/s with 0 / 1 / 2 busy threads "
              f"{rates[0]:.0f} / {rates[1]:.0f} / {rates[2]:.0f}  (ratio to idle "
              f"{rates[1] / rates[0]:.2f} / {rates[2] / rates[0]:.2f})", flush=True)  # fmt: skip
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
