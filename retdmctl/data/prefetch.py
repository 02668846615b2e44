"""A thread-prefetching pixel source whose augmentation does not depend on scheduling.

Why (see bench/train_throughput.py): on a CPU with as many cores as torch threads,
``PixelSource`` with ``runtime.workers = 2`` starts two worker processes per epoch (a new
DataLoader each epoch, ``persistent_workers=False``: each imports torch again) that then
compete with the two OpenMP threads of the training step; an OpenMP barrier stalls when
one of its threads is pre-empted. Decoding itself is cheap next to the CNN (PIL: ~1 ms
an image; Lite0 training step: ~95 ms an image at 224 on 2 cores).

``ThreadedPixelSource`` decodes in a background *thread* (PIL and LMDB release the GIL),
``prefetch`` batches ahead, created once and reused by every epoch. The crop and flip of
a sample come from ``np.random.default_rng([epoch_seed, row])``, not from a global RNG,
so the batches are the same whatever the thread timing, and a resumed run (which passes
the same per-epoch seed) draws the same augmentation. Same interface as PixelSource.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from retdmctl.data.loaders import decode, eval_transform
from retdmctl.data.store import ImageReader

Batch = tuple[torch.Tensor, torch.Tensor, np.ndarray]


class SeededTrainTransform:
    """The paper's train transform (resize, one of five crops, flip half of the time)
    with the choice given explicitly instead of drawn from a global RNG."""

    def __init__(self, size: int, mean, std) -> None:
        self.resize = v2.Resize(round(size * 256 / 224))
        self.five = v2.FiveCrop(size)
        self.tail = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, img, crop: int, flip: bool) -> torch.Tensor:
        out = self.five(self.resize(img))[crop]
        if flip:
            out = TF.horizontal_flip(out)
        return self.tail(out)


def augment_choice(seed: int, row: int) -> tuple[int, bool]:
    rng = np.random.default_rng([seed, row])
    return int(rng.integers(5)), bool(rng.random() < 0.5)


class ThreadedPixelSource:
    def __init__(self, lmdb, info, spec, image_size: int, batch_size: int, prefetch: int = 2) -> None:
        self.reader = ImageReader(lmdb)
        self.info, self.batch_size, self.prefetch = info, batch_size, prefetch
        self.train_tf = SeededTrainTransform(image_size, spec.mean, spec.std)
        self.eval_tf = eval_transform(image_size, spec.mean, spec.std)

    def _sample(self, row: int, seed: int | None) -> torch.Tensor:
        img = decode(self.reader.get(self.info.ids[row]))
        if seed is None:
            return self.eval_tf(img)
        return self.train_tf(img, *augment_choice(seed, row))

    def _produce(self, order: np.ndarray, seed: int | None) -> Iterator[Batch]:
        labels = self.info.labels
        for start in range(0, len(order), self.batch_size):
            r = order[start : start + self.batch_size]
            x = torch.stack([self._sample(int(i), seed) for i in r])
            yield x, torch.from_numpy(labels[r].astype(np.float32)), r

    def _prefetched(self, order: np.ndarray, seed: int | None) -> Iterator[Batch]:
        if self.prefetch <= 0:
            return self._produce(order, seed)
        return in_background(self._produce(order, seed), self.prefetch)

    def train_batches(self, rows: np.ndarray, seed: int) -> Iterator[Batch]:
        order = np.random.default_rng(seed).permutation(rows)
        return self._prefetched(order, seed)

    def eval_batches(self, rows: np.ndarray) -> Iterator[Batch]:
        return self._prefetched(np.asarray(rows), None)

    def num_batches(self, rows: np.ndarray) -> int:
        return -(-len(rows) // self.batch_size)


def in_background(items: Iterator, depth: int = 2) -> Iterator:
    """Yield what ``items`` yields, produced ``depth`` ahead on a background thread (PIL
    decoding and LMDB reads release the GIL, so they overlap the model's work). An
    exception in the producer is raised in the consumer; closing the consumer early
    stops the producer."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as exc:
            q.put((None, exc))
        q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (entry := q.get()) is not None:
            item, exc = entry
            if exc is not None:
                raise exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
