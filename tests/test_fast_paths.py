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
from retdmctl.sources import PixelSource, extract_backbone_features

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


@pytest.mark.parametrize("mean,std", [(MEAN, STD), ((0.5,) * 3, (0.5,) * 3), ((0.5,) * 3, (0.25,) * 3)])
def test_normalize_batch_is_the_eval_tail_for_every_pixel_value(mean, std):
    # elementwise: equal on all 256 values of every channel means equal on any image
    arr = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    tail = torch.nn.Sequential(*eval_transform(16, mean, std).transforms[2:])  # ToImage, ToDtype, Normalize
    for threads in (1, 2):
        with _threads(threads):
            assert torch.equal(normalize_batch(arr[None], mean, std)[0], tail(Image.fromarray(arr)))


class _threads:
    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def test_normalize_batch_is_the_eval_tail_bit_for_bit():
    rng = np.random.default_rng(1)
    crops = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(5)]
    tail = eval_transform(20, MEAN, STD).transforms[2:]  # ToImage, ToDtype, Normalize
    ref = torch.stack([torch.nn.Sequential(*tail)(c) for c in crops])
    x = normalize_batch(np.stack([np.asarray(c) for c in crops]), MEAN, STD)
    assert x.dtype == torch.float32 and x.shape == (5, 3, 20, 20)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("workers,prefetch,threads", [(0, 0, 0), (0, 2, 0), (1, 2, 0), (0, 2, 2), (0, 0, 3)])
def test_pixel_source_eval_batches_are_the_eval_transform(store, workers, prefetch, threads):
    spec = SimpleNamespace(mean=MEAN, std=STD)
    src = PixelSource(store.path, store.info, spec, 48, 5, workers)
    src.prefetch, src.decode_threads = prefetch, threads
    rows = np.array([3, 0, 11, 7, 1, 2, 10, 4, 9, 8, 5, 6])  # any order is kept
    batches = list(src.eval_batches(rows))
    assert [len(r) for _, _, r in batches] == [5, 5, 2]
    x = torch.cat([b[0] for b in batches])
    ref = torch.stack([eval_transform(48, MEAN, STD)(decode(store.blobs[r])) for r in rows])
    assert torch.equal(x, ref)
    assert np.array_equal(np.concatenate([r for _, _, r in batches]), rows)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(store.info.labels[rows].astype(np.float32)))
    src.reader.close()


@pytest.mark.parametrize("threads", [0, 2])
def test_pixel_source_eval_batches_can_be_abandoned(store, threads):
    src = PixelSource(store.path, store.info, SimpleNamespace(mean=MEAN, std=STD), 48, 2, 0)
    src.decode_threads = threads
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


class _DictSampler:
    """The metric sampler as it was before issue 11's rewrite (a dict per dataset row, a
    Python loop per batch): the reference the vectorised one must match exactly."""

    def __init__(self, graph, info, extra_rows):
        from retdmctl.knn import knn_search

        self.graph = graph
        self.label_sets = torch.from_numpy(graph.label_sets.astype(np.float32))
        self.row_neighbors = {}
        train_rows = np.flatnonzero(graph.image_set >= 0)
        for row, s in zip(train_rows, graph.image_set[train_rows]):
            self.row_neighbors[int(row)] = graph.neighbors[s]
        if len(extra_rows):
            nbrs, _ = knn_search(graph.label_sets, info.labels[extra_rows], graph.k, graph.index.get("kind", "exact"))
            for row, nb in zip(extra_rows, nbrs):
                self.row_neighbors[int(row)] = nb

    def neighbors(self, rows):
        return np.stack([self.row_neighbors[int(r)] for r in rows])

    def way2_images(self, neighbor_sets, rng):
        start = self.graph.set_ptr[neighbor_sets]
        count = self.graph.set_ptr[neighbor_sets + 1] - start
        pick = start + (rng.random(neighbor_sets.shape) * count).astype(np.int64)
        return self.graph.set_members[pick]


def test_metric_sampler_and_steps_are_exactly_the_previous_ones():
    from retdmctl.knn import build_graph
    from retdmctl.models.retdm import RETDM
    from retdmctl.training.sampler import MetricSampler, metric_and_rec

    rng = np.random.default_rng(3)
    labels = (rng.random((120, 6)) < 0.3).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    train, val = np.arange(90), np.arange(90, 120)
    graph = build_graph(labels, train, k=4)
    info = SimpleNamespace(labels=labels)
    new, old = MetricSampler.build(graph, info, val), _DictSampler(graph, info, val)
    batches = [rng.permutation(train)[:32], rng.permutation(train)[:32], val[:17], np.concatenate([val[:5], train[:9]])]
    for rows in batches:
        assert np.array_equal(new.neighbors(rows), old.neighbors(rows))
    with pytest.raises(KeyError):
        MetricSampler.build(graph, info, np.array([], dtype=np.int64)).neighbors(val[:3])

    # the same losses and weights, bit for bit, over a few SGD steps
    f_bank = torch.from_numpy(rng.random((120, 16)).astype(np.float32))
    cfg = SimpleNamespace(lam=1.0, margin=0.1)
    runs = []
    for sampler in (new, old):
        torch.manual_seed(0)
        model = RETDM(6, 8, embed_dim=16)
        opt = torch.optim.SGD(model.label_parameters(), lr=0.1, momentum=0.9)
        draws = np.random.default_rng(7)
        losses = []
        for rows in batches:
            y = torch.from_numpy(labels[rows].astype(np.float32))
            metric, rec = metric_and_rec(model, f_bank[rows], y, rows, sampler, f_bank, draws, cfg)
            opt.zero_grad()
            (metric + rec).backward()
            opt.step()
            losses.append((metric.item(), rec.item()))
        runs.append((losses, model.state_dict(), draws.random()))
    (l1, s1, r1), (l2, s2, r2) = runs
    assert l1 == l2 and r1 == r2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_view_crops_normalised_are_the_views_transform_bit_for_bit():
    from retdmctl.data.loaders import ViewsTransform

    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    tf = ViewsTransform(32, MEAN, STD, 10)
    crops = tf.crops(img)
    assert crops.shape == (10, 32, 32, 3) and crops.dtype == np.uint8
    assert torch.equal(normalize_batch(torch.from_numpy(crops), MEAN, STD), tf(img))


@pytest.mark.parametrize("threads", [0, 2])
def test_extracted_views_are_the_views_transform(store, tmp_path, threads):
    from retdmctl.data.loaders import ViewsTransform
    from retdmctl.sources import extract_views

    torch.manual_seed(0)
    backbone, spec = build_backbone("tiny_cnn", pretrained=False)
    backbone.eval()
    src = PixelSource(store.path, store.info, spec, 32, 6, 0)
    src.decode_threads = threads
    path = tmp_path / "views.h5"
    extract_views(path, backbone, src, 3, {"k": 1}, torch.device("cpu"), torch.no_grad())
    with h5py.File(path, "r") as h5:
        got = h5["features"][()]
    tf = ViewsTransform(32, spec.mean, spec.std, 3)
    with torch.no_grad():
        x = torch.stack([tf(decode(b)) for b in store.blobs])  # (N, 3, C, H, W)
        ref = torch.cat([backbone(x[i : i + 2].flatten(0, 1).contiguous(memory_format=torch.channels_last))
                         for i in range(0, len(x), 2)])  # 6 // 3 = 2 images a batch
    assert got.shape == (len(store.blobs), 3, spec.out_dim)
    assert np.array_equal(got, ref.reshape(len(store.blobs), 3, -1).numpy().astype(np.float16))
    src.reader.close()


def test_decoding_pool_keeps_order_and_raises_the_items_error():
    from retdmctl.sources import decoding

    for threads in (0, 1, 3):
        with decoding(threads) as decode_all:
            assert decode_all(lambda v: v * v, list(range(20))) == [v * v for v in range(20)]
            with pytest.raises(ZeroDivisionError):
                decode_all(lambda v: 1 // v, [2, 1, 0, 3])


def test_tune_allocator_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from retdmctl.allocator import tune_allocator

    monkeypatch.setenv("RETDM_MALLOC", "system")
    assert tune_allocator() is False
    monkeypatch.delenv("RETDM_MALLOC")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_allocator() is True
    x = torch.ones(64, 1024, 1024)  # 256 MiB from the heap now, not a fresh mmap
    assert float(x.sum()) == 64 * 1024 * 1024
