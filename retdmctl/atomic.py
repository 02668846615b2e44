"""Atomic writes, and the transaction that makes a stage's outputs appear all at once.

Every artifact is written under a temporary name next to its final path (``.NAME.tmp-PID``),
flushed to disk (fsync) and renamed over the final path. Inside :func:`transaction` the
renames wait until the whole stage has succeeded: a stage that fails or is killed half-way
leaves every previous artifact exactly as it was, never a mix of old and new outputs.

Writes that must survive a kill (a training run's ``resume.pt``) pass ``defer=False``.

Under torchrun only rank 0 writes: the other ranks are marked read-only
(:func:`set_writer`) and any write they attempt is a bug that fails loudly.
``RETDM_WRITE_LOG=FILE`` appends one line per committed file (rank, pid, path): an audit
of who wrote what.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_TMP_MARK = ".tmp-"


@dataclass
class Transaction:
    """Renames (and follow-up actions) that happen only when the stage has succeeded."""

    renames: list[tuple[Path, Path, bool]] = field(default_factory=list)  # (tmp, final, drop_on_abort)
    after: list[Callable[[], None]] = field(default_factory=list)

    def pending(self, path: Path) -> Path | None:
        """The staged temporary file that will replace ``path``, if any."""
        for tmp, final, _ in reversed(self.renames):
            if final == path:
                return tmp
        return None


_WRITER = {"allowed": True}


def set_writer(allowed: bool) -> None:
    """Whether this process may write the workspace (False on torchrun ranks > 0)."""
    _WRITER["allowed"] = allowed


def may_write() -> bool:
    return _WRITER["allowed"]


def _check_writer(path: Path) -> None:
    if not _WRITER["allowed"]:
        raise RuntimeError(f"rank {os.environ.get('RANK', '?')} tried to write {path}: only rank 0 writes")


def _log_write(path: Path) -> None:
    log = os.environ.get("RETDM_WRITE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{os.environ.get('RANK', '0')} {os.getpid()} {path}\n")


_CURRENT: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("retdm_tx", default=None)


@contextlib.contextmanager
def transaction() -> Iterator[Transaction]:
    """Stage every atomic write made inside; commit them together on success."""
    tx = Transaction()
    token = _CURRENT.set(tx)
    try:
        yield tx
    except BaseException:
        _CURRENT.reset(token)
        for tmp, _, drop in tx.renames:
            if drop:
                remove(tmp)
        raise
    _CURRENT.reset(token)
    for tmp, final, _ in tx.renames:
        _replace(tmp, final)
    for action in tx.after:
        action()


def after_commit(action: Callable[[], None]) -> None:
    """Run ``action`` once the current transaction has committed (now, outside one)."""
    tx = _CURRENT.get()
    if tx is None:
        action()
    else:
        tx.after.append(action)


def defer_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` when the transaction commits (now, outside one). On
    abort ``src`` is kept: it is resumable work (an ingest's ``.partial`` store)."""
    _check_writer(dst)
    tx = _CURRENT.get()
    if tx is None:
        _replace(src, dst)
    else:
        tx.renames.append((src, dst, False))


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path, *, defer: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block succeeds, fsync it and
    rename it over ``path`` (at the end of the current transaction unless ``defer`` is
    False). On any exception (Ctrl-C included) the temporary file is removed."""
    _check_writer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    remove(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        remove(tmp)
        raise
    tx = _CURRENT.get()
    if defer and tx is not None:
        tx.renames.append((tmp, path, True))
    else:
        _replace(tmp, path)


def write_text_atomic(path: Path, text: str, *, defer: bool = True) -> None:
    with atomic_path(path, defer=defer) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _replace(tmp: Path, path: Path) -> None:
    _check_writer(path)
    if path.is_dir() and tmp.is_dir():
        remove(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _log_write(path)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for item in path.rglob("*"):
            if item.is_file():
                _fsync_file(item)
        _fsync_dir(path)
    elif path.exists():
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_tmp(path: Path) -> list[Path]:
    """Remove what a killed writer of ``path`` left behind (kill -9 skips cleanup): only
    temporary files whose writing process is no longer alive. Returns what it removed."""
    removed = []
    for leftover in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
        pid = leftover.name.rsplit(_TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        remove(leftover)
        removed.append(leftover)
    return removed


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
