"""Rich progress bars for every loop over data (quiet when RETDM_NO_PROGRESS is set)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def make_progress(*, transient: bool = True, console=None) -> Progress:
    """Bars vanish when done (``transient``): logs keep the lines printed beside them."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        # under torchrun only rank 0 shows bars
        disable=bool(os.environ.get("RETDM_NO_PROGRESS")) or os.environ.get("RANK", "0") != "0",
        transient=transient,
        console=console,
    )


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate ``items`` behind a progress bar."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)
