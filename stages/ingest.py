"""Stage ``ingest``: a dataset in its native format -> ``data/images.lmdb`` + ``data/dataset.h5``.

The source (``ingest.source``, ``ingest.path``) is part of the config, so ``retdmctl run``
re-ingests when the dataset's files or the ingest options change. A re-ingest that only
changes the splits (``--seed``, ``--val-fraction``, ``--test-fraction``) keeps
``data/images.lmdb`` as it is, byte for byte (see ``retdmctl.data.ingest``), so its
fingerprint in the manifest stays the same and only ``data/dataset.h5`` changes.

Lists in the config are ``|``-joined strings: for ``coco``, ``ingest.path`` holds the
annotation files and ``ingest.images`` their image folders (one for all, or one per
file), ``ingest.coco_splits`` the split of each file; ``ingest.voc_years`` the VOC years.
"""

from __future__ import annotations

import os
from dataclasses import astuple
from pathlib import Path

from retdmctl.config import Config
from retdmctl.data.ingest import SourceData, run_ingest, source_fingerprint
from retdmctl.errors import ConfigError, RetdmError
from retdmctl.pipeline import Context, Stage

READERS = ("demo", "scene", "csv", "coco", "voc", "mirflickr", "nuswide")
LIST_SEP = "|"


def join_list(items) -> str:
    return LIST_SEP.join(str(x) for x in items)


def split_list(value: str) -> list[str]:
    return [x for x in value.split(LIST_SEP) if x] if value else []


def read_source(cfg: Config) -> SourceData:
    i = cfg.ingest
    if i.source == "demo":
        from retdmctl.data.readers.demo import read_demo

        return read_demo(i.demo_images, i.demo_classes, i.seed, i.demo_labels)
    if i.source == "scene":
        from retdmctl.data.readers.scene import read_scene

        return read_scene(Path(i.path))
    if i.source == "csv":
        from retdmctl.data.readers.csvfile import read_csv_labels

        classes = [c.strip() for c in i.classes.split(",") if c.strip()] or None
        return read_csv_labels(Path(i.path), Path(i.images), classes)
    if i.source == "coco":
        from retdmctl.data.readers.coco import read_coco

        return read_coco(
            [Path(p) for p in split_list(i.path)],
            [Path(p) for p in split_list(i.images)],
            split_list(i.coco_splits),
            keep_empty=i.keep_empty,
        )
    if i.source == "voc":
        from retdmctl.data.readers.voc import read_voc

        return read_voc(Path(i.path), split_list(i.voc_years), difficult=i.voc_difficult, keep_empty=i.keep_empty)
    if i.source == "mirflickr":
        from retdmctl.data.readers.mirflickr import read_mirflickr

        return read_mirflickr(Path(i.path), Path(i.images) if i.images else None, keep_empty=i.keep_empty)
    if i.source == "nuswide":
        from retdmctl.data.readers.nuswide import read_nuswide

        return read_nuswide(Path(i.path), Path(i.images) if i.images else None, keep_empty=i.keep_empty)
    raise ConfigError(f"ingest.source must be one of {', '.join(READERS)}, got {i.source!r}")


def _blocked(cfg: Config) -> str | None:
    if not cfg.ingest.source:
        return f"no dataset yet: run `retdmctl ingest <format> PATH` first (formats: {', '.join(READERS)})"
    return None


def _sources(ws, cfg: Config) -> list[Path]:
    """The dataset's own files and folders: every annotation file and image folder of a
    multi-file COCO source. Not what ingest's fingerprint walks (see ``_fingerprint``):
    an image folder may hold the workspace itself."""
    i = cfg.ingest
    if i.source == "demo":
        return []
    if i.source == "coco":
        paths = split_list(i.path) + split_list(i.images)
    else:  # a single path each: never split, a "|" may be part of a file name
        paths = [p for p in (i.path, i.images) if p]
    return [Path(p) for p in dict.fromkeys(paths)]


def _fingerprint(ws, cfg: Config) -> str | None:
    """The fingerprint of what ingest reads (see ``source_fingerprint``), never of the
    folders around it: a workspace inside the image folder (``--images .``) must not make
    ingest stale by its own artifacts. None when the source cannot be read: the stage is
    stale and its run says why."""
    if cfg.ingest.source == "demo":
        return None  # drawn from the config alone
    try:
        return source_fingerprint(_read_once(cfg))
    except (RetdmError, OSError, ValueError):
        return None


_PARSED: dict[tuple, SourceData] = {}  # emptied by every command (forget_parsed)


def forget_parsed() -> None:
    """A command starts from the files as they are now (an annotation file edited in
    place inside a listed folder keeps the folder's mtime)."""
    _PARSED.clear()


def _read_once(cfg: Config) -> SourceData:
    """The parsed labels, read once per command (each one calls ``forget_parsed``) while
    the label files and the folders named in the config keep their size, mtime and inode:
    ``run`` checks ingest before every later stage, and a COCO json takes seconds to
    parse. The images are stat'ed anew each time (``source_fingerprint``)."""
    stats = []
    for path in _sources(None, cfg):
        try:
            st = os.stat(path)
            stats.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append((str(path), None))
    key = (astuple(cfg.ingest), tuple(stats))
    if key not in _PARSED:
        _PARSED.clear()  # the latest source only
        _PARSED[key] = read_source(cfg)
    return _PARSED[key]


def run(ctx: Context) -> dict:
    return run_ingest(read_source(ctx.cfg), ctx.ws, ctx.cfg.ingest, ctx.console)


STAGE = Stage(
    name="ingest",
    command="retdmctl ingest <format> PATH",
    sections=("ingest",),
    inputs=lambda ws, cfg: [],
    outputs=lambda ws, cfg: [ws.lmdb, ws.dataset],
    run=run,
    sources=_sources,
    source_fingerprint=_fingerprint,
    blocked=_blocked,
)
