"""The working directory: where every artifact lives, how it is fingerprinted, and the
manifests that say which stage produced what from which inputs and config.

Fingerprints are content hashes (sha256). Hashing is cached by (size, mtime_ns) in
``.retdm/state.json``, as DVC does, so an up-to-date check costs a ``stat`` per file.
Raw dataset folders (thousands of source images) are fingerprinted by their listing of
names, sizes and mtimes instead of their content.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retdmctl import __version__
from retdmctl.atomic import (  # noqa: F401  (re-exported: the stages import them from here)
    atomic_path,
    may_write,
    remove,
    remove_stale_tmp,
    tmp_name,
    write_text_atomic,
)
from retdmctl.cache import cache_root
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
    def cache_dir(self) -> Path:
        """Content-addressed caches (backbone features): never replaced, only added; one
        directory shared by every workspace (:func:`retdmctl.cache.cache_root`)."""
        return cache_root()

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
        """Write ``cfg`` as retdm.toml: the config as asked for (auto values kept as auto,
        not made concrete)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.params_file, dump_toml(cfg), defer=False)

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
        write_text_atomic(self.manifest_path(stage), json.dumps(manifest, indent=2, sort_keys=True), defer=False)

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

    def derived(self, path: Path, name: str, compute: Callable[[], str]) -> str:
        """``compute()``, a value derived from the file ``path`` (``name`` says which),
        cached in the state file while ``path``'s size, mtime and inode match."""
        state = _State(self.state_file)
        try:
            return state.derived(path, name, compute)
        finally:
            state.save()


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name not in _IGNORED_NAMES:
                yield Path(dirpath) / name


class _State:
    """Cache of content hashes keyed by path, valid while (size, mtime_ns, inode) match."""

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
        # The inode too: an atomic replace makes a new file even within one mtime tick.
        if hit and hit[:2] == [st.st_size, st.st_mtime_ns] and hit[3:] == [st.st_ino]:
            return hit[2]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        value = "sha256:" + digest.hexdigest()
        self.entries[key] = [st.st_size, st.st_mtime_ns, value, st.st_ino]
        self.dirty = True
        return value

    def derived(self, path: Path, name: str, compute: Callable[[], str]) -> str:
        st = path.stat()
        key = f"{name}:{path.resolve()}"
        hit = self.entries.get(key)
        if hit and hit[:2] == [st.st_size, st.st_mtime_ns] and hit[3:] == [st.st_ino]:
            return hit[2]
        value = compute()
        self.entries[key] = [st.st_size, st.st_mtime_ns, value, st.st_ino]
        self.dirty = True
        return value

    def save(self) -> None:
        """Best effort: the cache only saves time, and a reader (``status``) of a
        read-only workspace must still work."""
        if self.dirty and may_write():  # never on torchrun ranks > 0
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.path, json.dumps(self.entries), defer=False)
            except OSError:
                pass


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
