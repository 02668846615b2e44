"""What ingest guarantees about its output: long ids, safe XML, non-empty splits (carved
when the source has no test split), classes without positives named, a store reused
across re-splits, and unknown (``?name``) labels."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
from rich.console import Console

from retdmctl.config import IngestConfig
from retdmctl.data.dataset import DatasetInfo, random_splits, read_dataset, write_dataset
from retdmctl.data.ingest import EncodeSettings, encode_image, run_ingest
from retdmctl.data.readers.coco import read_coco
from retdmctl.data.readers.csvfile import read_csv_labels
from retdmctl.data.readers.voc import read_voc
from retdmctl.data.store import ImageReader, store_key
from retdmctl.errors import InputError
from retdmctl.workspace import Workspace
from tests.test_ingest_formats import FEW, QUIET, cli, coco_json, make_jpeg, make_voc


def csv_set(root: Path, lines: list[str], n_images: int | None = None) -> Path:
    """``root/img/<i>.jpg`` for every line's path and ``root/labels.csv``."""
    for line in lines:
        make_jpeg(root / "img" / line.split(",")[0], seed=len(line))
    labels = root / "labels.csv"
    labels.write_text("".join(line + "\n" for line in lines))
    return labels


def run(labels: Path, ws_root: Path, console=QUIET, **cfg):
    ws = Workspace(ws_root)
    summary = run_ingest(read_csv_labels(labels, labels.parent / "img"), ws, IngestConfig(workers=1, **cfg), console)
    return summary, ws


# --- LMDB keys -------------------------------------------------------------------------
def test_ids_longer_than_lmdb_keys_are_stored_and_read_back(tmp_path):
    deep = "/".join(f"{k}_" + "d" * 120 for k in range(5))  # 5 folders of 122 bytes
    lines = [f"{deep}/image_{i}.jpg,{'a' if i % 2 else 'b'}" for i in range(6)]
    labels = csv_set(tmp_path, lines)
    summary, ws = run(labels, tmp_path / "w", **FEW)
    assert summary["images"] == 6 and summary["skipped"] == 0
    info = read_dataset(ws.dataset)
    assert sorted(info.ids) == sorted(line.split(",")[0] for line in lines)  # the full path, as data
    assert min(len(i.encode()) for i in info.ids) > 600
    reader = ImageReader(ws.lmdb)
    for image_id in info.ids:
        expected = encode_image(tmp_path / "img" / image_id, EncodeSettings(256, False, 90))
        assert reader.get(image_id) == expected
    reader.close()
    env = lmdb.open(str(ws.lmdb), readonly=True, lock=False)
    with env.begin() as txn:
        keys = [bytes(k) for k in txn.cursor().iternext(values=False)]
    env.close()
    assert sorted(keys) == sorted(hashlib.sha256(i.encode()).digest() for i in info.ids)
    assert store_key(info.ids[0]) == hashlib.sha256(info.ids[0].encode()).digest()
    with pytest.raises(KeyError):
        ImageReader(ws.lmdb).get("not/stored.jpg")


# --- VOC XML ---------------------------------------------------------------------------
BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(f' <!ENTITY lol{k} "{("&lol" + (str(k - 1) if k > 1 else "") + ";") * 10}">\n' for k in range(1, 10))
    + "]>\n<annotation><object><name>&lol9;</name></object></annotation>\n"
)


def test_voc_entity_expansion_is_rejected_not_expanded(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    xml = root / "VOC2007" / "Annotations" / "000007.xml"
    xml.write_text(BILLION_LAUGHS)
    src = read_voc(root)
    assert src.skipped == [(str(xml), "unsafe XML (declares entity 'lol')")]
    assert "VOC2007/000007" not in [r.key for r in src.records]
    assert len(src.records) == 5
    with pytest.raises(InputError, match="^" + re.escape(f"{xml}: unsafe XML (declares entity 'lol') (--strict)") + "$"):
        run_ingest(read_voc(root), Workspace(tmp_path / "w"), IngestConfig(workers=1, strict=True, **FEW), QUIET)


# --- splits ----------------------------------------------------------------------------
def coco_train_only(root: Path, n: int) -> Path:
    images = [(i + 1, f"{i:03d}.jpg") for i in range(n)]
    for i, name in images:
        make_jpeg(root / "train2017" / name, seed=i)
    ann = root / "annotations" / "instances_train2017.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(coco_json(images, [(i, 1 if i % 2 else 3) for i, _ in images])))
    return ann


def test_a_train_only_source_gets_a_carved_test_split(tmp_path):
    ann = coco_train_only(tmp_path / "coco", 12)
    out = io.StringIO()
    summary = run_ingest(read_coco([ann], []), Workspace(tmp_path / "w"), IngestConfig(workers=1, seed=4),
                         Console(file=out, width=200))  # fmt: skip
    assert summary["splits"] == {"train": 9, "val": 1, "test": 2}
    info = read_dataset(Workspace(tmp_path / "w").dataset)
    expected = random_splits(12, seed=4, test_fraction=0.2, val_fraction=0.1)  # exactly as for scene
    assert all(np.array_equal(info.splits[k], expected[k]) for k in ("train", "val", "test"))
    assert summary["split_note"] == "no test split in the source: carved 20% of it (seed 4) as test"
    assert "\nno test split in the source: carved 20% of it (seed 4) as test\n" in out.getvalue()
    with h5py.File(Workspace(tmp_path / "w").dataset) as h5:
        assert json.loads(h5.attrs["config"])["split"] == {
            "mode": "carved", "seed": 4, "test_fraction": 0.2, "val_fraction": 0.1
        }  # fmt: skip


@pytest.mark.parametrize(
    ("n", "cfg", "message"),
    [
        (11, {"val_fraction": 0.05}, "the val split is empty (9 training images x val_fraction 0.05 rounds to 0): "
                                     "use a larger --val-fraction or more images"),
        (11, {"val_fraction": 0.0}, "the val split is empty (9 training images x val_fraction 0 rounds to 0): "
                                    "use a larger --val-fraction or more images"),
        (4, {"test_fraction": 0.1}, "the test split is empty (4 images x test_fraction 0.1 rounds to 0): "
                                    "use a larger --test-fraction or more images"),
        (4, {"test_fraction": 1.0}, "the train split is empty (4 images x test_fraction 1 leaves none for training): "
                                    "use a smaller --test-fraction or more images"),
        (6, {"val_fraction": 1.0}, "the train split is empty (5 training images x val_fraction 1 leaves none): "
                                   "use a smaller --val-fraction or more images"),
        (6, {"val_fraction": 1.5}, "--val-fraction must be between 0 and 1, got 1.5"),
    ],
)  # fmt: skip
def test_an_empty_split_is_an_error_before_anything_is_written(tmp_path, n, cfg, message):
    labels = csv_set(tmp_path, [f"{i}.jpg,a" for i in range(n)])
    with pytest.raises(InputError) as err:
        run(labels, tmp_path / "w", **cfg)
    assert str(err.value) == message
    assert not (tmp_path / "w").exists()  # no store, no .partial, no dataset.h5


def test_an_empty_split_through_the_cli(tmp_path):
    labels = csv_set(tmp_path, [f"{i}.jpg,a" for i in range(11)])
    result = cli(tmp_path, "ingest", "csv", str(labels), "--images", str(tmp_path / "img"), "--val-fraction", "0.05")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: the val split is empty (9 training images x val_fraction 0.05 rounds to 0): "
        "use a larger --val-fraction or more images\n"
    )
    assert not (tmp_path / "cli-w" / "data").exists()


def test_a_split_emptied_by_unreadable_images_is_an_error_before_dataset_h5(tmp_path):
    labels = csv_set(tmp_path, [f"{i}.jpg,a" for i in range(7)])
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(b"not an image")
    ws = Workspace(tmp_path / "w")
    with pytest.raises(InputError) as err:
        run(labels, ws.root)
    assert str(err.value) == (
        "the val split is empty (2 training images x val_fraction 0.1 rounds to 0): use a larger --val-fraction or more images"
    )
    assert not ws.dataset.exists() and not ws.lmdb.exists()
    # the 3 readable images wait in the .partial store: a larger fraction resumes from it
    out = io.StringIO()
    run(labels, ws.root, console=Console(file=out, width=200), val_fraction=0.5)
    assert "resuming: 3 of 7 images already stored" in out.getvalue()
    assert read_dataset(ws.dataset).splits["val"].size == 1


def test_an_only_unreadable_source_says_so_rather_than_blaming_the_split(tmp_path):
    labels = csv_set(tmp_path, ["a.jpg,x"])
    (tmp_path / "img" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"labels.csv: no readable image with labels found$"):
        run(labels, tmp_path / "w", path=str(labels))


def test_require_nonempty_for_readers_of_dataset_h5():
    info = DatasetInfo(
        ids=["a", "b", "c", "d", "e"], labels=np.ones((5, 1), np.uint8), class_names=["x"],
        splits={"train": np.array([0, 1, 2]), "val": np.array([], np.int64), "test": np.array([3, 4])},
    )  # fmt: skip
    info.require_nonempty("train", "test")
    with pytest.raises(InputError) as err:
        info.require_nonempty()
    assert str(err.value) == (
        "the val split of the dataset is empty (5 images): re-run ingest with a larger --val-fraction or more images"
    )
    info.splits["test"] = np.array([], np.int64)
    with pytest.raises(InputError, match=r"^the test split of the dataset is empty \(5 images\): re-run ingest with a "
                                         r"larger --test-fraction or more images$"):  # fmt: skip
        info.require_nonempty("test")
    with pytest.raises(ValueError, match=r"^unknown split 'dev'; splits: train, val, test$"):
        info.require_nonempty("dev")


# --- classes without positives -----------------------------------------------------------
def test_classes_without_a_positive_in_train_or_test_are_named(tmp_path):
    root = tmp_path / "coco"
    train = [(i + 1, f"t{i}.jpg") for i in range(6)]
    test = [(100 + i, f"v{i}.jpg") for i in range(2)]
    for k, (_, name) in enumerate(train):
        make_jpeg(root / "train2017" / name, seed=k)
    for k, (_, name) in enumerate(test):
        make_jpeg(root / "val2017" / name, seed=50 + k)
    ann = root / "annotations"
    ann.mkdir(parents=True)
    # categories: person 1, car 3, cat 17, dog 18. train: person + car; test: person, cat
    (ann / "instances_train2017.json").write_text(json.dumps(coco_json(train, [(i, 1) for i, _ in train] + [(i, 3) for i, _ in train])))
    (ann / "instances_val2017.json").write_text(json.dumps(coco_json(test, [(100, 1), (101, 17)])))
    out = io.StringIO()
    src = read_coco([ann / "instances_train2017.json", ann / "instances_val2017.json"], [])
    summary = run_ingest(src, Workspace(tmp_path / "w"), IngestConfig(workers=1, val_fraction=0.5), Console(file=out, width=200))
    assert summary["no_positives"] == {"train": ["cat", "dog"], "test": ["car", "dog"]}
    assert "\nclasses without a positive in train: cat, dog; in test: car, dog\n" in out.getvalue()
    assert summary["split_note"] is None  # an official test split


def test_no_warning_when_every_class_has_positives(tmp_path):
    labels = csv_set(tmp_path, [f"{i}.jpg,a|b" for i in range(10)])
    out = io.StringIO()
    summary, _ = run(labels, tmp_path / "w", console=Console(file=out, width=200))
    assert summary["no_positives"] == {"train": [], "test": []}
    assert "without a positive" not in out.getvalue()


# --- the store is reused when only the splits change ---------------------------------------
def store_state(ws: Workspace) -> dict[str, tuple[str, int]]:
    """Every file of images.lmdb: content hash and mtime."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(ws.lmdb.iterdir())
    }


def test_a_new_seed_resplits_without_touching_the_store(tmp_path):
    labels = csv_set(tmp_path, [f"{i}.jpg,{'a' if i % 3 else 'b'}" for i in range(20)])
    ws = Workspace(tmp_path / "cli-w")
    base = ["ingest", "csv", str(labels), "--images", str(tmp_path / "img"), "--workers", "1"]
    first = cli(tmp_path, *base, "--seed", "0")
    assert first.exit_code == 0, first.output
    before, splits_before = store_state(ws), read_dataset(ws.dataset).splits
    assert "data.mdb" in before

    second = cli(tmp_path, *base, "--seed", "1")
    assert second.exit_code == 0, second.output
    assert "images.lmdb already holds these images with these settings: reused" in second.output.replace("\n", " ")
    assert store_state(ws) == before  # same bytes, same mtimes
    splits_after = read_dataset(ws.dataset).splits
    assert not np.array_equal(splits_after["test"], splits_before["test"])
    assert ws.read_manifest("ingest")["summary"]["store_reused"] is True
    assert "ingest: up to date, skipped" in cli(tmp_path, *base, "--seed", "1").output  # the manifest vouches for it

    third = cli(tmp_path, *base, "--seed", "1", "--short-side", "32")
    assert third.exit_code == 0, third.output
    assert "reused" not in third.output
    assert store_state(ws)["data.mdb"][0] != before["data.mdb"][0]  # rebuilt: other encode settings
    assert ws.read_manifest("ingest")["summary"]["store_reused"] is False


def test_a_changed_image_file_is_re_encoded(tmp_path):
    labels = csv_set(tmp_path, [f"{i}.jpg,a" for i in range(10)])
    ws = Workspace(tmp_path / "w")
    run(labels, ws.root, path=str(labels))
    make_jpeg(tmp_path / "img" / "3.jpg", seed=999)  # same name, other picture
    summary, _ = run(labels, ws.root, path=str(labels), seed=1)
    assert summary["store_reused"] is False
    assert ImageReader(ws.lmdb).get("3.jpg") == encode_image(tmp_path / "img" / "3.jpg", EncodeSettings(256, False, 90))


def test_demo_seed_draws_the_images_so_it_rebuilds(tmp_path):
    ws = Workspace(tmp_path / "cli-w")
    base = ["ingest", "demo", "--images", "20", "--classes", "4", "--workers", "1"]
    assert cli(tmp_path, *base, "--seed", "0").exit_code == 0
    before = store_state(ws)
    other_fraction = cli(tmp_path, *base, "--seed", "0", "--val-fraction", "0.3")
    assert other_fraction.exit_code == 0 and "reused" in other_fraction.output
    assert store_state(ws) == before
    other_seed = cli(tmp_path, *base, "--seed", "1")
    assert other_seed.exit_code == 0 and "reused" not in other_seed.output
    assert store_state(ws)["data.mdb"][0] != before["data.mdb"][0]


# --- unknown labels (?name) --------------------------------------------------------------
def test_unknown_labels_are_stored_as_known_false(tmp_path):
    lines = [f"{i}.jpg,cat" for i in range(8)] + ["8.jpg,cat|?dog", "9.jpg,?cat|?bird"]
    labels = csv_set(tmp_path, lines)
    out = io.StringIO()
    summary, ws = run(labels, tmp_path / "w", console=Console(file=out, width=200))
    info = read_dataset(ws.dataset)
    assert info.class_names == ["bird", "cat", "dog"]
    rows = {i: r for r, i in enumerate(info.ids)}
    assert info.labels[rows["8.jpg"]].tolist() == [0, 1, 0] and info.labels[rows["9.jpg"]].tolist() == [0, 0, 0]
    observed = info.observed()
    assert observed.dtype == np.int8
    assert observed[rows["8.jpg"]].tolist() == [0, 1, -1]
    assert observed[rows["9.jpg"]].tolist() == [-1, -1, 0]
    assert observed[rows["0.jpg"]].tolist() == [0, 1, 0]
    assert int((observed == -1).sum()) == 3 and info.known.shape == (10, 3)
    assert summary["unknown_labels"] == 3 and summary["images_with_unknown"] == 2
    assert "\n3 labels unknown (?name) in 2 images\n" in out.getvalue()


def test_known_round_trip_and_absent_when_all_known(tmp_path):
    splits = {"train": np.array([0]), "val": np.array([1]), "test": np.array([2])}
    known = np.array([[True, False], [True, True], [True, True]])
    info = DatasetInfo(["a", "b", "c"], np.array([[1, 0], [0, 1], [1, 1]], np.uint8), ["x", "y"], splits, known)
    write_dataset(tmp_path / "d.h5", info, source="csv", config={})
    back = read_dataset(tmp_path / "d.h5")
    assert back.known.dtype == bool and back.known.tolist() == known.tolist()
    assert back.observed().tolist() == [[1, -1], [0, 1], [1, 1]]
    for all_known in (None, np.ones((3, 2), bool)):
        info.known = all_known
        write_dataset(tmp_path / "e.h5", info, source="csv", config={})
        with h5py.File(tmp_path / "e.h5") as h5:
            assert "known" not in h5
        back = read_dataset(tmp_path / "e.h5")
        assert back.known is None and back.observed().tolist() == [[1, 0], [0, 1], [1, 1]]


def test_unknown_label_errors(tmp_path):
    labels = tmp_path / "labels.csv"
    (tmp_path / "img").mkdir()
    labels.write_text("a.jpg,cat\nb.jpg,dog|?cow\n")
    with pytest.raises(InputError, match=r"labels.csv: line 2: unknown label '\?cow'$"):
        read_csv_labels(labels, tmp_path / "img", classes=["cat", "dog"])
    assert read_csv_labels(labels, tmp_path / "img", classes=["cat", "dog", "cow"]).records[1].known.tolist() == [
        True, True, False
    ]  # fmt: skip
    labels.write_text("a.jpg,cat\nb.jpg,dog\nc.jpg,cat|dog|?cat\n")
    with pytest.raises(InputError) as err:
        read_csv_labels(labels, tmp_path / "img")
    assert str(err.value) == f"{labels}: line 3: label 'cat' is both positive and unknown (cat and ?cat)"
    labels.write_text("a.jpg,cat|?\n")
    with pytest.raises(InputError) as err:
        read_csv_labels(labels, tmp_path / "img")
    assert str(err.value) == f"{labels}: line 1: '?' without a label name"


def test_unknown_labels_through_the_cli(tmp_path):
    labels = csv_set(tmp_path, [f"{i}.jpg,cat|?dog" if i < 3 else f"{i}.jpg,dog" for i in range(10)])
    result = cli(tmp_path, "ingest", "csv", str(labels), "--images", str(tmp_path / "img"), "--classes", "cat,dog")
    assert result.exit_code == 0, result.output
    assert "3 labels unknown (?name) in 3 images" in result.output
    info = read_dataset(Workspace(tmp_path / "cli-w").dataset)
    assert sorted(info.ids[r] for r in np.flatnonzero((info.observed() == -1).any(axis=1))) == ["0.jpg", "1.jpg", "2.jpg"]
    bad = tmp_path / "bad.csv"
    bad.write_text("0.jpg,cat\n1.jpg,dog|?dog\n")
    result = cli(tmp_path / "b", "ingest", "csv", str(bad), "--images", str(tmp_path / "img"))
    assert result.exit_code == 1
    assert result.stderr == f"error: {bad}: line 2: label 'dog' is both positive and unknown (dog and ?dog)\n"
    help_text = cli(tmp_path, "ingest", "csv", "--help").output
    assert "?name: unknown for this image" in " ".join(help_text.split())
