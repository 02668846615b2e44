"""Room on disk for a sizeable write (a backbone cache, ``features.h5``, ``scores.h5``),
checked before anything of it is written: a full disk is one line that names what would
make the write fit, never a traceback half-way through an hour's extraction."""

from __future__ import annotations

import shutil
from pathlib import Path

from retdmctl.cache import display
from retdmctl.errors import RetdmError


class NoRoomError(RetdmError):
    """The disk that would hold a write has too little free space for it."""


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem of ``path``, or of its
    nearest existing parent (the directory a write will create may not exist yet). Tests
    replace it to play a full disk."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def spare(nbytes: int) -> int:
    """What a write of ``nbytes`` leaves free on top: 5 % and 100 MB (HDF5's own
    metadata, and room for whatever else writes to the same disk meanwhile)."""
    return nbytes // 20 + 100 * 10**6


def size(nbytes: float) -> str:
    """``nbytes`` for people, in decimal units: 512 B, 61.5 KB, 1.23 GB, 23.1 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(nbytes)} B"


def require_room(directory: Path, nbytes: int, what: str, fix: str) -> None:
    """Refuse (:class:`NoRoomError`, one line) when ``directory``'s disk has less than
    ``nbytes`` and :func:`spare` free. ``what`` says what needs them ("the backbone
    cache"), ``fix`` what would make it fit."""
    free = free_bytes(directory)
    if free < nbytes + spare(nbytes):
        raise NoRoomError(f"{what} needs {size(nbytes)} (and {size(spare(nbytes))} to spare) but "
                          f"{display(Path(directory))} has {size(free)} free: {fix}")


def require_room_in_workspace(directory: Path, nbytes: int, name: str) -> None:
    """:func:`require_room` for a stage's artifact ``name`` (``classifier/features.h5``)."""
    require_room(directory, nbytes, name, "free space on that disk, or use a workspace on a larger one (-w DIR)")
