"""The MIML natural-scene set: ``images/N.jpg`` and ``labels.csv`` with one 0/1 column
per label (``Filenames,desert,mountains,sea,sunset,trees``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import image_key, open_text, require_dir, require_file, safe_join
from retdmctl.errors import InputError


def read_scene(root: Path) -> SourceData:
    require_dir(root, "scene dataset folder")
    labels_csv = require_file(root / "labels.csv", "label file")
    images = require_dir(root / "images", "image folder")
    return read_wide_csv(labels_csv, images, name="scene")


def read_wide_csv(labels_csv: Path, image_root: Path, *, name: str) -> SourceData:
    """A CSV whose first column names the image and whose other columns are 0/1 labels."""
    with open_text(labels_csv) as fh:
        rows = list(csv.reader(fh))
    if not rows or len(rows[0]) < 2:
        raise InputError(f"{labels_csv}: expected a header 'filename,label1,label2,...'")
    header = [h.strip() for h in rows[0]]
    class_names = header[1:]
    if len(set(class_names)) != len(class_names) or any(not c for c in class_names):
        raise InputError(f"{labels_csv}: label columns must be named and unique, got {class_names}")
    records, skipped = [], []
    first: dict[str, str] = {}  # id -> the spelling that listed it first
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{labels_csv}: line {line_no}: expected {len(header)} columns, got {len(row)}")
        values = [v.strip() for v in row[1:]]
        bad = [(c, v) for c, v in zip(class_names, values) if v not in ("0", "1", "-1")]
        if bad:
            raise InputError(f"{labels_csv}: line {line_no}: label {bad[0][0]} must be 0 or 1, got {bad[0][1]!r}")
        path = safe_join(image_root, row[0].strip())
        if path is None:
            skipped.append((row[0], "path escapes the image folder"))
            continue
        key = image_key(row[0])
        if key in first:
            skipped.append((row[0].strip(), f"listed again (first as {first[key]})"))
            continue
        first[key] = row[0].strip()
        labels = np.array([v == "1" for v in values], dtype=np.uint8)
        records.append(Record(key=key, labels=labels, source=path))
    return SourceData(name=name, class_names=class_names, records=records, skipped=skipped)
