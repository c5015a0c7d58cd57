"""Typical devices and links, used by both the emulation harness and the simulator.

Devices are the planner's device classes (``llnode.plan.synthetic.DEVICE_CLASSES``: a laptop at
~27 GFLOP/s of SmolLM2 decode, phones a fraction of it); here each also gets the CPU quota that makes
one core of *this* machine behave like it (the laptop class = one full core), so the harness can run
"a flagship phone and an old one" for real and the simulator can draw the same devices by the
thousand. Links are Wi-Fi classes by their usable throughput and round trip.

A class also pays what every stage step costs beyond its modules (:class:`StepCosts`, measured on one
core here): the daemon's own CPU per step, scaled by the class's *core* (its quota: the daemon is one
interpreter thread, which a phone runs at its core's speed, not at the FLOP rate its onnxruntime
threads reach together), and a fused run's fixed cost, scaled like the modules it is measured with.
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
    def core(self) -> float:
        """The class's speed as a share of one core of this machine (the laptop class is one core)."""
        return self.gflops / _REFERENCE_GFLOPS

    @property
    def quota(self) -> float:
        """Share of one core of this machine that emulates the class (cgroup CPU quota)."""
        return round(min(1.0, self.core), 2)


@dataclass(frozen=True)
class StepCosts:
    """What a stage step costs beyond its modules' bodies on one core of this machine (measured).

    ``own_s``: the daemon's CPU per step outside the modules (``DaemonCpu.own_s()``, one session, not
    the entry: what the planner charges). ``call_s``: the fixed CPU of one ``session.run``
    (``ModuleCosts.call_s[0]``), measured at ``reference_flops_per_s`` with the module costs it belongs
    to; ``fuse_block``: the modules one run holds. Why a device class needs them: with both at zero the
    planner of the scale study priced a stage by its modules alone, so twelve one-module stages on
    phones looked as good as four, while every step of a real daemon pays ~1.5 ms on a core here."""

    own_s: float
    call_s: float
    reference_flops_per_s: float
    fuse_block: int = 1


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


def device_profile(
    cls: DeviceClass,
    device_id: str,
    rng: random.Random | None = None,
    step: StepCosts | None = None,
) -> DeviceProfile:
    """A planner profile of one device of ``cls``, jittered by +-20 % when ``rng`` is given.

    With ``step`` the profile carries the fixed costs the planner prices (``stage_fixed_s``) and the
    simulator charges: the daemon's own CPU per step at the device's core (``own_s / (core x jitter)``:
    a flagship phone 0.52 of a core here pays ~2.8 ms where a core here pays 1.45) and a run's fixed
    cost at its FLOP rate (``call_s x reference / decode speed``, as the simulator scales the measured
    module costs that hold it)."""

    def jit() -> float:
        return rng.uniform(0.8, 1.2) if rng is not None else 1.0

    speed = jit()
    decode = cls.gflops * 1e9 * speed
    own = call = 0.0
    block = 1
    if step is not None:
        own = step.own_s / (cls.core * speed)
        call = step.call_s * step.reference_flops_per_s / decode
        block = max(1, step.fuse_block)
    return DeviceProfile(
        device_id=device_id,
        name=device_id,
        decode_flops_per_s=decode,
        prefill_flops_per_s=cls.gflops * 4e9 * jit(),
        memory_available_bytes=int(cls.memory_gib * GB * jit()),
        battery_pct=None,  # the simulator studies placement, not the battery rule
        step_overhead_s=own,
        call_overhead_s=call,
        fuse_block=block,
    )


def own_cpu_scale(profile: DeviceProfile, step: StepCosts) -> float:
    """Seconds of the device per second of the daemon's own CPU on a core here: what the simulator
    multiplies ``DaemonCpu`` by (``Simulator(own_scale=...)``), read back from the profile's
    ``step_overhead_s`` so that planner and simulator charge the same."""
    return profile.step_overhead_s / step.own_s if step.own_s > 0 else 0.0


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
    step: StepCosts | None = None,
) -> Fleet:
    """``n`` devices drawn from the classes with the given weights (default: an office of laptops,
    boxes and phones on mostly decent Wi-Fi), with the fixed costs of ``step`` (:func:`device_profile`)."""
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
        dev = device_profile(cls, f"{cls.name}-{i}", rng, step)
        devices.append(dev)
        links[dev.device_id] = LINKS[rng.choices(lnames, lw)[0]]
    return Fleet(devices, links)
