"""A device-side image path: batched JPEG decode, resize, the paper's random five-crop and
flip, normalisation, channels_last, all on the accelerator (nvjpeg
decodes ~10k img/s on an H100, PIL ~500 img/s per CPU core).

It reproduces :func:`retdmctl.data.loaders.train_transform` / ``eval_transform``:
resize the shorter side to ``round(size * 256 / 224)`` (longer side ``int(short * long /
short_in)``, as torchvision computes it), then for training one of the five crops
(top-left, top-right, bottom-left, bottom-right, centre: torchvision's ``five_crop``
order and anchors) chosen uniformly, flipped horizontally with probability 1/2; for
evaluation the centre crop. Crop choice and flips are drawn from a seeded CPU
``torch.Generator`` (one draw per sample), so a batch is reproducible for a seed.

Differences from the PIL path: resizing is bilinear with antialiasing on float tensors
(PIL resizes uint8 with its own filter support), so pixels differ by a few 1/255 steps.

Everything works with ``device="cpu"`` too (torchvision decodes JPEG on the CPU), which
is how the tests exercise it. Usage::

    gpu = DeviceTransform(224, spec.mean, spec.std, device="cuda", train=True)
    x = gpu(list_of_jpeg_bytes, generator=torch.Generator().manual_seed(seed))
"""

from __future__ import annotations

import io
import threading
import queue
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from retdmctl.data.store import ImageReader

CROPS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """Output (h, w) of torchvision's Resize(short) for an (h, w) image."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def crop_anchor(h: int, w: int, size: int, which: int) -> tuple[int, int]:
    """(top, left) of five-crop number ``which`` (CROPS order) of an (h, w) image."""
    if size > h or size > w:
        raise ValueError(f"crop {size} is bigger than the resized image {(h, w)}")
    if which == 0:
        return 0, 0
    if which == 1:
        return 0, w - size
    if which == 2:
        return h - size, 0
    if which == 3:
        return h - size, w - size
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def draw_augment(n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: crop index in 0..4 (uniform) and a horizontal flip flag (p = 1/2)."""
    crops = torch.randint(0, 5, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return crops, flips


def _is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def _decode_pil(data: bytes, device: torch.device) -> torch.Tensor:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(device)


def decode_batch(datas: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB tensors on ``device``; JPEGs in one batched call (nvjpeg on
    CUDA), anything else (PNG, a JPEG nvjpeg rejects) through PIL."""
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if _is_jpeg(d)]
    if jpeg:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # e.g. a CMYK or corrupt file in the batch: one by one
            decoded = []
            for i, t in zip(jpeg, tensors):
                try:
                    decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(_decode_pil(datas[i], device))
        for i, img in zip(jpeg, decoded):
            out[i] = img
    for i, d in enumerate(datas):
        if out[i] is None:
            out[i] = _decode_pil(d, device)
    return out  # type: ignore[return-value]


def _resize_group(imgs: list[torch.Tensor], short: int) -> torch.Tensor:
    """Images of one shape, resized together: (n, 3, h', w') float in [0, 255]."""
    h, w = imgs[0].shape[-2:]
    nh, nw = resized_size(h, w, short)
    x = torch.stack(imgs).float()
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)


class DeviceTransform:
    """Bytes -> normalised (B, 3, size, size) float32 batch on ``device``, channels_last."""

    def __init__(self, size: int, mean, std, *, device: torch.device | str = "cpu", train: bool = False) -> None:
        self.size, self.train = size, train
        self.short = round(size * 256 / 224)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0

    def from_images(self, imgs: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The same from decoded (3, H, W) uint8 tensors."""
        n = len(imgs)
        if self.train:
            crops, flips = draw_augment(n, generator)
        else:
            crops, flips = torch.full((n,), 4), torch.zeros(n, dtype=torch.bool)
        out = torch.empty((n, 3, self.size, self.size), dtype=torch.float32, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(imgs):
            groups.setdefault(tuple(img.shape[-2:]), []).append(i)
        s = self.size
        for members in groups.values():
            resized = _resize_group([imgs[i].to(self.device) for i in members], self.short)
            h, w = resized.shape[-2:]
            for j, i in enumerate(members):
                top, left = crop_anchor(h, w, s, int(crops[i]))
                out[i] = resized[j, :, top : top + s, left : left + s]
        flip_idx = torch.nonzero(flips).flatten().to(self.device)
        if len(flip_idx):
            out[flip_idx] = out[flip_idx].flip(-1)
        out = (out - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last)

    def __call__(self, datas: Sequence[bytes], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.from_images(decode_batch(datas, self.device), generator)


class DevicePixelSource:
    """A drop-in for :class:`retdmctl.sources.PixelSource` that decodes on the
    device: a background thread reads the next batches' bytes from LMDB (cheap, no
    decoding) while the device decodes and augments the current one. Yields
    ``(x, y, rows)`` with x already on ``device`` (``to_device`` is then a no-op)."""

    def __init__(self, lmdb, info, spec, image_size: int, batch_size: int, device: torch.device | str, prefetch: int = 4,
                 score=None) -> None:
        # ``score``: another source for eval_batches. The stages pass the PIL one, so
        # that validation, thresholds, features.h5 and eval score the pixels `predict`
        # and `export` see (device resizing differs by a few 1/255 steps).
        self.score = score
        self.reader = score.reader if score is not None else ImageReader(lmdb)  # one LMDB handle a process
        self.info, self.batch_size, self.prefetch = info, batch_size, prefetch
        self.train_tf = DeviceTransform(image_size, spec.mean, spec.std, device=device, train=True)
        self.eval_tf = DeviceTransform(image_size, spec.mean, spec.std, device=device, train=False)

    def _bytes(self, order: np.ndarray | list[np.ndarray]) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """The bytes of each batch: ``order`` cut into batch_size pieces, or a list of batches."""
        q: queue.Queue = queue.Queue(self.prefetch)
        if isinstance(order, list):
            parts = order
        else:
            parts = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

        def work() -> None:
            try:
                for r in parts:
                    q.put((r, [self.reader.get(self.info.ids[int(i)]) for i in r]))
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)
            q.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _batches(self, order: np.ndarray, tf: DeviceTransform, gen: torch.Generator | None):
        labels = self.info.labels
        for r, datas in self._bytes(order):
            y = torch.from_numpy(labels[r].astype(np.float32))
            yield tf(datas, gen), y, r

    def train_batches(self, rows: np.ndarray, seed: int):
        gen = torch.Generator().manual_seed(seed)
        order = rows[torch.randperm(len(rows), generator=gen).numpy()]
        return self._batches(order, self.train_tf, gen)

    def batches_of(self, batches: list[np.ndarray], seed: int):
        """Training batches made of exactly these rows (one rank's shard of an epoch)."""
        return self._batches(list(batches), self.train_tf, torch.Generator().manual_seed(seed))

    def eval_batches(self, rows: np.ndarray):
        if self.score is not None:
            return self.score.eval_batches(rows)
        return self._batches(np.asarray(rows), self.eval_tf, None)

    def num_batches(self, rows: np.ndarray) -> int:
        return -(-len(rows) // self.batch_size)
