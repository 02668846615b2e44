"""The throughput work of issue 11 changes how things are computed, never what: the
batched eval path yields eval_transform's tensors bit for bit, extraction caches the
same features, and the metric stage samples and trains exactly as before."""

from __future__ import annotations

import io
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl.data.loaders import decode, eval_transform, normalize_batch
from retdmctl.data.store import ImageWriter
from retdmctl.models.backbones import build_backbone
from retdmctl.training.sources import PixelSource, extract_backbone_features

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blob(h: int, w: int, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 80 + np.linspace(0, 170, w)[None, :, None]).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def store(tmp_path):
    # mixed sizes and orientations, a PNG with alpha and a grayscale JPEG: every image
    # goes through decode() as before
    blobs = [_blob(h, w, i) for i, (h, w) in enumerate([(90, 140), (140, 90), (64, 64), (75, 201), (100, 100)] * 2)]
    blobs += [_blob(80, 120, 50, "PNG", "RGBA"), _blob(120, 80, 51, "JPEG", "L")]
    ids = [f"img{i}" for i in range(len(blobs))]
    writer = ImageWriter(tmp_path / "images.lmdb")
    writer.put_many(zip(ids, blobs))
    writer.close()
    labels = (np.random.default_rng(0).random((len(ids), 4)) < 0.5).astype(np.uint8)
    return SimpleNamespace(path=tmp_path / "images.lmdb", blobs=blobs, info=SimpleNamespace(ids=ids, labels=labels))


def test_normalize_batch_is_the_eval_tail_bit_for_bit():
    rng = np.random.default_rng(1)
    crops = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(5)]
    tail = eval_transform(20, MEAN, STD).transforms[2:]  # ToImage, ToDtype, Normalize
    ref = torch.stack([torch.nn.Sequential(*tail)(c) for c in crops])
    x = normalize_batch(torch.from_numpy(np.stack([np.asarray(c) for c in crops])), MEAN, STD)
    assert x.dtype == torch.float32 and x.shape == (5, 3, 20, 20)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("workers,prefetch", [(0, 0), (0, 2), (1, 2)])
def test_pixel_source_eval_batches_are_the_eval_transform(store, workers, prefetch):
    spec = SimpleNamespace(mean=MEAN, std=STD)
    src = PixelSource(store.path, store.info, spec, 48, 5, workers)
    src.prefetch = prefetch
    rows = np.array([3, 0, 11, 7, 1, 2, 10, 4, 9, 8, 5, 6])  # any order is kept
    batches = list(src.eval_batches(rows))
    assert [len(r) for _, _, r in batches] == [5, 5, 2]
    x = torch.cat([b[0] for b in batches])
    ref = torch.stack([eval_transform(48, MEAN, STD)(decode(store.blobs[r])) for r in rows])
    assert torch.equal(x, ref)
    assert np.array_equal(np.concatenate([r for _, _, r in batches]), rows)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(store.info.labels[rows].astype(np.float32)))
    src.reader.close()


def test_pixel_source_eval_batches_can_be_abandoned(store):
    src = PixelSource(store.path, store.info, SimpleNamespace(mean=MEAN, std=STD), 48, 2, 0)
    it = src.eval_batches(np.arange(12))
    next(it)
    it.close()  # the background decoder stops; nothing hangs
    assert len(list(src.eval_batches(np.arange(3)))) == 2
    src.reader.close()


def test_extracted_features_are_the_backbone_on_the_eval_transform(store, tmp_path):
    torch.manual_seed(0)
    backbone, spec = build_backbone("tiny_cnn", pretrained=False)
    src = PixelSource(store.path, store.info, spec, 32, 5, 0)
    path = tmp_path / "features.h5"
    extract_backbone_features(path, backbone, src, {"k": 1}, torch.device("cpu"), torch.no_grad())
    with h5py.File(path, "r") as h5:
        got = h5["features"][()]
    with torch.no_grad():
        x = torch.stack([eval_transform(32, spec.mean, spec.std)(decode(b)) for b in store.blobs])
        ref = torch.cat([backbone.eval()(x[i : i + 5].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), 5)])
    assert got.dtype == np.float16 and got.shape == (len(store.blobs), spec.out_dim)
    assert np.array_equal(got, ref.numpy().astype(np.float16))
    src.reader.close()
