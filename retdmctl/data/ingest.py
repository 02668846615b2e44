"""Turn a dataset reader's records into the LMDB store and ``dataset.h5``.

Readers (``retdmctl.data.readers``) only parse labels and list image sources; this module
decodes and re-encodes the images in worker processes, writes them to a ``.partial``
LMDB in committed batches and, once every record is handled, renames it into place.
Killing ingest at any moment loses at most one uncommitted batch: the next run reads the
keys already in the ``.partial`` store and carries on from there. Every stored value is a
deterministic function of its source file and the encode settings, so a resumed run ends
with exactly the store an uninterrupted run writes.

The splits are not part of the store: a finished ``images.lmdb`` records its encode
signature (source, paths, encode settings; for the demo set its generation parameters,
seed included), a stamp of its source files (sizes and mtimes) and the images that
failed to decode. When all of these and its key set match the current records, ingest
reuses it untouched (same bytes, same mtime) and rewrites only ``dataset.h5``: a new
``--seed`` or ``--val-fraction`` re-splits without re-encoding a single image.

What a reader could not use is reported, never silently lost:

* ``SourceData.skipped``: bad input (malformed annotation files, unknown category ids,
  paths escaping the dataset root, ...); ``--strict`` turns the first one into an error.
  Images that fail to decode join this list during ingest.
* ``SourceData.dropped``: images left out by a documented policy, not by an error
  (no label at all, a NUS-WIDE image missing on disk); ``--strict`` ignores these.

An empty train, val or test split is an error (see ``retdmctl.data.splits``), raised
before any image is encoded when the listed images are too few, and otherwise before
``dataset.h5`` or the store is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import lmdb
import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.markup import escape

from retdmctl.config import IngestConfig
from retdmctl.atomic import defer_replace
from retdmctl.data.dataset import DatasetInfo, write_dataset
from retdmctl.data.decode import open_rgb, to_rgb
from retdmctl.data.splits import describe, make_splits, split_mode
from retdmctl.data.store import ImageWriter, read_keys, store_key
from retdmctl.errors import InputError
from retdmctl.progress import make_progress
from retdmctl.workspace import Workspace, remove

_BATCH = 64  # images per LMDB transaction
STORE_META = "retdm-ingest.json"  # inside the store folder: signature, source stamp, failures


class Renderable(Protocol):
    """An image source that draws itself (the procedural demo set)."""

    def render(self) -> Image.Image: ...


@dataclass
class Record:
    key: str  # stable image id (its digest is the LMDB key, see retdmctl.data.store)
    labels: np.ndarray  # (L,) uint8; 0 where unknown
    source: Path | Renderable
    split: str | None = None  # an official split ("train" / "test"), if the format has one
    known: np.ndarray | None = None  # (L,) bool, False = unknown for this image; None = all known


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


class NotRegularFileError(OSError):
    """A FIFO, socket or device where an image file was listed."""


def encode_image(source: Path | Renderable, settings: EncodeSettings) -> bytes:
    """Decode (any PIL format; see ``retdmctl.data.decode`` for EXIF orientation, 16-bit,
    transparency, palette, CMYK), shrink the shorter side to ``short_side`` and re-encode
    as JPEG. With ``keep_original`` the source bytes are returned once they are proven to
    decode: the loader applies the same conversion at read time. Raises on unreadable
    input."""
    if isinstance(source, Path):
        mode = source.stat().st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise NotRegularFileError(source)  # reading a FIFO would wait for a writer forever
        raw = source.read_bytes()
        if not raw:
            raise ValueError("empty file")
        if settings.keep_original:
            open_rgb(raw)  # prove it decodes and converts fully
            return raw
        img = Image.open(io.BytesIO(raw))
        if settings.short_side > 0 and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) when that still
            # leaves at least short_side pixels: much faster than a full decode.
            w, h = img.size
            scale = settings.short_side / min(w, h)
            if scale < 1:
                img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        img.load()
        img = to_rgb(img)
    else:
        img = to_rgb(source.render())
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
    except NotRegularFileError:
        return key, None, "not a regular file (a FIFO, socket or device)"
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
    """What the stored bytes depend on; the splits (seed, fractions) are not part of it,
    except for the demo set, whose images the seed draws."""
    return {
        "source": source.name,
        "path": cfg.path,
        "images": cfg.images,
        "short_side": cfg.short_side,
        "keep_original": cfg.keep_original,
        "jpeg_quality": cfg.jpeg_quality,
        "demo": [cfg.demo_images, cfg.demo_classes, cfg.seed, cfg.demo_labels] if source.name == "demo" else None,
    }


def source_stamp(records: list[Record]) -> str:
    """A digest of the records' ids and their source files' sizes and mtimes: a store
    built from other files (an image replaced under the same name) is not reused."""
    digest = hashlib.sha256()
    for rec in sorted(records, key=lambda r: r.key):
        if isinstance(rec.source, Path):
            try:
                st = os.stat(rec.source)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "-"
        else:
            stamp = "rendered"  # fixed by the signature
        digest.update(f"{rec.key}\0{stamp}\n".encode())
    return digest.hexdigest()


def source_fingerprint(source: SourceData) -> str:
    """What ingest reads, and nothing else: the classes, each record's id, labels and split,
    what the reader skipped or dropped, and the stat (size, mtime) of each image a record
    names. Files the labels do not list (a workspace or a log inside the image folder)
    never change it; no image is opened, so it costs a ``stat`` per image."""
    digest = hashlib.sha256()
    digest.update(json.dumps([source.name, source.class_names, source.skipped, source.dropped]).encode())
    for rec in source.records:
        known = b"" if rec.known is None else np.packbits(rec.known).tobytes()
        digest.update(f"{rec.key}\0{rec.split}\0{rec.source}\0".encode() + rec.labels.tobytes() + b"\0" + known + b"\n")
    digest.update(source_stamp(source.records).encode())
    return "stat:" + digest.hexdigest()


def _reusable(store: Path, signature: dict, stamp: str, records: list[Record]) -> dict[str, str] | None:
    """The decode failures recorded by a finished store that holds exactly the images
    these records need, encoded with these settings; None when it cannot be reused."""
    try:
        meta = json.loads((store / STORE_META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("signature") != signature or meta.get("sources") != stamp:
        return None
    failed = meta.get("failed")
    ids = {r.key for r in records}
    if not isinstance(failed, dict) or not failed.keys() <= ids:
        return None
    try:
        keys = read_keys(store)
    except lmdb.Error:
        return None
    if keys != {store_key(i) for i in ids - failed.keys()}:
        return None
    return failed


def run_ingest(source: SourceData, ws: Workspace, cfg: IngestConfig, console) -> dict:
    check_class_names(source)
    skipped = list(source.skipped)
    records: list[Record] = []
    seen: set[str] = set()
    files: dict[Path, str] = {}  # source file -> the id it was first stored under
    for rec in source.records:
        if rec.key in seen:
            skipped.append((_name(rec), "duplicate id"))
            continue
        if isinstance(rec.source, Path) and files.setdefault(rec.source, rec.key) != rec.key:
            skipped.append((rec.key, f"same file as {files[rec.source]}"))  # one image, never in two splits
            continue
        seen.add(rec.key)
        records.append(rec)
    if cfg.strict and skipped:
        item, reason = skipped[0]
        raise InputError(f"{item}: {reason} (--strict)")

    mode = split_mode([r.split for r in records])
    split_args = {"seed": cfg.seed, "test_fraction": cfg.test_fraction, "val_fraction": cfg.val_fraction}
    settings = EncodeSettings(cfg.short_side, cfg.keep_original, cfg.jpeg_quality)
    try:  # too few images for the fractions even if every one decodes: fail before encoding
        make_splits([r.split for r in records], mode, **split_args)
    except InputError:
        if not any(_encode_task((r.key, r.source, settings))[1] is not None for r in records):
            raise _nothing_readable(source, cfg, records) from None
        raise

    partial = ws.lmdb.with_name(ws.lmdb.name + ".partial")
    signature = _signature(source, cfg)
    stamp = source_stamp(records)
    failed = _reusable(ws.lmdb, signature, stamp, records) if ws.lmdb.is_dir() else None
    reused = failed is not None
    if reused:
        remove(partial)  # whatever an interrupted earlier run left is of no use now
        console.print(
            "images.lmdb already holds these images with these settings: reused, only the splits are rewritten"
        )
        if cfg.strict:
            for rec in records:
                if rec.key in failed:
                    raise InputError(f"{_name(rec)}: {failed[rec.key]} (--strict)")
        stored = {store_key(r.key) for r in records if r.key not in failed}
    else:
        failed, stored = _encode_all(records, partial, signature, settings, cfg, console)

    # In record order, so that the report does not depend on which worker finished first.
    skipped += [(_name(r), failed[r.key]) for r in records if r.key in failed]
    good = [r for r in records if store_key(r.key) in stored]
    if not good:
        raise _nothing_readable(source, cfg, records)
    splits = make_splits([r.split for r in good], mode, **split_args)
    info = _build_info(good, source.class_names, splits)
    config = {**signature, "split": {"mode": mode, **split_args}}
    write_dataset(ws.dataset, info, source=source.name, config=config)
    if not reused:
        failures = {r.key: failed[r.key] for r in records if r.key in failed}
        (partial / STORE_META).write_text(json.dumps({"signature": signature, "sources": stamp, "failed": failures}))
        # With dataset.h5, when the stage commits; a failure keeps .partial to resume from.
        defer_replace(partial, ws.lmdb)
    note = describe(mode, seed=cfg.seed, test_fraction=cfg.test_fraction)
    summary = summarize(info, skipped, source.dropped, note=note)
    summary["store_reused"] = reused
    print_summary(console, summary)
    return summary


def check_class_names(source: SourceData) -> None:
    """Every class has a name of its own: two classes of one name would overwrite each
    other's scores wherever a name is the key (predict's JSON, a CSV header)."""
    twice = [name for name, n in Counter(source.class_names).items() if n > 1]
    if twice:
        raise InputError(f"{source.name}: duplicate class names: {', '.join(twice)}; every class needs a name of its own")


def _nothing_readable(source: SourceData, cfg: IngestConfig, records: list[Record]) -> InputError:
    """Not one image: says when that is because the listed files are not there (a wrong
    ``--images`` folder) or their paths were refused, naming a few."""
    message = f"{cfg.path or source.name}: no readable image with labels found"
    causes = []
    missing = [r.key for r in records if isinstance(r.source, Path) and not os.path.lexists(r.source)]
    if missing:
        where = f" under {cfg.images}" if cfg.images else ""
        causes.append(f"{len(missing)} of {len(records)} listed files not found{where} (first: {', '.join(missing[:3])})")
    refused = [item for item, why in source.skipped if why.startswith("path escapes")]
    if refused:
        causes.append(
            f"{len(refused)} listed paths refused as absolute or outside the image folder (first: {', '.join(refused[:3])})"
        )
    return InputError(message + (": " + "; ".join(causes) if causes else ""))


def _encode_all(
    records: list[Record], partial: Path, signature: dict, settings: EncodeSettings, cfg: IngestConfig, console
) -> tuple[dict[str, str], set[bytes]]:
    """Encode what the ``.partial`` store lacks; returns the failures (id -> reason) and
    the stored keys."""
    meta_file = partial / STORE_META
    if partial.exists():
        try:
            same = json.loads(meta_file.read_text()).get("signature") == signature
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
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
            meta_file.write_text(json.dumps({"signature": signature}))
            stored = writer.keys()
            stale = stored - {store_key(k) for k in by_key}
            if stale:  # left by an earlier run whose reader listed other images
                writer.delete(stale)
                stored -= stale
            if stored:
                console.print(f"resuming: {len(stored)} of {len(records)} images already stored")
            todo = [(r.key, r.source, settings) for r in records if store_key(r.key) not in stored]
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
                            stored.update(store_key(k) for k, _ in batch)
                            batch = []
                    progress.advance(task)
                if batch:
                    writer.put_many(batch)
                    stored.update(store_key(k) for k, _ in batch)
        finally:
            writer.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return failed, stored


def _name(rec: Record) -> str:
    return str(rec.source) if isinstance(rec.source, Path) else rec.key


def _build_info(good: list[Record], class_names: list[str], splits: dict[str, np.ndarray]) -> DatasetInfo:
    labels = np.stack([r.labels for r in good]).astype(np.uint8)
    known = None
    if any(r.known is not None for r in good):
        full = np.ones(len(class_names), dtype=bool)
        known = np.stack([full if r.known is None else r.known for r in good]).astype(bool)
        if known.all():
            known = None
    return DatasetInfo(ids=[r.key for r in good], labels=labels, class_names=class_names, splits=splits, known=known)


def _reason(why: str) -> str:
    """The reason without its details: ``unreadable image (broken data stream)`` ->
    ``unreadable image``, for counting."""
    return why.split(" (")[0]


def no_positives(info: DatasetInfo) -> dict[str, list[str]]:
    """The classes without a single positive image in train and in test: a model cannot
    learn the first kind, and no metric can measure the second."""
    out = {}
    for name in ("train", "test"):
        counts = info.labels[info.splits[name]].sum(axis=0, dtype=np.int64)
        out[name] = [info.class_names[i] for i in np.flatnonzero(counts == 0)]
    return out


def summarize(
    info: DatasetInfo,
    skipped: list[tuple[str, str]],
    dropped: list[tuple[str, str]] | None = None,
    *,
    note: str | None = None,
) -> dict:
    dropped = dropped or []
    unknown = ~info.known if info.known is not None else np.zeros(info.labels.shape, dtype=bool)
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
        "no_positives": no_positives(info),
        "unknown_labels": int(unknown.sum()),
        "images_with_unknown": int(unknown.any(axis=1).sum()),
        "split_note": note,
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
    if s.get("split_note"):
        console.print(escape(s["split_note"]))
    if s.get("unknown_labels"):
        console.print(escape(f"{s['unknown_labels']} labels unknown (?name) in {s['images_with_unknown']} images"))
    missing = s.get("no_positives") or {}
    parts = [f"in {name}: {', '.join(missing[name])}" for name in ("train", "test") if missing.get(name)]
    if parts:
        console.print("[yellow]" + escape("classes without a positive " + "; ".join(parts)) + "[/]")
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
