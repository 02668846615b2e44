"""Helpers shared by the dataset readers."""

from __future__ import annotations

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
