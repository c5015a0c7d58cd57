"""Typical devices and links, used by both the emulation harness and the simulator.

Devices are the planner's device classes (``llnode.plan.synthetic.DEVICE_CLASSES``: a laptop at
~27 GFLOP/s of SmolLM2 decode, phones a fraction of it); here each also gets the CPU quota that makes
one core of *this* machine behave like it (the laptop class = one full core), so the harness can run
"a flagship phone and an old one" for real and the simulator can draw the same devices by the
thousand. Links are Wi-Fi classes by their usable throughput and round trip.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from llnode.plan.synthetic import DEVICE_CLASSES, GB
from llnode.plan.types import DeviceProfile, LinkProfile

_REFERENCE_GFLOPS = DEVICE_CLASSES[0][1]  # the laptop class is one full core here


@dataclass(frozen=True)
class DeviceClass:
    name: str
    gflops: float  # decode GFLOP/s of the class (planner units)
    memory_gib: float
    battery: bool

    @property
    def quota(self) -> float:
        """Share of one core of this machine that emulates the class (cgroup CPU quota)."""
        return round(min(1.0, self.gflops / _REFERENCE_GFLOPS), 2)


@dataclass(frozen=True)
class LinkClass:
    name: str
    mbit: float  # usable throughput, Mbit/s
    rtt_ms: float  # round trip between the device and the access point (device to device: the sum)

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8


DEVICES: dict[str, DeviceClass] = {
    name: DeviceClass(name, gflops, gib, battery=name.endswith("phone"))
    for name, gflops, gib in DEVICE_CLASSES
}

LINKS: dict[str, LinkClass] = {
    "ethernet": LinkClass("ethernet", 940.0, 0.25),
    "wifi6": LinkClass("wifi6", 300.0, 1.0),
    "wifi5": LinkClass("wifi5", 100.0, 1.5),
    "wifi4-congested": LinkClass("wifi4-congested", 10.0, 4.0),
    "wifi-poor": LinkClass("wifi-poor", 2.0, 10.0),
}


def device_profile(cls: DeviceClass, device_id: str, rng: random.Random | None = None) -> DeviceProfile:
    """A planner profile of one device of ``cls``, jittered by +-20 % when ``rng`` is given."""

    def jit() -> float:
        return rng.uniform(0.8, 1.2) if rng is not None else 1.0

    return DeviceProfile(
        device_id=device_id,
        name=device_id,
        decode_flops_per_s=cls.gflops * 1e9 * jit(),
        prefill_flops_per_s=cls.gflops * 4e9 * jit(),
        memory_available_bytes=int(cls.memory_gib * GB * jit()),
        battery_pct=None,  # the simulator studies placement, not the battery rule
    )


@dataclass(frozen=True)
class Fleet:
    """Devices with one Wi-Fi link each (to the access point): a hop a -> b runs at the slower of the
    two links and pays both round-trip halves, as two phones talking through one access point do."""

    devices: list[DeviceProfile]
    link: dict[str, LinkClass]  # device id -> its link to the access point

    def link_profiles(self) -> dict[tuple[str, str], LinkProfile]:
        return pair_links([d.device_id for d in self.devices], self.link)


def pair_links(ids: list[str], link: Mapping[str, LinkClass | None]) -> dict[tuple[str, str], LinkProfile]:
    """The planner's per-pair links between devices on the same access point (O(n^2) profiles: fine
    up to a few thousand devices). An unshaped device (None) is at ethernet speed with no round trip."""
    fast = LinkClass("unshaped", 10_000.0, 0.0)
    out: dict[tuple[str, str], LinkProfile] = {}
    for a in ids:
        la = link.get(a) or fast
        for b in ids:
            if a != b:
                lb = link.get(b) or fast
                out[(a, b)] = LinkProfile(
                    a, b, (la.rtt_ms + lb.rtt_ms) / 1e3, min(la.bytes_per_s, lb.bytes_per_s)
                )
    return out


def draw_fleet(
    n: int,
    rng: random.Random,
    device_mix: dict[str, float] | None = None,
    link_mix: dict[str, float] | None = None,
) -> Fleet:
    """``n`` devices drawn from the classes with the given weights (default: an office of laptops,
    boxes and phones on mostly decent Wi-Fi)."""
    device_mix = device_mix or {
        "laptop": 2,
        "linux-box": 1,
        "flagship-phone": 3,
        "mid-phone": 3,
        "old-phone": 1,
    }
    link_mix = link_mix or {"wifi6": 1, "wifi5": 4, "wifi4-congested": 2, "wifi-poor": 0.5}
    for mix, known in ((device_mix, DEVICES), (link_mix, LINKS)):
        unknown = sorted(set(mix) - set(known))
        if unknown:
            raise ValueError(f"unknown profile(s) {unknown}; known: {sorted(known)}")
    dnames, dw = list(device_mix), list(device_mix.values())
    lnames, lw = list(link_mix), list(link_mix.values())
    devices, links = [], {}
    for i in range(n):
        cls = DEVICES[rng.choices(dnames, dw)[0]]
        dev = device_profile(cls, f"{cls.name}-{i}", rng)
        devices.append(dev)
        links[dev.device_id] = LINKS[rng.choices(lnames, lw)[0]]
    return Fleet(devices, links)
