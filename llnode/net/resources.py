"""What this device offers, as gossiped to the others: cores, CPU limit, memory, battery, shard sets on disk.

The planner needs this to place modules (a phone on 15% battery should get little or nothing), so it is
read cheaply from /proc and /sys, and from ``termux-battery-status`` on Android where /sys is closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any


def memory() -> dict[str, int]:
    """``{"total", "free"}`` bytes from /proc/meminfo (free = MemAvailable); ``{}`` where unreadable."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "MemFree"):
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return {"total": out.get("MemTotal", 0), "free": out.get("MemAvailable", out.get("MemFree", 0))}


def cores() -> int:
    """The cores this process may run on (its affinity mask: a pinned daemon offers only those)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _quota_v1(directory: Path) -> float | None:
    quota, period = _read_int(directory / "cpu.cfs_quota_us"), _read_int(directory / "cpu.cfs_period_us")
    return quota / period if quota is not None and period and quota > 0 else None


def _quota_v2(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _group_quota(mount: Path, group: str, read: Callable[[Path], float | None]) -> float | None:
    """The tightest quota on the way from ``group`` up to the hierarchy's root (a parent's quota limits
    its children too). Inside a container ``/proc/self/cgroup`` may name the host's path while the
    container sees its own group at the mount point: a path that does not exist there is skipped."""
    parts = [p for p in group.strip("/").split("/") if p]
    found = [q for i in range(len(parts), -1, -1) if (q := read(mount.joinpath(*parts[:i]))) is not None]
    return min(found) if found else None


def cpu_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """The CFS quota of this process in cores (0.3: 30 % of one core), or None when unlimited.

    cgroup v1: the group of the ``cpu`` controller (``N:cpu,cpuacct:/path`` in ``/proc/self/cgroup``)
    under ``root/cpu`` or ``root/cpu,cpuacct``, ``cpu.cfs_quota_us / cpu.cfs_period_us``; cgroup v2:
    ``cpu.max`` of the unified group (``0::/path``). Why it matters: a device under a quota that is given
    little work runs its bursts at full speed, so its step time says nothing of what it can sustain
    (the JVM's container support and Go's automaxprocs read the same files). A few small reads: cheap
    enough to re-read every second, as a quota can change while the daemon runs.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        _, controllers, group = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            q = _group_quota(root, group, _quota_v2)
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]
            mount = next((m for m in mounts if m.is_dir()), None)
            q = None if mount is None else _group_quota(mount, group, _quota_v1)
        else:
            continue
        if q is not None:
            found.append(q)
    return min(found) if found else None


def cpu_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float:
    """Cores of CPU time this process can use per second: its quota, at most its affinity cores.

    On a phone the limit is the cores (thermal throttling shows in step time directly)."""
    quota = cpu_quota(proc_cgroup, root)
    return float(cores()) if quota is None else min(quota, float(cores()))


def battery_sysfs(root: Path = Path("/sys/class/power_supply")) -> dict[str, Any] | None:
    try:
        supplies = sorted(root.iterdir())
    except OSError:
        return None
    for supply in supplies:
        try:
            if (supply / "type").read_text().strip() != "Battery":
                continue
            level = int(float((supply / "capacity").read_text().strip()))
            status = (supply / "status").read_text().strip()
        except (OSError, ValueError):
            continue
        return {"level": level, "charging": status in ("Charging", "Full"), "source": "sysfs"}
    return None


def battery_termux(wait: float = 5.0) -> dict[str, Any] | None:
    """Android closes /sys to apps: Termux:API's ``termux-battery-status`` is the way there. Blocking
    (it can take seconds): call it off the event loop."""
    exe = shutil.which("termux-battery-status")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=wait, check=True).stdout
        data = json.loads(out)
        return {
            "level": int(data["percentage"]),
            "charging": data.get("status") in ("CHARGING", "FULL")
            or data.get("plugged") not in (None, "UNPLUGGED"),
            "source": "termux",
        }
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None


def battery() -> dict[str, Any] | None:
    """``{"level", "charging", "source"}`` from sysfs or Termux, or None on a device without a battery."""
    return battery_sysfs() or battery_termux()


def shard_sets(root: Path) -> dict[str, Any]:
    """Shard sets under ``root`` and which of their modules are present (by manifest, file exists)."""
    out: dict[str, Any] = {}
    try:
        dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return out
    for d in dirs:
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            modules = manifest["modules"]
            present = [m["index"] for m in modules if (d / m["file"]).is_file()]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[d.name] = {
            "name": manifest.get("name", d.name),
            "precision": manifest.get("precision", ""),
            "modules": present,
            "total": len(modules),
        }
    return out


async def snapshot(shards_root: Path) -> dict[str, Any]:
    return {
        "cores": cores(),
        "cpu_limit": round(cpu_limit(), 3),
        "memory": memory(),
        "battery": await asyncio.to_thread(battery),
        "shards": await asyncio.to_thread(shard_sets, shards_root),
    }
