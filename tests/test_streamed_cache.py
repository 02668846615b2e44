"""The backbone caches are read batch by batch (:class:`retdmctl.sources.CacheRows`),
never whole: the rows, views and epoch order are exactly those of the array in memory,
on a re-run and after a resume."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from retdmctl.sources import CachedSource, CacheRows
from retdmctl.workspace import Workspace
from tests.conftest import run_stages, tiny_config


class Info:
    def __init__(self, n: int, classes: int = 3) -> None:
        self.labels = (np.arange(n * classes).reshape(n, classes) % 2).astype(np.uint8)


def cache_file(path, array: np.ndarray, chunked: bool) -> CacheRows:
    with h5py.File(path, "w") as h5:
        if chunked:  # how extract_views writes: one image per chunk
            h5.create_dataset("features", data=array, chunks=(1, *array.shape[1:]))
        else:  # how the pooled features are written: contiguous
            h5.create_dataset("features", data=array)
    return CacheRows(path)


@pytest.mark.parametrize("chunked", [True, False])
def test_rows_read_from_the_file_are_the_arrays_rows(tmp_path, chunked):
    rng = np.random.default_rng(0)
    views = rng.standard_normal((40, 3, 2, 2)).astype(np.float16)
    rows_of = cache_file(tmp_path / "v.h5", views, chunked)
    for rows in (np.array([7, 3, 3, 39, 0, 8, 9, 10, 11]), np.arange(40), np.arange(12, 30), np.array([], np.int64)):
        pick = rng.integers(3, size=len(rows))
        np.testing.assert_array_equal(rows_of.read(rows, pick), views[rows, pick])  # one view each
        np.testing.assert_array_equal(rows_of.read(rows, np.ones(len(rows), np.int64)), views[rows, 1])
        np.testing.assert_array_equal(rows_of.read(rows), views[rows])  # whole rows
    pooled = rng.standard_normal((25, 6)).astype(np.float16)
    flat = cache_file(tmp_path / "p.h5", pooled, chunked)
    rows = rng.permutation(25)[:17]
    np.testing.assert_array_equal(flat.read(rows), pooled[rows])


def epoch(source: CachedSource, rows: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy(), r) for x, y, r in source.train_batches(rows, seed)]


@pytest.mark.parametrize("views", [1, 4])
def test_an_epoch_from_the_file_is_the_epoch_from_memory(tmp_path, views):
    """Same seed, same batches: rows, their order, each row's view and the values."""
    rng = np.random.default_rng(1)
    shape = (50, views, 3, 2, 2) if views > 1 else (50, 8)
    array = rng.standard_normal(shape).astype(np.float16)
    info = Info(50)
    streamed = CachedSource(cache_file(tmp_path / "c.h5", array, chunked=views > 1), info, 16, views)
    in_memory = CachedSource(array, info, 16, views)
    rows = np.arange(3, 47)
    for seed in (0, 1, 12345):
        got, want = epoch(streamed, rows, seed), epoch(in_memory, rows, seed)
        assert len(got) == len(want) == 3
        for (x, y, r), (x0, y0, r0) in zip(got, want):
            np.testing.assert_array_equal(r, r0)
            np.testing.assert_array_equal(x, x0.astype(np.float32))
            np.testing.assert_array_equal(y, y0)
        order = np.concatenate([r for _, _, r in got])
        assert sorted(order.tolist()) == rows.tolist()  # every training row once per epoch
        again = epoch(streamed, rows, seed)  # a re-run draws the same epoch
        assert all((a[2] == b[2]).all() and (a[0] == b[0]).all() for a, b in zip(got, again))
    assert not (epoch(streamed, rows, 0)[0][2] == epoch(streamed, rows, 1)[0][2]).all()
    # evaluation: the centre crop (view 0) of the rows asked, in their order
    (x, _, r), = list(streamed.eval_batches(np.array([9, 2, 30])))
    np.testing.assert_array_equal(x.numpy(), (array[[9, 2, 30], 0] if views > 1 else array[[9, 2, 30]]).astype(np.float32))
    np.testing.assert_array_equal(streamed.centre_of(np.array([4, 4, 0])).numpy(),
                                  (array[[4, 4, 0], 0] if views > 1 else array[[4, 4, 0]]).astype(np.float32))


def test_the_stages_never_read_a_cache_whole(tmp_path, monkeypatch):
    """Every read of the cache file goes through CacheRows, a batch at a time: no read
    larger than a batch (plus the joint stage's way-2 images) reaches HDF5."""
    from retdmctl import sources

    biggest = {"rows": 0}
    real = sources.CacheRows.read

    def spy(self, rows, views=None):
        biggest["rows"] = max(biggest["rows"], len(rows))
        return real(self, rows, views)

    monkeypatch.setattr(sources.CacheRows, "read", spy)
    real_getitem = h5py.Dataset.__getitem__

    def getitem(self, *args, **kwargs):  # a read of a backbone cache outside CacheRows
        assert "/backbone/" not in self.file.filename, f"{self.file.filename} read outside CacheRows"
        return real_getitem(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    cfg = tiny_config(frozen=True)
    cfg.model.views = 2
    ws = Workspace(tmp_path)
    ran = run_stages(ws, cfg, "ingest", "knn", "classifier")
    assert all(ran.values())
    assert 0 < biggest["rows"] <= cfg.model.batch_size


def test_an_epoch_after_a_resume_is_the_epoch_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """The classifier, killed after its second epoch and run again, resumes at the third
    and draws exactly the batches (rows, views, values) the uninterrupted run drew."""
    from retdmctl import sources

    drawn: list[list[tuple]] = []
    real = sources.CachedSource.train_batches
    stop_at = {"epoch": None}

    def spy(self, rows, seed):
        if stop_at["epoch"] is not None and len(drawn) == stop_at["epoch"]:
            raise KeyboardInterrupt  # killed at the start of this epoch
        batches = [(x.clone(), r.copy()) for x, _, r in real(self, rows, seed)]
        drawn.append(batches)
        return iter([(x, self.labels[torch.from_numpy(r)], r) for x, r in batches])

    monkeypatch.setattr(sources.CachedSource, "train_batches", spy)
    cfg = tiny_config(frozen=True)
    cfg.model.views, cfg.classifier.epochs, cfg.classifier.stop_after = 3, 4, 0

    run_stages(Workspace(tmp_path / "whole"), cfg, "ingest", "knn", "classifier")
    whole, drawn[:] = list(drawn), []

    ws = Workspace(tmp_path / "killed")
    run_stages(ws, cfg, "ingest", "knn")
    stop_at["epoch"] = 2
    with pytest.raises(KeyboardInterrupt):
        run_stages(ws, cfg, "classifier")
    assert (ws.stage_dir("classifier") / "resume.pt").is_file()
    before, drawn[:], stop_at["epoch"] = list(drawn), [], None
    out = __import__("io").StringIO()
    run_stages(ws, cfg, "classifier", out=out)
    assert "resum" in out.getvalue().lower()
    assert len(before) == 2 and len(drawn) == 2  # epochs 1-2, then 3-4 after the resume
    for got, want in zip(before + drawn, whole):
        assert len(got) == len(want)
        for (x, r), (x0, r0) in zip(got, want):
            np.testing.assert_array_equal(r, r0)
            assert torch.equal(x, x0)


def test_the_image_store_is_remapped_as_it_is_read_and_every_image_is_read_right(tmp_path, monkeypatch):
    """LMDB's pages stay mapped, in the process's RSS, until the environment closes: the
    reader closes it every REMAP_BYTES read and reopens it on the next read."""
    from retdmctl.data.store import ImageReader, ImageWriter

    images = {f"img{i}.jpg": bytes([i]) * (1000 + i) for i in range(30)}
    store = ImageWriter(tmp_path / "images.lmdb")
    store.put_many(images.items())
    store.close()
    monkeypatch.setattr(ImageReader, "REMAP_BYTES", 5000)
    reader = ImageReader(tmp_path / "images.lmdb")
    opened = []
    real_open = ImageReader._open

    def counting_open(self):
        if self._env is None:
            opened.append(1)
        return real_open(self)

    monkeypatch.setattr(ImageReader, "_open", counting_open)
    for name, data in list(images.items()) * 2:
        assert reader.get(name) == data
    total = 2 * sum(len(d) for d in images.values())
    assert len(opened) >= total // 5000  # reopened as it went, never more than 5000 bytes mapped
    assert reader._mapped < 5000
    with pytest.raises(KeyError):
        reader.get("missing.jpg")


@pytest.mark.parametrize("remap", [1, 2500, 1 << 30])
def test_the_records_digest_is_the_one_pass_hash_however_often_the_store_is_reopened(tmp_path, monkeypatch, remap):
    import hashlib

    import lmdb

    from retdmctl.data import store

    writer = store.ImageWriter(tmp_path / "s.lmdb")
    writer.put_many([(f"img{i}.jpg", bytes([i % 256]) * (500 + i)) for i in range(60)])
    writer.env.close()
    digest = hashlib.sha256()  # every record, in key order, in one pass
    env = lmdb.open(str(tmp_path / "s.lmdb"), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        for key, value in txn.cursor().iternext(keys=True, values=True):
            digest.update(bytes(key) + len(value).to_bytes(8, "little"))
            digest.update(value)
    env.close()
    monkeypatch.setattr(store.ImageReader, "REMAP_BYTES", remap)
    assert store.records_digest(tmp_path / "s.lmdb") == "records:" + digest.hexdigest()
