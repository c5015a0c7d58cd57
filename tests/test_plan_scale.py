"""The layer-count MILP, the candidate pool for big clusters, and the link table they rely on."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from llnode.plan import DeviceProfile, LinkProfile, PlanOptions, solve
from llnode.plan.baselines import even_split, memory_split
from llnode.plan.bruteforce import brute_force
from llnode.plan.costs import ModelCosts, build_instance
from llnode.plan.dp import dp_best
from llnode.plan.layers import layer_shape
from llnode.plan.milp import solve_exact
from llnode.plan.pool import candidate_pool
from llnode.plan.search import SearchTables, recut
from llnode.plan.synthetic import GB, random_fleet, synthetic_manifest

SMOLLM2 = synthetic_manifest()  # 32 modules: embedding, 30 identical layers, head
SMALL = synthetic_manifest(num_layers=5)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _fleet(n: int, seed: int) -> tuple[list[DeviceProfile], list[LinkProfile]]:
    return random_fleet(n, random.Random(seed))


@pytest.mark.parametrize("seed", range(4))
def test_layer_and_stage_arc_formulations_agree_with_brute_force(seed: int) -> None:
    devices, links = _fleet(3 + seed % 2, 40 + seed)
    options = PlanOptions(objective=("throughput", "latency")[seed % 2])
    inst = build_instance(SMALL, devices, links, options)
    assert layer_shape(inst, range(inst.num_devices)) is not None
    brute = brute_force(inst)
    assert brute is not None
    for formulation in ("layers", "arcs"):
        res = solve_exact(inst, time_limit_s=60, formulation=formulation)
        assert res.optimal and res.evaluation is not None
        assert res.evaluation.objective_value == pytest.approx(brute.objective_value, rel=1e-6)


def test_non_uniform_layers_use_the_stage_arc_formulation() -> None:
    devices, links = _fleet(3, 7)
    costs = ModelCosts.from_manifest(SMALL, PlanOptions())
    flops = list(costs.decode_flops)
    flops[2] *= 3  # one layer three times as costly: positions matter again
    uneven = replace(costs, decode_flops=flops)
    inst = build_instance(uneven, devices, links, PlanOptions())
    assert layer_shape(inst, range(inst.num_devices)) is None
    with pytest.raises(ValueError, match="does not apply"):
        solve_exact(inst, formulation="layers")
    plan = solve(uneven, devices, links, PlanOptions())
    brute = brute_force(inst)
    assert brute is not None and plan.optimal
    assert plan.objective_value == pytest.approx(brute.objective_value, rel=1e-6)


def test_sixteen_devices_solved_to_proven_optimality() -> None:
    devices, links = random_fleet(16, random.Random(1016))  # the bench's 16-device fleet
    options = PlanOptions(time_limit_s=120)
    plan = solve(SMOLLM2, devices, links, options)
    assert plan.solver == "cbc" and plan.optimal, plan.notes
    inst = build_instance(SMOLLM2, devices, links, options)
    for ev in (dp_best(inst), even_split(inst), memory_split(inst)):
        assert ev is not None
        if ev.feasible:
            assert ev.objective_value >= plan.objective_value - 1e-12
    # the optimum found by bisection is the 11-stage ring at 3.215 ms (311 tokens/s); the previous
    # stage-arc MILP returned 4.016 ms after its time limit
    assert plan.bottleneck_s == pytest.approx(0.0032152240, rel=1e-6)
    for s in plan.stages:
        assert s.memory_bytes <= s.memory_limit_bytes


def test_pool_gap_to_the_full_milp_is_measured_not_negative() -> None:
    devices, links = _fleet(12, 3)
    full = solve(SMOLLM2, devices, links, PlanOptions(time_limit_s=120))
    pooled = solve(SMOLLM2, devices, links, PlanOptions(time_limit_s=120, milp_max_devices=6))
    assert full.optimal and not pooled.optimal
    assert any("pool of 6" in n for n in pooled.notes)
    assert pooled.objective_value >= full.objective_value - 1e-12  # a pool can only lose


def test_a_thousand_devices_get_a_plan_from_the_pool() -> None:
    n = 1000
    rng = random.Random(5)
    devices = [
        DeviceProfile(
            f"dev{i}",
            rng.choice((3e9, 7e9, 14e9, 27e9)) * rng.uniform(0.8, 1.2),
            memory_available_bytes=int(rng.uniform(0.8, 6) * GB),
        )
        for i in range(n)
    ]
    # a few measured links; the rest use the defaults (a sim or a fresh cluster has no full mesh)
    links = [LinkProfile(f"dev{i}", f"dev{i + 1}", 0.002, 5e6) for i in range(0, n - 1, 7)]
    options = PlanOptions(time_limit_s=20)
    inst = build_instance(SMOLLM2, devices, links, options)
    pool, ring = candidate_pool(inst, options.milp_max_devices)
    assert len(pool) == options.milp_max_devices and ring is not None
    assert set(ring.order) <= set(pool)
    plan = solve(SMOLLM2, devices, links, options)
    plan.check()
    assert not plan.optimal and any("pool of 16" in note for note in plan.notes)
    assert plan.objective_value <= ring.objective_value + 1e-12
    assert plan.objective_value <= even_split(inst).objective_value
    for s in plan.stages:
        assert s.memory_bytes <= s.memory_limit_bytes


def test_links_apply_both_ways_unless_the_reverse_is_measured() -> None:
    devices = [DeviceProfile(x, 1e9, memory_available_bytes=GB) for x in "abc"]
    links = [
        LinkProfile("a", "b", 0.004, 1e6),
        LinkProfile("c", "a", 0.010, 2e6),
        LinkProfile("a", "c", 0.002, 4e6),
    ]
    options = PlanOptions(default_rtt_s=0.008, default_bandwidth_bytes_per_s=8e6)
    inst = build_instance(SMALL, devices, links, options)
    assert inst.rtt[0][1] == inst.rtt[1][0] == 0.002 and inst.inv_bw[1][0] == 1e-6
    assert inst.rtt[2][0] == 0.005 and inst.rtt[0][2] == 0.001  # both directions measured
    assert inst.rtt[1][2] == inst.rtt[2][1] == 0.004 and inst.inv_bw[1][2] == 1 / 8e6  # defaults
    assert inst.rtt[1][1] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_counting_bound_and_recut_bracket_the_brute_force_optimum(seed: int) -> None:
    devices, links = _fleet(2 + seed % 4, 70 + seed)
    inst = build_instance(SMALL, devices, links, PlanOptions())
    brute = brute_force(inst)
    assert brute is not None
    tables = SearchTables(inst, range(inst.num_devices))
    # the counting bound is a cap no plan fits under: strictly below the optimum, and not trivial
    bound = tables.coverage_bound(0.0, 10 * brute.bottleneck_s)
    assert 0.3 * brute.bottleneck_s < bound < brute.bottleneck_s
    # the best cuts for the optimal ring's order are the optimum's own
    again = recut(inst, brute.order)
    assert again is not None and again.bottleneck_s == pytest.approx(brute.bottleneck_s, rel=1e-9)
