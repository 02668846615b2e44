"""The working directory: where every artifact lives, how it is fingerprinted, and the
manifests that say which stage produced what from which inputs and config.

Fingerprints are content hashes (sha256). Hashing is cached by (size, mtime_ns) in
``.retdm/state.json``, as DVC does, so an up-to-date check costs a ``stat`` per file.
Raw dataset folders (thousands of source images) are fingerprinted by their listing of
names, sizes and mtimes instead of their content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retdmctl import __version__
from retdmctl.config import Config, apply, dump_toml, load_toml

# Files that change without their content changing (LMDB's reader lock table).
_IGNORED_NAMES = {"lock.mdb"}


@dataclass(frozen=True)
class Workspace:
    root: Path

    # --- artifact locations -------------------------------------------------
    @property
    def lmdb(self) -> Path:
        return self.root / "data" / "images.lmdb"

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "dataset.h5"

    @property
    def knn(self) -> Path:
        return self.root / "knn.h5"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def params_file(self) -> Path:
        return self.root / "retdm.toml"

    @property
    def manifests(self) -> Path:
        return self.root / ".retdm" / "manifests"

    @property
    def state_file(self) -> Path:
        return self.root / ".retdm" / "state.json"

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    # --- configuration ------------------------------------------------------
    def load_config(self, config_file: Path | None = None, overrides: dict | None = None) -> Config:
        cfg = Config()
        if self.params_file.exists():
            apply(cfg, load_toml(self.params_file), str(self.params_file))
        if config_file is not None:
            apply(cfg, load_toml(config_file), str(config_file))
        if overrides:
            apply(cfg, overrides, "command line")
        return cfg

    def save_config(self, cfg: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.params_file, dump_toml(cfg))

    # --- manifests ----------------------------------------------------------
    def manifest_path(self, stage: str) -> Path:
        return self.manifests / f"{stage}.json"

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path(stage).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        self.manifests.mkdir(parents=True, exist_ok=True)
        manifest = {"stage": stage, "version": __version__, **manifest}
        write_text_atomic(self.manifest_path(stage), json.dumps(manifest, indent=2, sort_keys=True))

    def drop_manifest(self, stage: str) -> None:
        self.manifest_path(stage).unlink(missing_ok=True)

    # --- fingerprints -------------------------------------------------------
    def fingerprint(self, path: Path, *, content: bool = True) -> str | None:
        """A fingerprint of a file or folder, or None when it does not exist."""
        if not path.exists():
            return None
        state = _State(self.state_file)
        try:
            if path.is_file():
                return state.file_hash(path)
            digest = hashlib.sha256()
            for item in _walk(path):
                rel = item.relative_to(path).as_posix()
                if content:
                    digest.update(f"{rel}\0{state.file_hash(item)}\n".encode())
                else:
                    st = item.stat()
                    digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return ("sha256:" if content else "stat:") + digest.hexdigest()
        finally:
            state.save()


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name not in _IGNORED_NAMES:
                yield Path(dirpath) / name


class _State:
    """Cache of content hashes keyed by path, valid while (size, mtime_ns) match."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dirty = False
        try:
            self.entries: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        value = "sha256:" + digest.hexdigest()
        self.entries[key] = [st.st_size, st.st_mtime_ns, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.entries))


# --- atomic writes ----------------------------------------------------------
def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On any exception (Ctrl-C included) the temporary file or folder is removed, so a
    reader never sees a half-written artifact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            remove(path)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove_stale_tmp(path: Path) -> None:
    """Remove what a killed writer of ``path`` left behind (kill -9 skips cleanup)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        remove(leftover)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
