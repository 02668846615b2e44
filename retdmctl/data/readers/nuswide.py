"""NUS-WIDE, official layout::

    <root>/ImageList/TrainImagelist.txt     actor\\0001_2124494179.jpg (one image a line)
    <root>/ImageList/TestImagelist.txt
    <root>/Concepts81.txt                   the 81 concepts, one a line
    <root>/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt   one 0/1 a line, in
    <root>/Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt    image-list order
    <images>/<concept>/<file>.jpg           the images (default: <root>/Flickr)

The image lists use Windows backslashes. Train and test are the official split. Images
without any of the 81 concepts are dropped (unless ``keep_empty``), and so are listed
images missing on disk: many NUS-WIDE URLs are dead, so a copy always lacks some; they
are counted and reported, never an error (not even with ``--strict``). A damaged label
file (wrong length, a value other than 0/1) is an error: its lines could no longer be
matched to images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import image_key, require_dir, require_file, safe_join
from retdmctl.errors import InputError

IMAGES = "Flickr"
_SPLITS = (("Train", "train"), ("Test", "test"))


def read_concepts(path: Path) -> list[str]:
    require_file(path, "concept list")
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"{path}: no concepts found")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{path}: concept {dup!r} is listed twice")
    return names


def _label_column(path: Path, expected: int, image_list: Path) -> np.ndarray:
    require_file(path, "label file")
    values = np.array(path.read_bytes().split())
    if len(values) != expected:
        raise InputError(f"{path}: {len(values)} labels, expected {expected} (one per line of {image_list.name})")
    ones = values == b"1"
    bad = ~(ones | (values == b"0"))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{path}: label {i + 1} must be 0 or 1, got {values[i].decode(errors='replace')!r}")
    return ones.astype(np.uint8)


def read_nuswide(root: Path, images: Path | None = None, *, keep_empty: bool = False) -> SourceData:
    require_dir(root, "NUS-WIDE folder")
    images = require_dir(images or root / IMAGES, "NUS-WIDE image folder")
    concepts = read_concepts(root / "Concepts81.txt")
    label_dir = require_dir(root / "Groundtruth" / "TrainTestLabels", "NUS-WIDE label folder")

    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    for suffix, split in _SPLITS:
        image_list = require_file(root / "ImageList" / f"{suffix}Imagelist.txt", "NUS-WIDE image list")
        names = [
            line.strip().replace("\\", "/")
            for line in image_list.read_text(encoding="utf-8", errors="replace").splitlines()
        ]
        names = [n for n in names if n]
        labels = np.zeros((len(names), len(concepts)), dtype=np.uint8)
        for col, concept in enumerate(concepts):
            path = safe_join(label_dir, f"Labels_{concept}_{suffix}.txt")
            if path is None:
                raise InputError(f"{root / 'Concepts81.txt'}: concept {concept!r} is not a valid file name")
            labels[:, col] = _label_column(path, len(names), image_list)
        has_label = labels.any(axis=1)
        for i, rel in enumerate(names):
            if not keep_empty and not has_label[i]:
                dropped.append((rel, "without labels"))
                continue
            path = safe_join(images, rel)
            if path is None:
                skipped.append((f"{image_list}: {rel}", "path escapes the image folder"))
                continue
            if not os.path.isfile(path):
                dropped.append((rel, "missing on disk"))
                continue
            records.append(Record(key=image_key(rel), labels=labels[i], source=path, split=split))
    return SourceData(name="nuswide", class_names=concepts, records=records, skipped=skipped, dropped=dropped)
