"""This process's footprint (resident memory, open descriptors, asyncio tasks) and giving freed heap back.

Why trimming is needed: a plan switch builds a new :class:`~llnode.model.runner.ModuleRunner` (hundreds of
MB of onnxruntime sessions) while the old plan's stage still serves, then drops the old one. glibc keeps
what was freed in its arenas instead of returning it to the OS, so every switch left the daemon's RSS
higher: measured with SmolLM2-135M, ten switches between ranges of 11 to 14 modules settled at 733 MB
(peak of one runner 381 MB) without a trim, and went back to 335-388 MB after each with
``malloc_trim(0)`` (docs/faults.md, "Soak"). On a phone the difference is whether the OS kills the daemon.

The readers take a pid so the soak benchmark can watch its child daemons with the same code.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
from functools import lru_cache
from pathlib import Path
from typing import Any


def rss_bytes(pid: int | None = None, *, peak: bool = False) -> int:
    """Resident set size of a process from /proc, now or its peak so far (``peak``: VmHWM); 0 if it is
    gone or /proc is unreadable."""
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def open_fds(pid: int | None = None) -> int:
    """Open file descriptors of a process (-1 if unreadable)."""
    try:
        return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
    except OSError:
        return -1


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (musl, bionic on Android, macOS: nothing to call)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> int:
    """Collect garbage, then return the allocator's free pages to the OS; the bytes of RSS given back.

    Cheap enough for rare events (a plan switch: tens of ms on a 1 GB heap), too slow to call per request.
    Blocking: call it from a worker thread in async code.
    """
    before = rss_bytes()
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return max(0, before - rss_bytes())


def snapshot() -> dict[str, int]:
    """The ``process`` section of /api/status: what a soak watches for leaks on a live node."""
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        tasks = 0
    return {
        "pid": os.getpid(),
        "rss_bytes": rss_bytes(),
        "fds": open_fds(),
        "tasks": tasks,
        "threads": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0,
    }
