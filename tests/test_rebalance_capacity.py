"""A device is priced by the capacity it can sustain: max(wall time, CPU time / CPU limit) per token.

Under a CFS quota a device with little work runs its steps in bursts at full speed; its step time then
overstates what it sustains once it gets more work (the drift bench's corrective rebalances measured
-33 % / -22 % against +270 % / +60 % predicted). These tests feed a stage the figures of such a device
(wall and CPU per step as measured under a 30 % quota) and profile real modules under a lowered limit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llnode.emulate.cgroups import CpuGroup, unavailable_reason
from llnode.model.manifest import load_manifest
from llnode.pipeline.metrics import IDLE_GAP_S, StageMetrics
from llnode.pipeline.rebalance import (
    DELIVERED,
    Accepted,
    RebalanceConfig,
    churn_min_gain,
    decide,
    heaviest,
    limit_changed,
    measured_ms,
    measured_profiles,
    remembered,
    undelivered,
)
from llnode.plan import profile as profile_mod
from llnode.plan.costs import ModelCosts
from llnode.plan.profile import profile_device, sustained
from llnode.plan.solve import solve
from llnode.plan.synthetic import synthetic_manifest
from llnode.plan.types import DeviceProfile, PlanOptions

GB = 1024**3


class _Clock:
    """(wall, process CPU) seconds a test advances by hand: the figures of a known device."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 10.0

    def __call__(self) -> tuple[float, float]:
        return self.wall, self.cpu

    def step(self, wall_s: float, cpu_s: float, gap_s: float = 0.0, gap_cpu_s: float = 0.0) -> float:
        """An idle gap, then a step of ``wall_s`` that used ``cpu_s``; returns the step's wall seconds."""
        self.wall += gap_s + wall_s
        self.cpu += gap_cpu_s + cpu_s
        return wall_s


def _stage(limit: list[float]) -> tuple[StageMetrics, _Clock]:
    clock = _Clock()
    return StageMetrics(limit_reader=lambda: limit[0], clock=clock), clock


def test_a_quota_limited_stage_with_little_work_is_priced_by_its_cpu_over_the_limit() -> None:
    limit = [0.3]
    m, clock = _stage(limit)
    m.record(1, clock.step(0.005, 0.005), prefill=False)  # the first step only sets the CPU mark
    for _ in range(20):
        # a light stage: 5 ms steps at full speed (one thread busy), 20 ms apart while it waits
        m.record(1, clock.step(0.005, 0.005, gap_s=0.020, gap_cpu_s=0.0002), prefill=False)
    snap = m.snapshot()
    assert snap["decode_ms_recent"] == pytest.approx(5.0)
    assert snap["cpu_ms"] == pytest.approx(5.2)
    assert snap["cpu_limit"] == 0.3
    # what it sustains when given work back to back: 5.2 ms of CPU per token at 0.3 of a core
    assert snap["sustained_ms_recent"] == pytest.approx(5.2 / 0.3)
    assert snap["sustained_ms"] == pytest.approx(5.2 / 0.3, rel=0.01)
    # the same device without a quota is priced by its wall time
    limit[0] = 2.0
    clock.wall += 1.0  # the cached limit is re-read after LIMIT_EVERY_S
    assert m.snapshot()["sustained_ms_recent"] == pytest.approx(5.0)


def test_cpu_time_while_the_stage_sat_idle_is_not_charged_to_its_tokens() -> None:
    m, clock = _stage([1.0])
    m.record(1, clock.step(0.010, 0.010), prefill=False)
    m.record(1, clock.step(0.010, 0.010), prefill=False)
    # a long idle gap with gossip and HTTP work in it: not a cost of the next token
    m.record(1, clock.step(0.010, 0.010, gap_s=IDLE_GAP_S + 1.0, gap_cpu_s=0.050), prefill=False)
    # prefill chunks take their CPU with them
    m.record(32, clock.step(0.100, 0.100), prefill=True)
    m.record(1, clock.step(0.010, 0.010), prefill=False)
    assert m.recent_cpu_ms() == pytest.approx(10.0)
    # a batch of 4 tokens in one step: CPU per token
    m.record(4, clock.step(0.020, 0.040), prefill=False)
    assert m.recent_cpu_ms() == pytest.approx((10.0 * 2 + 40.0) / 6)


def test_a_quota_cut_shows_in_the_sustained_figure_at_once() -> None:
    """CPU per token does not depend on the quota: the moment the limit drops, the sustained figure
    moves, while the wall time of a stage that still has slack shows nothing yet."""
    limit = [1.0]
    m, clock = _stage(limit)
    for _ in range(10):
        m.record(1, clock.step(0.008, 0.008, gap_s=0.010), prefill=False)
    assert m.snapshot()["sustained_ms_recent"] == pytest.approx(8.0)
    limit[0] = 0.3
    clock.wall += 1.0
    m.record(1, clock.step(0.008, 0.008, gap_s=0.010), prefill=False)
    snap = m.snapshot()
    assert snap["decode_ms_recent"] == pytest.approx(8.0)
    assert snap["sustained_ms_recent"] == pytest.approx(8.0 / 0.3)


def test_gossiped_metrics_prefer_the_sustained_figure() -> None:
    assert measured_ms({"decode_ms": 5.0, "sustained_ms": 16.0}, recent=False) == 16.0
    assert measured_ms({"decode_ms_recent": 5.0, "sustained_ms_recent": 17.0, "sustained_ms": 16.0},
                       recent=True) == 17.0
    # an older node's metrics: wall time
    assert measured_ms({"decode_ms": 5.0, "decode_ms_recent": 6.0}, recent=True) == 6.0
    assert measured_ms({"decode_ms": 5.0}, recent=True) == 5.0
    assert measured_ms({"decode_ms": None, "sustained_ms": -1}, recent=False) is None


def test_the_limit_trigger_fires_on_a_real_change_only() -> None:
    assert limit_changed(1.0, 0.3, 1.4) and limit_changed(0.3, 1.0, 1.4)  # a cut, and a raise
    assert not limit_changed(1.0, 0.8, 1.4)
    assert not limit_changed(2.0, 2.0, 1.4)
    assert not limit_changed(None, 0.3, 1.4) and not limit_changed(1.0, 0.0, 1.4)
    assert RebalanceConfig.from_env({"LLNODE_REBALANCE_LIMIT_TRIGGER": "0"}).limit_trigger is False
    assert RebalanceConfig.from_env({}).limit_trigger is True


def test_only_rebalances_that_missed_their_prediction_raise_the_bar() -> None:
    """Anti-flapping counts the recent rebalances that did not deliver: two corrective rebalances that
    measured what they predicted leave the bar at 10 %, so a real cut after them is not refused."""
    now = 1000.0
    delivered = [Accepted(now - 30, 3, 0.6, 0.55), Accepted(now - 20, 4, 0.3, 0.3 * DELIVERED)]
    missed = [Accepted(now - 30, 3, 2.7, -0.33), Accepted(now - 20, 4, 0.6, -0.22)]
    assert undelivered(delivered, now) == 0
    assert undelivered(missed, now) == 2
    assert undelivered([Accepted(now - 5, 5, 0.4)], now) == 1  # not measured yet: not settled
    assert undelivered(missed, now + 60) == 0  # older than the window
    manifest = synthetic_manifest(num_layers=12)
    opts = PlanOptions()
    costs = ModelCosts.from_manifest(manifest, opts)
    profiles = {
        d: DeviceProfile(d, decode_flops_per_s=2e9, memory_available_bytes=8 * GB) for d in ("a", "b", "c")
    }
    current = solve(manifest, list(profiles.values()), [], opts, epoch=3)
    c = current.stages[-1]
    slower = measured_profiles(costs, profiles, {"c": (c.start, c.end, 1300.0 * c.compute_s)})
    after_good = RebalanceConfig(min_gain=churn_min_gain(0.1, undelivered(delivered, now)))
    after_bad = RebalanceConfig(min_gain=churn_min_gain(0.1, undelivered(missed, now)))
    assert decide(manifest, slower, [], opts, current, after_good, epoch=5).accept
    assert not decide(manifest, slower, [], opts, current, after_bad, epoch=5).accept


def test_sustained_step_time() -> None:
    assert sustained(0.005, 0.005, 0.3) == pytest.approx(0.005 / 0.3)
    assert sustained(0.005, 0.008, 2.0) == 0.005  # two threads on two cores: wall time
    assert sustained(0.005, 0.005, 0.0) > 1.0  # no CPU at all: as good as unusable, never a crash


def test_the_profile_prices_a_quota_limited_device_by_cpu_over_the_limit(
    tiny_llama_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    man = load_manifest(tiny_llama_shards)
    free = profile_device(tiny_llama_shards, man, device_id="me", repeats=5, threads=1)
    monkeypatch.setattr(profile_mod.resources, "cpu_limit", lambda: 0.25)
    capped = profile_device(tiny_llama_shards, man, device_id="me", repeats=5, threads=1)
    assert capped.measured["cpu_limit"] == 0.25
    for key in capped.measured:
        if key.startswith("decode_ms_modules_"):
            rng = key.removeprefix("decode_ms_modules_")
            wall = capped.measured[f"decode_wall_ms_modules_{rng}"]
            cpu = capped.measured[f"decode_cpu_ms_modules_{rng}"]
            assert capped.measured[key] == pytest.approx(max(wall, cpu / 0.25))
            assert cpu > 0
    # one thread's CPU per step over a quarter of a core: well below the unlimited speed
    assert capped.decode_flops_per_s < 0.6 * free.decode_flops_per_s


_PROFILE = (
    "import sys; from llnode.plan.profile import profile_device; "
    "p = profile_device(sys.argv[1], device_id='me', repeats=9, threads=1); "
    "print(p.decode_flops_per_s, p.measured['cpu_limit'])"
)


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_a_profile_in_a_real_cpu_group_sees_its_quota(tiny_llama_shards: Path) -> None:
    """A real 20 % quota: the profile runs in bursts shorter than the quota's period, so its wall time
    looks like a whole core's; the sustained figure sees a fifth of one."""
    group = CpuGroup(f"llnode-test-profile-{id(object())}", 0.2)

    def run(in_group: bool) -> tuple[float, float]:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(0.5); " + _PROFILE, str(tiny_llama_shards)],
            stdout=subprocess.PIPE, text=True,
        )
        if in_group:
            group.add(child.pid)
        out, _ = child.communicate(timeout=120)
        speed, limit = out.split()
        return float(speed), float(limit)

    try:
        free_speed, free_limit = run(False)
        slow_speed, slow_limit = run(True)
    finally:
        group.remove()
    assert slow_limit == pytest.approx(0.2) and free_limit >= 1.0
    assert slow_speed < 0.5 * free_speed


def test_a_measurement_from_before_a_quota_cut_is_not_remembered() -> None:
    """The heaviest range a device carried in the last minute sets its speed, but only among the
    measurements under the CPU limit it has now: the pre-cut [10,25) at 0.6 of a core must not price
    the node cut to 0.1 (the drift bench gave it more work for that)."""
    costs = ModelCosts.from_manifest(synthetic_manifest(num_layers=30), PlanOptions())
    settled = [(90.0, 10, 25, 40.0, 0.6), (95.0, 12, 25, 38.0, 0.6), (99.0, 12, 25, 250.0, 0.1)]
    latest = (12, 25, 260.0)
    picked = heaviest(costs, {"n": remembered(settled, latest, 0.1, now=100.0)})
    assert picked == {"n": latest}
    # under an unchanged limit the heavier range is still what counts (bursts on a light range)
    assert heaviest(costs, {"n": remembered(settled[:2], (12, 20, 20.0), 0.6, now=100.0)}) == {
        "n": (10, 25, 40.0)}
    assert remembered(settled, latest, 0.6, now=200.0) == [latest]  # older than SLOW_MEMORY_S
