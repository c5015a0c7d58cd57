"""Drift detection and the leader's rebalance decision, on recorded-like series and a synthetic model."""

from __future__ import annotations

import random

import pytest

from llnode.pipeline.rebalance import (
    DriftDetector,
    RebalanceConfig,
    decide,
    measured_profiles,
    price,
)
from llnode.plan.costs import ModelCosts
from llnode.plan.solve import solve
from llnode.plan.synthetic import synthetic_manifest
from llnode.plan.types import DeviceProfile, PlanOptions

GB = 1024**3
CFG = RebalanceConfig(threshold=1.4, clear=1.2, window_s=6.0, min_samples=3)


def _run(series: list[tuple[float, float]], baseline: float = 10.0) -> list[float]:
    """Feed (t, ms) samples; return the times at which the detector fired."""
    det = DriftDetector(CFG)
    return [t for t, ms in series if det.observe("0-10", ms, baseline, t)]


def _ewma(raw: list[float], alpha: float = 0.2) -> list[float]:
    out, cur = [], raw[0]
    for x in raw:
        cur = (1 - alpha) * cur + alpha * x
        out.append(cur)
    return out


def test_noise_and_short_spikes_never_fire() -> None:
    rng = random.Random(1)
    # 10 ms/token with +-30 % jitter, GC / neighbour spikes of 3x for one to three samples
    raw = [10.0 * rng.uniform(0.7, 1.3) for _ in range(240)]
    for start in (20, 70, 130, 200):
        for k in range(rng.randint(1, 3)):
            raw[start + k] = 30.0
    series = list(zip([i * 0.5 for i in range(240)], _ewma(raw), strict=True))
    assert max(ms for _, ms in series) > 14.0  # the spikes do cross the threshold ...
    assert _run(series) == []  # ... but never for long enough


def test_sustained_slowdown_fires_once_after_the_window() -> None:
    rng = random.Random(2)
    # a quota cut to 30 % at t=30 s: about 3.3x slower from then on
    raw = [10.0 * rng.uniform(0.8, 1.2) * (3.3 if i >= 60 else 1.0) for i in range(200)]
    series = list(zip([i * 0.5 for i in range(200)], _ewma(raw), strict=True))
    fired = _run(series)
    assert len(fired) == 1
    assert 30.0 + CFG.window_s <= fired[0] <= 30.0 + CFG.window_s + 5.0


def test_speedup_counts_as_drift_too() -> None:
    series = [(i * 0.5, 10.0 if i < 20 else 4.0) for i in range(60)]
    assert len(_run(series)) == 1


def test_hysteresis_band_neither_starts_nor_ends_an_episode() -> None:
    det = DriftDetector(CFG)
    # in the band (1.2 .. 1.4x) forever: never fires
    assert not any(det.observe("s", 13.0, 10.0, t) for t in range(30))
    # over the threshold, dips into the band (not below clear) and stays over: one episode, fires
    samples = [(0, 20.0), (2, 13.0), (4, 20.0), (7, 20.0), (9, 20.0)]
    fired = [t for t, ms in samples if det.observe("s", ms, 10.0, t)]
    assert fired == [7]
    # still slow: no second request for the same episode
    assert not det.observe("s", 20.0, 10.0, 30)
    # back to normal ends the episode; a new sustained drift fires again
    assert not det.observe("s", 10.5, 10.0, 31)
    fired = [t for t in range(32, 45) if det.observe("s", 25.0, 10.0, t)]
    assert fired == [38]


def test_too_few_fresh_samples_do_not_fire() -> None:
    det = DriftDetector(RebalanceConfig(window_s=1.0, min_samples=5))
    assert not any(det.observe("s", 30.0, 10.0, t) for t in (0.0, 10.0, 20.0, 30.0))
    assert det.observe("s", 30.0, 10.0, 40.0)


def test_bad_measurements_are_ignored_and_bad_config_refused() -> None:
    det = DriftDetector(CFG)
    assert not det.observe("s", float("nan"), 10.0, 0)
    assert not det.observe("s", 0.0, 10.0, 0)
    with pytest.raises(ValueError, match="clear"):
        RebalanceConfig(threshold=1.1, clear=1.3)
    with pytest.raises(ValueError, match="not a number"):
        RebalanceConfig.from_env({"LLNODE_REBALANCE_THRESHOLD": "fast"})
    cfg = RebalanceConfig.from_env({"LLNODE_REBALANCE": "0", "LLNODE_REBALANCE_WINDOW_S": "3"})
    assert not cfg.enabled and cfg.window_s == 3.0 and not cfg.impose


def _devices() -> dict[str, DeviceProfile]:
    return {
        d: DeviceProfile(device_id=d, name=d, decode_flops_per_s=4e9, memory_available_bytes=4 * GB)
        for d in ("a", "b", "c")
    }


def test_measured_speeds_replace_the_profile_and_drive_a_rebalance() -> None:
    manifest = synthetic_manifest(num_layers=12)
    opts = PlanOptions()
    costs = ModelCosts.from_manifest(manifest, opts)
    profiles = _devices()
    current = solve(manifest, list(profiles.values()), [], opts, epoch=3)
    # the last stage's device now measures 3.3x its predicted time (its CPU quota was cut)
    c = current.stages[-1]
    assert c.device_id == "c" and len(current.stages) == 3
    slow = measured_profiles(costs, profiles, {"c": (c.start, c.end, 3300.0 * c.compute_s)})
    assert slow["c"].decode_flops_per_s == pytest.approx(4e9 / 3.3, rel=1e-6)
    assert slow["a"] == profiles["a"]
    decision = decide(manifest, slow, [], opts, current, CFG, epoch=4)
    assert decision.accept and decision.plan is not None
    assert decision.predicted_gain > 0.3
    new = decision.plan.ranges()
    flops = costs.decode_flops
    assert sum(flops[slice(*new["c"])]) < sum(flops[c.start : c.end])  # the slow device got less work
    assert decision.plan.epoch == 4
    # the same speeds as planned: nothing to gain, nothing published
    again = decide(manifest, profiles, [], opts, current, CFG, epoch=4)
    assert not again.accept and again.plan is None


def test_gain_below_threshold_is_not_published() -> None:
    manifest = synthetic_manifest(num_layers=12)
    opts = PlanOptions()
    costs = ModelCosts.from_manifest(manifest, opts)
    profiles = _devices()
    m = costs.num_modules
    current = price(manifest, profiles, [], opts, [("a", 0, 5), ("b", 5, 10), ("c", 10, m)])
    assert current.stages[0].start == 0
    c = current.stages[2]
    slightly = measured_profiles(costs, profiles, {"c": (c.start, c.end, 1050.0 * c.compute_s)})
    decision = decide(manifest, slightly, [], opts, current, RebalanceConfig(min_gain=0.5), epoch=1)
    assert not decision.accept and decision.plan is None
