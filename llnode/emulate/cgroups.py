"""Slow a process down for real: its own cgroup v1 CPU group with a CFS quota.

Why cgroups and not sleeps: a quota throttles every thread of the process (onnxruntime's pool
included) exactly like a slower CPU would, so measured speeds, queues and the planner's reaction are the
real thing. ``cpu.cfs_quota_us / cpu.cfs_period_us`` is the share of ONE core the group may use per
period (0.3 -> 30 % of a core). The quota can be changed while the process runs (drift experiments).

Only cgroup v1 with a writable ``cpu`` hierarchy is supported (``/sys/fs/cgroup/cpu``);
:func:`unavailable_reason` says why not otherwise, so tests can skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class CgroupError(RuntimeError):
    """The CPU group cannot be created, changed or joined (with the reason)."""


def unavailable_reason(root: Path = CPU_ROOT) -> str | None:
    """None when CPU groups with quotas can be used here, else why not."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (needs root)"
    probe = root / f"llnode-probe-{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        (probe / "cpu.cfs_quota_us").write_text(str(PERIOD_US // 2))
    except OSError as exc:
        return f"cannot create a CPU group under {root}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


class CpuGroup:
    """One CPU group; ``quota`` is the fraction of one core (None: unlimited)."""

    def __init__(self, name: str, quota: float | None = None, *, root: Path = CPU_ROOT) -> None:
        if not _NAME.match(name):
            raise CgroupError(f"bad cgroup name {name!r}: letters, digits, '_', '.', '-' only")
        self.root = root
        self.path = root / name
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        except OSError as exc:
            raise CgroupError(f"cannot create CPU group {self.path}: {exc}") from exc
        self.quota: float | None = None
        self.set_quota(quota)

    def set_quota(self, quota: float | None) -> None:
        """Change the limit at once, also while member processes run."""
        if quota is not None and not 0.01 <= quota <= 64:
            raise CgroupError(f"quota must be a fraction of a core in [0.01, 64], got {quota}")
        value = -1 if quota is None else round(quota * PERIOD_US)
        try:
            (self.path / "cpu.cfs_quota_us").write_text(str(value))
        except OSError as exc:
            raise CgroupError(f"cannot set the quota of {self.path}: {exc}") from exc
        self.quota = quota

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group; its future children inherit it."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {exc}") from exc

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def throttled_s(self) -> float:
        """Total time the group was throttled (proof that the quota bites)."""
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "throttled_time":
                    return int(value) / 1e9
        except (OSError, ValueError):
            pass
        return 0.0

    def remove(self) -> None:
        """Move any remaining member back to the root group and delete the group."""
        if not self.path.exists():
            return
        for pid in self.pids():
            with contextlib.suppress(OSError):
                (self.root / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            self.path.rmdir()
