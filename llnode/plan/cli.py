"""``llnode plan``: show the module assignment for a shard set and a set of device profiles.

Device profiles come from a JSON file (format in docs/planner.md)::

    {"devices": [{"device_id": "phone-a", "decode_flops_per_s": 7e9, "memory_available_bytes": 1.5e9,
                  "battery_pct": 60, "charging": false}, ...],
     "links": [{"src": "phone-a", "dst": "laptop", "rtt_s": 0.004, "bandwidth_bytes_per_s": 6e6}, ...],
     "current": {"phone-a": [0, 12], "laptop": [12, 32]}}

``--profile-here`` adds this machine, profiled on the spot with the real modules. Live profiles from a
running cluster are shown by ``llnode status``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llnode.model.manifest import ManifestError, load_manifest
from llnode.plan.solve import solve
from llnode.plan.types import DeviceProfile, LinkProfile, PlanError, PlanInfeasible, PlanOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard set folder (with manifest.json)")
    parser.add_argument("--devices", help="JSON file with devices, links and optionally the current plan")
    parser.add_argument("--profile-here", action="store_true", help="profile this machine and add it")
    parser.add_argument("--objective", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--solver", choices=["auto", "cbc", "highs", "dp", "brute"], default="auto")
    parser.add_argument("--time-limit", type=float, default=10.0, help="MILP time limit, seconds")
    parser.add_argument("--memory-fraction", type=float, default=0.7)
    parser.add_argument("--max-sessions", type=int, default=4)
    parser.add_argument("--max-context", type=int, default=None)
    parser.add_argument("--energy-weight", type=float, default=0.0)
    parser.add_argument("--movement-weight", type=float, default=0.0)
    parser.add_argument("--min-battery", type=float, default=None, help="leave out devices below this %%")
    parser.add_argument("--explain", action="store_true", help="say why each device got what it got")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def load_devices(path: Path) -> tuple[list[DeviceProfile], list[LinkProfile], dict[str, tuple[int, int]]]:
    """Read and validate a devices JSON file; errors name the file and the problem."""
    try:
        data: Any = json.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, list):
        data = {"devices": data}
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise PlanError(f"{path}: expected an object with a 'devices' list")
    unknown = set(data) - {"devices", "links", "current"}
    if unknown:
        raise PlanError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    devices = [DeviceProfile.from_dict(d) for d in data["devices"]]
    links = [LinkProfile.from_dict(lk) for lk in data.get("links", [])]
    current: dict[str, tuple[int, int]] = {}
    for dev, rng in (data.get("current") or {}).items():
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
            raise PlanError(f"{path}: current range of {dev} must be [start, end]")
        current[dev] = (rng[0], rng[1])
    return devices, links, current


def run(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.shards)
        devices: list[DeviceProfile] = []
        links: list[LinkProfile] = []
        current: dict[str, tuple[int, int]] = {}
        if args.devices:
            devices, links, current = load_devices(Path(args.devices))
        if args.profile_here:
            from llnode.plan.profile import profile_device

            here = profile_device(args.shards, manifest, device_id="this-machine")
            print(f"profiled this machine in {here.profile_s:.2f} s", file=sys.stderr)
            devices.append(here)
        if not devices:
            raise PlanError("no devices: pass --devices FILE and/or --profile-here")
        options = PlanOptions(
            objective=args.objective,
            solver=args.solver,
            time_limit_s=args.time_limit,
            memory_fraction=args.memory_fraction,
            max_sessions=args.max_sessions,
            max_context=args.max_context,
            energy_weight=args.energy_weight,
            movement_weight=args.movement_weight,
            min_battery_pct=args.min_battery,
        )
        plan = solve(manifest, devices, links, options, current=current or None)
    except PlanInfeasible as exc:
        print(f"llnode plan: infeasible: {exc}", file=sys.stderr)
        return 3
    except (PlanError, ManifestError) as exc:
        print(f"llnode plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.table())
        if args.explain:
            print()
            print(plan.explain())
    return 0
