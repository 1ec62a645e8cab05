"""Streaming tiles from a slide through Dask with bounded in-flight work.

Each batch is a small Dask graph (one read task per tile, then a stack) computed on Dask's threaded
scheduler, so tiles of a batch decode in parallel. A producer thread computes batches ahead of the
consumer and hands them over through a bounded queue: decoding overlaps with the network, and at most
``prefetch`` decoded batches wait in memory whatever the slide size. The threaded scheduler is named
explicitly so that a slide processed inside a Dask distributed worker decodes locally instead of
submitting tile tasks back to the cluster (the unit of distributed work is the slide).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import dask
import numpy as np

from .tiling import Tile

_DONE = object()


@dataclass
class TileBatch:
    tiles: list[Tile]
    images: np.ndarray  # (B, size, size, 3) uint8 RGB at target mpp


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def stream_batches(
    read_tile: Callable[[Tile], np.ndarray],
    tiles: Sequence[Tile],
    *,
    batch_size: int,
    workers: int,
    prefetch: int,
) -> Iterator[TileBatch]:
    """Yield tile batches in grid order; ``read_tile`` must be thread-safe.

    Errors raised while decoding are re-raised in the consumer. Stopping the iteration early (break,
    exception in the consumer) stops the producer after its current batch.
    """
    q: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    stop = threading.Event()
    read = dask.delayed(read_tile, pure=True)
    stack = dask.delayed(np.stack, pure=True)

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for start in range(0, len(tiles), batch_size):
                if stop.is_set():
                    return
                chunk = list(tiles[start : start + batch_size])
                graph = stack([read(t) for t in chunk])
                (images,) = dask.compute(graph, scheduler="threads", num_workers=workers)
                if not put(TileBatch(tiles=chunk, images=images)):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
            return
        put(_DONE)

    producer = threading.Thread(target=produce, name="wsi-psm-tile-producer", daemon=True)
    producer.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        producer.join(timeout=30)
