"""Helpers shared by the dataset readers."""

from __future__ import annotations

import posixpath
from pathlib import Path

from retdmctl.errors import InputError


def safe_join(root: Path, relative: str) -> Path | None:
    """``root / relative``, or None when it would leave ``root`` (``../``, absolute
    paths, symlinks pointing outside). A dataset file never gets to name a path
    outside its dataset's root."""
    if not relative or relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        return None
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        return None
    return candidate


def image_key(relative: str) -> str:
    """The id of an image listed as ``relative``: its normalised path, so that one file
    listed as ``n1.jpg``, ``./n1.jpg``, ``.//n1.jpg`` or ``sub/../n1.jpg`` is one image
    (the duplicates are skipped by name), never several that may land in train and test."""
    return posixpath.normpath(relative.strip())


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    if not path.is_dir():
        raise InputError(f"{path}: {what} is not a folder")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a file")
    return path
