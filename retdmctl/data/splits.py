"""How ingest turns the records' official splits into train/val/test rows, and the check
that none of the three ends up empty.

Three cases, decided on everything the reader listed (before any image is decoded):

* ``random``: a record has no official split (scene, csv, mirflickr, demo): a seeded
  ``test_fraction`` of the images is the test split;
* ``carved``: every record's official split is ``train`` (coco128's single
  ``instances_train2017.json``, VOC2012 alone): the test split is carved from it exactly
  as in the ``random`` case;
* ``official``: the source has a test split: it is kept as is.

Val is always ``val_fraction`` of the remaining training rows.
"""

from __future__ import annotations

import numpy as np

from retdmctl.data.dataset import random_splits
from retdmctl.errors import InputError

RANDOM, CARVED, OFFICIAL = "random", "carved", "official"


def split_mode(official: list[str | None]) -> str:
    """``random``, ``carved`` or ``official`` for the records' official splits."""
    if any(s is None for s in official):
        return RANDOM
    if all(s == "train" for s in official):
        return CARVED
    return OFFICIAL


def check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise InputError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value:g}")


def make_splits(
    official: list[str | None], mode: str, *, seed: int, test_fraction: float, val_fraction: float
) -> dict[str, np.ndarray]:
    """Train/val/test row indices for records with these official splits; InputError
    when one of the three would be empty, naming it and how to fix it."""
    check_fraction("test_fraction", test_fraction)
    check_fraction("val_fraction", val_fraction)
    n = len(official)
    if mode == OFFICIAL:
        test = np.array([i for i, s in enumerate(official) if s == "test"], dtype=np.int64)
        if len(test) == 0:
            raise InputError("the test split is empty (no image of the source's test split could be read)")
        if len(test) == n:
            raise InputError("the train split is empty (every image is in the source's test split): add training images")
        splits = random_splits(n, seed=seed, test_fraction=0, val_fraction=val_fraction, test=test)
    else:
        splits = random_splits(n, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction)
        what = f"{n} images x test_fraction {test_fraction:g}"
        if len(splits["test"]) == 0:
            raise InputError(f"the test split is empty ({what} rounds to 0): use a larger --test-fraction or more images")
        if len(splits["train"]) + len(splits["val"]) == 0:
            raise InputError(
                f"the train split is empty ({what} leaves none for training): use a smaller --test-fraction or more images"
            )
    pool = len(splits["train"]) + len(splits["val"])
    what = f"{pool} training images x val_fraction {val_fraction:g}"
    if len(splits["val"]) == 0:
        raise InputError(f"the val split is empty ({what} rounds to 0): use a larger --val-fraction or more images")
    if len(splits["train"]) == 0:
        raise InputError(f"the train split is empty ({what} leaves none): use a smaller --val-fraction or more images")
    return splits


def describe(mode: str, *, seed: int, test_fraction: float) -> str | None:
    """The summary's line about a test split carved from a train-only source, or None."""
    if mode == CARVED:
        return f"no test split in the source: carved {test_fraction * 100:g}% of it (seed {seed}) as test"
    return None
