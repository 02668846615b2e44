"""MIRFLICKR-25K: ``mirflickr/im1.jpg`` ... ``im25000.jpg`` and the annotation folder
``mirflickr25k_annotations_v080/`` with one ``<label>.txt`` per label (24), each listing
the 1-based numbers of the images that carry it, one per line.

``<label>_r1.txt`` are the "relevant" subsets of the same labels (the label is salient),
not extra classes, and ``README.txt`` is documentation: both are ignored. The classes are
the label files' names, sorted. The images are those on disk plus any number a label file
names (one missing on disk is reported as a missing file). There is no official split: the
pipeline makes the paper's seeded 80/20 random one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import require_dir, safe_join
from retdmctl.errors import InputError

IMAGES = "mirflickr"
ANNOTATIONS = "mirflickr25k_annotations_v080"
_IMAGE = re.compile(r"im([1-9]\d*)\.jpg$")


def label_files(annotations: Path) -> list[Path]:
    files = [
        p
        for p in sorted(annotations.glob("*.txt"))
        if p.stem.lower() != "readme" and not p.stem.endswith("_r1") and p.is_file()
    ]
    if not files:
        raise InputError(f"{annotations}: no label files (<label>.txt) found")
    return files


def read_mirflickr(root: Path, images: Path | None = None, *, keep_empty: bool = False) -> SourceData:
    require_dir(root, "MIRFLICKR folder")
    annotations = require_dir(root / ANNOTATIONS, "MIRFLICKR annotation folder")
    images = require_dir(images or root / IMAGES, "MIRFLICKR image folder")
    files = label_files(annotations)
    class_names = [p.stem for p in files]

    skipped: list[tuple[str, str]] = []
    positives: list[set[int]] = []
    for path in files:
        numbers: set[int] = set()
        for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            token = line.strip()
            if not token:
                continue
            if not (token.isascii() and token.isdigit()) or int(token) < 1:
                skipped.append((f"{path}: line {line_no}", f"not an image number ({token[:40]!r})"))
                continue
            numbers.add(int(token))
        positives.append(numbers)

    with os.scandir(images) as entries:
        on_disk = {int(m.group(1)) for e in entries if (m := _IMAGE.match(e.name))}
    numbers = sorted(on_disk.union(*positives))
    row = {n: i for i, n in enumerate(numbers)}
    labels = np.zeros((len(numbers), len(class_names)), dtype=np.uint8)
    for col, nums in enumerate(positives):
        labels[[row[n] for n in nums], col] = 1

    records: list[Record] = []
    dropped: list[tuple[str, str]] = []
    for i, n in enumerate(numbers):
        key = f"{IMAGES}/im{n}.jpg"
        if not keep_empty and not labels[i].any():
            dropped.append((key, "without labels"))
            continue
        path = safe_join(images, f"im{n}.jpg")
        if path is None:  # a symlink pointing out of the image folder
            skipped.append((key, "path escapes the image folder"))
            continue
        records.append(Record(key=key, labels=labels[i], source=path))
    return SourceData(
        name="mirflickr", class_names=class_names, records=records, skipped=skipped, dropped=dropped
    )
