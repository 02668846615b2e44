"""The user cache shared by every workspace: content-addressed files (a frozen backbone's
features or views) that depend only on what their key names, never on the workspace that
made them. A variant of a run in another workspace reuses them instead of extracting again.

Where: ``$RETDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/retdmctl``, else ``~/.cache/retdmctl``
(the convention torch hub and Hugging Face follow). An entry is written under a temporary
name and renamed into place (:func:`retdmctl.atomic.atomic_path`), so a reader never sees
half a file; writers of one entry take its lock (``ENTRY.lock``) first, so two workspaces
extracting the same features at once do it once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from retdmctl.atomic import remove_stale_tmp


def cache_root() -> Path:
    """The shared cache directory (read from the environment at each call)."""
    if os.environ.get("RETDM_CACHE_DIR"):
        return Path(os.environ["RETDM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "retdmctl"


def display(path: Path) -> str:
    """``path`` with the home directory written as ``~``."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except (ValueError, RuntimeError):  # elsewhere, or no home directory known
        return str(path)


@contextlib.contextmanager
def entry_lock(path: Path, console=None) -> Iterator[None]:
    """Hold the writer lock of the cache entry ``path`` (waiting for another writer, and
    saying so), with what a killed writer left behind removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another process is writing this entry
        if console is not None:
            console.print(f"waiting for another process writing {display(path)}", soft_wrap=True)
        lock.acquire()
    try:
        remove_stale_tmp(path)
        yield
    finally:
        lock.release()
