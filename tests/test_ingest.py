"""Ingest: demo determinism, scene and csv readers, bad input, path safety."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from retdmctl.config import IngestConfig
from retdmctl.data.dataset import read_dataset
from retdmctl.data.ingest import run_ingest
from retdmctl.data.readers.csvfile import read_csv_labels
from retdmctl.data.readers.demo import read_demo
from retdmctl.data.readers.scene import read_scene
from retdmctl.data.store import ImageReader
from retdmctl.errors import InputError
from retdmctl.workspace import Workspace
from tests.conftest import shared

QUIET = Console(file=io.StringIO())
# Fractions that leave each of train, val and test at least one image of a 3-6 image fixture.
FEW = {"test_fraction": 0.34, "val_fraction": 0.5}


def _jpeg(path, size=(40, 30), color=(200, 10, 10), mode="RGB", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path, format=fmt)


def _store(ws: Workspace) -> dict[str, bytes]:
    info = read_dataset(ws.dataset)
    reader = ImageReader(ws.lmdb)
    return {k: reader.get(k) for k in info.ids}


def test_demo_is_deterministic_and_has_structure(tmp_path):
    cfg = IngestConfig(source="demo", workers=1)
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    run_ingest(read_demo(60, 8, 3), a, cfg, QUIET)
    run_ingest(read_demo(60, 8, 3), b, cfg, QUIET)
    assert _store(a) == _store(b)
    info = read_dataset(a.dataset)
    per_image = info.labels.sum(axis=1)
    assert set(per_image) <= {2, 3} and info.num_classes == 8
    assert sum(len(v) for v in info.splits.values()) == 60
    assert not set(info.splits["train"]) & set(info.splits["test"])
    sizes = [Image.open(io.BytesIO(v)).size for v in _store(a).values()]
    assert all(96 <= w <= 128 and 96 <= h <= 128 for w, h in sizes)


def test_dense_demo_has_the_requested_label_density_and_is_deterministic(tmp_path):
    src = read_demo(300, 20, 5, "4-6")
    labels = np.stack([r.labels for r in src.records])
    per_image = labels.sum(axis=1)
    assert len(src.class_names) == 20 and labels.shape == (300, 20)
    assert set(per_image) == {4, 5, 6}  # every count of the range occurs, nothing outside it
    assert 4.7 < per_image.mean() < 5.3  # drawn uniformly: about 5 on average
    assert (labels.sum(axis=0) > 0).all()  # every class, the 8 new shapes included, is used
    assert [r.source.classes for r in src.records[:5]] == [tuple(np.flatnonzero(r.labels)) for r in src.records[:5]]
    again = read_demo(300, 20, 5, "4-6")
    assert np.array_equal(labels, np.stack([r.labels for r in again.records]))
    assert all(a.source.render().tobytes() == b.source.render().tobytes()
               for a, b in zip(src.records[:6], again.records[:6]))
    other = np.stack([r.labels for r in read_demo(300, 20, 6, "4-6").records])
    assert not np.array_equal(labels, other)
    exact = np.stack([r.labels for r in read_demo(40, 12, 1, "7").records])
    assert set(exact.sum(axis=1)) == {7}
    # through ingest: the same bytes twice, the density kept in dataset.h5
    cfg = IngestConfig(source="demo", workers=1, demo_labels="4-6")
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    run_ingest(read_demo(40, 20, 2, "4-6"), a, cfg, QUIET)
    run_ingest(read_demo(40, 20, 2, "4-6"), b, cfg, QUIET)
    assert _store(a) == _store(b)
    assert set(read_dataset(a.dataset).labels.sum(axis=1)) <= {4, 5, 6}


def test_demo_default_density_is_the_earlier_one():
    default, explicit = read_demo(80, 10, 4), read_demo(80, 10, 4, "2-3")
    assert all(np.array_equal(a.labels, b.labels) and a.source == b.source
               for a, b in zip(default.records, explicit.records))
    assert {r.source.grid for r in default.records} == {2}  # the 2 x 2 layout of earlier versions


@pytest.mark.parametrize(
    ("labels", "classes", "message"),
    [
        ("4-6", 5, "demo: --labels 4-6 needs at least 6 classes, got --classes 5"),
        ("0", 10, "demo: --labels must be K or MIN-MAX with 1 <= MIN <= MAX <= 9, got '0'"),
        ("6-4", 10, "demo: --labels must be K or MIN-MAX with 1 <= MIN <= MAX <= 9, got '6-4'"),
        ("10", 20, "demo: --labels must be K or MIN-MAX with 1 <= MIN <= MAX <= 9, got '10'"),
        ("4 to 6", 20, "demo: --labels must be K or MIN-MAX with 1 <= MIN <= MAX <= 9, got '4 to 6'"),
    ],
)
def test_demo_label_option_errors(labels, classes, message):
    with pytest.raises(InputError) as err:
        read_demo(40, classes, 0, labels)
    assert str(err.value) == message


def test_csv_reader_classes_and_errors(tmp_path):
    img = tmp_path / "img"
    for name in ("a.jpg", "sub/b.jpg", "c.jpg"):
        _jpeg(img / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,labels\na.jpg,cat|dog\nsub/b.jpg,dog\nc.jpg,\n")
    src = read_csv_labels(labels, img)
    assert src.class_names == ["cat", "dog"]
    assert [r.labels.tolist() for r in src.records] == [[1, 1], [0, 1], [0, 0]]
    with pytest.raises(InputError, match=r"labels.csv: line 2: unknown label 'cat'$"):
        read_csv_labels(labels, img, classes=["dog"])
    labels.write_text("a.jpg,cat,extra\n")
    with pytest.raises(InputError, match=r"line 1: expected 2 columns \(path,label1\|label2\|...\), got 3$"):
        read_csv_labels(labels, img)


def test_paths_escaping_the_image_root_are_skipped(tmp_path):
    img = tmp_path / "img"
    _jpeg(img / "ok.jpg")
    _jpeg(tmp_path / "secret.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"ok.jpg,x\n../secret.jpg,x\n{tmp_path / 'secret.jpg'},x\n")
    src = read_csv_labels(labels, img)
    assert [r.key for r in src.records] == ["ok.jpg"]
    assert [why for _, why in src.skipped] == ["path escapes the image folder"] * 2


def test_bad_images_are_skipped_and_good_ones_kept(tmp_path):
    img = tmp_path / "img"
    _jpeg(img / "good.jpg", size=(600, 400))
    _jpeg(img / "gray.jpg", mode="L")
    _jpeg(img / "png_named.jpg", fmt="PNG")
    (img / "empty.jpg").write_bytes(b"")
    good = (img / "good.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
    labels = tmp_path / "labels.csv"
    names = ["good.jpg", "gray.jpg", "png_named.jpg", "empty.jpg", "truncated.jpg", "missing.jpg"]
    labels.write_text("".join(f"{n},x\n" for n in names))
    ws = Workspace(tmp_path / "w")
    summary = run_ingest(read_csv_labels(labels, img), ws, IngestConfig(path=str(labels), workers=1, **FEW), QUIET)
    info = read_dataset(ws.dataset)
    assert sorted(info.ids) == ["good.jpg", "gray.jpg", "png_named.jpg"]
    assert summary["skipped"] == 3
    stored = _store(ws)
    for data in stored.values():
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.mode == "RGB"
    assert Image.open(io.BytesIO(stored["good.jpg"])).size == (384, 256)  # shorter side 256
    with pytest.raises(InputError, match=r"empty.jpg: unreadable image \(empty file\) \(--strict\)$"):
        run_ingest(
            read_csv_labels(labels, img), Workspace(tmp_path / "s"), IngestConfig(workers=1, strict=True, **FEW), QUIET
        )


@pytest.mark.data
def test_scene_reference_split(tmp_path):
    root = shared("scene")
    src = read_scene(root)
    assert src.class_names == ["desert", "mountains", "sea", "sunset", "trees"]
    assert len(src.records) == 2000
    counts = np.stack([r.labels for r in src.records]).sum(axis=0)
    assert counts.tolist() == [409, 458, 580, 465, 560]
    from retdmctl.data.dataset import random_splits

    splits = random_splits(2000, seed=0, test_fraction=0.2, val_fraction=0.1)
    perm = np.random.default_rng(0).permutation(2000)
    assert np.array_equal(splits["test"], np.sort(perm[1600:]))
    assert np.array_equal(np.sort(np.concatenate([splits["train"], splits["val"]])), np.sort(perm[:1600]))


def test_lmdb_map_grows_as_needed(tmp_path, monkeypatch):
    import lmdb

    from retdmctl.data import store

    monkeypatch.setattr(store, "_INITIAL_MAP", 1 << 16)  # 64 KiB: far too small for the images
    img = tmp_path / "img"
    rng = np.random.default_rng(0)
    for i in range(12):
        img.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(img / f"{i}.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{i}.jpg,x\n" for i in range(12)))
    ws = Workspace(tmp_path / "w")
    summary = run_ingest(read_csv_labels(labels, img), ws, IngestConfig(path=str(labels), workers=2), QUIET)
    assert summary["images"] == 12 and summary["skipped"] == 0
    stored = _store(ws)
    assert sum(len(v) for v in stored.values()) > 4 * (1 << 16)
    env = lmdb.open(str(ws.lmdb), readonly=True, lock=False)
    assert env.info()["map_size"] >= 4 * (1 << 16)
    env.close()
    assert stored["3.jpg"] == _store_of(img / "3.jpg")


def _store_of(path):
    from retdmctl.data.ingest import EncodeSettings, encode_image

    return encode_image(path, EncodeSettings(256, False, 90))
