"""Batches of a stage's image inputs, and the files that cache them.

``PixelSource`` decodes images from LMDB (fine-tuning the backbone); ``CachedSource``
serves backbone features cached on disk (frozen-backbone mode, the CPU-friendly one).
Both yield ``(x, y, rows)`` batches, so a stage's loop, and scoring, are the same in
either mode. Which source a config uses, and when its cache is made, is
:mod:`retdmctl.inputs`'s.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from retdmctl import __version__
from retdmctl.data.dataset import DatasetInfo, ids_mismatch
from retdmctl.data.prefetch import in_background
from retdmctl.data.loaders import (
    LmdbImages,
    decode,
    eval_crop,
    eval_transform,
    normalize_batch,
    train_transform,
    worker_init,
)
from retdmctl.data.store import ImageReader
from retdmctl.errors import InputError
from retdmctl.models.backbones import BackboneSpec
from retdmctl.pace import Pace
from retdmctl.runtime import prepare_model, to_device
from retdmctl.workspace import atomic_path, now_iso

Batch = tuple[torch.Tensor, torch.Tensor, np.ndarray]


@contextlib.contextmanager
def decoding(threads: int) -> Iterator[Callable[[Callable, list], list]]:
    """``with decoding(threads) as decode_all: decode_all(fn, items)`` -> ``[fn(x) for x
    in items]``, on ``threads`` threads (a pool kept for the ``with`` block), or on the
    calling thread with 0.

    Why two ways of feeding the model. With a device, the CPU is idle while the model
    runs, so batches are decoded ahead on a background thread beside it
    (:func:`~retdmctl.data.prefetch.in_background`). On the CPU the model's OpenMP team
    already occupies every core: a decode thread beside it pre-empts one of the team,
    and the other then waits at the next barrier, so each ms of decoding cost the model
    about two (bench/train_throughput.py measured feature extraction at 80 % of the
    model's own speed that way). There, each batch is decoded between the model's
    batches on as many threads as the model uses, with the cores to itself. The
    functions given must be numpy and PIL only (they release the GIL): torch ops on
    other threads would start a second OpenMP team."""
    if threads <= 0:
        yield lambda fn, items: [fn(x) for x in items]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        yield lambda fn, items: list(pool.map(fn, items))


class PixelSource:
    def __init__(self, lmdb: Path, info: DatasetInfo, spec: BackboneSpec, image_size: int, batch_size: int, workers: int) -> None:
        self.reader = ImageReader(lmdb)
        self.info, self.batch_size, self.workers = info, batch_size, workers
        self.image_size, self.mean, self.std = image_size, spec.mean, spec.std
        self.train_tf = train_transform(image_size, spec.mean, spec.std)
        self.eval_tf = eval_transform(image_size, spec.mean, spec.std)
        self.eval_crop = eval_crop(image_size)
        self.prefetch = 2  # eval batches decoded ahead on a background thread (workers = 0)
        # > 0 (the CPU): decode each eval batch on this many threads *between* the model's
        # batches instead of beside them (see :meth:`eval_batches`)
        self.decode_threads = 0

    def _loader(self, rows: np.ndarray, transform, shuffle_seed: int | None) -> DataLoader:
        ds = LmdbImages(self.reader, self.info.ids, self.info.labels, rows, transform)
        # Always an explicit generator: a loader without one draws its workers' base
        # seed from the global RNG, and the training run's numbers would then depend
        # on whether features had to be extracted first.
        gen = torch.Generator().manual_seed(shuffle_seed if shuffle_seed is not None else 0)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle_seed is not None,
            generator=gen,
            num_workers=self.workers,
            worker_init_fn=worker_init,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def train_batches(self, rows: np.ndarray, seed: int) -> Iterator[Batch]:
        for x, y, r in self._loader(rows, self.train_tf, seed):
            yield x, y, r.numpy()

    def batches_of(self, batches: list[np.ndarray], seed: int) -> Iterator[Batch]:
        """Training batches made of exactly these rows (one rank's shard of an epoch)."""
        rows = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        ds = LmdbImages(self.reader, self.info.ids, self.info.labels, rows, self.train_tf)
        ends = np.cumsum([len(b) for b in batches])
        positions = [list(range(end - len(b), end)) for b, end in zip(batches, ends)]
        loader = DataLoader(
            ds,
            batch_sampler=positions,
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.workers,
            worker_init_fn=worker_init,
            pin_memory=torch.cuda.is_available(),
        )
        for x, y, r in loader:
            yield x, y, r.numpy()

    def eval_batches(self, rows: np.ndarray) -> Iterator[Batch]:
        """Centre crops in the order of ``rows``: exactly ``eval_tf`` of each image, as
        8-bit crops normalised a batch at a time (:func:`~retdmctl.data.loaders.normalize_batch`).
        With loader workers, all of it happens in the workers. With none, decoding and
        cropping run on ``decode_threads`` threads between the model's batches (the CPU)
        or, with 0, on a background thread beside the model (a device; see
        :func:`decoding`), and the normalisation (four vectorised passes) on the
        model's own threads."""
        if self.workers > 0:
            loader = DataLoader(
                LmdbImages(self.reader, self.info.ids, self.info.labels, np.asarray(rows), self._crop),
                batch_size=self.batch_size,
                num_workers=self.workers,
                collate_fn=self._collate,
                pin_memory=torch.cuda.is_available(),
            )
            yield from loader
            return
        for x, y, r in self.fed(self._eval_crops(np.asarray(rows))):
            yield normalize_batch(x, self.mean, self.std), torch.from_numpy(y), r

    def fed(self, batches: Iterator) -> Iterator:
        """``batches`` as the model should receive them: decoded ahead on a background
        thread (``prefetch`` deep) with a device, or as they come when they are decoded
        between the model's batches (``decode_threads`` > 0, the CPU; see :func:`decoding`)."""
        return in_background(batches, self.prefetch) if self.prefetch > 0 and not self.decode_threads else batches

    def _crop(self, img) -> np.ndarray:
        return np.asarray(self.eval_crop(img))  # (H, W, 3) uint8

    def _collate(self, items: list) -> Batch:
        crops, labels, rows = zip(*items)
        return normalize_batch(np.stack(crops), self.mean, self.std), torch.stack(labels), np.array(rows, dtype=np.int64)

    def _eval_crops(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        ids, labels = self.info.ids, self.info.labels
        crop = lambda data: self._crop(decode(data))  # noqa: E731
        with decoding(self.decode_threads) as decode_all:
            for start in range(0, len(rows), self.batch_size):
                r = rows[start : start + self.batch_size]
                crops = np.stack(decode_all(crop, [self.reader.get(ids[int(i)]) for i in r]))
                yield crops, labels[r].astype(np.float32), r

    def num_batches(self, rows: np.ndarray) -> int:
        return -(-len(rows) // self.batch_size)


class CacheRows:
    """The rows of a cache file's dataset, read on demand.

    A batch reads its own rows and nothing else, so memory does not grow with the
    number of images (a views cache is ~190 KB per image at 224 px: 23 GB for COCO).
    The epoch's order is exactly the in-memory one (a seeded permutation of the rows),
    only the reads change: the rows of a batch are read in file order, consecutive rows
    as one slice, and put back in the batch's order. HDF5's own fancy indexing is not
    used for chunked files: it is ~100 times slower than row-by-row reads there."""

    def __init__(self, path: Path, name: str = "features") -> None:
        self.path, self.name = Path(path), name
        self._file = h5py.File(self.path, "r")
        self._ds = self._file[name]
        self.shape, self.dtype = self._ds.shape, self._ds.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        self._file.close()

    def read(self, rows: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed), each at its view in ``views``
        (None: the whole row), as stored."""
        rows = np.asarray(rows, dtype=np.int64)
        if views is not None and len(views) and (np.asarray(views) == views[0]).all():
            return self._runs(rows, (int(views[0]),))  # one view for all (eval: the centre crop)
        if views is None:
            return self._runs(rows, ())
        keys = rows * self.shape[1] + np.asarray(views, dtype=np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        block = np.empty((len(uniq), *self.shape[2:]), dtype=self.dtype)
        for j, key in enumerate(uniq.tolist()):
            self._ds.read_direct(block, np.s_[key // self.shape[1], key % self.shape[1]], np.s_[j])
        return block[inverse]

    def _runs(self, rows: np.ndarray, view: tuple) -> np.ndarray:
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = np.empty((len(uniq), *self.shape[1 + len(view):]), dtype=self.dtype)
        cuts = np.flatnonzero(np.diff(uniq) != 1) + 1  # runs of consecutive rows
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(uniq)]) if len(uniq) else ():
            a, b = int(uniq[lo]), int(uniq[hi - 1]) + 1
            self._ds.read_direct(block, np.s_[(slice(a, b), *view)], np.s_[lo:hi])
        return block[inverse]


class _ArrayRows:
    """:class:`CacheRows`' interface over an array in memory (small per-image data:
    ``features.h5``'s embeddings, tests)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape = array, array.shape

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        return self.array[rows] if views is None else self.array[rows, views]


class CachedSource:
    """Batches of cached backbone inputs: pooled features (N, F), or with several views
    per image (N, V, ...) stored as float16 and converted batch by batch. ``features``
    is a :class:`CacheRows` (the backbone caches, read batch by batch) or an array in
    memory. A training batch takes one view per image, drawn from the epoch's seed;
    evaluation always takes view 0, the centre crop."""

    def __init__(self, features: np.ndarray | CacheRows, info: DatasetInfo, batch_size: int, views: int = 1) -> None:
        self.rows_of = features if isinstance(features, CacheRows) else _ArrayRows(features)
        self.multi = not (views == 1 and len(self.rows_of.shape) == 2)  # (N, V, ...) rather than (N, F)
        self.views = views
        self.labels = torch.from_numpy(info.labels.astype(np.float32))
        self.batch_size = batch_size

    def centre_of(self, rows: np.ndarray) -> torch.Tensor:
        """The view 0 of images ``rows``, as float32."""
        return self._read(np.asarray(rows), None)

    def _read(self, r: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        if self.multi:
            views = np.zeros(len(r), dtype=np.int64) if views is None else views
            return torch.from_numpy(self.rows_of.read(r, views)).float()
        return torch.from_numpy(self.rows_of.read(r)).float()

    def _take(self, r: np.ndarray, views: np.ndarray | None) -> Batch:
        """Rows ``r``, each at its view in ``views`` (None: view 0)."""
        return self._read(r, views), self.labels[torch.from_numpy(r)], r

    def _batches(self, rows: np.ndarray, views: np.ndarray | None) -> Iterator[Batch]:
        for start in range(0, len(rows), self.batch_size):
            end = start + self.batch_size
            yield self._take(rows[start:end], None if views is None else views[start:end])

    def train_batches(self, rows: np.ndarray, seed: int) -> Iterator[Batch]:
        rng = np.random.default_rng(seed)
        order = rng.permutation(rows)
        views = rng.integers(self.views, size=len(order)) if self.views > 1 else None
        return self._batches(order, views)

    def batches_of(self, batches: list[np.ndarray], seed: int) -> Iterator[Batch]:
        """Training batches made of exactly these rows (one rank's shard of an epoch)."""
        rng = np.random.default_rng(seed)
        for r in batches:
            yield self._take(r, rng.integers(self.views, size=len(r)) if self.multi else None)

    def eval_batches(self, rows: np.ndarray) -> Iterator[Batch]:
        return self._batches(rows, None)

    def num_batches(self, rows: np.ndarray) -> int:
        return -(-len(rows) // self.batch_size)


def cache_key(model_cfg, spec: BackboneSpec, images_fp: str | None, weights_fp: str | None = None, *,
              ids: str, precision: str) -> dict:
    """Everything the cached backbone features depend on: with ``ids`` (the dataset's
    :func:`~retdmctl.data.dataset.ids_digest`) the order of its rows, and ``precision``
    the dtype they were computed in (:func:`~retdmctl.runtime.precision`)."""
    return {
        "backbone": spec.name,
        "pretrained": model_cfg.pretrained,
        "weights_file": weights_fp,
        "image_size": model_cfg.image_size,
        "images": images_fp,
        "ids": ids,
        "precision": precision,
        "version": 2,  # 2: a randomly initialised backbone is drawn from a fixed seed
    }


def views_cache_key(model_cfg, spec: BackboneSpec, images_fp: str | None, weights_fp: str | None = None, *,
                    ids: str, precision: str) -> dict:
    """The key of a cache of several views, or of trunk activations (model.views,
    model.tune_blocks); with one view of pooled features it is :func:`cache_key`."""
    key = cache_key(model_cfg, spec, images_fp, weights_fp, ids=ids, precision=precision)
    if model_cfg.views > 1 or model_cfg.tune_blocks:
        key.update(views=model_cfg.views, tune_blocks=model_cfg.tune_blocks, version=3)
    return key


def read_cache_key(path: Path) -> dict | None:
    try:
        with h5py.File(path, "r") as h5:
            return json.loads(h5.attrs["key"])
    except (OSError, KeyError):
        return None


def read_cache_origin(path: Path) -> str | None:
    """The workspace that extracted a cache file (not part of its key), if recorded."""
    try:
        with h5py.File(path, "r") as h5:
            return str(h5.attrs["workspace"])
    except (OSError, KeyError):
        return None


def _cache_attrs(key: dict, origin: str | None) -> dict:
    return {"key": json.dumps(key), "version": __version__, "created": now_iso(),
            **({"workspace": origin} if origin else {})}


# --- extracting the frozen backbone's cache ----------------------------------------------
# Outputs: batches of a pass over the images, in row order: (float16 outputs, their rows).
Outputs = Iterator[tuple[np.ndarray, np.ndarray]]


def pooled_outputs(backbone: torch.nn.Module, pixels: PixelSource, rows: np.ndarray, device: torch.device, autocast) -> Outputs:
    """The backbone's pooled features of ``rows`` (centre crop): (B, F) a batch."""
    backbone = prepare_model(backbone, device).eval()
    for x, _, r in pixels.eval_batches(rows):
        with torch.no_grad(), autocast:
            feats = backbone(to_device(x, device))
        yield feats.float().cpu().numpy().astype(np.float16), r


def view_outputs(forward, pixels: PixelSource, views: int, rows: np.ndarray, device: torch.device, autocast) -> Outputs:
    """``forward`` (the backbone, or its trunk) of the first ``views`` views of ``rows``:
    (B, V, ...) a batch. Decoding as in :meth:`PixelSource.eval_batches`."""
    from retdmctl.data.loaders import ViewsTransform

    info = pixels.info
    tf = ViewsTransform(pixels.image_size, pixels.mean, pixels.std, views)
    per_batch = max(1, pixels.batch_size // views)

    def batches():
        crops = lambda data: tf.crops(decode(data))  # noqa: E731 - numpy and PIL only
        with decoding(pixels.decode_threads) as decode_all:
            for start in range(0, len(rows), per_batch):
                r = rows[start : start + per_batch]
                yield np.concatenate(decode_all(crops, [pixels.reader.get(info.ids[int(i)]) for i in r])), r

    for crops, r in pixels.fed(batches()):
        x = normalize_batch(crops, pixels.mean, pixels.std)  # (B * V, 3, H, W), on the model's threads
        with torch.no_grad(), autocast:
            acts = forward(to_device(x, device)).float()
        yield acts.reshape(len(r), views, *acts.shape[1:]).cpu().numpy().astype(np.float16), r


def output_shape(forward, image_size: int, views: int | None, device: torch.device, autocast) -> tuple[int, ...]:
    """What one image adds to a cache, from one forward of a blank image: (F,) pooled
    features (``views`` None), else (V, ...) ``forward``'s output per view."""
    with torch.no_grad(), autocast:
        out = forward(to_device(torch.zeros(1, 3, image_size, image_size), device))
    return tuple(out.shape[1:]) if views is None else (views, *out.shape[1:])


def write_cache(path: Path, outputs: Outputs, rows: int, key: dict, origin: str | None = None, *,
                chunked: bool, pace=None) -> None:
    """The cache file of ``rows`` images' ``outputs``: ``features`` (N, ...) float16 (one
    chunk per image when ``chunked``: the views and activations, read a row at a time),
    its key and origin in the attributes; under a temporary name renamed when done, not at
    the end of the stage's transaction: the cache is keyed by its content's inputs."""
    with atomic_path(path, defer=False) as tmp, h5py.File(tmp, "w") as h5:
        _fill(h5, outputs, rows, 0, chunked, pace)
        h5.attrs.update(_cache_attrs(key, origin))


def _fill(h5: h5py.File, outputs: Outputs, rows: int, first: int, chunked: bool, pace) -> None:
    out = None
    for batch, r in outputs:
        if out is None:
            out = h5.create_dataset("features", shape=(rows, *batch.shape[1:]), dtype=np.float16,
                                    chunks=(1, *batch.shape[1:]) if chunked else None)
        out[r[0] - first : r[-1] + 1 - first] = batch  # rows come in order: a slice, not a point selection
        if pace is not None:
            pace.advance(len(r))


def part_path(path: Path, rank: int) -> Path:
    """Where process ``rank`` writes its shard of the cache ``path`` under torchrun."""
    return path.with_name(f".{path.name}.part{rank}")


def write_part(path: Path, rank: int, outputs: Outputs, rows: np.ndarray, *, chunked: bool, pace=None) -> None:
    """Process ``rank``'s contiguous shard ``rows`` of the cache ``path``, into its part
    file (:func:`part_path`; removed if this fails). Not through ``atomic_path``: every
    rank writes its own, in the user cache, and rank 0 merges them (:func:`merge_parts`)."""
    part = part_path(path, rank)
    try:
        with h5py.File(part, "w") as h5:
            _fill(h5, outputs, len(rows), int(rows[0]), chunked, pace)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def merge_parts(path: Path, parts: list[Path], rows: int, key: dict, origin: str | None = None,
                block_bytes: int = 64 * 2**20) -> None:
    """The part files (in rank order, each a contiguous run of rows) copied into the cache
    file ``path`` ``block_bytes`` at a time, with the layout :func:`write_cache` gives
    (each part's, as written); each part is removed once copied."""
    with atomic_path(path, defer=False) as tmp, h5py.File(tmp, "w") as h5:
        out, at = None, 0
        for part in parts:
            with h5py.File(part, "r") as src:
                feats = src["features"]
                if out is None:
                    out = h5.create_dataset("features", shape=(rows, *feats.shape[1:]), dtype=np.float16, chunks=feats.chunks)
                step = max(1, block_bytes // (2 * int(np.prod(feats.shape[1:]))))  # rows a block
                for start in range(0, len(feats), step):
                    block = feats[start : start + step]
                    out[at + start : at + start + len(block)] = block
                at += len(feats)
            part.unlink()
        if at != rows:
            raise RuntimeError(f"the parts of {path.name} hold {at} rows, not {rows}")
        h5.attrs.update(_cache_attrs(key, origin))


def extract_backbone_features(
    path: Path, backbone: torch.nn.Module, pixels: PixelSource, key: dict, device: torch.device, autocast,
    origin: str | None = None, say=None,
) -> None:
    """Run the backbone once over every image (centre crop) and cache the pooled features
    (``say`` receives the estimate of the time left, :class:`~retdmctl.pace.Pace`)."""
    rows = np.arange(len(pixels.info.ids))
    with Pace("backbone features", len(rows), say) as pace:
        write_cache(path, pooled_outputs(backbone, pixels, rows, device, autocast), len(rows), key, origin,
                    chunked=False, pace=pace)


def extract_views(
    path: Path, forward, pixels: PixelSource, views: int, key: dict, device: torch.device, autocast,
    origin: str | None = None, say=None,
) -> None:
    """Cache ``forward`` (the backbone, or its trunk) of the first ``views`` views of every
    image: (N, V, ...) float16."""
    rows = np.arange(len(pixels.info.ids))
    with Pace(f"backbone inputs, {views} view(s)", len(rows), say) as pace:
        write_cache(path, view_outputs(forward, pixels, views, rows, device, autocast), len(rows), key, origin,
                    chunked=True, pace=pace)


def read_features(path: Path, name: str = "features") -> np.ndarray:
    """A whole cache file in memory, as float32: for tests and small files only (stages
    read caches batch by batch through :class:`CacheRows`)."""
    with h5py.File(path, "r") as h5:
        return h5[name][()].astype(np.float32)


def write_features(path: Path, features: np.ndarray, config: dict, ids: str) -> None:
    """``features.h5``: row i is the image ``ids[i]`` of the dataset whose ids hash to ``ids``."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=np.asarray(features, dtype=np.float16))
        h5.attrs.update({"config": json.dumps(config), "ids_digest": ids, "version": __version__, "created": now_iso()})


def read_row_features(path: Path, info: DatasetInfo, source: str, fix: str, dtype=np.float32) -> np.ndarray:
    """``features.h5`` as ``dtype`` (float16: as stored, half the memory), only where it
    was written for ``info``'s ordered ids (else an InputError naming ``source`` and
    ``fix``): its rows are read as the dataset's."""
    with h5py.File(path, "r") as h5:
        if why := ids_mismatch(h5.attrs.get("ids_digest"), info.ids_digest):
            raise InputError(f"{source} {why}: {fix}")
        return h5["features"][()].astype(dtype, copy=False)
