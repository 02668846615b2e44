"""Helpers shared by the dataset readers."""

from __future__ import annotations

import codecs
import functools
import io
import os
import posixpath
from pathlib import Path

from retdmctl.errors import InputError


@functools.lru_cache(maxsize=64)
def _realpath(root: str) -> str:
    """A dataset root's real path, once per root (it is asked once per listed image)."""
    return os.path.realpath(root)


def safe_join(root: Path, relative: str) -> Path | None:
    """``root / relative``, or None when it would leave ``root`` (``../``, absolute
    paths, symlinks pointing outside). A dataset file never gets to name a path
    outside its dataset's root."""
    if not relative or relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        return None
    # os.path on strings: this runs once per listed image, and ingest's up-to-date check
    # reads the labels again (10^5 images: pathlib's resolve() took seconds)
    base = _realpath(str(root))
    candidate = os.path.realpath(os.path.join(base, relative))
    if candidate != base and not candidate.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return Path(candidate)


def image_key(relative: str) -> str:
    """The id of an image listed as ``relative``: its normalised path, so that one file
    listed as ``n1.jpg``, ``./n1.jpg``, ``.//n1.jpg`` or ``sub/../n1.jpg`` is one image
    (the duplicates are skipped by name), never several that may land in train and test."""
    return posixpath.normpath(relative.strip())


def open_text(path: Path) -> io.StringIO:
    """A label file's text, for ``csv.reader``: UTF-8 (a BOM is fine), or UTF-16 when it
    starts with a UTF-16 BOM (what spreadsheet programs write as "Unicode text"). Any other
    encoding (Latin-1, ...) is one error naming the line of the first byte that is not
    UTF-8."""
    raw = path.read_bytes()
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    if not utf16 and b"\0" in raw:  # csv refuses NUL: UTF-16 without its byte order mark
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: NUL bytes (UTF-16 without a byte order mark?); save it as UTF-8")
    try:
        return io.StringIO(raw.decode("utf-16" if utf16 else "utf-8-sig"), newline="")
    except UnicodeDecodeError as exc:
        if utf16:
            raise InputError(f"{path}: not valid UTF-16 although it starts with a UTF-16 byte order mark") from None
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save it as UTF-8 (e.g. Latin-1 is not read)"
        ) from None


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
