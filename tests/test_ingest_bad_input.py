"""Bad input, one test per case: it is skipped with a count and its name in the summary
(``--strict`` makes it an error), and the good images are always kept."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retdmctl.config import IngestConfig
from retdmctl.data.dataset import read_dataset
from retdmctl.data.ingest import run_ingest
from retdmctl.data.readers.coco import read_coco
from retdmctl.data.readers.nuswide import read_nuswide
from retdmctl.data.readers.voc import read_voc
from retdmctl.errors import InputError
from retdmctl.workspace import Workspace
from tests.test_ingest_formats import (
    FEW,
    QUIET,
    cli,
    coco_json,
    ingest,
    make_jpeg,
    make_nuswide,
    make_voc,
    stored,
)

GOOD = ["good1.jpg", "good2.jpg", "good3.jpg"]  # three: train, val and test must not be empty


def coco_case(tmp_path: Path, bad_name: str = "bad.jpg", write_bad=None, extra_images=(), extra_annotations=()):
    """A COCO train2017 set with three good images (person, car, cat) and one ``bad_name``
    (person) written by ``write_bad(path)`` (not written at all when None)."""
    root = tmp_path / "coco"
    for k, name in enumerate(GOOD):
        make_jpeg(root / "train2017" / name, seed=k)
    if write_bad is not None:
        (root / "train2017").mkdir(parents=True, exist_ok=True)
        write_bad(root / "train2017" / bad_name)
    images = [(1, GOOD[0]), (2, GOOD[1]), (6, GOOD[2]), (3, bad_name), *extra_images]
    annotations = [(1, 1), (2, 3), (3, 1), *extra_annotations, (6, 17)]  # ids 1000, 1001, ...: keep the first ones
    ann = root / "annotations" / "instances_train2017.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(coco_json(images, annotations)))
    return ann, root / "train2017"


def assert_skipped(tmp_path: Path, src_factory, item: str, reason: str) -> dict:
    """The good images are stored, exactly one item is skipped and named in the summary,
    and --strict turns it into ``<item>: <reason> (--strict)``."""
    summary, ws = ingest(src_factory(), tmp_path / "lenient")
    assert sorted(read_dataset(ws.dataset).ids) == [f"train2017/{n}" for n in GOOD]
    assert summary["skipped"] == 1
    assert summary["skipped_first"] == [f"{item}: {reason}"]
    assert summary["skipped_reasons"] == {reason.split(" (")[0]: 1}
    for data in stored(ws).values():
        assert Image.open(io.BytesIO(data)).mode == "RGB"
    with pytest.raises(InputError, match="^" + re.escape(f"{item}: {reason} (--strict)") + "$"):
        ingest(src_factory(), tmp_path / "strict", strict=True)
    return summary


def read(ann: Path, images: Path):
    return lambda: read_coco([ann], [images])


# --- images -------------------------------------------------------------------------
def test_corrupt_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    ann, images = coco_case(
        tmp_path, write_bad=lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 4000, np.uint8).tobytes())
    )
    summary, _ = ingest(read(ann, images)(), tmp_path / "probe")
    reason = summary["skipped_first"][0].split(": ", 1)[1]
    assert reason.startswith("unreadable image (")
    assert_skipped(tmp_path, read(ann, images), str(images / "bad.jpg"), reason)


def test_jpeg_with_a_broken_frame_header(tmp_path):
    def write(path):
        make_jpeg(path, size=(64, 48), seed=9)
        data = bytearray(path.read_bytes())
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = b"\x00\x00\x00\x00"  # height = width = 0
        path.write_bytes(bytes(data))

    ann, images = coco_case(tmp_path, write_bad=write)
    assert_skipped(tmp_path, read(ann, images), str(images / "bad.jpg"), "unreadable image (not an image format PIL knows)")


def test_truncated_jpeg(tmp_path):
    def write(path):
        make_jpeg(path, size=(300, 200), seed=5)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    ann, images = coco_case(tmp_path, write_bad=write)
    summary, _ = ingest(read(ann, images)(), tmp_path / "probe")
    assert re.fullmatch(r".*bad\.jpg: unreadable image \(image file is truncated.*\)", summary["skipped_first"][0])
    reason = summary["skipped_first"][0].split(": ", 1)[1]
    assert_skipped(tmp_path, read(ann, images), str(images / "bad.jpg"), reason)


def test_zero_byte_file(tmp_path):
    ann, images = coco_case(tmp_path, write_bad=lambda p: p.write_bytes(b""))
    assert_skipped(tmp_path, read(ann, images), str(images / "bad.jpg"), "unreadable image (empty file)")
    # and through the CLI: one line, exit 1, no traceback
    result = cli(tmp_path, "ingest", "coco", str(ann), "--images", str(images), "--strict", "--workers", "1",
                 "--val-fraction", "0.5")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == f"error: {images.resolve() / 'bad.jpg'}: unreadable image (empty file) (--strict)\n"


def test_missing_file(tmp_path):
    ann, images = coco_case(tmp_path, write_bad=None)
    assert_skipped(tmp_path, read(ann, images), str(images / "bad.jpg"), "missing file")


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG")]
)
def test_grayscale_cmyk_and_png_named_jpg_are_converted_to_rgb(tmp_path, mode, fmt):
    ann, images = coco_case(tmp_path, write_bad=lambda p: make_jpeg(p, size=(400, 300), seed=3, mode=mode, fmt=fmt))
    summary, ws = ingest(read(ann, images)(), tmp_path)
    assert summary["skipped"] == 0 and summary["images"] == 4
    img = Image.open(io.BytesIO(stored(ws)["train2017/bad.jpg"]))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (341, 256))


def test_original_bytes_kept_with_keep_original(tmp_path):
    ann, images = coco_case(tmp_path, write_bad=lambda p: make_jpeg(p, size=(400, 300), seed=3, fmt="PNG"))
    summary, ws = ingest(read(ann, images)(), tmp_path, keep_original=True)
    assert summary["images"] == 4
    data = stored(ws)
    assert data["train2017/bad.jpg"] == (images / "bad.jpg").read_bytes()  # PNG bytes, as on disk
    assert data["train2017/good1.jpg"] == (images / "good1.jpg").read_bytes()


# --- annotation files -----------------------------------------------------------------
def test_malformed_json_loses_only_its_own_images(tmp_path):
    ann, images = coco_case(tmp_path, write_bad=lambda p: make_jpeg(p))
    broken = ann.with_name("instances_val2017.json")
    broken.write_text('{"images": [{"id": 1, "file_name": "x.jpg"},')
    (images.parent / "val2017").mkdir()
    src = read_coco([ann, broken], [])
    assert src.skipped == [(str(broken), "malformed json (Expecting value: line 1 column 45 (char 44))")]
    summary, ws = ingest(src, tmp_path)
    assert read_dataset(ws.dataset).ids == [f"train2017/{n}" for n in [*GOOD, "bad.jpg"]]
    assert summary["images"] == 4 and summary["skipped"] == 1
    assert summary["skipped_first"] == [f"{broken}: malformed json (Expecting value: line 1 column 45 (char 44))"]
    with pytest.raises(InputError, match=re.escape(f"{broken}: malformed json (Expecting value") + r".*\(--strict\)$"):
        run_ingest(read_coco([ann, broken], []), Workspace(tmp_path / "s"), IngestConfig(strict=True, **FEW), QUIET)
    # alone, it is an error: there is nothing to ingest
    with pytest.raises(InputError, match=r"^" + re.escape(f"{broken}: malformed json (Expecting value")):
        read_coco([broken], [images])
    broken.write_text('{"images": []}')
    with pytest.raises(InputError, match=r"^" + re.escape(f"{broken}: malformed json (no 'annotations' list)") + "$"):
        read_coco([broken], [images])


def test_malformed_xml_skips_only_that_image(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    xml = root / "VOC2007" / "Annotations" / "000007.xml"
    xml.write_text("<annotation><object><name>car</name></object>")  # never closed
    src = read_voc(root)
    assert len(src.skipped) == 1 and src.skipped[0][0] == str(xml)
    assert re.fullmatch(r"malformed XML \(no element found: line 1, column \d+\)", src.skipped[0][1])
    summary, ws = ingest(src, tmp_path)
    assert summary["images"] == 5 and "VOC2007/000007" not in read_dataset(ws.dataset).ids
    assert summary["skipped_reasons"] == {"malformed XML": 1}
    with pytest.raises(InputError, match=r"000007.xml: malformed XML \(no element found: .*\) \(--strict\)$"):
        ingest(read_voc(root), tmp_path / "strict", strict=True)


def test_unknown_category_id_skips_the_annotation_not_the_image(tmp_path):
    ann, images = coco_case(
        tmp_path,
        write_bad=lambda p: make_jpeg(p),
        extra_images=[(4, "only_unknown.jpg")],
        extra_annotations=[(3, 999), (4, 999)],
    )
    make_jpeg(images / "only_unknown.jpg", seed=7)
    src = read_coco([ann], [images])
    assert src.skipped == [
        ("instances_train2017.json: annotation 1003", "unknown category id 999"),
        ("instances_train2017.json: annotation 1004", "unknown category id 999"),
    ]
    assert src.dropped == [("train2017/only_unknown.jpg", "without labels")]
    summary, ws = ingest(src, tmp_path)
    assert summary["skipped"] == 2 and summary["skipped_reasons"] == {"unknown category id 999": 2}
    assert read_dataset(ws.dataset).labels.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(InputError, match=r"^instances_train2017.json: annotation 1003: unknown category id 999 \(--strict\)$"):
        ingest(read_coco([ann], [images]), tmp_path / "strict", strict=True)


def test_file_names_escaping_the_image_root(tmp_path):
    make_jpeg(tmp_path / "coco" / "secret.jpg", seed=42)  # exists, right next to the image folder
    ann, images = coco_case(tmp_path, bad_name="../secret.jpg", write_bad=None)
    assert_skipped(tmp_path, read(ann, images), "instances_train2017.json: ../secret.jpg", "path escapes the image folder")
    # absolute names, and the other formats' lists
    ann2, _ = coco_case(tmp_path / "abs", bad_name=str(tmp_path / "coco" / "secret.jpg"), write_bad=None)
    assert [why for _, why in read_coco([ann2], []).skipped] == ["path escapes the image folder"]
    voc = make_voc(tmp_path / "VOCdevkit")
    with open(voc / "VOC2007" / "ImageSets" / "Main" / "trainval.txt", "a") as fh:
        fh.write("../../../coco/secret\n")
    assert read_voc(voc).skipped == [
        (f"{voc / 'VOC2007' / 'ImageSets' / 'Main' / 'trainval.txt'}: line 5: ../../../coco/secret",
         "path escapes the VOC folder")
    ]  # fmt: skip
    nus = make_nuswide(tmp_path / "NUS-WIDE")
    for suffix, line in (("Imagelist", "..\\..\\coco\\secret.jpg"),):
        path = nus / "ImageList" / f"Train{suffix}.txt"
        path.write_text(path.read_text() + line + "\r\n")
    for concept in ("animal", "sky", "water"):
        path = nus / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_Train.txt"
        path.write_text(path.read_text() + "1\r\n")
    assert read_nuswide(nus).skipped == [
        (f"{nus / 'ImageList' / 'TrainImagelist.txt'}: ../../coco/secret.jpg", "path escapes the image folder")
    ]


def test_duplicate_ids(tmp_path):
    # the same image id twice in the json: the second entry is skipped
    ann, images = coco_case(tmp_path, write_bad=lambda p: make_jpeg(p), extra_images=[(1, "bad.jpg")])
    src = read_coco([ann], [images])
    assert src.skipped == [("instances_train2017.json: image id 1 (bad.jpg)", "duplicate id")]
    summary, ws = ingest(src, tmp_path / "a")
    assert summary["images"] == 4 and summary["skipped_first"] == [
        "instances_train2017.json: image id 1 (bad.jpg): duplicate id"
    ]
    # two ids naming the same file: the same stable key, stored once
    ann, images = coco_case(tmp_path / "b", write_bad=lambda p: make_jpeg(p), extra_images=[(4, "good1.jpg")],
                            extra_annotations=[(4, 3)])  # fmt: skip
    summary, ws = ingest(read_coco([ann], [images]), tmp_path / "b")
    assert summary["images"] == 4
    assert summary["skipped_first"] == [f"{images / 'good1.jpg'}: duplicate id"]
    assert read_dataset(ws.dataset).labels[0].tolist() == [1, 0, 0, 0]  # the first entry's labels
    with pytest.raises(InputError, match=r"good1.jpg: duplicate id \(--strict\)$"):
        ingest(read_coco([ann], [images]), tmp_path / "strict", strict=True)


def test_summary_names_only_the_first_few(tmp_path):
    ann, images = coco_case(
        tmp_path, write_bad=None, extra_images=[(10 + i, f"gone{i}.jpg") for i in range(8)],
        extra_annotations=[(10 + i, 1) for i in range(8)],
    )  # fmt: skip
    summary, _ = ingest(read_coco([ann], [images]), tmp_path)
    assert summary["skipped"] == 9 and summary["skipped_reasons"] == {"missing file": 9}
    assert summary["skipped_first"] == [f"{images / n}: missing file" for n in ["bad.jpg"] + [f"gone{i}.jpg" for i in range(4)]]
