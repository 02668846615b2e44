"""The C allocator's settings for CPU work (no torch import: the CLI sets them first)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc malloc): True when applied.

    glibc serves every allocation above a threshold (at most 32 MiB, adjusted at run
    time) with its own mmap and returns it with munmap when freed. A CNN's activations on
    the CPU are tens of MiB each, so every forward pass maps fresh pages and the kernel
    zeroes and faults in each of them again: EfficientNet-Lite0 at 224 px, batch 32 on
    2 cores inferred 26-30 img/s that way and 72-89 img/s with this. (A training step
    raises glibc's threshold as a side effect, which is why inference after training
    looked fast.) Here malloc keeps allocations up to 1 GiB on its heap and never trims
    it; the process's peak memory is what it would be anyway. Off with RETDM_MALLOC=system,
    and a no-op where the C library is not glibc."""
    if os.environ.get("RETDM_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, ctypes.c_int(1 << 30)) and mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))
