"""The simulator: exact single-stream arithmetic, pipeline throughput, batching, links, events, arrivals,
and the per-module profile on a real (tiny) shard set. The planner in these tests is the real one."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from llnode.emulate.profiles import (
    DEVICES,
    LINKS,
    LinkClass,
    StepCosts,
    device_profile,
    draw_fleet,
    own_cpu_scale,
    pair_links,
)
from llnode.model.runner import fuse_block
from llnode.plan import PlanOptions
from llnode.plan.costs import runs_per_step
from llnode.plan.profile import DaemonCpu
from llnode.plan.synthetic import synthetic_manifest
from llnode.plan.types import DeviceProfile, Plan, Stage
from llnode.sim.costs import TOKEN_ID_BYTES, ModuleCosts, cached_costs, range_check
from llnode.sim.engine import Event, Overheads, Simulator, Workload, planner

HIDDEN = 2304  # bytes per token of SmolLM2's hidden state
REF = 1e9  # reference FLOP/s: a device of this speed runs modules in exactly decode_s


def costs(modules: int = 6, decode_ms: float = 10.0, batch4_ms: float | None = None) -> ModuleCosts:
    return ModuleCosts(
        model="t", manifest_sha="x", threads=1, context=64, prompt_tokens=8,
        decode_s=[decode_ms / 1e3] * modules,
        decode_batch_s=[  # linear in the batch size through the batch of 4 (default: no gain at all)
            [(b if batch4_ms is None else 1 + (b - 1) * (batch4_ms / decode_ms - 1) / 3) * decode_ms / 1e3]
            * modules
            for b in (2, 4, 8)
        ],
        prefill_s=[4 * decode_ms / 1e3] * modules,  # a prompt of 8 tokens costs 4 decode steps
        out_bytes_per_token=[HIDDEN] * (modules - 1) + [TOKEN_ID_BYTES],
        reference_flops_per_s=REF,
    )  # fmt: skip


def dev(name: str, speed: float = 1.0) -> DeviceProfile:
    return DeviceProfile(device_id=name, decode_flops_per_s=REF * speed, memory_available_bytes=8 * 2**30)


def fixed_plan(*stages: tuple[str, int, int]) -> Plan:
    m = stages[-1][2]
    st = [Stage(d, a, b, 0.0, 0.0, 0.0, 0, 1) for d, a, b in stages]
    return Plan(0, "throughput", "fixed", "t", m, st, {}, 1.0, 1.0, 1.0)


def no_replan(_: list[DeviceProfile]) -> Plan:
    raise AssertionError("no re-plan expected")


def test_single_stream_latency_is_the_sum_of_stages_and_hops() -> None:
    c = costs()
    plan = fixed_plan(("a", 0, 3), ("b", 3, 6))
    link = LinkClass("l", 8.0, 2.0)  # 1 MB/s, 2 ms to the access point
    sim = Simulator(c, [dev("a"), dev("b", speed=0.5)], {"a": link, "b": link}, no_replan, plan=plan)
    r = sim.run(Workload(sessions=1, prompt_tokens=8, max_tokens=50, duration_s=30, warmup_s=5))
    # a: 3 x 10 ms; a -> b: 2304 B at 1 MB/s + (2 + 2) ms / 2; b (half speed): 60 ms; b -> a: 8 B + 2 ms
    expected = 0.030 + (HIDDEN / 1e6 + 0.002) + 0.060 + (TOKEN_ID_BYTES / 1e6 + 0.002)
    assert r.token_latency_s == pytest.approx(expected, rel=1e-9)
    assert 0.9 / expected < r.tokens_per_s < 1 / expected  # each request's prefill takes its share


def test_concurrent_sessions_fill_the_pipeline_up_to_the_bottleneck() -> None:
    c = costs()
    plan = fixed_plan(("a", 0, 2), ("b", 2, 6))  # b is the bottleneck: 40 ms per step
    sim = Simulator(c, [dev("a"), dev("b")], {}, no_replan, plan=plan, max_batch=1)
    one = sim.run(Workload(sessions=1, prompt_tokens=8, duration_s=60, warmup_s=10))
    sim = Simulator(c, [dev("a"), dev("b")], {}, no_replan, plan=plan, max_batch=1)
    many = sim.run(Workload(sessions=6, prompt_tokens=8, duration_s=60, warmup_s=10))
    # one request of 32 tokens: a prefill (the first token; 4 decode steps' worth) and 31 decode steps
    assert one.tokens_per_s == pytest.approx(32 / (0.240 + 31 * 0.060), rel=0.03)
    # with 6 sessions b never idles: 32 tokens cost b one prefill (160 ms) and 31 steps of 40 ms
    assert many.tokens_per_s == pytest.approx(32 / (0.160 + 31 * 0.040), rel=0.03)


def test_batching_pays_off_only_as_much_as_measured() -> None:
    plan = fixed_plan(("a", 0, 3), ("b", 3, 6))
    runs = {}
    for label, batch4 in (("cheap", 15.0), ("linear", 40.0)):
        sim = Simulator(costs(batch4_ms=batch4), [dev("a"), dev("b")], {}, no_replan, plan=plan)
        runs[label] = sim.run(Workload(sessions=8, duration_s=60, warmup_s=10)).tokens_per_s
    sim = Simulator(costs(), [dev("a"), dev("b")], {}, no_replan, plan=plan, max_batch=1)
    off = sim.run(Workload(sessions=8, duration_s=60, warmup_s=10)).tokens_per_s
    assert runs["cheap"] > 1.3 * off  # 4 rows for 1.5x the cost of one (prefills are not batched)
    assert runs["linear"] == pytest.approx(off, rel=0.1)  # rows cost as much batched as alone


def test_batch_cost_follows_the_measured_curve() -> None:
    """Piecewise linear between the measured batches of 1, 2, 4 and 8; beyond 8 along the last segment."""
    c = replace(costs(modules=2), decode_batch_s=[[0.012] * 2, [0.015] * 2, [0.023] * 2])
    ms = {b: c.decode_range_s(0, 2, REF, b) * 1e3 for b in (1, 2, 3, 4, 6, 8, 10)}
    assert ms == pytest.approx({1: 20.0, 2: 24.0, 3: 27.0, 4: 30.0, 6: 38.0, 8: 46.0, 10: 54.0})
    assert c.decode_range_s(0, 2, REF / 2, 4) == pytest.approx(0.060)  # half the speed: twice the time


def test_a_fused_range_pays_one_run_per_block_it_touches() -> None:
    """The daemon runs blocks of ``fuse_block`` modules aligned to module indices, one ``session.run``
    each: a range is priced at its modules' singles minus the fixed cost of the runs it does not make."""
    c = replace(costs(), fuse_block=4, call_s=[1e-3, 2e-3, 3e-3, 4e-3], prefill_call_s=2e-3)
    assert runs_per_step(0, 6, 4) == 2 and runs_per_step(2, 6, 4) == 2 and runs_per_step(3, 4, 4) == 1
    assert runs_per_step(0, 6, 1) == 6
    assert c.decode_range_s(0, 6, REF) == pytest.approx(0.060 - 4 * 1e-3)  # [0,4) and [4,6): 2 runs, not 6
    assert c.decode_range_s(2, 6, REF) == pytest.approx(0.040 - 2 * 1e-3)  # [2,4) and [4,6)
    assert c.decode_range_s(4, 5, REF) == pytest.approx(0.010)  # one module, one run: as measured
    assert c.decode_range_s(0, 6, REF, 4) == pytest.approx(6 * 0.040 - 4 * 3e-3)  # the batch's own call cost
    # prefill: the per-run cost does not grow with the tokens (16 tokens: twice the 8 measured)
    body = 0.040 - 2e-3
    assert c.prefill_range_s(0, 5, 16, REF) == pytest.approx(5 * body * 2 + 2 * 2e-3)
    assert replace(c, fuse_block=1).decode_range_s(0, 6, REF) == pytest.approx(0.060)  # unfused: singles


def test_prefill_runs_the_head_on_the_last_token_only() -> None:
    c = costs()  # prompt of 8 tokens measured: 40 ms per module
    assert c.prefill_range_s(0, 5, 16, REF) == pytest.approx(5 * 0.080)  # layers: linear in tokens
    assert c.prefill_range_s(3, 6, 16, REF) == pytest.approx(2 * 0.080 + 0.040)  # the head: fixed


def test_a_cpu_quota_throttles_sustained_work_but_not_short_bursts() -> None:
    """CFS bandwidth control as the harness's CPU groups apply it: full speed until the period's budget
    is spent, then a wait for the next period."""
    plan = fixed_plan(("a", 0, 6))
    sim = Simulator(costs(), [dev("a")], {}, no_replan, plan=plan, quotas={"a": 0.4}, period_s=0.1)
    assert sim._cpu_done("a", 0.0, 0.030) == pytest.approx(0.030)  # within the 40 ms budget
    assert sim._cpu_done("a", 0.030, 0.030) == pytest.approx(0.120)  # 10 ms left, throttled to 0.1
    assert sim._cpu_done("a", 0.5, 0.100) == pytest.approx(0.5 + 0.2 + 0.02)  # 40 + 40 + 20 ms
    # on a loaded host with half a core left, wall time doubles but the quota counts CPU time
    loaded = Simulator(costs(), [dev("a")], {}, no_replan, plan=plan, quotas={"a": 0.4}, cpu_share=0.5)
    assert loaded._cpu_done("a", 0.0, 0.030) == pytest.approx(0.060)  # 30 of the 40 ms budget
    assert loaded._cpu_done("a", 0.060, 0.020) == pytest.approx(0.120)  # 10 ms to 0.08, wait, 10 ms
    assert loaded._cpu_done("b", 0.0, 0.030) == pytest.approx(0.060)  # no quota: the share alone
    # one session, 60 ms of compute per token at full speed: it overdraws the budget, so it is busy
    # all the time and runs at 0.4 of the speed
    one = sim.run(Workload(sessions=1, prompt_tokens=8, max_tokens=50, duration_s=30, warmup_s=5))
    assert one.token_latency_s == pytest.approx(0.060 / 0.4, rel=0.05)
    # two stages of 30 ms each at 0.6 of a core: one session keeps each busy half the time, its bursts
    # fit the budget and run at full speed
    plan = fixed_plan(("a", 0, 3), ("b", 3, 6))
    quotas = {"a": 0.6, "b": 0.6}
    sim = Simulator(costs(), [dev("a"), dev("b")], {}, no_replan, plan=plan, quotas=quotas)
    two = sim.run(Workload(sessions=1, prompt_tokens=8, max_tokens=50, duration_s=30, warmup_s=5))
    assert two.token_latency_s == pytest.approx(0.060, rel=0.1)
    # busy all the time (6 sessions, no batching gain), each gets 0.6 of a core: 30 ms / 0.6 per step
    sim = Simulator(costs(), [dev("a"), dev("b")], {}, no_replan, plan=plan, quotas=quotas, max_batch=1)
    busy = sim.run(Workload(sessions=6, prompt_tokens=8, max_tokens=50, duration_s=60, warmup_s=10))
    assert busy.tokens_per_s == pytest.approx(0.6 / 0.030, rel=0.1)


def test_the_gather_wait_breaks_the_lockstep_of_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``StageWorker._gather``: without the short wait each session's step arrives while another's
    computes and batches hold one; with it (5 % of the last batch) 4 sessions on 2 stages pair up."""
    from llnode.sim import engine

    plan = fixed_plan(("a", 0, 3), ("b", 3, 6))
    link = LinkClass("l", 100.0, 1.0)
    batches = {}
    default = engine.GATHER_MAX_S
    for wait in (default, 0.0):
        monkeypatch.setattr(engine, "GATHER_MAX_S", wait)
        sim = Simulator(
            costs(batch4_ms=15.0), [dev("a"), dev("b")], {"a": link, "b": link}, no_replan, plan=plan
        )
        sim.run(Workload(sessions=4, duration_s=30, warmup_s=5))
        batches[wait] = sim.batches
    with_wait, without = batches[default], batches[0.0]
    assert with_wait[2] > 10 * with_wait[1]  # pairs
    assert without[1] > 5 * without[2]  # lockstep: singles


def test_a_slow_link_slows_the_pipeline() -> None:
    c = costs()
    plan = fixed_plan(("a", 0, 3), ("b", 3, 6))
    fast = Simulator(c, [dev("a"), dev("b")], {}, no_replan, plan=plan).run(Workload(sessions=1))
    slow_link = LinkClass("poor", 0.5, 10.0)
    slow = Simulator(c, [dev("a"), dev("b")], {"a": slow_link, "b": slow_link}, no_replan, plan=plan)
    res = slow.run(Workload(sessions=1))
    assert res.token_latency_s - fast.token_latency_s == pytest.approx(
        HIDDEN / 62500 + 8 / 62500 + 0.02, rel=1e-6
    )


def test_leave_join_and_slowdown_replan_with_the_real_planner() -> None:
    man = synthetic_manifest(num_layers=4)
    from llnode.sim.scale import flops_costs

    c = flops_costs(man, costs(6))
    devices = [dev("a"), dev("b"), dev("c", 0.5)]
    links = dict.fromkeys(["a", "b", "c", "d"], LINKS["wifi5"])
    plan_fn = planner(man, links, PlanOptions(solver="dp"))
    events = [
        Event(20, "leave", "b"),
        Event(40, "join", "d", profile=dev("d", 2.0), link=LINKS["wifi5"]),
    ]
    sim = Simulator(c, devices, links, plan_fn, events=events)
    first = sim.plan
    assert first is not None and "b" in first.devices
    r = sim.run(Workload(sessions=4, max_tokens=16, duration_s=70, warmup_s=5))
    plans = [p for _, p in r.plans]
    assert len(plans) == 3, r.events
    assert "b" not in plans[1].devices
    assert "d" in plans[2].devices  # the fastest device joins the pipeline
    per_bucket = dict(r.timeline)
    assert per_bucket[10.0] > 0 and per_bucket[30.0] > 0 and per_bucket[60.0] > 0  # served throughout
    assert any(t == 0 for t in (per_bucket[20.0], per_bucket[22.0]))  # the pause while b is detected
    # a device slowing 10x: the rebalance gives it less work (or leaves it out)
    sim = Simulator(c, devices, links, plan_fn, events=[Event(10, "slowdown", "a", 10.0)])
    before = sim.plan
    assert before is not None
    r = sim.run(Workload(sessions=4, max_tokens=16, duration_s=40, warmup_s=5))
    after = r.plans[-1][1]
    before_a, after_a = (p.ranges().get("a", (0, 0)) for p in (before, after))
    assert len(r.plans) == 2 and after_a[1] - after_a[0] < before_a[1] - before_a[0], r.events


def test_open_loop_arrivals() -> None:
    plan = fixed_plan(("a", 0, 6))
    sim = Simulator(costs(), [dev("a", 10.0)], {}, no_replan, plan=plan)
    r = sim.run(Workload(arrival_rate=2.0, max_tokens=4, duration_s=100, warmup_s=10, seed=3))
    assert 150 <= r.requests <= 250
    assert r.tokens_per_s == pytest.approx(8.0, rel=0.2)


def test_profiles_and_fleets() -> None:
    fleet = draw_fleet(30, random.Random(7))
    again = draw_fleet(30, random.Random(7))
    assert [d.device_id for d in fleet.devices] == [d.device_id for d in again.devices]
    a, b = fleet.devices[0].device_id, fleet.devices[1].device_id
    lk = fleet.link_profiles()[(a, b)]
    assert lk.bandwidth_bytes_per_s == min(fleet.link[a].bytes_per_s, fleet.link[b].bytes_per_s)
    assert lk.rtt_s == pytest.approx((fleet.link[a].rtt_ms + fleet.link[b].rtt_ms) / 1e3)
    assert pair_links(["x", "y"], {"x": None, "y": None})[("x", "y")].rtt_s == 0.0
    with pytest.raises(ValueError, match="unknown profile"):
        draw_fleet(3, random.Random(0), device_mix={"toaster": 1.0})


def test_a_device_class_pays_the_fixed_costs_measured_here_at_its_core() -> None:
    """The daemon's own CPU at the class's core (the laptop class is one core here, a flagship phone
    0.52 of it), a run's fixed cost at its FLOP rate, as the simulator scales the costs that hold it."""
    step = StepCosts(own_s=1.5e-3, call_s=0.4e-3, reference_flops_per_s=4e9, fuse_block=8)
    laptop = device_profile(DEVICES["laptop"], "l", step=step)
    phone = device_profile(DEVICES["flagship-phone"], "p", step=step)
    old = device_profile(DEVICES["old-phone"], "o", step=step)
    assert laptop.step_overhead_s == pytest.approx(1.5e-3)
    assert phone.step_overhead_s == pytest.approx(1.5e-3 * 27 / 14)  # ~2.9 ms per step on a phone
    assert old.step_overhead_s > phone.step_overhead_s > laptop.step_overhead_s
    assert phone.call_overhead_s == pytest.approx(0.4e-3 * 4e9 / 14e9) and phone.fuse_block == 8
    assert own_cpu_scale(phone, step) == pytest.approx(27 / 14)
    # without measured fixed costs a class is priced by its modules alone (as before session 6)
    bare = device_profile(DEVICES["flagship-phone"], "b")
    assert (bare.step_overhead_s, bare.call_overhead_s, bare.fuse_block) == (0.0, 0.0, 1)
    # the fixed costs do not change which devices a seed draws
    ids = [d.device_id for d in draw_fleet(20, random.Random(3), step=step).devices]
    assert ids == [d.device_id for d in draw_fleet(20, random.Random(3)).devices]


def test_the_scale_study_simulates_the_price_the_planner_put_on_a_class_stage() -> None:
    """One way to price: a device class's stage step costs the planner ``a + b·k`` (its profile's
    fixed costs, FLOPs at its speed) and the simulator exactly that for one session on that device."""
    from llnode.plan.costs import build_instance
    from llnode.sim.scale import flops_costs, planner_model, simulate, step_costs

    man = synthetic_manifest(num_layers=7)  # 9 modules: [0, 9) makes 2 runs of 8, as the planner's 1 + 8/8
    ref = replace(costs(9), call_s=[0.4e-3, 0.5e-3, 0.6e-3, 0.8e-3], fuse_block=8)
    c = flops_costs(man, ref)
    cpu = DaemonCpu(step_s=1.4e-3, row_s=0.1e-3)  # not the entry, no module factor: the planner's part
    step = step_costs(c, cpu)
    assert step.call_s == 0.4e-3 and step.own_s == pytest.approx(1.5e-3)
    phone = device_profile(DEVICES["flagship-phone"], "p", step=step)
    inst = build_instance(man, [phone], options=PlanOptions(cost_context=c.context))
    plan = fixed_plan(("p", 0, 9))
    _, latency = simulate(c, plan, [phone], {"p": None}, 2, tokens=8, duration_s=5.0, cpu=cpu)
    assert latency == pytest.approx(inst.compute_s(0, 0, 9), rel=1e-9)
    assert inst.compute_s(0, 0, 9) > c.decode_range_s(0, 9, phone.decode_flops_per_s) + 2e-3  # both charge it
    # measured costs that FLOPs do not predict (a head 3x its share): the planner gets the measured bodies
    head = [*ref.decode_s[:-1], 3 * ref.decode_s[-1]]
    measured = replace(ref, decode_s=head, decode_batch_s=[head] * 3)
    model = planner_model(man, measured)
    inst = build_instance(model, [phone], options=PlanOptions(cost_context=c.context))
    _, latency = simulate(measured, plan, [phone], {"p": None}, 2, tokens=8, duration_s=5.0, cpu=cpu)
    assert latency == pytest.approx(inst.compute_s(0, 0, 9), rel=1e-9)
    assert inst.t[0][8] == pytest.approx(3 * inst.t[0][7], rel=0.05)  # the head priced as measured


def test_module_profile_on_a_real_shard_set(tiny_llama_shards: Path, tmp_path: Path) -> None:
    c, cached = cached_costs(tiny_llama_shards, cache_dir=tmp_path)
    assert not cached and c.num_modules == 4
    assert all(t > 0 for t in c.decode_s) and all(t > 0 for t in c.prefill_s)
    assert c.out_bytes_per_token[-1] == TOKEN_ID_BYTES and c.reference_flops_per_s > 0
    # the daemon's fused blocks were timed too: what a run it does not make saves, per batch size. It is a
    # difference of two timings, so on a loaded machine it can come out <= 0: it is then taken as no
    # saving, never as a negative one (whether it is positive is the benchmark's figure, not a test's)
    assert c.fuse_block == fuse_block() and len(c.call_s) == 1 + len(c.batch_sizes)
    assert all(x >= 0 for x in c.call_s)
    assert c.decode_range_s(0, 4, c.reference_flops_per_s) <= sum(c.decode_s) + 1e-12
    again, cached = cached_costs(tiny_llama_shards, cache_dir=tmp_path)
    assert cached and again == c
    (next(tmp_path.iterdir())).write_text("{not json")
    _, cached = cached_costs(tiny_llama_shards, cache_dir=tmp_path)
    assert not cached  # a broken cache is measured again, not trusted


def test_the_range_check_times_the_daemons_own_runner(tiny_llama_shards: Path, tmp_path: Path) -> None:
    """`bench sim --fused-check`: each range's price next to its runner's CPU per step, in one process."""
    c, _ = cached_costs(tiny_llama_shards, cache_dir=tmp_path)
    rows = range_check(tiny_llama_shards, c, (((0, 4),), ((0, 1), (1, 4)), ((2, 9),)), repeats=3)
    assert [(r["start"], r["end"]) for r in rows] == [(0, 4), (0, 1), (1, 4)]  # [2, 9) is not in the model
    assert all(r["measured_s"] > 0 for r in rows)
    whole = rows[0]
    assert whole["fused_s"] < whole["per_module_s"]  # one run instead of four
    assert rows[1]["fused_s"] == pytest.approx(rows[1]["per_module_s"])  # one module: one run either way


def test_validation_verdict_counts_a_collapsed_run_as_a_miss() -> None:
    """A real cluster that served nothing (0 tok/s, no latency) is a miss, not a crash of the bench."""
    from llnode.bench.sim import _within

    row = {"predicted_tps": 10.0, "predicted_latency_s": 0.1}
    assert _within({**row, "measured_tps": 10.5, "measured_latency_s": 0.105}, 0.15)
    assert not _within({**row, "measured_tps": 5.0, "measured_latency_s": 0.105}, 0.15)
    assert not _within({**row, "measured_tps": 0.0, "measured_latency_s": float("nan")}, 0.15)


def test_bench_measures_module_costs_inside_a_cpu_group(tiny_llama_shards: Path) -> None:
    """The validation's side-by-side calibration: the batching curve measured now, in a CPU group at
    100 % of a core (mean times: what a run under the same load sees), and the group removed after."""
    from llnode.bench.sim import measure_costs
    from llnode.emulate.cgroups import CPU_ROOT, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs a cgroup v1 CPU controller: {reason}")
    c = measure_costs(tiny_llama_shards, context=25)  # the validation's workload context
    assert c.num_modules == 4 and c.batch_sizes == (2, 4, 8) and c.context == 25
    assert len(c.decode_batch_s) == 3 and all(len(b) == 4 and min(b) > 0 for b in c.decode_batch_s)
    assert not (CPU_ROOT / f"llnode-simcal-{os.getpid()}").exists()  # the calibration group is gone


def test_the_daemons_own_cpu_per_step_is_its_cpu_outside_the_stage_worker_thread() -> None:
    """Calibration: per node over a window, the process CPU minus its busiest thread's (the stage worker,
    where onnxruntime runs), over the decode steps; a node without a stage contributes nothing."""
    from llnode.bench.sim import _own_cpu, _usage_delta

    def usage(cpu: float, threads: dict[str, float], batches: dict[int, int]) -> dict[str, object]:
        return {"cpu_s": cpu, "threads": threads, "throttled_s": 0.0, "batches": batches,
                "range": [0, 3], "decode_ms": None, "hops": None}  # fmt: skip

    before = usage(5.0, {"1/1": 1.0, "1/2": 3.0, "1/3": 1.0}, {1: 100})
    after = usage(7.0, {"1/1": 1.3, "1/2": 4.6, "1/3": 1.1}, {1: 130, 2: 10})  # worker: 1.6 s of 2.0
    a = _usage_delta(before, after)
    assert a["worker_cpu_s"] == pytest.approx(1.6) and a["own_cpu_s"] == pytest.approx(0.4)
    assert a["batches"] == {1: 30, 2: 10}
    assert _own_cpu(a) == (pytest.approx(0.4), 40)
    assert _own_cpu({"own_cpu_s": 0.3, "batches": {}, "range": None}) == (0.0, 0)  # no stage, no steps


def test_the_daemons_cpu_is_measured_per_step_per_row_and_at_the_entry() -> None:
    """``measure_daemon_cpu``: the other nodes' own CPU splits into per step and per session row (their
    windows at 1 and at 4 sessions tell them apart), the entry's excess over that is its own part, and
    the worker threads' CPU over the price of their decode batches and prefills is the module factor.
    Windows made from known parts come back as those parts."""
    from llnode.bench.sim import measure_daemon_cpu

    c = costs()
    w = {"tokens": 10, "prompt_tokens": 8, "measure_s": 10.0}
    step, row, e_step, e_row, factor = 1.5e-3, 0.3e-3, 0.5e-3, 0.8e-3, 1.2

    def node(
        entry: bool, rng: tuple[int, int], batches: dict[int, int], requests: float
    ) -> dict[str, object]:
        steps, rows = sum(batches.values()), sum(k * v for k, v in batches.items())
        own = step * steps + row * rows + (e_step * steps + e_row * rows if entry else 0.0)
        price = sum(c.decode_range_s(*rng, REF, k) * v for k, v in batches.items())
        price += requests * c.prefill_range_s(*rng, 8, REF)
        return {"own_cpu_s": own, "worker_cpu_s": factor * price, "batches": batches, "range": list(rng)}

    windows = [
        {"tokens_per_s": tps, "nodes": [node(True, (0, 2), b, tps), node(False, (2, 6), b, tps)]}
        for tps, b in ((10.0, {1: 100}), (20.0, {2: 60, 4: 30}))  # 10 tokens per request: tps requests
    ]
    got = measure_daemon_cpu(windows, c, w)
    assert (got.step_s, got.row_s) == (pytest.approx(step), pytest.approx(row))
    assert (got.entry_step_s, got.entry_row_s) == (pytest.approx(e_step), pytest.approx(e_row))
    assert got.module_factor == pytest.approx(factor)
    assert got.own_s(4, entry=True) == pytest.approx(step + e_step + 4 * (row + e_row))
    # batches of one only: per step and per row cannot be told apart, so it is all per step
    ones = measure_daemon_cpu(windows[:1], c, w)
    assert ones.row_s == 0.0 and ones.step_s == pytest.approx(step + row)


def test_own_cpu_per_step_is_charged_under_the_nodes_quota() -> None:
    """The daemon's own CPU per step runs on the stage and counts against its CFS budget: one session at
    60 ms of modules + 20 ms of own CPU per step on 0.4 of a core is busy all the time, 80 / 0.4 ms per
    token; at a full core 80 ms."""
    plan = fixed_plan(("a", 0, 6))
    over = Overheads(cpu=DaemonCpu(step_s=0.020))
    work = Workload(sessions=1, prompt_tokens=8, max_tokens=50, duration_s=30, warmup_s=5)
    full = Simulator(costs(), [dev("a")], {}, no_replan, plan=plan, overheads=over).run(work)
    assert full.token_latency_s == pytest.approx(0.080, rel=1e-6)
    quota = Simulator(costs(), [dev("a")], {}, no_replan, plan=plan, overheads=over, quotas={"a": 0.4})
    assert quota.run(work).token_latency_s == pytest.approx(0.080 / 0.4, rel=0.05)


def test_the_daemons_cpu_is_charged_by_role_rows_and_module_factor() -> None:
    """``DaemonCpu`` in the simulator: the entry's part only on the entry's stage, the per-row parts per
    session in the batch, and the worker's factor on the decode modules: one session through a (30 ms)
    and b (30 ms), entry a: a pays 30 x 1.5 + 2 + 1 + 3 + 4 ms, b 30 x 1.5 + 2 + 1 ms."""
    plan = fixed_plan(("a", 0, 3), ("b", 3, 6))
    cpu = DaemonCpu(step_s=0.002, row_s=0.001, entry_step_s=0.003, entry_row_s=0.004, module_factor=1.5)
    work = Workload(sessions=1, prompt_tokens=8, max_tokens=50, duration_s=30, warmup_s=5)
    sim = Simulator(costs(), [dev("a"), dev("b")], {}, no_replan, plan=plan, overheads=Overheads(cpu=cpu))
    assert sim.run(work).token_latency_s == pytest.approx(0.055 + 0.048, rel=1e-6)
    # the entry elsewhere (b): b pays the entry's part, a does not
    sim = Simulator(
        costs(), [dev("a"), dev("b")], {}, no_replan, plan=plan, entries=["b"], overheads=Overheads(cpu=cpu)
    )
    assert sim.run(work).token_latency_s == pytest.approx(0.048 + 0.055, rel=1e-6)
    # four sessions batched on one 60 ms stage (no batching gain): 4 rows of per-row CPU per step
    one = fixed_plan(("a", 0, 6))
    sim = Simulator(
        costs(), [dev("a")], {}, no_replan, plan=one, overheads=Overheads(cpu=replace(cpu, module_factor=1.0))
    )
    sim.run(replace(work, sessions=4, max_tokens=32, duration_s=60))
    assert sim.batches[4] > 10 * (sim.batches[1] + sim.batches[2] + sim.batches[3])
    assert cpu.own_s(4, entry=True) == pytest.approx(0.002 + 0.003 + 4 * 0.005)


def test_a_saved_validation_run_is_predicted_again_offline() -> None:
    """``bench sim --repredict``: a saved run's rows priced again from its own costs, plans, quotas and
    CPU shares, with its calibrated overheads or ones to try."""
    from llnode.bench.sim import repredict

    row = {
        "config": "2 nodes 1/1 cores, unshaped", "plan": [["node0", 0, 3], ["node1", 3, 6]],
        "quotas": [1.0, 1.0], "mbit": None, "sessions": 1, "cpu_share": 1.0,
        "measured_tps": 10.0, "measured_latency_s": 0.1, "predicted_tps": 0.0, "predicted_latency_s": 0.0,
    }  # fmt: skip
    saved = {
        "costs": costs().to_dict(), "validation": [row], "step_s": 0.002, "token_s": 0.001, "hop_s": 0.0005,
        "workload": {"tokens": 50, "prompt_tokens": 8, "warm_s": 5.0, "measure_s": 25.0},
    }  # fmt: skip
    (again,) = repredict(saved)
    # two stages of 30 ms + 2 ms own CPU, two hops (a -> b, b -> entry a) of 0.5 ms, 1 ms at the entry
    assert again["predicted_latency_s"] == pytest.approx(0.064 + 0.001 + 0.001, abs=1e-4)
    assert again["measured_tps"] == 10.0 and again["config"] == row["config"]
    (bare,) = repredict(saved, Overheads())
    assert bare["predicted_latency_s"] == pytest.approx(0.060, abs=1e-4)


def test_process_cpu_is_read_from_proc() -> None:
    """The per-node CPU reading behind the calibration: utime + stime of a live process, 0 if gone."""
    import time

    from llnode.bench.sim import _proc_cpu_s

    before = _proc_cpu_s(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert _proc_cpu_s(os.getpid()) - before >= 0.15
    assert _proc_cpu_s(2**22 + 1) == 0.0


def test_a_nodes_share_of_a_core_does_not_count_the_probe_against_itself() -> None:
    """The probe is one of the runnable threads it measures: 0.69 of a core on two cores means three
    threads wanted them, the probe and two nodes, and each node ran at full speed; 0.5 means four, so a
    node competed with two others (and the probe a tenth of the time)."""
    from llnode.bench.sim import PROBE_DUTY, node_share

    assert node_share(1.0, 2) == 1.0 and node_share(0.69, 2) == 1.0
    assert node_share(0.5, 2) == pytest.approx(2 / (3 + PROBE_DUTY))
    assert node_share(0.25, 1) == pytest.approx(1 / (3 + PROBE_DUTY))


def test_modules_are_timed_one_after_the_other_as_a_pipeline_runs_them() -> None:
    """The profile runs every module once per round, in order (each finds its weights pushed out of
    the caches by the others, as in a pipeline), and keeps each one's median CPU time over the rounds."""
    import time

    from llnode.sim.costs import _in_pipeline_order

    order: list[int] = []

    def call(k: int, cpu_s: float) -> Callable[[], None]:
        def run() -> None:
            order.append(k)
            end = time.process_time() + cpu_s
            while time.process_time() < end:
                pass

        return run

    medians, slowdown = _in_pipeline_order([call(0, 0.002), call(1, 0.006)], 5)
    assert order == [0, 1] * 6  # a warm-up round, then 5 rounds in pipeline order
    assert medians[0] == pytest.approx(0.002, abs=0.001) and medians[1] == pytest.approx(0.006, abs=0.001)
    assert slowdown >= 0.99  # wall time can only exceed CPU time on one thread


def test_the_wait_per_step_keeps_a_stage_busy_without_spending_its_cpu_budget() -> None:
    """``Overheads.wait_s``: wall time per step on the stage (wake-ups), not CPU: one session on a 1-core
    stage of 60 ms pays it once per token; four sessions batched pay it once per batch, so they still
    run as batches of 4 (a wait between a token and its next step would split them); and a quota is
    charged the modules' CPU only."""
    plan = fixed_plan(("a", 0, 6))
    over = Overheads(wait_s=0.010)
    work = Workload(sessions=1, prompt_tokens=8, max_tokens=50, duration_s=30, warmup_s=5)
    one = Simulator(costs(), [dev("a")], {}, no_replan, plan=plan, overheads=over).run(work)
    assert one.token_latency_s == pytest.approx(0.070, rel=1e-6)
    sim = Simulator(costs(batch4_ms=15.0), [dev("a")], {}, no_replan, plan=plan, overheads=over)
    sim.run(replace(work, sessions=4, max_tokens=32, duration_s=60))
    assert sim.batches[4] > 10 * (sim.batches[1] + sim.batches[2] + sim.batches[3])
    # at 0.5 of a core, 60 ms of CPU per step: the budget refills while the stage waits, so a step costs
    # 60 / 0.5 = 120 ms (it would be 130 if waiting were charged like computing)
    quota = Simulator(costs(), [dev("a")], {}, no_replan, plan=plan, overheads=over, quotas={"a": 0.5})
    assert quota.run(work).token_latency_s == pytest.approx(0.120, rel=0.02)


def test_a_saved_run_is_calibrated_again_from_its_calibration_clusters() -> None:
    """``calibrate`` (the validation's and ``--repredict``'s): from the two clusters' windows, the daemon's
    CPU by role, then the 1-node run's leftover time per token as waiting per step, then the 2-node
    run's leftover per hop. Clusters built from known parts give those parts back."""
    from llnode.bench.sim import calibrate

    c = costs()
    w = {"tokens": 50, "prompt_tokens": 8, "warm_s": 5.0, "measure_s": 25.0, "cores": 2}
    wait, hop = 0.004, 0.0005

    def node(rng: tuple[int, int], own_ms: float) -> dict[str, object]:
        worker = 100 * c.decode_range_s(*rng, REF) + 5 * c.prefill_range_s(*rng, 8, REF)
        return {"own_cpu_s": own_ms * 0.1, "worker_cpu_s": worker, "batches": {"1": 100}, "range": list(rng)}

    def cluster(
        plan: list[list[object]], nodes: list[dict[str, object]], latency: float
    ) -> dict[str, object]:
        window = {"tokens_per_s": 10.0, "token_latency_s": latency, "cpu_share": 1.0, "nodes": nodes}
        quotas = [1.0] * len(plan)
        return {
            "config": f"{len(plan)} nodes",
            "quotas": quotas,
            "mbit": None,
            "plan": plan,
            "measured_1": window,
        }

    one = cluster([["node0", 0, 6]], [node((0, 6), 3.0)], 0.060 + 0.003 + wait)
    # entry node0 [0, 3): 30 ms + 3 ms own + wait; node1 [3, 6): 30 + 2 + wait; two hops
    two = cluster(
        [["node0", 0, 3], ["node1", 3, 6]],
        [node((0, 3), 3.0), node((3, 6), 2.0)],
        0.033 + 0.032 + 2 * wait + 2 * hop,
    )
    over = calibrate(c, [one, two], w).overheads
    assert over.cpu.step_s == pytest.approx(0.002) and over.cpu.row_s == 0.0
    assert over.cpu.entry_step_s == pytest.approx(0.001) and over.cpu.module_factor == pytest.approx(1.0)
    assert over.wait_s == pytest.approx(wait, abs=2e-4) and over.hop_s == pytest.approx(hop, abs=2e-4)


def test_repredict_refuses_a_file_that_is_not_a_saved_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--repredict`` on a log without the JSON line (runs before session 5) or on JSON without module
    costs: a one-line error and exit code 2, not a traceback."""
    import argparse

    from llnode.bench.sim import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for text in ("a table, no JSON\n", '{"validation": []}\n', ""):
        saved = tmp_path / "saved.log"
        saved.write_text(text)
        assert run(parser.parse_args(["--repredict", str(saved)])) == 2
        assert "--repredict" in capsys.readouterr().err
    assert run(parser.parse_args(["--repredict", str(tmp_path / "missing.log")])) == 2
