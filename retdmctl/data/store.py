"""The LMDB image store: encoded image bytes keyed by a stable image id (utf-8)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import lmdb

_INITIAL_MAP = 1 << 30  # 1 GiB; doubled whenever a write finds it full


class ImageWriter:
    """Appends images in transactions; the map grows as needed. Committed writes survive
    a kill -9, which is what makes ingest resumable."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=_INITIAL_MAP, subdir=True, metasync=False)
        if self.env.info()["map_size"] < _INITIAL_MAP:
            self.env.set_mapsize(_INITIAL_MAP)

    def keys(self) -> set[str]:
        with self.env.begin() as txn:
            return {bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False)}

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        items = list(items)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key.encode(), value)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


class ImageReader:
    """Read-only access; opens lazily so that it can be shared with DataLoader workers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env: lmdb.Environment | None = None

    def _open(self) -> lmdb.Environment:
        if self._env is None:
            self._env = lmdb.open(
                str(self.path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True
            )
        return self._env

    def get(self, key: str) -> bytes:
        with self._open().begin() as txn:
            value = txn.get(key.encode())
        if value is None:
            raise KeyError(key)
        return bytes(value)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_env": None}

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
