"""The benchmark readers (COCO, PASCAL VOC, MIRFLICKR-25K, NUS-WIDE) on tiny fixtures in
their official layouts, the CLI commands, and the coco128 real-data check.

The ``make_*`` builders are shared with tests/test_ingest_bad_input.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from retdmctl.cli import app
from retdmctl.config import Config, IngestConfig
from retdmctl.data.dataset import read_dataset
from retdmctl.data.ingest import run_ingest
from retdmctl.data.readers.coco import read_coco
from retdmctl.data.readers.mirflickr import read_mirflickr
from retdmctl.data.readers.nuswide import read_nuswide
from retdmctl.data.readers.voc import CLASSES as VOC_CLASSES
from retdmctl.data.readers.voc import read_voc
from retdmctl.data.store import ImageReader
from retdmctl.errors import InputError
from retdmctl.workspace import Workspace
from stages.ingest import STAGE, read_source
from tests.conftest import shared

QUIET = Console(file=io.StringIO())
RUNNER = CliRunner()
# Fractions that leave each of train, val and test at least one image of these 3-6 image
# fixtures (an empty split is an error); the tests below that check fractions set their own.
FEW = {"test_fraction": 0.34, "val_fraction": 0.5}


# --- builders -------------------------------------------------------------------
def make_jpeg(path: Path, size=(48, 36), seed: int = 0, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    """A small noisy image (distinct bytes per seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


# COCO: category ids with gaps, listed out of order; names as in COCO.
COCO_CATEGORIES = [
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 17, "name": "cat"},
]  # sorted by id: person, car, cat, dog


def coco_json(images: list[tuple[int, str]], annotations: list[tuple[int, int]], categories=None) -> dict:
    return {
        "info": {"description": "fixture", "year": 2017},
        "licenses": [],
        "images": [
            {"id": i, "file_name": name, "height": 36, "width": 48, "license": 1, "coco_url": ""}
            for i, name in images
        ],
        "annotations": [
            {"id": 1000 + k, "image_id": img, "category_id": cat, "iscrowd": 0, "area": 10.0, "bbox": [0, 0, 4, 4]}
            for k, (img, cat) in enumerate(annotations)
        ],
        "categories": COCO_CATEGORIES if categories is None else categories,
    }


def make_coco(root: Path) -> Path:
    """coco/annotations/instances_{train,val}2017.json + coco/{train,val}2017/*.jpg.
    train: 3 labelled images and one without annotations; val: 2 labelled."""
    train = [(9, "000000000009.jpg"), (25, "000000000025.jpg"), (30, "000000000030.jpg"), (34, "000000000034.jpg")]
    val = [(139, "000000000139.jpg"), (285, "000000000285.jpg")]
    for k, (_, name) in enumerate(train):
        make_jpeg(root / "train2017" / name, seed=k)
    for k, (_, name) in enumerate(val):
        make_jpeg(root / "val2017" / name, seed=10 + k)
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    # image 9: person x2 + dog; 25: car; 30: cat + car (crowd counts too); 34: none
    (ann / "instances_train2017.json").write_text(
        json.dumps(coco_json(train, [(9, 1), (9, 1), (9, 18), (25, 3), (30, 17), (30, 3)]))
    )
    (ann / "instances_val2017.json").write_text(json.dumps(coco_json(val, [(139, 18), (285, 1), (285, 17)])))
    return root


def voc_xml(objects: list[tuple[str, int]], filename: str = "x.jpg") -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
        f"</bndbox></object>"
        for name, difficult in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
        f"<size><width>48</width><height>36</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>"
    )


VOC_2007 = {
    # id: (set, objects as (name, difficult))
    "000005": ("trainval", [("chair", 0), ("chair", 1), ("diningtable", 0)]),
    "000007": ("trainval", [("car", 0)]),
    "000009": ("trainval", [("horse", 0), ("person", 1)]),
    "000012": ("trainval", [("bottle", 1)]),  # only a difficult object
    "000001": ("test", [("dog", 0), ("person", 0)]),
    "000002": ("test", [("train", 0)]),
}


def make_voc(root: Path, images: dict = VOC_2007, year: str = "2007") -> Path:
    """VOCdevkit/VOC<year>/{Annotations,ImageSets/Main,JPEGImages}."""
    base = root / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {"trainval": [], "test": []}
    for k, (image_id, (set_name, objects)) in enumerate(images.items()):
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects, f"{image_id}.jpg"))
        make_jpeg(base / "JPEGImages" / f"{image_id}.jpg", seed=100 + k)
        sets[set_name].append(image_id)
    for set_name, ids in sets.items():
        if ids:
            (base / "ImageSets" / "Main" / f"{set_name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


MIR_LABELS = {"sky": [1, 2, 5], "people": [2, 3, 6, 7], "water": [5, 8, 9, 10]}  # image 4 has none


def make_mirflickr(root: Path, n: int = 10) -> Path:
    """<root>/mirflickr/im1.jpg..im<n>.jpg + mirflickr25k_annotations_v080/ with the
    label files, their *_r1 variants and the README."""
    for i in range(1, n + 1):
        make_jpeg(root / "mirflickr" / f"im{i}.jpg", seed=200 + i)
    ann = root / "mirflickr25k_annotations_v080"
    ann.mkdir(parents=True, exist_ok=True)
    for label, nums in MIR_LABELS.items():
        (ann / f"{label}.txt").write_text("".join(f"{x}\n" for x in nums))
        (ann / f"{label}_r1.txt").write_text(f"{nums[0]}\n")
    (ann / "README.txt").write_text("MIRFLICKR-25K annotations v080\n1 2 3\n")
    return root


NUS_CONCEPTS = ["animal", "sky", "water"]
NUS_TRAIN = [("animal\\0001_100.jpg", "100"), ("animal\\0002_101.jpg", "000"), ("sky\\0001_102.jpg", "010"),
             ("water\\0001_103.jpg", "011")]  # fmt: skip
NUS_TEST = [("sky\\0002_200.jpg", "110"), ("water\\0002_201.jpg", "001"), ("water\\0003_202.jpg", "001")]


def make_nuswide(root: Path, missing: tuple[str, ...] = ("water\\0003_202.jpg",), crlf: bool = True) -> Path:
    """ImageList/{Train,Test}Imagelist.txt (backslashes, CRLF), Concepts81.txt,
    Groundtruth/TrainTestLabels/Labels_<c>_{Train,Test}.txt and Flickr/<concept>/<file>."""
    eol = "\r\n" if crlf else "\n"
    (root / "ImageList").mkdir(parents=True, exist_ok=True)
    labels = root / "Groundtruth" / "TrainTestLabels"
    labels.mkdir(parents=True, exist_ok=True)
    (root / "Concepts81.txt").write_text(eol.join(NUS_CONCEPTS) + eol)
    for suffix, rows in (("Train", NUS_TRAIN), ("Test", NUS_TEST)):
        (root / "ImageList" / f"{suffix}Imagelist.txt").write_text("".join(name + eol for name, _ in rows))
        for col, concept in enumerate(NUS_CONCEPTS):
            (labels / f"Labels_{concept}_{suffix}.txt").write_text("".join(bits[col] + eol for _, bits in rows))
        for k, (name, _) in enumerate(rows):
            if name not in missing:
                make_jpeg(root / "Flickr" / name.replace("\\", "/"), seed=300 + k)
    return root


def ingest(src, tmp_path: Path, **cfg) -> tuple[dict, Workspace]:
    ws = Workspace(tmp_path / "w")
    summary = run_ingest(src, ws, IngestConfig(workers=1, **{**FEW, **cfg}), QUIET)
    return summary, ws


def stored(ws: Workspace) -> dict[str, bytes]:
    reader = ImageReader(ws.lmdb)
    try:
        return {k: reader.get(k) for k in read_dataset(ws.dataset).ids}
    finally:
        reader.close()


def labels_of(info) -> dict[str, list[str]]:
    return {i: [info.class_names[c] for c in np.flatnonzero(row)] for i, row in zip(info.ids, info.labels, strict=True)}


def split_of(info) -> dict[str, str]:
    return {info.ids[i]: name for name, idx in info.splits.items() for i in idx}


def cli(tmp_path: Path, *args: str):
    return RUNNER.invoke(app, ["--workdir", str(tmp_path / "cli-w"), *args])


# --- COCO -----------------------------------------------------------------------
def test_coco_classes_labels_and_splits(tmp_path):
    root = make_coco(tmp_path / "coco")
    ann = root / "annotations"
    src = read_coco([ann / "instances_train2017.json", ann / "instances_val2017.json"], [])
    assert src.class_names == ["person", "car", "cat", "dog"]  # sorted by category id
    assert src.dropped == [("train2017/000000000034.jpg", "without labels")]
    assert src.skipped == []
    summary, ws = ingest(src, tmp_path)
    info = read_dataset(ws.dataset)
    assert labels_of(info) == {
        "train2017/000000000009.jpg": ["person", "dog"],
        "train2017/000000000025.jpg": ["car"],
        "train2017/000000000030.jpg": ["car", "cat"],
        "val2017/000000000139.jpg": ["dog"],
        "val2017/000000000285.jpg": ["person", "cat"],
    }
    splits = split_of(info)
    assert {k for k, s in splits.items() if s == "test"} == {"val2017/000000000139.jpg", "val2017/000000000285.jpg"}
    assert all(s in ("train", "val") for k, s in splits.items() if k.startswith("train2017/"))
    assert summary["dropped"] == 1 and summary["dropped_reasons"] == {"without labels": 1}
    assert summary["positive_labels"] == 8 and summary["classes_present"] == 4
    data = stored(ws)
    assert Image.open(io.BytesIO(data["val2017/000000000139.jpg"])).size == (48, 36)  # never upscaled


def test_coco_keep_empty_and_explicit_split(tmp_path):
    root = make_coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_train2017.json"
    src = read_coco([ann], [root / "train2017"], ["test"], keep_empty=True)
    assert src.dropped == []
    assert [r.key for r in src.records][-1] == "train2017/000000000034.jpg"
    assert src.records[-1].labels.tolist() == [0, 0, 0, 0]
    assert {r.split for r in src.records} == {"test"}
    with pytest.raises(InputError, match=r"^coco: give one --split per annotation file \(1\), got 2$"):
        read_coco([ann], [], ["train", "test"])


def test_coco_cli_infers_folders_and_fingerprints_every_file(tmp_path):
    root = make_coco(tmp_path / "coco")
    train, val = root / "annotations" / "instances_train2017.json", root / "annotations" / "instances_val2017.json"
    result = cli(tmp_path, "ingest", "coco", str(train), str(val), "--workers", "1", "--val-fraction", "0.5")
    assert result.exit_code == 0, result.output
    assert "stored 5 images" in result.output and "dropped 1 images (without labels: 1)" in result.output
    ws = Workspace(tmp_path / "cli-w")
    cfg = ws.load_config()
    assert cfg.ingest.path == f"{train.resolve()}|{val.resolve()}"
    assert cfg.ingest.images == f"{(root / 'train2017').resolve()}|{(root / 'val2017').resolve()}"
    assert STAGE.sources(ws, cfg) == [train.resolve(), val.resolve(), (root / "train2017").resolve(),
                                      (root / "val2017").resolve()]  # fmt: skip
    assert len(read_source(cfg).records) == 5
    again = cli(tmp_path, "ingest", "coco", str(train), str(val), "--workers", "1", "--val-fraction", "0.5")
    assert again.exit_code == 0 and "ingest: up to date, skipped" in again.output


def test_coco_cli_errors_are_one_line(tmp_path):
    root = make_coco(tmp_path / "coco")
    odd = root / "annotations" / "mine.json"
    odd.write_text((root / "annotations" / "instances_val2017.json").read_text())
    result = cli(tmp_path, "ingest", "coco", str(odd), "--images", str(root / "val2017"))
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {odd.resolve()}: cannot tell its split from the name (train* or val*); "
        "give --split train or --split test\n"
    )
    assert "Traceback" not in result.output
    # --split test is taken: every image is then a test image, which leaves nothing to train on
    only_test = cli(tmp_path, "ingest", "coco", str(odd), "--images", str(root / "val2017"), "--split", "test")
    assert only_test.exit_code == 1
    assert only_test.stderr == (
        "error: the train split is empty (every image is in the source's test split): add training images\n"
    )
    moved = tmp_path / "elsewhere" / "instances_train2017.json"
    moved.parent.mkdir()
    moved.write_text("{}")
    result = cli(tmp_path, "ingest", "coco", str(moved))
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {moved}: image folder {tmp_path / 'train2017'} not found; give it with --images\n"
    )


# --- VOC ------------------------------------------------------------------------
def test_voc_standard_classes_sets_and_difficult_positive(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    src = read_voc(root)
    assert src.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird") and VOC_CLASSES[-1] == "tvmonitor"
    summary, ws = ingest(src, tmp_path)
    info = read_dataset(ws.dataset)
    assert labels_of(info) == {
        "VOC2007/000005": ["chair", "diningtable"],
        "VOC2007/000007": ["car"],
        "VOC2007/000009": ["horse", "person"],
        "VOC2007/000012": ["bottle"],
        "VOC2007/000001": ["dog", "person"],
        "VOC2007/000002": ["train"],
    }
    splits = split_of(info)
    assert sorted(k for k, s in splits.items() if s == "test") == ["VOC2007/000001", "VOC2007/000002"]
    assert summary["dropped"] == 0


def test_voc_difficult_ignore_and_years(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    make_voc(root, {"2008_000008": ("trainval", [("horse", 0)])}, year="2012")
    src = read_voc(root, difficult="ignore")
    labels = {r.key: [VOC_CLASSES[c] for c in np.flatnonzero(r.labels)] for r in src.records}
    assert labels["VOC2007/000009"] == ["horse"]  # the difficult person does not count
    assert "VOC2007/000012" not in labels  # only a difficult bottle: no label left
    assert src.dropped == [("VOC2007/000012", "without labels")]
    assert labels["VOC2012/2008_000008"] == ["horse"]
    assert {r.split for r in src.records if r.key.startswith("VOC2012")} == {"train"}
    kept = read_voc(root, difficult="ignore", keep_empty=True)
    assert [r.labels.sum() for r in kept.records if r.key == "VOC2007/000012"] == [0]
    only_2012 = read_voc(root, ["2012"])
    assert [r.key for r in only_2012.records] == ["VOC2012/2008_000008"]
    assert [r.key for r in read_voc(root / "VOC2012").records] == ["VOC2012/2008_000008"]
    with pytest.raises(InputError, match=r"VOCdevkit: no VOC2010 folder \(found: VOC2007, VOC2012\)$"):
        read_voc(root, ["2010"])


def test_voc_cli(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    result = cli(tmp_path, "ingest", "voc", str(root), "--difficult", "ignore", "--year", "2007", "--workers", "1",
                 "--val-fraction", "0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stored 5 images" in result.output
    cfg = Workspace(tmp_path / "cli-w").load_config()
    assert (cfg.ingest.source, cfg.ingest.voc_difficult, cfg.ingest.voc_years) == ("voc", "ignore", "2007")


# --- MIRFLICKR-25K ------------------------------------------------------------------
def test_mirflickr_labels_ignore_r1_and_readme(tmp_path):
    root = make_mirflickr(tmp_path / "mirflickr25k")
    src = read_mirflickr(root)
    assert src.class_names == ["people", "sky", "water"]
    by_key = {r.key: r.labels.tolist() for r in src.records}
    assert by_key["mirflickr/im2.jpg"] == [1, 1, 0]
    assert by_key["mirflickr/im5.jpg"] == [0, 1, 1]
    assert sorted(by_key, key=lambda k: int(k[len("mirflickr/im") : -4])) == [
        f"mirflickr/im{i}.jpg" for i in (1, 2, 3, 5, 6, 7, 8, 9, 10)
    ]
    assert src.dropped == [("mirflickr/im4.jpg", "without labels")]
    assert all(r.split is None for r in src.records)


def test_mirflickr_seeded_80_20_split(tmp_path):
    root = make_mirflickr(tmp_path / "mirflickr25k", n=10)
    cfg = {"test_fraction": 0.2, "val_fraction": 0.2}
    summary, ws = ingest(read_mirflickr(root), tmp_path / "a", seed=3, **cfg)
    assert summary["splits"] == {"train": 6, "val": 1, "test": 2}  # 9 labelled images, 20% test
    info = read_dataset(ws.dataset)
    perm = np.random.default_rng(3).permutation(9)
    assert np.array_equal(info.splits["test"], np.sort(perm[7:]))
    _, again = ingest(read_mirflickr(root), tmp_path / "b", seed=3, **cfg)
    assert np.array_equal(read_dataset(again.dataset).splits["test"], info.splits["test"])
    _, other = ingest(read_mirflickr(root), tmp_path / "c", seed=4, **cfg)
    assert not np.array_equal(read_dataset(other.dataset).splits["test"], info.splits["test"])


def test_mirflickr_cli(tmp_path):
    root = make_mirflickr(tmp_path / "mirflickr25k")
    result = cli(tmp_path, "ingest", "mirflickr", str(root), "--workers", "1", "--keep-empty")
    assert result.exit_code == 0, result.output
    assert "stored 10 images (train 7, val 1, test 2); 3 classes (3 occur)" in result.output


# --- NUS-WIDE ---------------------------------------------------------------------
def test_nuswide_official_split_backslashes_and_missing_images(tmp_path):
    root = make_nuswide(tmp_path / "NUS-WIDE")
    src = read_nuswide(root)
    assert src.class_names == NUS_CONCEPTS
    assert src.dropped == [("animal/0002_101.jpg", "without labels"), ("water/0003_202.jpg", "missing on disk")]
    summary, ws = ingest(src, tmp_path, strict=True)  # missing images are never fatal
    info = read_dataset(ws.dataset)
    assert labels_of(info) == {
        "animal/0001_100.jpg": ["animal"],
        "sky/0001_102.jpg": ["sky"],
        "water/0001_103.jpg": ["sky", "water"],
        "sky/0002_200.jpg": ["animal", "sky"],
        "water/0002_201.jpg": ["water"],
    }
    assert sorted(k for k, s in split_of(info).items() if s == "test") == ["sky/0002_200.jpg", "water/0002_201.jpg"]
    assert summary["dropped_reasons"] == {"without labels": 1, "missing on disk": 1}
    assert summary["skipped"] == 0


def test_nuswide_damaged_label_file_is_an_error(tmp_path):
    root = make_nuswide(tmp_path / "NUS-WIDE", crlf=False)
    bad = root / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Test.txt"
    bad.write_text("1\n0\n")
    with pytest.raises(InputError, match=r"Labels_sky_Test.txt: 2 labels, expected 3 \(one per line of TestImagelist.txt\)$"):
        read_nuswide(root)
    bad.write_text("1\n0\n2\n")
    with pytest.raises(InputError, match=r"Labels_sky_Test.txt: label 3 must be 0 or 1, got '2'$"):
        read_nuswide(root)


def test_nuswide_cli_reports_missing(tmp_path):
    root = make_nuswide(tmp_path / "NUS-WIDE")
    result = cli(tmp_path, "ingest", "nuswide", str(root), "--workers", "1", "--strict", "--val-fraction", "0.5")
    assert result.exit_code == 0, result.output
    assert "dropped 2 images (without labels: 1, missing on disk: 1)" in result.output
    cfg = Workspace(tmp_path / "cli-w").load_config()
    assert STAGE.sources(Workspace(tmp_path / "cli-w"), cfg) == [root.resolve()]


# --- the existing formats still work through the CLI -----------------------------------
def test_scene_csv_and_demo_commands_still_work(tmp_path):
    scene = tmp_path / "scene"
    for i in range(1, 11):
        make_jpeg(scene / "images" / f"{i}.jpg", seed=i)
    (scene / "labels.csv").write_text(
        "Filenames,desert,sea\n" + "".join(f"{i}.jpg,{i % 2},{1 - i % 2}\n" for i in range(1, 11))
    )
    result = cli(tmp_path / "s", "ingest", "scene", str(scene), "--workers", "1")
    assert result.exit_code == 0 and "stored 10 images (train 7, val 1, test 2)" in result.output
    (tmp_path / "l.csv").write_text("".join(f"{i}.jpg,a|b\n" for i in range(1, 11)))
    result = cli(tmp_path / "c", "ingest", "csv", str(tmp_path / "l.csv"), "--images", str(scene / "images"))
    assert result.exit_code == 0 and "stored 10 images" in result.output
    result = cli(tmp_path / "d", "ingest", "demo", "--images", "20", "--classes", "4")
    assert result.exit_code == 0 and "stored 20 images" in result.output


def test_config_lists_round_trip():
    cfg = Config()
    cfg.ingest.source, cfg.ingest.path, cfg.ingest.coco_splits = "coco", "/a/x.json|/a/y.json", "train|test"
    cfg.ingest.images = "/a/train2017"
    assert [str(p) for p in STAGE.sources(None, cfg)] == ["/a/x.json", "/a/y.json", "/a/train2017"]
    cfg.ingest.source, cfg.ingest.path, cfg.ingest.images = "csv", "/a/odd|name.csv", "/a/img"
    assert [str(p) for p in STAGE.sources(None, cfg)] == ["/a/odd|name.csv", "/a/img"]


# --- real data -----------------------------------------------------------------------
@pytest.mark.data
def test_coco128_real_sample(tmp_path):
    root = shared("coco128")
    result = cli(
        tmp_path,
        "ingest", "coco", str(root / "annotations" / "instances_train2017.json"),
        "--images", str(root / "train2017"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = Workspace(tmp_path / "cli-w").read_manifest("ingest")["summary"]
    assert summary["images"] == 126
    assert summary["dropped_reasons"] == {"without labels": 2}
    assert (summary["classes"], summary["classes_present"], summary["positive_labels"]) == (80, 71, 362)
    assert summary["skipped"] == 0
    info = read_dataset(Workspace(tmp_path / "cli-w").dataset)
    assert info.class_names[:3] == ["person", "bicycle", "car"] and info.class_names[-1] == "toothbrush"
    # train2017 only: the test split is carved from it, 20% with seed 0, as for scene
    assert summary["splits"] == {"train": 91, "val": 10, "test": 25}
    perm = np.random.default_rng(0).permutation(126)
    assert np.array_equal(info.splits["test"], np.sort(perm[101:]))
    assert summary["split_note"] == "no test split in the source: carved 20% of it (seed 0) as test"
    assert "no test split in the source: carved 20% of it (seed 0) as test\n" in result.output
    assert all(min(Image.open(io.BytesIO(b)).size) <= 256 for b in stored(Workspace(tmp_path / "cli-w")).values())


def test_new_commands_have_examples_and_validate_paths(tmp_path):
    for fmt in ("coco", "voc", "mirflickr", "nuswide"):
        result = RUNNER.invoke(app, ["ingest", fmt, "--help"])
        assert result.exit_code == 0 and f"Example: retdmctl ingest {fmt} " in result.output, fmt
        missing = cli(tmp_path, "ingest", fmt, str(tmp_path / "nope"))
        assert missing.exit_code == 2 and missing.output.count("\n") == 1, fmt  # a usage error
        assert missing.output.startswith("error: Invalid value for ") and "nope' does not exist." in missing.output
