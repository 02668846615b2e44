"""One writer per workspace.

Every command that writes a workspace holds ``.retdm/lock`` (an OS file lock from the
``filelock`` package, released by the kernel when the process dies, even by kill -9) for
its whole run. Beside it, ``.retdm/lock.json`` says who holds it, so that a second
writer is refused with a message naming the pid and command. Readers (``status``,
opening the report) never take the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from retdmctl.errors import WorkspaceBusyError


def _holder(info_file: Path) -> tuple[str, str]:
    # The holder writes its info right after it takes the lock: give it a moment.
    for _ in range(20):
        try:
            info = json.loads(info_file.read_text())
            return str(info["pid"]), info["command"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    return "?", "unknown command"


def command_line() -> str:
    args = [os.path.basename(sys.argv[0]) or "retdmctl", *sys.argv[1:]]
    if args[0] in ("__main__.py", "-m", "python", "python3"):
        args[0] = "retdmctl"
    return " ".join(args)


@contextlib.contextmanager
def workspace_lock(root: Path, command: str | None = None) -> Iterator[None]:
    """Hold the workspace's writer lock, or raise WorkspaceBusyError at once."""
    state = root / ".retdm"
    state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(state / "lock", timeout=0)
    info_file = state / "lock.json"
    try:
        lock.acquire()
    except Timeout:
        pid, cmd = _holder(info_file)
        raise WorkspaceBusyError(f"workspace {root} is in use by pid {pid} ({cmd})") from None
    try:
        info_file.write_text(json.dumps({"pid": os.getpid(), "command": command or command_line()}))
        yield
    finally:
        info_file.unlink(missing_ok=True)
        lock.release()
