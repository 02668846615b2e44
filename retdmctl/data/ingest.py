"""Turn a dataset reader's records into the LMDB store and ``dataset.h5``.

Readers (``retdmctl.data.readers``) only parse labels and list image sources; this module
decodes and re-encodes the images in worker processes, writes them to a ``.partial``
LMDB in committed batches and, once every record is handled, renames it into place.
Killing ingest at any moment loses at most one uncommitted batch: the next run reads the
keys already in the ``.partial`` store and carries on from there. Every stored value is a
deterministic function of its source file and the encode settings, so a resumed run ends
with exactly the store an uninterrupted run writes.

What a reader could not use is reported, never silently lost:

* ``SourceData.skipped``: bad input (malformed annotation files, unknown category ids,
  paths escaping the dataset root, ...); ``--strict`` turns the first one into an error.
  Images that fail to decode join this list during ingest.
* ``SourceData.dropped``: images left out by a documented policy, not by an error
  (no label at all, a NUS-WIDE image missing on disk); ``--strict`` ignores these.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.markup import escape

from retdmctl.config import IngestConfig
from retdmctl.data.dataset import DatasetInfo, random_splits, write_dataset
from retdmctl.data.store import ImageWriter
from retdmctl.errors import InputError
from retdmctl.progress import make_progress
from retdmctl.workspace import Workspace, remove

_BATCH = 64  # images per LMDB transaction


class Renderable(Protocol):
    """An image source that draws itself (the procedural demo set)."""

    def render(self) -> Image.Image: ...


@dataclass
class Record:
    key: str  # stable image id, the LMDB key
    labels: np.ndarray  # (L,) uint8
    source: Path | Renderable
    split: str | None = None  # an official split ("train" / "test"), if the format has one


@dataclass
class SourceData:
    """What a reader returns: classes, records, and what it had to skip while parsing."""

    name: str
    class_names: list[str]
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason): bad input
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason): by policy


@dataclass(frozen=True)
class EncodeSettings:
    short_side: int
    keep_original: bool
    quality: int


def encode_image(source: Path | Renderable, settings: EncodeSettings) -> bytes:
    """Decode (any PIL format, grayscale/CMYK/PNG included), convert to RGB, shrink the
    shorter side to ``short_side`` and re-encode as JPEG. Raises on unreadable input."""
    if isinstance(source, Path):
        raw = source.read_bytes()
        if not raw:
            raise ValueError("empty file")
        img = Image.open(io.BytesIO(raw))
        if not settings.keep_original and settings.short_side > 0 and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) when that still
            # leaves at least short_side pixels: much faster than a full decode.
            w, h = img.size
            scale = settings.short_side / min(w, h)
            if scale < 1:
                img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        img.load()
    else:
        raw = b""
        img = source.render()
    if settings.keep_original and raw:
        img.convert("RGB")  # prove it decodes fully; the loader converts at read time
        return raw
    img = img.convert("RGB")
    w, h = img.size
    if settings.short_side > 0 and min(w, h) > settings.short_side:
        scale = settings.short_side / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=settings.quality)
    return out.getvalue()


def _encode_task(args: tuple[str, Path | Renderable, EncodeSettings]) -> tuple[str, bytes | None, str]:
    key, source, settings = args
    try:
        return key, encode_image(source, settings), ""
    except FileNotFoundError:
        return key, None, "missing file"
    except IsADirectoryError:
        return key, None, "not a file"
    except UnidentifiedImageError:
        return key, None, "unreadable image (not an image format PIL knows)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return key, None, f"unreadable image ({exc})"
    except Exception as exc:  # noqa: BLE001 - a corrupt file may trip any decoder path
        return key, None, f"unreadable image ({type(exc).__name__}: {exc})"


def _worker_init(parent: int) -> None:
    """Workers ignore Ctrl-C (the parent handles it and terminates the pool) and die with
    their parent: a ``kill -9`` of ingest must not leave orphans holding the store open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _signature(source: SourceData, cfg: IngestConfig) -> dict:
    return {
        "source": source.name,
        "path": cfg.path,
        "images": cfg.images,
        "short_side": cfg.short_side,
        "keep_original": cfg.keep_original,
        "jpeg_quality": cfg.jpeg_quality,
        "demo": [cfg.demo_images, cfg.demo_classes, cfg.seed] if source.name == "demo" else None,
    }


def run_ingest(source: SourceData, ws: Workspace, cfg: IngestConfig, console) -> dict:
    skipped = list(source.skipped)
    records: list[Record] = []
    seen: set[str] = set()
    for rec in source.records:
        if rec.key in seen:
            skipped.append((_name(rec), "duplicate id"))
            continue
        seen.add(rec.key)
        records.append(rec)
    if cfg.strict and skipped:
        item, reason = skipped[0]
        raise InputError(f"{item}: {reason} (--strict)")

    partial = ws.lmdb.with_name(ws.lmdb.name + ".partial")
    sig_file = partial / "retdm-ingest.json"
    signature = _signature(source, cfg)
    if partial.exists():
        try:
            same = json.loads(sig_file.read_text()) == signature
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            same = False
        if not same:
            remove(partial)

    workers = cfg.workers or os.cpu_count() or 1
    # Fork the workers before the LMDB environment is opened: a child must not inherit it.
    pool = None
    if workers > 1 and len(records) > 1:
        pool = mp.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(os.getpid(),))
    failed: dict[str, str] = {}
    by_key = {r.key: r for r in records}
    try:
        writer = ImageWriter(partial)
        try:
            sig_file.write_text(json.dumps(signature))
            stored = writer.keys()
            stale = stored - by_key.keys()
            if stale:  # left by an earlier run whose reader listed other images
                _delete(writer, stale)
                stored -= stale
            if stored:
                console.print(f"resuming: {len(stored)} of {len(records)} images already stored")
            settings = EncodeSettings(cfg.short_side, cfg.keep_original, cfg.jpeg_quality)
            todo = [(r.key, r.source, settings) for r in records if r.key not in stored]
            with make_progress() as progress:
                task = progress.add_task("ingest", total=len(records), completed=len(records) - len(todo), info="")
                if pool is not None and len(todo) > 1:
                    chunk = max(1, min(16, len(todo) // (workers * 8)))
                    results = pool.imap_unordered(_encode_task, todo, chunksize=chunk)
                else:
                    results = map(_encode_task, todo)
                batch: list[tuple[str, bytes]] = []
                for key, data, error in results:
                    if data is None:
                        if cfg.strict:
                            raise InputError(f"{_name(by_key[key])}: {error} (--strict)")
                        failed[key] = error
                    else:
                        batch.append((key, data))
                        if len(batch) >= _BATCH:
                            writer.put_many(batch)
                            stored.update(k for k, _ in batch)
                            batch = []
                    progress.advance(task)
                if batch:
                    writer.put_many(batch)
                    stored.update(k for k, _ in batch)
        finally:
            writer.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    # In record order, so that the report does not depend on which worker finished first.
    skipped += [(_name(r), failed[r.key]) for r in records if r.key in failed]
    good = [r for r in records if r.key in stored]
    if not good:
        raise InputError(f"{cfg.path or source.name}: no readable image with labels found")
    info = _build_info(good, source.class_names, cfg)
    write_dataset(ws.dataset, info, source=source.name, config=signature)
    remove(ws.lmdb)
    os.replace(partial, ws.lmdb)
    summary = summarize(info, skipped, source.dropped)
    print_summary(console, summary)
    return summary


def _delete(writer: ImageWriter, keys: set[str]) -> None:
    with writer.env.begin(write=True) as txn:
        for key in keys:
            txn.delete(key.encode())


def _name(rec: Record) -> str:
    return str(rec.source) if isinstance(rec.source, Path) else rec.key


def _build_info(good: list[Record], class_names: list[str], cfg: IngestConfig) -> DatasetInfo:
    labels = np.stack([r.labels for r in good]).astype(np.uint8)
    official = [r.split for r in good]
    if all(s is not None for s in official):
        test = np.array([i for i, s in enumerate(official) if s == "test"], dtype=np.int64)
        splits = random_splits(len(good), seed=cfg.seed, test_fraction=0, val_fraction=cfg.val_fraction, test=test)
    else:
        splits = random_splits(
            len(good), seed=cfg.seed, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction
        )
    return DatasetInfo(ids=[r.key for r in good], labels=labels, class_names=class_names, splits=splits)


def _reason(why: str) -> str:
    """The reason without its details: ``unreadable image (broken data stream)`` ->
    ``unreadable image``, for counting."""
    return why.split(" (")[0]


def summarize(
    info: DatasetInfo, skipped: list[tuple[str, str]], dropped: list[tuple[str, str]] | None = None
) -> dict:
    dropped = dropped or []
    counts = info.labels.sum(axis=0, dtype=np.int64)
    per_image = info.labels.sum(axis=1, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    present = [int(i) for i in order if counts[i] > 0]
    return {
        "images": len(info.ids),
        "splits": {name: len(idx) for name, idx in info.splits.items()},
        "classes": info.num_classes,
        "classes_present": len(present),
        "positive_labels": int(counts.sum()),
        "labels_per_image": round(float(per_image.mean()), 3),
        "labels_per_image_max": int(per_image.max()),
        "most_frequent": [[info.class_names[i], int(counts[i])] for i in present[:3]],
        "least_frequent": [[info.class_names[i], int(counts[i])] for i in present[::-1][:3]],
        "absent": [info.class_names[i] for i in range(info.num_classes) if counts[i] == 0],
        "skipped": len(skipped),
        "skipped_first": [f"{item}: {why}" for item, why in skipped[:5]],
        "skipped_reasons": dict(Counter(_reason(why) for _, why in skipped)),
        "dropped": len(dropped),
        "dropped_first": [item for item, _ in dropped[:5]],
        "dropped_reasons": dict(Counter(_reason(why) for _, why in dropped)),
    }


def print_summary(console, s: dict) -> None:
    console.print(
        f"stored {s['images']} images (train {s['splits']['train']}, val {s['splits']['val']}, "
        f"test {s['splits']['test']}); {s['classes']} classes ({s['classes_present']} occur), "
        f"{s['positive_labels']} positive labels, {s['labels_per_image']} labels per image"
    )
    def fmt(pairs: list) -> str:
        return ", ".join(f"{n} ({c})" for n, c in pairs)

    def counts(reasons: dict) -> str:
        return ", ".join(f"{why}: {n}" for why, n in reasons.items())

    line = f"most frequent: {fmt(s['most_frequent'])}; least frequent: {fmt(s['least_frequent'])}"
    if s.get("absent"):
        line += f"; absent: {', '.join(s['absent'])}"
    console.print(escape(line))
    if s.get("dropped"):
        console.print(
            escape(f"dropped {s['dropped']} images ({counts(s['dropped_reasons'])}), first: ")
            + escape(", ".join(item for item in s["dropped_first"]))
        )
    if s["skipped"]:
        console.print(
            f"[yellow]skipped {s['skipped']} items[/] "
            + escape(f"({counts(s['skipped_reasons'])}), first: " + "; ".join(s["skipped_first"]))
        )
