"""The MILP, the DP and the brute force agree on one cost model; memory is never exceeded."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from llnode.plan import DeviceProfile, LinkProfile, Plan, PlanInfeasible, PlanOptions, solve
from llnode.plan.baselines import even_split, memory_split
from llnode.plan.bruteforce import brute_force, brute_force_ranked
from llnode.plan.costs import build_instance, evaluate
from llnode.plan.dp import dp_fixed_order
from llnode.plan.milp import solve_exact
from llnode.plan.synthetic import GB, random_fleet, synthetic_manifest

SMALL = synthetic_manifest(num_layers=5)  # 7 modules: brute force stays small
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _instance(seed: int, n: int, **opts: object):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    devices, links = random_fleet(n, rng)
    options = PlanOptions(**opts)  # type: ignore[arg-type]
    return devices, links, options


def test_ranked_brute_force_lists_the_k_best_distinct_plans_best_first() -> None:
    devices, links, options = _instance(3, 3)
    inst = build_instance(SMALL, devices, links, options)
    ranked = brute_force_ranked(inst, 5)
    assert len(ranked) == 5
    best = brute_force(inst)
    assert best is not None and (ranked[0].order, ranked[0].cuts) == (best.order, best.cuts)
    values = [ev.objective_value for ev in ranked]
    assert values == sorted(values) and values[-1] > values[0]
    assert len({(ev.order, ev.cuts) for ev in ranked}) == 5
    # nothing outside the list beats its last entry: the next plans price at least as high
    assert min(ev.objective_value for ev in brute_force_ranked(inst, 8)[5:]) >= values[-1] - 1e-12
    assert brute_force_ranked(inst, 0) == []


@pytest.mark.parametrize("seed", range(8))
def test_milp_equals_brute_force(seed: int) -> None:
    n = 2 + seed % 5  # 2..6 devices
    devices, links, options = _instance(seed, n, objective="latency" if seed % 4 == 3 else "throughput")
    inst = build_instance(SMALL, devices, links, options)
    brute = brute_force(inst)
    assert brute is not None
    plan = solve(SMALL, devices, links, options)
    assert plan.solver == "cbc" and plan.optimal
    assert plan.objective_value == pytest.approx(brute.objective_value, rel=1e-6, abs=1e-9)
    for s in plan.stages:
        assert s.memory_bytes <= s.memory_limit_bytes


def test_memory_forces_a_split_and_is_never_exceeded() -> None:
    # one very fast device that can hold only part of the model, several slow ones
    small_fast = DeviceProfile("fast", 50e9, memory_available_bytes=int(0.5 * GB))
    slow = [DeviceProfile(f"slow{i}", 5e9, memory_available_bytes=int(2 * GB)) for i in range(3)]
    options = PlanOptions(max_sessions=1, max_context=512)
    plan = solve(SMALL, [small_fast, *slow], [], options)
    brute = brute_force(build_instance(SMALL, [small_fast, *slow], [], options))
    assert brute is not None
    assert plan.objective_value == pytest.approx(brute.objective_value, rel=1e-6)
    for s in plan.stages:
        assert s.memory_bytes <= s.memory_limit_bytes
    assert len(plan.stages) >= 2


def test_infeasible_reports_missing_bytes() -> None:
    devices = [DeviceProfile(f"d{i}", 5e9, memory_available_bytes=int(0.35 * GB)) for i in range(2)]
    with pytest.raises(PlanInfeasible) as err:
        solve(SMALL, devices, [], PlanOptions())
    assert err.value.missing_bytes > 0
    assert "missing" in str(err.value)
    # adding the reported amount to each device's usable memory makes the problem at least pass the check
    more = [
        DeviceProfile(
            d.device_id,
            5e9,
            memory_available_bytes=int(d.memory_available_bytes + err.value.missing_bytes / 0.7) + 1,
        )
        for d in devices
    ]
    assert solve(SMALL, more, [], PlanOptions()).stages


def test_single_module_too_big_names_the_module() -> None:
    devices = [DeviceProfile(f"d{i}", 5e9, memory_available_bytes=int(0.2 * GB)) for i in range(8)]
    with pytest.raises(PlanInfeasible, match="missing") as err:
        solve(SMALL, devices, [], PlanOptions(runtime_overhead_bytes=0))
    assert "module" in str(err.value)
    assert err.value.missing_bytes > 0


@pytest.mark.parametrize("seed", range(5))
def test_dp_equals_brute_force_for_its_order(seed: int) -> None:
    devices, links, options = _instance(
        100 + seed, 2 + seed % 4, objective=("throughput", "latency")[seed % 2]
    )
    inst = build_instance(SMALL, devices, links, options)
    order = list(range(inst.num_devices))
    dp = dp_fixed_order(inst, order)
    # brute force restricted to order-preserving subsets of the same order
    from itertools import combinations

    best = None
    m = inst.num_modules
    for k in range(1, min(len(order), m) + 1):
        for subset in combinations(order, k):
            for inner in combinations(range(1, m), k - 1):
                cuts = (0, *inner, m)
                if all(inst.fits(d, cuts[i], cuts[i + 1]) for i, d in enumerate(subset)):
                    ev = evaluate(inst, subset, cuts)
                    if best is None or ev.objective_value < best:
                        best = ev.objective_value
    assert dp is not None and best is not None
    assert dp.objective_value == pytest.approx(best, rel=1e-9)


def test_latency_objective_prefers_one_fast_device() -> None:
    fast = DeviceProfile("fast", 30e9, memory_available_bytes=4 * GB)
    other = DeviceProfile("other", 25e9, memory_available_bytes=4 * GB)
    links = [LinkProfile("fast", "other", 0.01, 1e6)]
    lat = solve(SMALL, [fast, other], links, PlanOptions(objective="latency"))
    assert lat.devices == ["fast"]
    assert "other" in lat.left_out
    thr = solve(SMALL, [fast, other], [LinkProfile("fast", "other", 0.0002, 1e8)], PlanOptions())
    assert len(thr.devices) == 2  # with a fast link, splitting wins for throughput
    assert thr.bottleneck_s < lat.bottleneck_s


def test_movement_term_keeps_current_plan_when_gain_is_small() -> None:
    devices = [DeviceProfile(f"d{i}", (10 + 3 * i) * 1e9, memory_available_bytes=4 * GB) for i in range(3)]
    links = [LinkProfile(a.device_id, b.device_id, 0.0002, 1e8) for a in devices for b in devices if a != b]
    free = solve(SMALL, devices, links, PlanOptions())
    # a current plan that is slightly worse: shift one cut by one module where possible
    cur = {s.device_id: (s.start, s.end) for s in free.stages}
    assert len(free.stages) >= 2
    # a current plan that is strictly worse: the same cuts with the devices in another order
    from itertools import permutations

    inst0 = build_instance(SMALL, devices, links, PlanOptions())
    idx = {d.device_id: i for i, d in enumerate(devices)}
    cuts = [0, *[s.end for s in free.stages]]
    worse = None
    for perm in permutations([idx[s.device_id] for s in free.stages]):
        ev = evaluate(inst0, perm, cuts)
        if ev.feasible and ev.objective_value > free.objective_value * 1.01:
            worse = perm
    assert worse is not None
    cur = {devices[d].device_id: (cuts[i], cuts[i + 1]) for i, d in enumerate(worse)}
    inst = build_instance(SMALL, devices, links, PlanOptions(), current=cur)
    cur_ev = evaluate(inst, list(worse), cuts)
    assert cur_ev.objective_value >= free.objective_value
    # any move costs 10 x (moved share of the weights) x the current objective: stay
    sticky = solve(SMALL, devices, links, PlanOptions(movement_weight=10.0), current=cur)
    assert sticky.ranges() == cur and sticky.moved_bytes == 0
    # a negligible weight lets the better plan through
    loose = solve(SMALL, devices, links, PlanOptions(movement_weight=1e-4), current=cur)
    assert loose.bottleneck_s == pytest.approx(free.bottleneck_s, rel=1e-9) and loose.moved_bytes > 0
    # and the movement term is exact: brute force agrees
    brute = brute_force(build_instance(SMALL, devices, links, PlanOptions(movement_weight=10.0), current=cur))
    assert brute is not None and sticky.objective_value == pytest.approx(brute.objective_value, rel=1e-6)


def test_energy_term_unloads_a_discharging_phone() -> None:
    mains = DeviceProfile("mains", 20e9, memory_available_bytes=4 * GB)
    phone = DeviceProfile("phone", 20e9, memory_available_bytes=4 * GB, battery_pct=20, charging=False)
    links = [LinkProfile("mains", "phone", 0.0005, 5e7)]
    plain = solve(SMALL, [mains, phone], links, PlanOptions())
    aware = solve(SMALL, [mains, phone], links, PlanOptions(energy_weight=1.0))
    share = {
        p: sum(s.compute_s for s in plan.stages if s.device_id == "phone")
        for p, plan in (("a", plain), ("b", aware))
    }
    assert share["b"] < share["a"]
    brute = brute_force(build_instance(SMALL, [mains, phone], links, PlanOptions(energy_weight=1.0)))
    assert brute is not None and aware.objective_value == pytest.approx(brute.objective_value, rel=1e-6)


def test_min_battery_leaves_device_out_with_reason() -> None:
    devices, links, _ = _instance(3, 3)
    low = DeviceProfile("low", 40e9, memory_available_bytes=4 * GB, battery_pct=5, charging=False)
    plan = solve(SMALL, [*devices, low], links, PlanOptions(min_battery_pct=15))
    assert "low" not in plan.devices and "battery" in plan.left_out["low"]
    assert "low" in plan.explain()


def test_plan_json_round_trip_and_explain() -> None:
    devices, links, options = _instance(11, 4)
    plan = solve(SMALL, devices, links, options, epoch=3)
    data = json.loads(json.dumps(plan.to_dict()))
    back = Plan.from_dict(data)
    assert back.to_dict() == plan.to_dict()
    assert back.epoch == 3 and back.tokens_per_s == pytest.approx(1 / plan.bottleneck_s)
    text = plan.explain()
    for s in plan.stages:
        assert s.device_id in text
    for dev in plan.left_out:
        assert dev in text


def test_profiles_round_trip_and_reject_typos() -> None:
    d = DeviceProfile("a", 1e9, memory_available_bytes=GB, battery_pct=50, charging=True)
    assert DeviceProfile.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    lk = LinkProfile("a", "b", 0.002, 1e7)
    assert LinkProfile.from_dict(lk.to_dict()) == lk
    from llnode.plan.types import PlanError

    with pytest.raises(PlanError, match="unknown field"):
        DeviceProfile.from_dict(
            {"device_id": "a", "decode_flops_per_s": 1e9, "memory_available_bytes": 1, "ram": 2}
        )
    with pytest.raises(PlanError, match="must be > 0"):
        DeviceProfile.from_dict({"device_id": "a", "decode_flops_per_s": 0, "memory_available_bytes": 1})
    with pytest.raises(PlanError, match="duplicate device ids"):
        solve(SMALL, [d, d], [])


def test_dp_fallback_when_solver_missing() -> None:
    devices, links, _ = _instance(5, 4)
    plan = solve(SMALL, devices, links, PlanOptions(solver="dp"))
    assert plan.solver == "dp" and not plan.optimal
    milp = solve(SMALL, devices, links, PlanOptions())
    assert milp.objective_value <= plan.objective_value + 1e-12


def test_baselines_are_never_better_than_milp() -> None:
    devices, links, options = _instance(21, 5)
    inst = build_instance(SMALL, devices, links, options)
    plan = solve(SMALL, devices, links, options)
    for ev in (even_split(inst), memory_split(inst)):
        if ev.feasible:
            assert ev.objective_value >= plan.objective_value - 1e-12


def test_solve_exact_matches_brute_on_smollm2_sized_model() -> None:
    man = synthetic_manifest()  # 32 modules
    devices, links, options = _instance(4, 3)
    inst = build_instance(man, devices, links, options)
    res = solve_exact(inst, time_limit_s=60)
    assert res.optimal and res.evaluation is not None
    brute = brute_force(inst)
    assert brute is not None
    assert res.evaluation.objective_value == pytest.approx(brute.objective_value, rel=1e-6)


def test_a_stage_is_priced_as_a_fixed_cost_plus_its_modules() -> None:
    """cost(k) = a + b * k: the device's own CPU per step and its fused runs' fixed cost, once per stage."""
    man = synthetic_manifest(num_layers=14)  # 16 modules: two fused blocks of 8
    dev = DeviceProfile(
        "d", 5e9, memory_available_bytes=8 * GB, step_overhead_s=1.5e-3, call_overhead_s=0.4e-3, fuse_block=8
    )
    inst = build_instance(man, [dev], [], PlanOptions(max_sessions=1, max_context=512))
    bare = build_instance(man, [replace(dev, step_overhead_s=0.0, call_overhead_s=0.0)], [], inst.options)
    whole = evaluate(inst, [0], [0, 16]).compute_s[0]
    # 16 modules cost their own work, the step's 1.5 ms and one run's 0.4 ms per 8 modules on average
    expected = evaluate(bare, [0], [0, 16]).compute_s[0] + 1.5e-3 + 0.4e-3 * (1 + 15 / 8)
    assert whole == pytest.approx(expected, rel=1e-9)
    assert inst.compute_s(0, 3, 5) - bare.compute_s(0, 3, 5) == pytest.approx(1.5e-3 + 0.4e-3 * (1 + 1 / 8))


@pytest.mark.parametrize("formulation", ["arcs", "layers"])
def test_a_large_fixed_cost_per_step_keeps_a_slow_device_out(formulation: str) -> None:
    """A slow device helps the bottleneck only while its fixed cost per step is small: the MILP (either
    formulation), the DP and the brute force agree where it stops paying."""
    fast = DeviceProfile("fast", 10e9, memory_available_bytes=8 * GB)
    slow = DeviceProfile("slow", 4e9, memory_available_bytes=8 * GB)
    options = PlanOptions(
        max_sessions=1, max_context=512, default_rtt_s=1e-4, default_bandwidth_bytes_per_s=1e9
    )
    used = {}
    for step_s in (0.0, 0.005, 0.02):
        inst = build_instance(SMALL, [fast, replace(slow, step_overhead_s=step_s)], [], options)
        res = solve_exact(inst, time_limit_s=30, formulation=formulation)
        brute = brute_force(inst)
        dps = [dp_fixed_order(inst, order) for order in ([0, 1], [1, 0])]
        assert res.optimal and res.evaluation is not None and brute is not None
        assert res.evaluation.objective_value == pytest.approx(brute.objective_value, rel=1e-9)
        dp = min(ev.objective_value for ev in dps if ev is not None)
        assert dp == pytest.approx(brute.objective_value, rel=1e-9)
        used[step_s] = (len(res.evaluation.order), res.evaluation.cuts)
    assert used[0.0][0] == 2 and used[0.02] == (1, (0, SMALL.num_modules))
    # in between the slow device still helps, with fewer modules than when its steps were free
    assert used[0.005][0] == 2 and used[0.005][1][1] < used[0.0][1][1]
