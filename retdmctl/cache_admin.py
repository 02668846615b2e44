"""Listing and pruning the shared backbone cache (:mod:`retdmctl.cache`): what
``retdmctl cache`` and :meth:`retdmctl.Workspace.caches` show and remove.

The cache is shared by every workspace, so "unused" is decided from one workspace's
side. An entry is *used* when it is the file the workspace's current config reads
(:func:`retdmctl.inputs.backbone_cache_path`); a used entry is never removed. A prune
removes by default only the unused entries that no other live workspace can claim:

- those this workspace extracted (the ``workspace`` each file records);
- orphans, whose extracting workspace no longer exists (its folder holds neither
  ``retdm.toml`` nor ``.retdm``);
- unreadable files (no key: no run ever reads them).

It keeps the entries other live workspaces extracted, and those whose workspace is not
recorded, unless ``all_`` (``--all``) is given. A workspace without a dataset knows of
no entry that it uses: a prune there removes only orphans, unreadable files and what
dead writers left, and refuses ``--all``.

Besides entries, a prune removes what killed writers left: temporary files
(``.NAME.tmp-PID``, :func:`retdmctl.atomic.tmp_name`) whose process is gone, torchrun
shards (``.NAME.partR``) no writer holds the entry's lock for, and lock
files (``NAME.lock``) of entries that do not exist and that no process holds.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
from filelock import FileLock, Timeout

from retdmctl.atomic import _TMP_MARK, pid_alive, remove_stale_tmp
from retdmctl.cache import cache_root
from retdmctl.config import Config, concrete
from retdmctl.errors import InputError
from retdmctl.workspace import Workspace

BACKBONE = "backbone"  # the cache's only kind of entry so far: backbone/NAME-HASH.h5


@dataclass
class Entry:
    """One cache file and what it records."""

    path: Path
    size: int
    key: dict | None  # None: damaged, or it cannot be read
    created: str | None
    origin: str | None  # the workspace that extracted it
    owner: str  # "this", "other" (a live workspace), "gone" (orphan), "unknown" (not recorded)
    used: bool | None  # by this workspace's current config; None: unknown (no dataset)
    damaged: bool = False  # no run can read it: not HDF5, or no key

    @property
    def summary(self) -> str:
        return key_summary(self.key) if self.key is not None or self.damaged else "cannot be read"

    def to_json(self) -> dict:
        return {"path": str(self.path), "size": self.size, "used": self.used, "summary": self.summary,
                "created": self.created, "extracted_by": self.origin, "owner": self.owner, "key": self.key,
                "damaged": self.damaged}


@dataclass
class Leftover:
    """A file a killed writer left: a temporary file, or the lock file of no entry."""

    path: Path
    size: int
    entry: Path  # the entry it belongs to

    def to_json(self) -> dict:
        return {"path": str(self.path), "size": self.size}


@dataclass
class Listing:
    cache: Path  # cache_root()
    workspace: Path
    uses: Path | None  # the entry the current config reads (extracted or not)
    note: str | None  # why no entry is marked used, when none is
    known: bool  # whether it is known which entry the workspace uses (it has a dataset)
    entries: list[Entry]
    leftovers: list[Leftover]

    def to_json(self) -> dict:
        return {
            "cache": str(self.cache), "workspace": str(self.workspace),
            "uses": str(self.uses) if self.uses else None, "known": self.known, "note": self.note,
            "entries": [e.to_json() for e in self.entries],
            "leftovers": [x.to_json() for x in self.leftovers],
            "total": {"entries": len(self.entries), "size": sum(e.size for e in self.entries)},
        }


@dataclass
class Pruned:
    dry_run: bool
    removed: list[tuple[Entry, str]] = field(default_factory=list)  # (entry, why)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    leftovers: list[Leftover] = field(default_factory=list)  # removed
    kept_used: list[Entry] = field(default_factory=list)
    kept_other: list[Entry] = field(default_factory=list)  # other live (or unrecorded) workspaces'
    kept_own: list[Entry] = field(default_factory=list)  # this workspace's, use unknown (no dataset)
    kept_unreadable: list[Entry] = field(default_factory=list)  # HDF5 that cannot be opened: never guessed at

    @property
    def freed(self) -> int:
        return sum(e.size for e, _ in self.removed) + sum(x.size for x in self.leftovers)

    def to_json(self) -> dict:
        def sized(entries: list[Entry]) -> dict:
            return {"entries": len(entries), "size": sum(e.size for e in entries)}

        return {
            "dry_run": self.dry_run,
            "removed": [{"path": str(e.path), "size": e.size, "why": why} for e, why in self.removed],
            "skipped": [{"path": str(p), "why": why} for p, why in self.skipped],
            "leftovers": [x.to_json() for x in self.leftovers],
            "freed": self.freed,
            "kept": {"used": sized(self.kept_used), "other_workspaces": sized(self.kept_other),
                     "this_workspace_no_dataset": sized(self.kept_own), "unreadable": sized(self.kept_unreadable)},
        }


# --- listing -------------------------------------------------------------------------------
def list_caches(ws: Workspace, cfg: Config | None) -> Listing:
    """Every entry of the shared cache, each with whether ``cfg`` (this workspace's
    current config) uses it, and the leftovers of dead writers. Reads only (computing
    the images' digest for the key is cached in the workspace's state, as ``status`` does)."""
    root = ws.root.resolve()
    uses, note, known = _current_use(ws, cfg)
    folder = cache_root() / BACKBONE
    entries = []
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # removed meanwhile
            continue
        key, created, origin, damaged = _read_attrs(path)
        entries.append(Entry(path, size, key, created, origin, _owner(origin, root),
                             (path == uses) if known else None, damaged))
    return Listing(cache_root(), root, uses, note, known, entries, _leftovers(folder))


def _current_use(ws: Workspace, cfg: Config | None) -> tuple[Path | None, str | None, bool]:
    """(the entry ``cfg`` reads, why none is, whether that is known)."""
    from retdmctl.inputs import backbone_cache_path  # torch and the backbones: only when needed

    if not ws.root.is_dir():
        return None, f"workspace {ws.root} does not exist: which entry it would use is unknown", False
    if not ws.dataset.is_file() or cfg is None:
        return None, "this workspace has no dataset yet: which entry it uses is unknown", False
    cfg = concrete(copy.deepcopy(cfg))
    if not cfg.model.frozen_backbone:
        return None, "the current config fine-tunes the backbone: it uses no cache entry", True
    path = backbone_cache_path(ws, cfg)
    note = None if path.exists() else f"the current config's entry ({path.name}) is not extracted yet"
    return path, note, True


def _read_attrs(path: Path) -> tuple[dict | None, str | None, str | None, bool]:
    """(key, created, workspace, damaged): damaged when no run can read it (not HDF5, or
    no key). A file that cannot be opened for another reason (permissions) is not."""
    try:
        # HDF5's own file locking is off: where it is unsupported (some network file
        # systems) it fails on files that are fine, and those must never look damaged.
        with h5py.File(path, "r", locking=False) as h5:
            attrs = h5.attrs
            key = json.loads(attrs["key"]) if "key" in attrs else None
            created = str(attrs["created"]) if "created" in attrs else None
            origin = str(attrs["workspace"]) if "workspace" in attrs else None
    except ValueError:  # a key that is no JSON
        return None, None, None, True
    except OSError:
        return None, None, None, not _hdf5_signature(path)
    return (key if isinstance(key, dict) else None), created, origin, not isinstance(key, dict)


def _hdf5_signature(path: Path) -> bool:
    """Whether ``path`` starts as an HDF5 file does (True when it cannot be read at all)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return True


def _owner(origin: str | None, root: Path) -> str:
    if origin is None:
        return "unknown"
    if origin == str(root):
        return "this"
    return "other" if is_workspace(Path(origin)) else "gone"


def is_workspace(path: Path) -> bool:
    """Whether ``path`` still is a workspace (what a command leaves: retdm.toml or .retdm)."""
    try:
        return (path / "retdm.toml").is_file() or (path / ".retdm").is_dir()
    except OSError:  # unreadable: treat as alive, never as an orphan
        return True


def _leftovers(folder: Path) -> list[Leftover]:
    """Temporary files of dead writers, and lock files of entries that do not exist,
    that no process holds (a writer holds its entry's lock while it writes)."""
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") and _TMP_MARK in name:
            entry = folder / name[1:].rsplit(_TMP_MARK, 1)[0]
            pid = name.rsplit(_TMP_MARK, 1)[1]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
        elif name.startswith(".") and re.fullmatch(r"\.(.+\.h5)\.part\d+", name):
            entry = folder / name[1:].rsplit(".part", 1)[0]  # a torchrun shard (sources.part_path)
        elif name.endswith(".h5.lock"):
            entry = folder / name[: -len(".lock")]
            if entry.exists():
                continue  # an entry's own lock: removed with the entry
        else:
            continue
        if not busy(entry):
            out.append(Leftover(path, _size(path), entry))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lock_file(entry: Path) -> Path:
    return Path(str(entry) + ".lock")


def busy(entry: Path) -> bool:
    """Whether another process holds ``entry``'s writer lock (probed without creating
    the lock file: none means no writer)."""
    if not lock_file(entry).exists():
        return False
    lock = FileLock(str(lock_file(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


# --- pruning -------------------------------------------------------------------------------
def removal_reason(entry: Entry, all_: bool) -> str | None:
    """Why a prune removes ``entry``, or None when it keeps it."""
    if entry.used:
        return None
    if entry.key is None:  # damaged: no run reads it; else unknown: kept
        return "unreadable" if entry.damaged else None
    if entry.owner == "gone":
        return f"orphan: workspace {entry.origin} no longer exists"
    if entry.used is None:  # no dataset: this workspace's own and the others' entries stay
        return None
    if entry.owner == "this":
        return "extracted by this workspace, unused by its current config"
    if all_:
        return f"extracted by {'workspace ' + entry.origin if entry.origin else 'an unrecorded workspace'} (--all)"
    return None


@contextlib.contextmanager
def prune_lock(ws: Workspace, dry_run: bool) -> Iterator[None]:
    """The workspace's writer lock for a prune: its config cannot change, nor its run
    extract, while it decides. None for a dry run (it changes nothing) or a folder that
    is no workspace (nothing of it to protect, and no ``.retdm`` is made there)."""
    from retdmctl.lock import workspace_lock

    if dry_run or not is_workspace(ws.root):
        yield
        return
    with workspace_lock(ws.root):
        yield


def prune_caches(ws: Workspace, config: Callable[[], Config | None], *, all_: bool = False,
                 dry_run: bool = False) -> tuple[Listing, Pruned]:
    """Remove the unused entries (see the module's docstring) and the leftovers of dead
    writers, under the workspace's lock and each entry's own: an entry another process
    is writing is skipped. ``config`` gives the workspace's current config, read once the
    lock is held. ``dry_run``: remove nothing, say what would go."""
    with prune_lock(ws, dry_run):
        listing = list_caches(ws, config())
        if all_ and not listing.known:
            raise InputError(f"--all: {listing.note}; prune --all from a workspace with a dataset")
        pruned = Pruned(dry_run)
        for entry in listing.entries:
            why = removal_reason(entry, all_)
            if why is None:
                kept = (pruned.kept_used if entry.used else pruned.kept_unreadable if entry.key is None
                        else pruned.kept_own if entry.owner == "this" else pruned.kept_other)
                kept.append(entry)
            elif not busy(entry.path) if dry_run else _remove(entry.path, True):
                pruned.removed.append((entry, why))
            else:
                pruned.skipped.append((entry.path, "another process is writing it"))
        for left in listing.leftovers:
            if dry_run or _remove(left.entry, False) and not left.path.exists():  # its pid may be alive again
                pruned.leftovers.append(left)
    return listing, pruned


def _remove(entry: Path, with_entry: bool) -> bool:
    """Remove ``entry`` (``with_entry``) and what dead writers left of it, holding its
    lock; False when another process holds it."""
    lock = FileLock(str(lock_file(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        if with_entry:
            entry.unlink(missing_ok=True)
        remove_stale_tmp(entry)
        for part in entry.parent.glob(f".{entry.name}.part*"):  # torchrun shards: written under this lock only
            part.unlink(missing_ok=True)
        if not entry.exists():
            # Removed while held. A process that opened the old lock file just before
            # may then lock that unlinked file while a newcomer locks a new one: both
            # extract the entry and rename it into place, whole; the cost is the work.
            lock_file(entry).unlink(missing_ok=True)
    finally:
        lock.release()
    return True


# --- text ----------------------------------------------------------------------------------
def _short(digest: str | None) -> str:
    return (digest or "?").rsplit(":", 1)[-1][:8]


def key_summary(key: dict | None) -> str:
    """A cache key in a few words: backbone, input size, views and tuned blocks (or
    pooled), precision, weights, the rows' ids digest (its first 8 hex digits)."""
    if key is None:
        return "unreadable (no key)"
    parts = [str(key.get("backbone", "?")), f"{key.get('image_size', '?')} px"]
    views, tune = key.get("views"), key.get("tune_blocks")
    if views is None and tune is None:
        parts.append("pooled")
    else:
        parts += [f"{views} view{'' if views == 1 else 's'}", f"tune {tune}" if tune else "pooled"]
    parts.append(str(key.get("precision", "?")))
    if key.get("weights_file"):
        parts.append(f"weights {_short(key['weights_file'])}")
    else:
        parts.append("pretrained" if key.get("pretrained") else "random init")
    parts.append(f"ids {_short(key.get('ids'))}")
    return ", ".join(parts)


def human_size(n: int) -> str:
    """Bytes in binary units, one decimal: ``0 B``, ``512 B``, ``1.5 KiB``, ``188.0 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def created_text(created: str | None) -> str:
    """``2026-01-02T03:04:05+0000`` -> ``2026-01-02 03:04`` (as recorded, its own zone)."""
    return created[:16].replace("T", " ") if created else "?"
