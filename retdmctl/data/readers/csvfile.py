"""A user's own labels: ``relative/path.jpg,label1|label2|...`` one image per line.

An optional header line ``path,labels`` is recognised. Without ``classes`` the class list
is every label that occurs, sorted; with it, any other label is an error.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import require_dir, require_file, safe_join
from retdmctl.errors import InputError


def read_csv_labels(labels_csv: Path, image_root: Path, classes: list[str] | None = None) -> SourceData:
    require_file(labels_csv, "label file")
    require_dir(image_root, "image folder")
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        rows = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row and any(c.strip() for c in row)]
    if rows and [c.strip().lower() for c in rows[0][1]] == ["path", "labels"]:
        rows = rows[1:]
    parsed: list[tuple[str, list[str]]] = []
    for line_no, row in rows:
        if len(row) != 2:
            raise InputError(
                f"{labels_csv}: line {line_no}: expected 2 columns (path,label1|label2|...), got {len(row)}"
            )
        names = [x.strip() for x in row[1].split("|") if x.strip()]
        if classes is not None:
            unknown = [x for x in names if x not in classes]
            if unknown:
                raise InputError(f"{labels_csv}: line {line_no}: unknown label {unknown[0]!r}")
        parsed.append((row[0].strip(), names))
    if not parsed:
        raise InputError(f"{labels_csv}: no image lines found")
    class_names = list(classes) if classes is not None else sorted({x for _, names in parsed for x in names})
    index = {c: i for i, c in enumerate(class_names)}
    records, skipped = [], []
    for rel, names in parsed:
        path = safe_join(image_root, rel)
        if path is None:
            skipped.append((rel, "path escapes the image folder"))
            continue
        labels = np.zeros(len(class_names), dtype=np.uint8)
        labels[[index[x] for x in names]] = 1
        records.append(Record(key=rel, labels=labels, source=path))
    return SourceData(name="csv", class_names=class_names, records=records, skipped=skipped)
