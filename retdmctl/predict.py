"""Labels for new images: expanding the inputs, batched scoring, and the output formats.

Inputs may be image files, folders (searched recursively for image files), glob patterns
(``photos/**/*.jpg``) or ``@list.txt`` (one path, folder or pattern a line; blank lines
and lines starting with ``#`` are ignored; relative paths are relative to the current
directory). A file that cannot be read or decoded is reported on stderr (one line) and
skipped, never fatal.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from retdmctl.errors import RetdmError
from retdmctl.inference import Predictor

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
GLOB_CHARS = frozenset("*?[")


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Prediction:
    path: str
    scores: np.ndarray  # (L,) probabilities
    labels: list[tuple[str, float]]  # predicted (name, score), best first


def expand_inputs(items: list[str]) -> tuple[list[Path], list[Skipped]]:
    """Files to score, in order and without duplicates, plus the inputs that name nothing."""
    files: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    def expand(item: str, depth: int = 0) -> None:
        if item.startswith("@") and depth == 0:
            list_file = Path(item[1:])
            try:
                lines = list_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                skipped.append(Skipped(item, f"cannot read the list file: {exc.strerror or exc}"))
                return
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    expand(line, depth + 1)
            return
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                skipped.append(Skipped(item, "folder holds no image files"))
            for p in found:
                add(p)
        elif path.is_file():
            add(path)  # named explicitly: tried whatever its suffix
        elif GLOB_CHARS & set(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                skipped.append(Skipped(item, "pattern matches no file"))
            for p in found:
                add(p)
        else:
            skipped.append(Skipped(item, "no such file or folder"))

    for item in items:
        expand(item)
    return files, skipped


def _load(predictor: Predictor, path: Path) -> torch.Tensor | str:
    """The preprocessed tensor, or why the file cannot be used."""
    from PIL import UnidentifiedImageError

    try:
        return predictor.preprocess.load(path)
    except UnidentifiedImageError:
        return "not an image file (its format is not recognised)"
    except IsADirectoryError:
        return "is a folder"
    except OSError as exc:  # unreadable, not an image (PIL.UnidentifiedImageError), truncated
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return reason.replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(exc).__name__
    except Exception as exc:  # decoder bugs on hostile files: skip, never crash the run
        return f"cannot decode ({type(exc).__name__})"


def progress_bar(total: int, description: str) -> Progress:
    """A transient bar on stderr; silent when RETDM_NO_PROGRESS is set or stderr is no tty."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=bool(os.environ.get("RETDM_NO_PROGRESS")) or total < 2,
    )


def predict_files(
    predictor: Predictor,
    files: list[Path],
    *,
    batch_size: int = 32,
    thresholds: np.ndarray | None = None,
    top_k: int = 0,
    on_skip: Callable[[Skipped], None] | None = None,
) -> Iterator[Prediction | Skipped]:
    """Score ``files`` in batches; yields a Prediction or a Skipped for each, in order."""
    if batch_size < 1:
        raise RetdmError(f"--batch-size must be at least 1, got {batch_size}")
    thr = predictor.thresholds if thresholds is None else thresholds
    names = predictor.class_names
    with progress_bar(len(files), "predicting") as progress:
        task = progress.add_task("predicting", total=len(files))
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            loaded = [(p, _load(predictor, p)) for p in chunk]
            good = [(p, x) for p, x in loaded if isinstance(x, torch.Tensor)]
            probs = predictor.predict_tensor(torch.stack([x for _, x in good])) if good else np.zeros((0, len(names)))
            by_path = {id(p): row for (p, _), row in zip(good, probs)}
            for p, x in loaded:
                if not isinstance(x, torch.Tensor):
                    skip = Skipped(str(p), x)
                    if on_skip:
                        on_skip(skip)
                    yield skip
                    continue
                row = by_path[id(p)]
                order = [int(i) for i in np.argsort(-row, kind="stable") if row[i] >= thr[i]]
                if top_k > 0:
                    order = order[:top_k]
                yield Prediction(str(p), row, [(names[i], float(row[i])) for i in order])
            progress.advance(task, len(chunk))


# --- output formats ----------------------------------------------------------------------


def jsonl_line(pred: Prediction, class_names: list[str]) -> str:
    return json.dumps(
        {
            "path": pred.path,
            "labels": [name for name, _ in pred.labels],
            "scores": {name: round(float(s), 6) for name, s in zip(class_names, pred.scores)},
        },
        ensure_ascii=False,
    )


def csv_header(class_names: list[str]) -> list[str]:
    return ["path", "labels", *class_names]


def csv_row(pred: Prediction) -> list[str]:
    return [pred.path, ";".join(name for name, _ in pred.labels), *(f"{float(s):.6f}" for s in pred.scores)]


def table(preds: list[Prediction], title: str) -> Table:
    t = Table(title=escape(title))
    t.add_column("image", overflow="fold")
    t.add_column("labels (score)")
    t.add_column("best score", justify="right")
    for pred in preds:
        if pred.labels:
            labels = escape(", ".join(f"{name} ({s:.3f})" for name, s in pred.labels))
        else:
            labels = "[dim]none above threshold[/]"
        best = int(np.argmax(pred.scores)) if len(pred.scores) else None
        t.add_row(escape(pred.path), labels, "" if best is None else f"{float(pred.scores[best]):.3f}")
    return t


def write_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
