"""PASCAL VOC: ``VOCdevkit/VOC2007`` (and ``VOC2012``), each with ``Annotations/<id>.xml``,
``ImageSets/Main/{trainval,test}.txt`` and ``JPEGImages/<id>.jpg``.

The 20 classes in the standard order. ``trainval`` is the train split (the pipeline carves
val out of it), ``test`` the test split (VOC2012 publishes no test annotations: with
2007+2012 the usual "07+12" protocol results, trainval of both and the 2007 test set).

Objects marked ``<difficult>1</difficult>``: with ``difficult="positive"`` (the default)
they count like any other object, so an image with only a difficult person is labelled
person (the object is in the picture, and the training recipe of the multi-label VOC
papers, e.g. ML-GCN, turns the official "difficult" 0 entries into positives); with
``difficult="ignore"`` they are left out, which reproduces the positive set of the
official classification ground truth (``<class>_trainval.txt``).

The XML is parsed with ``defusedxml``: a file declaring entities (the "billion laughs"
expansion bomb), or referring to external ones, is rejected unexpanded and skips that
image like a malformed or missing file does; an object of an unknown class skips that
object; image ids never reach outside the year's folder.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import parse as safe_parse

from retdmctl.data.ingest import Record, SourceData
from retdmctl.data.readers.common import image_key, require_dir, require_file, safe_join
from retdmctl.errors import ConfigError, InputError

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
DIFFICULT = ("positive", "ignore")
_YEAR_DIR = re.compile(r"VOC(\d{4})$")
_SETS = (("trainval", "train"), ("test", "test"))


def find_years(root: Path) -> dict[str, Path]:
    """``{"2007": root/VOC2007, ...}`` for a VOCdevkit folder, or the folder itself when
    ``root`` is one year's folder."""
    require_dir(root, "VOC folder")
    m = _YEAR_DIR.match(root.name)
    if m and (root / "Annotations").is_dir():
        return {m.group(1): root}
    found = {}
    for child in sorted(root.iterdir()):
        m = _YEAR_DIR.match(child.name)
        if m and child.is_dir():
            found[m.group(1)] = child
    if not found:
        raise InputError(f"{root}: no VOC2007 or VOC2012 folder found (expected the VOCdevkit folder)")
    return found


def read_voc(
    root: Path, years: list[str] | None = None, *, difficult: str = "positive", keep_empty: bool = False
) -> SourceData:
    if difficult not in DIFFICULT:
        raise ConfigError(f"ingest.voc_difficult must be positive or ignore, got {difficult!r}")
    found = find_years(root)
    if years:
        missing = [y for y in years if y not in found]
        if missing:
            raise InputError(f"{root}: no VOC{missing[0]} folder (found: {', '.join('VOC' + y for y in found)})")
        found = {y: found[y] for y in years}
    index = {c: i for i, c in enumerate(CLASSES)}
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    for year, folder in found.items():
        ann_dir = require_dir(folder / "Annotations", "VOC annotation folder")
        img_dir = require_dir(folder / "JPEGImages", "VOC image folder")
        sets = folder / "ImageSets" / "Main"
        require_file(sets / "trainval.txt", "VOC image set")
        for set_name, split in _SETS:
            set_file = sets / f"{set_name}.txt"
            if not set_file.is_file():
                continue
            for line_no, line in enumerate(set_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                image_id = line.strip().split(" ")[0] if line.strip() else ""
                if not image_id:
                    continue
                key = f"VOC{year}/{image_key(image_id)}"
                xml = safe_join(ann_dir, image_id + ".xml")
                jpg = safe_join(img_dir, image_id + ".jpg")
                if xml is None or jpg is None:
                    skipped.append((f"{set_file}: line {line_no}: {image_id}", "path escapes the VOC folder"))
                    continue
                labels, problems = _labels(xml, index, difficult)
                if labels is None:
                    skipped.append(problems[0])
                    continue
                skipped += problems
                if not keep_empty and not labels.any():
                    dropped.append((key, "without labels"))
                    continue
                records.append(Record(key=key, labels=labels, source=jpg, split=split))
    return SourceData(name="voc", class_names=list(CLASSES), records=records, skipped=skipped, dropped=dropped)


def _labels(xml: Path, index: dict[str, int], difficult: str) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
    """The image's label vector (None when the file is unusable) and what was wrong."""
    try:
        root = safe_parse(xml).getroot()
    except EntitiesForbidden as exc:
        return None, [(str(xml), f"unsafe XML (declares entity {exc.name!r})")]
    except ExternalReferenceForbidden as exc:
        return None, [(str(xml), f"unsafe XML (refers to external {exc.system_id or exc.public_id!r})")]
    except DTDForbidden:
        return None, [(str(xml), "unsafe XML (DTD)")]
    except FileNotFoundError:
        return None, [(str(xml), "missing annotation")]
    except ET.ParseError as exc:
        return None, [(str(xml), f"malformed XML ({exc})")]
    except OSError as exc:
        return None, [(str(xml), f"unreadable annotation ({exc.strerror or exc})")]
    labels = np.zeros(len(index), dtype=np.uint8)
    problems = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip().lower()
        col = index.get(name)
        if col is None:
            problems.append((f"{xml}: object {name!r}", f"unknown class {name!r}"))
            continue
        if difficult == "ignore" and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        labels[col] = 1
    return labels, problems
