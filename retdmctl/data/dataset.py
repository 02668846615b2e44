"""``dataset.h5``: image ids, the uint8 label matrix, class names and split indices, and
optionally ``known``: a boolean (N, L) matrix, False where a label is unknown for an image
(neither positive nor negative; ``?name`` in a csv label file). It is absent when every
label is known.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from retdmctl import __version__
from retdmctl.config import SPLITS
from retdmctl.errors import InputError
from retdmctl.workspace import atomic_path, now_iso

_FIX = {
    "train": "re-run ingest with a smaller --val-fraction or --test-fraction, or more images",
    "val": "re-run ingest with a larger --val-fraction or more images",
    "test": "re-run ingest with a larger --test-fraction or more images",
}


@dataclass
class DatasetInfo:
    ids: list[str]
    labels: np.ndarray  # (N, L) uint8; 0 where a label is unknown
    class_names: list[str]
    splits: dict[str, np.ndarray]  # split name -> sorted int64 row indices
    known: np.ndarray | None = None  # (N, L) bool, False = unknown; None = all known

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> np.ndarray:
        return self.splits[name]

    @property
    def ids_digest(self) -> str:
        """:func:`ids_digest` of this dataset's ordered ids."""
        return ids_digest(self.ids)

    def observed(self) -> np.ndarray:
        """The labels as int8: 1 positive, 0 negative, -1 unknown."""
        out = self.labels.astype(np.int8)
        if self.known is not None:
            out[~self.known] = -1
        return out

    def known_at(self, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), L) bool, False where a label of that row is unknown; None when
        every one of them is known. Metrics and thresholds leave unknown entries out."""
        if self.known is None:
            return None
        known = self.known[np.asarray(rows)]
        return None if known.all() else known

    def unknown_count(self, rows: np.ndarray) -> tuple[int, int]:
        """(unknown label entries, images with one) among ``rows``."""
        known = self.known_at(rows)
        if known is None:
            return 0, 0
        return int((~known).sum()), int((~known).any(axis=1).sum())

    def require_nonempty(self, *names: str) -> None:
        """Raise InputError naming the first of the given splits (default: all three)
        that holds no image, and how to fix it."""
        for name in names or SPLITS:
            if name not in SPLITS:
                raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
            if len(self.splits[name]) == 0:
                raise InputError(f"the {name} split of the dataset is empty ({len(self.ids)} images): {_FIX[name]}")


def ids_digest(ids: list[str]) -> str:
    """The hash of the ordered image ids: what a file of per-row data (a backbone cache,
    ``features.h5``, ``scores.h5``, the neighbour vote's bank rows) was written for. Row i
    of such a file is the image ``ids[i]`` only while this hash is the one of ``dataset.h5``
    (a re-ingest may reorder the rows of the same images)."""
    # NUL-separated (no id holds one): one pass, milliseconds at 10^5 images
    return "sha256:" + hashlib.sha256("\0".join(ids).encode("utf-8")).hexdigest()


def ids_mismatch(stored: str | None, ids: str) -> str | None:
    """Why a file that recorded the :func:`ids_digest` ``stored`` cannot be read as the
    rows of the dataset whose digest is ``ids`` (the words after its name), or None."""
    if stored == ids:
        return None
    if stored is None:
        return "records no image list (written by an older version)"
    return "was written for another image list than the dataset's (re-ingested since?)"


def write_dataset(path: Path, info: DatasetInfo, *, source: str, config: dict) -> None:
    str_dt = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("ids", data=np.array(info.ids, dtype=object), dtype=str_dt)
        h5.create_dataset("labels", data=info.labels.astype(np.uint8), compression="gzip")
        h5.create_dataset("class_names", data=np.array(info.class_names, dtype=object), dtype=str_dt)
        for name in SPLITS:
            h5.create_dataset(f"splits/{name}", data=np.sort(info.splits[name]).astype(np.int64))
        if info.known is not None and not info.known.all():
            h5.create_dataset("known", data=info.known.astype(bool), compression="gzip")
        h5.attrs.update(
            {"source": source, "config": json.dumps(config), "version": __version__, "created": now_iso(),
             "ids_digest": ids_digest(info.ids)}
        )


def read_dataset(path: Path) -> DatasetInfo:
    with h5py.File(path, "r") as h5:
        return DatasetInfo(
            ids=[s.decode() if isinstance(s, bytes) else s for s in h5["ids"][()]],
            labels=h5["labels"][()],
            class_names=[s.decode() if isinstance(s, bytes) else s for s in h5["class_names"][()]],
            splits={name: h5[f"splits/{name}"][()] for name in SPLITS},
            known=h5["known"][()].astype(bool) if "known" in h5 else None,
        )


def random_splits(
    n: int, *, seed: int, test_fraction: float, val_fraction: float, test: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Seeded train/val/test row indices.

    Without ``test``: a permutation of the rows, the first part for training and the last
    ``test_fraction`` for test. With ``test`` (an official split): it is kept as is. In
    both cases val is ``val_fraction`` of the training rows, drawn with the same seed."""
    rng = np.random.default_rng(seed)
    if test is None:
        perm = rng.permutation(n)
        n_train = n - int(round(n * test_fraction))
        # The reference protocol (scene: default_rng(seed).permutation(2000), first 1600
        # train) takes the *first* part of the permutation for training.
        train_pool, test = perm[:n_train], perm[n_train:]
    else:
        mask = np.ones(n, bool)
        mask[test] = False
        train_pool = np.flatnonzero(mask)
    n_val = int(round(len(train_pool) * val_fraction))
    val_rng = np.random.default_rng([seed, 1])
    shuffled = val_rng.permutation(train_pool)
    return {
        "train": np.sort(shuffled[n_val:]),
        "val": np.sort(shuffled[:n_val]),
        "test": np.sort(np.asarray(test)),
    }
