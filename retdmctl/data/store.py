"""The LMDB image store: encoded image bytes keyed by the SHA-256 digest of the image id.

LMDB rejects keys over 511 bytes, and an image id is a relative path that may be longer
(deeply nested folders); the fixed-size digest never is. The ids themselves live in
``dataset.h5``. :func:`store_key` is the only place that maps an id to its key.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

import lmdb

_INITIAL_MAP = 1 << 30  # 1 GiB; doubled whenever a write finds it full
_LMDB_MAX_KEY = 511


def store_key(image_id: str) -> bytes:
    """The LMDB key of an image id: the 32-byte SHA-256 digest of its utf-8 bytes."""
    return hashlib.sha256(image_id.encode()).digest()


def read_keys(path: Path) -> set[bytes]:
    """The keys of a finished store, read without writing anything to it (no lock file,
    no map change): its files stay byte-identical."""
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    try:
        with env.begin() as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}
    finally:
        env.close()


def records_digest(path: Path) -> str:
    """A hash of a finished store's records (key and bytes, in key order): the same for
    two stores that hold the same images, however their pages were laid out (two ingests
    of one dataset write different ``data.mdb`` files). Read without writing anything,
    reopening the store every :data:`ImageReader.REMAP_BYTES` read (see
    :class:`ImageReader`): a pass over the whole store never holds all of it mapped."""
    digest = hashlib.sha256()
    after: bytes | None = None  # the last key hashed
    while True:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
        try:
            with env.begin() as txn:
                cursor = txn.cursor()
                found = cursor.first() if after is None else cursor.set_range(after)
                if found and after is not None and cursor.key() == after:
                    found = cursor.next()
                mapped = 0
                while found and mapped < ImageReader.REMAP_BYTES:
                    key, value = cursor.key(), cursor.value()
                    digest.update(bytes(key) + len(value).to_bytes(8, "little"))
                    digest.update(value)
                    mapped += len(value)
                    after = bytes(key)
                    found = cursor.next()
        finally:
            env.close()
        if not found:
            return "records:" + digest.hexdigest()

class ImageWriter:
    """Appends images in transactions; the map grows as needed. Committed writes survive
    a kill -9, which is what makes ingest resumable."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=_INITIAL_MAP, subdir=True, metasync=False)
        if self.env.info()["map_size"] < _INITIAL_MAP:
            self.env.set_mapsize(_INITIAL_MAP)

    def keys(self) -> set[bytes]:
        """The stored keys (digests, see :func:`store_key`)."""
        with self.env.begin() as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Store ``(image id, bytes)`` pairs in one transaction."""
        items = [(store_key(image_id), value) for image_id, value in items]
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def delete(self, keys: Iterable[bytes]) -> None:
        """Remove entries by key (digest)."""
        with self.env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


class ImageReader:
    """Read-only access; opens lazily so that it can be shared with DataLoader workers.

    LMDB reads through a memory map, and every page read stays mapped, counted in the
    process's resident memory, until the environment is closed: one pass over a store
    would hold all of it. So the environment is closed, and reopened on the next read,
    after every :data:`REMAP_BYTES` read: the pages stay in the OS page cache (a second
    pass still reads from memory), not in this process. A lock keeps a read and that
    close apart where threads share a reader (the device path's prefetch thread)."""

    REMAP_BYTES = 256 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env: lmdb.Environment | None = None
        self._mapped = 0  # bytes read since the environment was opened
        self._lock = threading.Lock()

    def _open(self) -> lmdb.Environment:
        if self._env is None:
            self._env = lmdb.open(
                str(self.path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True
            )
        return self._env

    def get(self, image_id: str) -> bytes:
        """The stored bytes of an image id. Stores written before ids were hashed keyed
        the id itself: that key is tried when the digest is absent."""
        with self._lock:
            with self._open().begin() as txn:
                value = txn.get(store_key(image_id))
                if value is None:
                    legacy = image_id.encode()
                    if 0 < len(legacy) <= _LMDB_MAX_KEY:
                        value = txn.get(legacy)
                if value is not None:
                    value = bytes(value)  # a copy: the map may be closed below
            if value is None:
                raise KeyError(image_id)
            self._mapped += len(value)
            if self._mapped >= self.REMAP_BYTES:
                self._close()
        return value

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        self._mapped = 0
