"""The experiment log: each training stage's per-epoch history as CSV, and TensorBoard
event files when the ``tracking`` extra (tensorboard) is installed.

Where it goes, for a workspace ``W``:

- ``W/<stage>/history.partial.csv``: rewritten (atomically) after every epoch while the
  stage trains, so an interrupted run shows what it did; a resumed run rewrites it from
  the resume point's history, so the earlier rows stay and none is repeated.
- ``W/<stage>/history.csv``: the final history (with the ``kept`` column), written in the
  stage's transaction beside ``checkpoint.pt`` (they appear together); the partial file
  is removed then. It is a view of the checkpoint's ``history``, not a stage output: it is
  not fingerprinted, so deleting or editing it never makes the stage stale.
- ``W/runs/<stage>/``: TensorBoard scalars per epoch (``train/<loss>``, ``val/loss``,
  ``val/mAP``, ``lr``; step = epoch). Each run of the stage starts the folder over; a
  resumed run first logs again the epochs of its resume point, so nothing a killed run
  logged after it remains and no epoch appears twice.
- ``W/runs/eval/<split>/``: ``retdmctl eval``'s 12 metrics (``eval/<metric>``), written
  once the eval stage has committed, replacing the previous eval of that split.

``tensorboard --logdir W/runs`` shows them all. Without tensorboard installed only the
CSV files are written. Under torchrun only rank 0 writes. Nothing here reads or changes
any random state: the trained numbers are the same with and without the log.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retdmctl import distributed
from retdmctl.atomic import after_commit, remove, remove_stale_tmp, write_text_atomic

HISTORY = "history.csv"
PARTIAL = "history.partial.csv"
RUNS = "runs"


def history_csv(history: Iterable[dict[str, Any]]) -> str:
    """The records as CSV: one row per epoch, the columns in the order they first
    appear (``epoch`` first); a value a record lacks (or None) is an empty cell. Floats
    are written as Python's shortest round-trip repr, so ``float(cell)`` gives them back."""
    records = list(history)
    columns: dict[str, None] = {"epoch": None} if records else {}
    for record in records:
        columns.update(dict.fromkeys(record))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow(["" if record.get(c) is None else record[c] for c in columns])
    return out.getvalue()


def read_history(path: Path) -> list[dict[str, Any]]:
    """A ``history.csv`` read back: ``epoch`` as int, ``kept`` as bool, the rest as
    floats; empty cells are left out of their record."""
    records = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            record: dict[str, Any] = {}
            for key, cell in row.items():
                if cell == "":
                    continue
                record[key] = int(cell) if key == "epoch" else (cell == "True") if key == "kept" else float(cell)
            records.append(record)
    return records


def runs_dir(root: Path) -> Path:
    """The workspace's TensorBoard logdir (``tensorboard --logdir`` it)."""
    return Path(root) / RUNS


def tensorboard_available() -> bool:
    """Whether the tensorboard package (the ``tracking`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def summary_writer(logdir: Path):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``logdir``, or None when the
    tensorboard package is not installed (``pip install 'retdmctl[tracking]'``)."""
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(logdir))


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """A history record's TensorBoard tags: ``train_total`` -> ``train/total``,
    ``val_mAP`` -> ``val/mAP``, ``lr`` as it is; ``epoch`` and ``kept`` are not scalars."""
    tags = {}
    for key, value in record.items():
        if key in ("epoch", "kept") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        prefix, _, rest = key.partition("_")
        tags[f"{prefix}/{rest}" if prefix in ("train", "val") and rest else key] = float(value)
    return tags


class EpochLog:
    """The log of one training stage while it trains (rank 0 writes; the other ranks
    hold an inert log). ``history``: the records a resumed run starts from (empty for a
    fresh start). Either way the stage's TensorBoard folder starts over with exactly
    those records and the partial CSV holds exactly them: what a killed run logged after
    its resume point is gone, and no epoch appears twice."""

    def __init__(self, stage_dir: Path, name: str, history: list[dict[str, Any]]) -> None:
        self.partial = stage_dir / PARTIAL
        self.logdir = runs_dir(stage_dir.parent) / name
        self.writer = None
        if not distributed.is_main():
            return
        remove(self.logdir)
        self.writer = summary_writer(self.logdir)
        if history:
            write_text_atomic(self.partial, history_csv(history), defer=False)
        else:
            remove(self.partial)
        for record in history:
            self._log(record)
        self._flush()

    def epoch(self, history: list[dict[str, Any]]) -> None:
        """After an epoch: the partial CSV rewritten with every record so far, the last
        record's scalars logged and flushed."""
        if not distributed.is_main():
            return
        write_text_atomic(self.partial, history_csv(history), defer=False)
        if history:
            self._log(history[-1])
        self._flush()

    def _log(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            for tag, value in _scalars(record).items():
                self.writer.add_scalar(tag, value, global_step=int(record["epoch"]))

    def _flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def remove_leftovers(stage_dir: Path) -> None:
    """What a killed writer of the stage's CSV files left behind (their temporary files)."""
    for name in (HISTORY, PARTIAL):
        remove_stale_tmp(stage_dir / name)


def write_history(stage_dir: Path, history: list[dict[str, Any]]) -> None:
    """The final ``history.csv`` (in the current transaction: it appears with the
    checkpoint); the partial CSV is removed once the transaction has committed."""
    write_text_atomic(stage_dir / HISTORY, history_csv(history))
    after_commit(lambda: remove(stage_dir / PARTIAL))


def log_eval(root: Path, split: str, metrics: dict[str, float], step: int = 0) -> Path | None:
    """``retdmctl eval``'s metrics as TensorBoard scalars in ``runs/eval/<split>/``
    (the previous eval of that split replaced); the folder, or None without tensorboard."""
    if not tensorboard_available():
        return None
    logdir = runs_dir(root) / "eval" / split
    remove(logdir)
    writer = summary_writer(logdir)
    try:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"eval/{name}", float(value), global_step=step)
    finally:
        writer.close()
    return logdir
