"""Torch datasets over the LMDB store, with the paper's augmentation.

Train: resize the shorter side to size*256/224, take one of the four corner crops or the
centre crop at random, flip horizontally half of the time ("good practices for very deep
two-stream convnets"). Test: the same resize, one centre crop.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from retdmctl.data.decode import open_rgb
from retdmctl.data.store import ImageReader


class RandomFiveCrop(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.five = v2.FiveCrop(size)

    def forward(self, img):
        return random.choice(self.five(img))


def _tail(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(size: int, mean, std) -> v2.Compose:
    return v2.Compose([v2.Resize(round(size * 256 / 224)), RandomFiveCrop(size), v2.RandomHorizontalFlip(), *_tail(mean, std)])


def eval_transform(size: int, mean, std) -> v2.Compose:
    return v2.Compose([*eval_crop(size).transforms, *_tail(mean, std)])


def eval_crop(size: int) -> v2.Compose:
    """The geometric part of :func:`eval_transform`: an RGB image -> its centre crop
    (a ``PIL.Image``), before conversion to floats."""
    return v2.Compose([v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)])


def normalize_batch(pixels, mean, std) -> torch.Tensor:
    """A batch of 8-bit crops (B, H, W, 3), numpy or torch -> (B, 3, H, W) float32,
    channels-last in memory (what :func:`retdmctl.runtime.to_device` makes of
    image batches).

    Bit for bit :func:`eval_transform`'s tail applied to each crop: the same correctly
    rounded float32 operations (to float, times 1/255, minus mean, over std), in four
    vectorised in-place passes over the batch instead of a dozen small ops per image.
    Per image, those small ops cost far more than decoding (bench/train_throughput.py:
    22 CPU-ms an image on 2 torch threads, decoding 0.4).

    These are torch ops, so call it on the model's thread (or in a loader worker), never
    on a background decode thread: there they would start a second OpenMP team beside
    the model's. On the model's threads the four passes cost about 0.2 ms an image
    (numpy on the decode thread: 0.8 CPU-ms, taken from the model's cores)."""
    x = torch.as_tensor(np.asarray(pixels)).to(torch.float32)
    x.mul_(1 / 255)  # a float32 tensor times a Python scalar: the scalar is rounded to float32 first
    x.sub_(torch.tensor(mean, dtype=torch.float32))
    x.div_(torch.tensor(std, dtype=torch.float32))
    return x.permute(0, 3, 1, 2)


# The cached views of an image (model.views): first the centre crop (what evaluation
# sees), then its flip, then the four corner crops, each followed by its flip. Indices
# into v2.FiveCrop's output (top-left, top-right, bottom-left, bottom-right, centre).
VIEW_ORDER: tuple[tuple[int, bool], ...] = (
    (4, False), (4, True), (0, False), (0, True), (1, False), (1, True),
    (2, False), (2, True), (3, False), (3, True),
)


class ViewsTransform:
    """An image -> its first ``views`` views (views, 3, size, size), from one resize;
    view 0 is exactly :func:`eval_transform`'s output."""

    def __init__(self, size: int, mean, std, views: int) -> None:
        self.resize = v2.Resize(round(size * 256 / 224))
        self.five = v2.FiveCrop(size)
        self.tail = v2.Compose(_tail(mean, std))
        self.order = VIEW_ORDER[:views]

    def __call__(self, img) -> torch.Tensor:
        crops = self.five(self.resize(img))
        out = [self.tail(crops[c]) for c, _ in self.order]
        return torch.stack([x.flip(-1) if flip else x for x, (_, flip) in zip(out, self.order)])

    def crops(self, img) -> np.ndarray:
        """The same views as 8-bit crops (views, size, size, 3), before conversion to
        floats: :func:`normalize_batch` of them (flattened) is exactly ``self(img)``."""
        crops = self.five(self.resize(img))
        out = [np.asarray(crops[c]) for c, _ in self.order]
        return np.stack([x[:, ::-1] if flip else x for x, (_, flip) in zip(out, self.order)])


def decode(data: bytes) -> Image.Image:
    """Stored bytes -> RGB image, with ingest's own conversion (``retdmctl.data.decode``):
    with ``--keep-original`` the store holds the source bytes, EXIF, 16-bit and alpha
    included."""
    return open_rgb(data)


class LmdbImages(Dataset):
    """(image tensor, label vector, row index) for the given dataset rows."""

    def __init__(self, reader: ImageReader, ids: list[str], labels: np.ndarray, rows: np.ndarray, transform) -> None:
        self.reader, self.ids, self.labels, self.rows, self.transform = reader, ids, labels, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        img = decode(self.reader.get(self.ids[row]))
        return self.transform(img), torch.from_numpy(self.labels[row].astype(np.float32)), row


def worker_init(worker_id: int) -> None:
    # Each worker's `random` (crop choice) gets its own stream from torch's seed.
    random.seed(torch.initial_seed() % 2**32)
