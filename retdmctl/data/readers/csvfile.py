"""A user's own labels: ``relative/path.jpg,label1|label2|...`` one image per line.

An optional header line ``path,labels`` is recognised. Without ``classes`` the class list
is every label that occurs, sorted; with it, any other label is an error.

A label written ``?name`` is unknown for that image: neither positive nor negative
(learning with incomplete labels). It is stored in ``dataset.h5`` as ``known`` False
(label 0). ``name`` and ``?name`` on one line is an error.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import image_key, open_text, require_dir, require_file, safe_join
from retdmctl.errors import InputError

UNKNOWN = "?"  # prefix of a label that is unknown for the image


def read_csv_labels(labels_csv: Path, image_root: Path, classes: list[str] | None = None) -> SourceData:
    require_file(labels_csv, "label file")
    require_dir(image_root, "image folder")
    with open_text(labels_csv) as fh:
        rows = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row and any(c.strip() for c in row)]
    if rows and [c.strip().lower() for c in rows[0][1]] == ["path", "labels"]:
        rows = rows[1:]
    parsed: list[tuple[str, list[str], list[str]]] = []
    for line_no, row in rows:
        if len(row) != 2:
            raise InputError(
                f"{labels_csv}: line {line_no}: expected 2 columns (path,label1|label2|...), got {len(row)}"
            )
        entries = [x.strip() for x in row[1].split("|") if x.strip()]
        names = [x for x in entries if not x.startswith(UNKNOWN)]
        unsure = [x[len(UNKNOWN) :].strip() for x in entries if x.startswith(UNKNOWN)]
        if "" in unsure:
            raise InputError(f"{labels_csv}: line {line_no}: '{UNKNOWN}' without a label name")
        if classes is not None:
            bad = [x for x in names if x not in classes] + [UNKNOWN + x for x in unsure if x not in classes]
            if bad:
                raise InputError(f"{labels_csv}: line {line_no}: unknown label {bad[0]!r}")
        both = [x for x in unsure if x in names]
        if both:
            raise InputError(
                f"{labels_csv}: line {line_no}: label {both[0]!r} is both positive and unknown "
                f"({both[0]} and {UNKNOWN}{both[0]})"
            )
        parsed.append((row[0].strip(), names, unsure))
    if not parsed:
        raise InputError(f"{labels_csv}: no image lines found")
    if classes is not None:
        class_names = list(classes)
    else:
        class_names = sorted({x for _, names, unsure in parsed for x in (*names, *unsure)})
    index = {c: i for i, c in enumerate(class_names)}
    records, skipped = [], []
    first: dict[str, str] = {}  # id -> the spelling that listed it first
    for rel, names, unsure in parsed:
        path = safe_join(image_root, rel)
        if path is None:
            skipped.append((rel, "path escapes the image folder"))
            continue
        key = image_key(rel)
        if key in first:
            skipped.append((rel, f"listed again (first as {first[key]})"))
            continue
        first[key] = rel
        labels = np.zeros(len(class_names), dtype=np.uint8)
        labels[[index[x] for x in names]] = 1
        known = None
        if unsure:
            known = np.ones(len(class_names), dtype=bool)
            known[[index[x] for x in unsure]] = False
        records.append(Record(key=key, labels=labels, source=path, known=known))
    return SourceData(name="csv", class_names=class_names, records=records, skipped=skipped)
