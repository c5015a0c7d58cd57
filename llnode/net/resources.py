"""What this device offers, as gossiped to the others: cores, memory, battery, shard sets on disk.

The planner needs this to place modules (a phone on 15% battery should get little or nothing), so it is
read cheaply from /proc and /sys, and from ``termux-battery-status`` on Android where /sys is closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
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
        "memory": memory(),
        "battery": await asyncio.to_thread(battery),
        "shards": await asyncio.to_thread(shard_sets, shards_root),
    }
