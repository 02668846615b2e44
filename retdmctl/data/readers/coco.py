"""MS-COCO: ``annotations/instances_<split><year>.json`` (2014 or 2017) next to the image
folders they list (``train2017/``, ``val2017/``, ``train2014/``, ...).

Classes are the json's ``categories`` sorted by id (80 for COCO, ids 1..90 with gaps), with
their names. An image's labels are the categories of its annotations (crowd regions
included, as in the multi-label papers). Each annotation file is one official split:
``train*`` -> train and ``val*`` -> test (the protocol of the multi-label papers: the
2014/2017 val set is their test set), unless given explicitly.

Only images listed in a json are read. Images without any annotation are dropped (the
``dropped`` list) unless ``keep_empty``. Bad input is skipped and reported, never fatal
for the good images: a malformed json file (its images are lost, the other files' kept),
malformed entries, annotations naming an unknown category or image id, file names that
would leave the image folder, duplicate image ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import image_key, require_dir, require_file, safe_join
from retdmctl.errors import InputError

SPLITS = ("train", "test")


def split_tag(annotations: Path) -> str:
    """``instances_train2017.json`` -> ``train2017``: the image folder's usual name and
    the prefix of the image ids (so that train and val files never collide)."""
    return annotations.stem.removeprefix("instances_")


def split_from_name(annotations: Path) -> str | None:
    tag = split_tag(annotations).lower()
    if tag.startswith("train"):
        return "train"
    if tag.startswith(("val", "test")):
        return "test"
    return None


def default_image_dir(annotations: Path) -> Path:
    """The official layout: ``coco/annotations/instances_train2017.json`` lists the
    images of ``coco/train2017/``."""
    return annotations.resolve().parent.parent / split_tag(annotations)


def _load(path: Path) -> tuple[dict | None, str]:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        return None, f"malformed json ({exc})"
    except UnicodeDecodeError as exc:
        return None, f"malformed json (not UTF-8: {exc.reason})"
    if not isinstance(data, dict):
        return None, "malformed json (expected an object at the top level)"
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            return None, f"malformed json (no {key!r} list)"
    return data, ""


def _categories(data: dict) -> list[tuple[int, str]] | None:
    cats = []
    for c in data["categories"]:
        if not isinstance(c, dict) or type(c.get("id")) is not int or not isinstance(c.get("name"), str):
            return None
        cats.append((c["id"], c["name"]))
    if not cats or len({i for i, _ in cats}) != len(cats):
        return None
    return sorted(cats)


def read_coco(
    annotations: list[Path],
    images: list[Path],
    splits: list[str] | None = None,
    *,
    keep_empty: bool = False,
) -> SourceData:
    """``images`` holds one folder per annotation file, or one folder for all of them
    (or none: the official layout's folders). ``splits`` holds ``train``/``test`` per
    file, or is empty: each file's split then comes from its name."""
    if not annotations:
        raise InputError("coco: no annotation file given")
    if not images:
        images = [default_image_dir(a) for a in annotations]
    if len(images) == 1:
        images = images * len(annotations)
    if len(images) != len(annotations):
        raise InputError(
            f"coco: give one --images folder for all annotation files or one per file "
            f"({len(annotations)}), got {len(images)}"
        )
    if splits and len(splits) != len(annotations):
        raise InputError(f"coco: give one --split per annotation file ({len(annotations)}), got {len(splits)}")
    splits = list(splits) if splits else [""] * len(annotations)
    for i, ann in enumerate(annotations):
        if not splits[i]:
            splits[i] = split_from_name(ann) or ""
            if not splits[i]:
                raise InputError(
                    f"{ann}: cannot tell its split from the name (train* or val*); give --split train or --split test"
                )
        elif splits[i] not in SPLITS:
            raise InputError(f"{ann}: split must be train or test, got {splits[i]!r}")

    class_names: list[str] | None = None
    column: dict[int, int] = {}
    first_file: Path | None = None
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    errors: list[str] = []
    for ann, root, split in zip(annotations, images, splits, strict=True):
        require_file(ann, "annotation file")
        require_dir(root, "image folder")
        data, error = _load(ann)
        if data is None:
            skipped.append((str(ann), error))
            errors.append(f"{ann}: {error}")
            continue
        cats = _categories(data)
        if cats is None:
            error = "malformed json (categories need unique integer ids and names)"
            skipped.append((str(ann), error))
            errors.append(f"{ann}: {error}")
            continue
        if class_names is None:
            class_names = [name for _, name in cats]
            column = {cid: j for j, (cid, _) in enumerate(cats)}
            first_file = ann
        elif [name for _, name in cats] != class_names or list(column) != [cid for cid, _ in cats]:
            raise InputError(f"{ann}: its categories differ from those of {first_file}")
        records_of_file, skip, drop = _read_one(ann, root, split, data, column, len(class_names), keep_empty)
        records += records_of_file
        skipped += skip
        dropped += drop
    if class_names is None:
        raise InputError(errors[0])
    return SourceData(name="coco", class_names=class_names, records=records, skipped=skipped, dropped=dropped)


def _read_one(
    ann: Path, root: Path, split: str, data: dict, column: dict[int, int], num_classes: int, keep_empty: bool
) -> tuple[list[Record], list[tuple[str, str]], list[tuple[str, str]]]:
    tag = split_tag(ann)
    skipped: list[tuple[str, str]] = []
    row_of: dict[int, int] = {}  # image id -> row
    files: list[str] = []
    for entry in data["images"]:
        if not isinstance(entry, dict) or type(entry.get("id")) is not int or not isinstance(entry.get("file_name"), str):
            skipped.append((f"{ann.name}: image entry {_short(entry)}", "malformed entry"))
            continue
        if entry["id"] in row_of:
            skipped.append((f"{ann.name}: image id {entry['id']} ({entry['file_name']})", "duplicate id"))
            continue
        row_of[entry["id"]] = len(files)
        files.append(entry["file_name"])

    rows: list[int] = []
    cols: list[int] = []
    for a in data["annotations"]:
        if not isinstance(a, dict) or type(a.get("image_id")) is not int or type(a.get("category_id")) is not int:
            skipped.append((f"{ann.name}: annotation {_short(a)}", "malformed entry"))
            continue
        image_id, category_id = a["image_id"], a["category_id"]
        row = row_of.get(image_id)
        col = column.get(category_id)
        if col is None:
            skipped.append((f"{ann.name}: annotation {a.get('id', '?')}", f"unknown category id {category_id!r}"))
        elif row is None:
            skipped.append((f"{ann.name}: annotation {a.get('id', '?')}", f"unknown image id {image_id!r}"))
        else:
            rows.append(row)
            cols.append(col)
    labels = np.zeros((len(files), num_classes), dtype=np.uint8)
    labels[rows, cols] = 1
    has_label = labels.any(axis=1)

    records: list[Record] = []
    dropped: list[tuple[str, str]] = []
    for i, name in enumerate(files):
        if not keep_empty and not has_label[i]:
            dropped.append((f"{tag}/{name}", "without labels"))
            continue
        path = safe_join(root, name)
        if path is None:
            skipped.append((f"{ann.name}: {name}", "path escapes the image folder"))
            continue
        records.append(Record(key=f"{tag}/{image_key(name)}", labels=labels[i], source=path, split=split))
    return records, skipped, dropped


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
