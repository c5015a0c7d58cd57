"""This process's footprint (resident memory, open descriptors, asyncio tasks) and giving freed heap back.

Why trimming is needed: a plan switch builds a new :class:`~llnode.model.runner.ModuleRunner` (hundreds of
MB of onnxruntime sessions) while the old plan's stage still serves, then drops the old one. glibc keeps
what was freed in its arenas instead of returning it to the OS, so every switch left the daemon's RSS
higher: measured with SmolLM2-135M, ten switches between ranges of 11 to 14 modules settled at 733 MB
(peak of one runner 381 MB) without a trim, and went back to 335-388 MB after each with
``malloc_trim(0)`` (docs/faults.md, "Soak"). On a phone the difference is whether the OS kills the daemon.

Why a fixed mmap threshold (:func:`tune_allocator`, applied when this module is imported, i.e. by every
process that imports the runner): glibc raises its mmap threshold to the size of each large block that is
freed (up to 32 MiB), so after the first prefill every activation of onnxruntime (which runs without its
CPU arena) came from the heap, where freed blocks fragment and stay resident. Pinned at 128 KiB, large
blocks are mapped and unmapped on their own. Measured on the int4 SmolLM2 set (135 MiB of modules, 1
thread, side by side): peak RSS of load + a 512-token prefill in 256-token chunks + decode 369-379 -> 296
MiB, RSS afterwards 313-325 -> 249 MiB, decode CPU time equal or lower, prefill CPU time +7 % (fresh pages).

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


def _status(pid: int | None, fields: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB, as bytes; missing ones (process gone, no /proc) are 0."""
    out = dict.fromkeys(fields, 0)
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_bytes(pid: int | None = None, *, peak: bool = False) -> int:
    """Resident set size of a process from /proc, now or its peak so far (``peak``: VmHWM); 0 if it is
    gone or /proc is unreadable."""
    field = "VmHWM" if peak else "VmRSS"
    return _status(pid, (field,))[field]


def memory(pid: int | None = None) -> dict[str, int]:
    """Bytes: ``rss`` and ``peak`` (VmHWM) split as ``anon`` (heap, onnxruntime's prepacked weights,
    activations, KV: what the process really owns) and ``file`` (pages of mapped files: shared libraries'
    code and weights mapped from module files, which the kernel can drop and re-read). WHY the split:
    the two react to different fixes, and only ``anon`` is pressure the OS cannot relieve by itself."""
    st = _status(pid, ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"))
    return {
        "rss": st["VmRSS"],
        "peak": st["VmHWM"],
        "anon": st["RssAnon"],
        "file": st["RssFile"] + st["RssShmem"],
    }


def reset_peak() -> bool:
    """Restart this process's VmHWM from its current RSS (``/proc/self/clear_refs``, Linux >= 4.0); True
    if done. WHY: a benchmark can then tell the peak of a workload from the peak of loading before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int | None = None, tid: int | None = None) -> float | None:
    """User + system CPU seconds a process (all its threads) or one of its threads (``tid``) has used,
    from /proc; None if it is gone or /proc is unreadable (each caller decides what that counts as)."""
    base = f"/proc/{pid or os.getpid()}"
    try:
        fields = Path(base + ("/stat" if tid is None else f"/task/{tid}/stat")).read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def open_fds(pid: int | None = None) -> int:
    """Open file descriptors of a process (-1 if unreadable)."""
    try:
        return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
    except OSError:
        return -1


@lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library if it is glibc (it has ``malloc_trim``), else None (musl, bionic on Android, macOS:
    their allocators neither need nor take these calls)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc


MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def tune_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold (see the module docstring); True if applied. Leaves a threshold the user
    set with ``MALLOC_MMAP_THRESHOLD_`` alone; does nothing off glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def release_memory() -> int:
    """Collect garbage, then return the allocator's free pages to the OS; the bytes of RSS given back.

    Cheap enough for rare events (a plan switch: tens of ms on a 1 GB heap), too slow to call per request.
    Blocking: call it from a worker thread in async code.
    """
    before = rss_bytes()
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
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


tune_allocator()
