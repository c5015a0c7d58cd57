"""The planner and the simulator on swarms: 16 to 1000 devices, three model sizes, Wi-Fi classes.

Questions answered (printed by ``llnode bench sim``, plotted as PNG):
- how long the public planner (``llnode.plan.solve``; a pool above 16 devices) takes as the fleet grows,
  and its plan against the DP over a fixed device order;
- the plan's simulated tokens/s against an even split and a memory-proportional split of the same fleet;
- how many devices a model usefully spreads over before the hops cost more than the compute they save;
- per-token latency against link bandwidth.

SmolLM2-135M is priced with its per-module times measured here (:mod:`llnode.sim.costs`). The bigger
models have no shard set on this machine: their modules are priced by FLOPs at the FLOP rate measured on
SmolLM2's layers (the planner's own assumption), which the output says.

One way to price (session 6): the device classes carry the fixed costs of a stage step measured here
(:class:`llnode.emulate.profiles.StepCosts`), the planner gets the measured module bodies
(:func:`planner_model`) and the simulator charges the daemon's CPU as the validation does, at each
class's core (:func:`simulate`): a plan costs the planner what it costs the simulator for one session.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from llnode.emulate.profiles import (
    DEVICES,
    LINKS,
    LinkClass,
    StepCosts,
    device_profile,
    draw_fleet,
    own_cpu_scale,
)
from llnode.model.manifest import Manifest, load_manifest
from llnode.plan import PlanInfeasible, PlanOptions, solve
from llnode.plan.baselines import even_split, memory_split
from llnode.plan.costs import ModelCosts as PlanModel
from llnode.plan.costs import build_instance
from llnode.plan.profile import DAEMON_CPU, DaemonCpu
from llnode.plan.solve import make_plan
from llnode.plan.synthetic import synthetic_manifest
from llnode.plan.types import DeviceProfile, Plan
from llnode.sim.costs import TOKEN_ID_BYTES, ModuleCosts, cached_costs
from llnode.sim.engine import Overheads, Simulator, Workload, planner


def flops_costs(manifest: Manifest, reference: ModuleCosts) -> ModuleCosts:
    """Module costs of a model with no shard set here: FLOPs at the reference's measured layer rate,
    plus the reference's fixed cost of a run (``call_s``) on every module, fused as the daemon fuses:
    a range then costs its FLOPs at the body rate plus one fixed cost per run it makes, as the planner
    prices it (``stage_fixed_s``)."""
    ctx, p = reference.context, reference.prompt_tokens
    rate = reference.reference_flops_per_s  # net of a run's fixed cost (``sim.costs``)
    calls = reference.call_s or [0.0] * (1 + len(reference.batch_sizes))
    pcall = reference.prefill_call_s
    # a prefill runs at the rate the reference's layers showed for its prefill (batched matmuls)
    layers = [i for i, s in enumerate(reference.decode_s) if 0 < i < reference.num_modules - 1]
    per_layer = rate * sum(reference.decode_s[i] - calls[0] for i in layers) / len(layers)
    prefill_rate = p * per_layer / (sum(reference.prefill_s[i] - pcall for i in layers) / len(layers))
    decode = [m.flops.at(ctx) / rate for m in manifest.modules]
    return ModuleCosts(
        model=manifest.name,
        manifest_sha="flops",
        threads=reference.threads,
        context=ctx,
        prompt_tokens=p,
        decode_s=[t + calls[0] for t in decode],
        decode_batch_s=[[t + c for t in decode] for c in calls[1:]],  # batching is free
        prefill_s=[p * m.flops.at(p // 2) / prefill_rate + pcall for m in manifest.modules],
        out_bytes_per_token=[manifest.boundary_bytes(m) for m in range(manifest.num_modules - 1)]
        + [TOKEN_ID_BYTES],
        reference_flops_per_s=rate,
        batch_sizes=reference.batch_sizes,
        fuse_block=reference.fuse_block,
        call_s=list(reference.call_s),
        prefill_call_s=pcall,
    )


def step_costs(costs: ModuleCosts, cpu: DaemonCpu = DAEMON_CPU) -> StepCosts:
    """The fixed costs of a stage step measured on a core here, for the device classes: the planner's
    own ``DaemonCpu`` (one session, not the entry) and the fused run's fixed cost of ``costs``."""
    return StepCosts(
        own_s=cpu.own_s(),
        call_s=costs.call_s[0] if costs.call_s else 0.0,
        reference_flops_per_s=costs.reference_flops_per_s,
        fuse_block=costs.fuse_block,
    )


def models(shards: Path) -> list[tuple[str, Manifest, ModuleCosts]]:
    """SmolLM2-135M (measured here) and two bigger Llama shapes priced by FLOPs (fp16 weights)."""
    real = load_manifest(shards)
    costs, _ = cached_costs(shards)
    big = synthetic_manifest(
        num_layers=24,
        hidden=2048,
        intermediate=8192,
        heads=32,
        kv_heads=32,
        bytes_per_param=2.0,
        name="llama-1.7b-shape",
    )
    huge = synthetic_manifest(
        num_layers=32,
        hidden=4096,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        vocab=32000,
        bytes_per_param=2.0,
        name="llama-7b-shape",
    )
    return [
        ("smollm2-135m (measured)", real, costs),
        ("1.7B-shape (FLOPs)", big, flops_costs(big, costs)),
        ("7B-shape (FLOPs)", huge, flops_costs(huge, costs)),
    ]


def simulate(
    costs: ModuleCosts,
    plan: Plan,
    devices: list[DeviceProfile],
    links: Mapping[str, LinkClass | None],
    sessions: int,
    tokens: int = 64,
    duration_s: float = 120.0,
    cpu: DaemonCpu = DAEMON_CPU,
    max_batch: int = 0,
) -> tuple[float, float]:
    """(tokens/s with ``sessions`` clients, per-token latency with one) of ``plan``, the daemon's CPU
    charged as ``cpu`` (by role and rows, with its module factor, as the validation charges it) at each
    device's core, read from the profiles' fixed costs (:func:`own_cpu_scale`): the same price the
    planner put on the plan, where the scale study's simulations charged nothing until session 6.
    ``max_batch=1``: every stage runs one session's step at a time (what the planner's objective prices)."""

    def fixed(_: list[DeviceProfile]) -> Plan:
        return plan

    step = StepCosts(cpu.own_s(), 0.0, costs.reference_flops_per_s)
    scale = {d.device_id: own_cpu_scale(d, step) for d in devices if d.step_overhead_s > 0}
    out = []
    for s in (sessions, 1):
        sim = Simulator(
            costs,
            devices,
            dict(links),
            fixed,
            plan=plan,
            entries=[plan.stages[0].device_id],
            overheads=Overheads(cpu=cpu),
            own_scale=scale,
            max_batch=max_batch,
        )
        r = sim.run(Workload(sessions=s, max_tokens=tokens, duration_s=duration_s, warmup_s=duration_s / 4))
        out.append(r.tokens_per_s if s == sessions else r.token_latency_s)
    return out[0], out[1]


def planner_model(manifest: Manifest, costs: ModuleCosts, options: PlanOptions | None = None) -> PlanModel:
    """The planner's model with each module's decode FLOPs replaced by its measured body (``costs``,
    net of a run's fixed cost) at the reference rate: the planner then prices module m on a device of
    speed v at ``body_m x reference / v`` plus its profile's fixed costs, which is what the simulator
    charges one session (one way to price). Why: by FLOPs the head of SmolLM2 is priced at about half
    of what it measures next to a layer, and plans the planner ranked first simulated 6-26 % below the
    DP's (session 4)."""
    base = PlanModel.from_manifest(manifest, options or PlanOptions())
    call = costs.call_s[0] if costs.call_s else 0.0
    return replace(base, decode_flops=[(t - call) * costs.reference_flops_per_s for t in costs.decode_s])


def fleet_table(shards: Path, sizes: list[int], rng: random.Random, time_limit_s: float) -> dict[str, Any]:
    manifest = load_manifest(shards)
    costs, _ = cached_costs(shards)
    options = PlanOptions(time_limit_s=time_limit_s)
    model = planner_model(manifest, costs, options)
    step = step_costs(costs)
    print(
        f"== fleets drawn from the device and Wi-Fi profiles, {manifest.name}: planners vs even / memory "
        "splits (tok/s simulated with 2 sessions per stage of the planner's plan; 'obj ms': the "
        "planner's own price of the plan's slowest stage)"
    )
    print(
        f"{'devices':>7} {'plan s':>7} {'solver':>6} {'stages':>6} {'obj ms':>6} {'tok/s':>7} "
        f"{'ms/tok':>7} | "
        f"{'DP s':>6} {'stages':>6} {'obj ms':>6} {'DP tok/s':>8} | {'even':>6} {'memory':>6} | "
        f"{'unbatched: plan':>15} {'DP':>7}"
    )
    plan_s: dict[str, float] = {}
    rows = []
    for n in sizes:
        fleet = draw_fleet(n, rng, step=step)
        links = fleet.link_profiles()
        t0 = time.perf_counter()
        # the public planner as the daemon calls it (above ``milp_max_devices`` it solves over a pool)
        plan = solve(model, fleet.devices, links, options)
        dt = time.perf_counter() - t0
        plan_s[str(n)] = round(dt, 3)
        sessions = 2 * len(plan.stages)
        link = dict(fleet.link)
        tps, lat = simulate(costs, plan, fleet.devices, link, sessions)
        alt: dict[str, tuple[float, float | None]] = {}
        t0 = time.perf_counter()
        dp = (
            plan if plan.solver == "dp" else solve(model, fleet.devices, links, replace(options, solver="dp"))
        )
        alt["dp"] = (
            dt if dp is plan else time.perf_counter() - t0,
            simulate(costs, dp, fleet.devices, link, sessions)[0],
        )
        # the same plans unbatched: the planner's objective prices one session's step per stage, and
        # the gap between the two plans closes here if batching (and the ring) is what separates them
        unbatched = [simulate(costs, p, fleet.devices, link, sessions, max_batch=1)[0] for p in (plan, dp)]
        inst = build_instance(model, fleet.devices, links, options)
        for name, ev in (("even", even_split(inst)), ("memory", memory_split(inst))):
            if not ev.feasible:
                alt[name] = (0.0, None)  # a device is given more than it can hold
                continue
            bplan = make_plan(inst, ev, name, False, 0.0, [], {})
            alt[name] = (0.0, simulate(costs, bplan, fleet.devices, link, sessions)[0])
        row = {
            "devices": n,
            "plan_s": dt,
            "solver": plan.solver,
            "stages": len(plan.stages),
            "plan_bottleneck_s": plan.bottleneck_s,
            "plan_tps": tps,
            "latency_s": lat,
            "dp_s": alt["dp"][0],
            "dp_stages": len(dp.stages),
            "dp_bottleneck_s": dp.bottleneck_s,
            "dp_tps": alt["dp"][1],
            "plan_tps_unbatched": unbatched[0],
            "dp_tps_unbatched": unbatched[1],
            "even_tps": alt["even"][1],
            "memory_tps": alt["memory"][1],
            "notes": plan.notes,
        }
        rows.append(row)
        print(
            f"{n:>7} {dt:>7.2f} {plan.solver:>6} {len(plan.stages):>6} {plan.bottleneck_s * 1e3:>6.2f} "
            f"{tps:>7.1f} {lat * 1e3:>7.1f} | {alt['dp'][0]:>6.2f} {len(dp.stages):>6} "
            f"{dp.bottleneck_s * 1e3:>6.2f} {_fmt(alt['dp'][1]):>8} | {_fmt(alt['even'][1]):>6} "
            f"{_fmt(alt['memory'][1]):>6} | {unbatched[0]:>7.1f} {unbatched[1]:>7.1f}",
            flush=True,
        )
    return {"plan_s": plan_s, "fleet": rows}


def _fmt(x: float | None) -> str:
    return "oom" if x is None else f"{x:.1f}"


def spread_study(shards: Path, counts: list[int], time_limit_s: float) -> dict[str, Any]:
    """Identical mid-range phones, added one group at a time: where do more devices stop helping?"""
    out: dict[str, Any] = {}
    cls = DEVICES["flagship-phone"]
    print("== how far a model spreads: n flagship phones on one Wi-Fi class, the planner free to use fewer")
    print(
        f"{'model':<26} {'link':<16} " + " ".join(f"{n:>9}" for n in counts) + "   (simulated tok/s | stages)"
    )
    opts = PlanOptions(time_limit_s=time_limit_s)
    for label, manifest, costs in models(shards):
        step, model = step_costs(costs), planner_model(manifest, costs, opts)
        for link_name in ("wifi5", "wifi4-congested"):
            link = LINKS[link_name]
            series: list[tuple[int, float | None, int]] = []
            for n in counts:
                devices = [device_profile(cls, f"phone-{i}", step=step) for i in range(n)]
                links = dict.fromkeys((d.device_id for d in devices), link)
                try:
                    plan = planner(model, links, opts)(devices)
                except PlanInfeasible:
                    series.append((n, None, 0))
                    continue
                tps, _ = simulate(
                    costs, plan, devices, links, 2 * len(plan.stages), tokens=32, duration_s=40.0
                )
                series.append((n, tps, len(plan.stages)))
            useful = _useful(series)
            out[f"{label} / {link_name}"] = {"series": series, "useful_devices": useful}
            cells = " ".join(f"{('oom' if t is None else f'{t:.1f}|{k}'):>9}" for _, t, k in series)
            print(f"{label:<26} {link_name:<16} {cells}   useful up to {useful}", flush=True)
    return out


def _useful(series: list[tuple[int, float | None, int]]) -> int | None:
    """The device count after which adding devices gains less than 5 % tokens/s."""
    best_n, best = None, 0.0
    for n, tps, _ in series:
        if tps is not None and tps > best * 1.05:
            best_n, best = n, tps
    return best_n


def bandwidth_study(shards: Path, mbits: list[float], time_limit_s: float) -> list[dict[str, float]]:
    """SmolLM2 on 4 flagship phones: per-token latency and tokens/s as the Wi-Fi gets slower."""
    manifest = load_manifest(shards)
    costs, _ = cached_costs(shards)
    step = step_costs(costs)
    devices = [device_profile(DEVICES["flagship-phone"], f"phone-{i}", step=step) for i in range(4)]
    opts = PlanOptions(time_limit_s=time_limit_s)
    model = planner_model(manifest, costs, opts)
    rows = []
    print("== 4 flagship phones, SmolLM2: latency vs link bandwidth (the plan re-solved for each link)")
    print(f"{'Mbit/s':>7} {'stages':>6} {'ms/token':>9} {'tok/s@8':>8}")
    for mbit in mbits:
        link = replace(LINKS["wifi5"], mbit=mbit, name=f"{mbit:g}mbit")
        links = dict.fromkeys((d.device_id for d in devices), link)
        plan = planner(model, links, opts)(devices)
        tps, lat = simulate(costs, plan, devices, links, 8)
        rows.append({"mbit": mbit, "stages": len(plan.stages), "latency_s": lat, "tokens_per_s": tps})
        print(f"{mbit:>7g} {len(plan.stages):>6} {lat * 1e3:>9.1f} {tps:>8.1f}", flush=True)
    return rows


def scale_study(shards: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    from llnode.bench.balance import write_timeline_png

    sizes = [int(s) for s in args.sizes.split(",") if s]
    fleet = fleet_table(shards, sizes, rng, time_limit_s=10.0)
    spread = spread_study(shards, [1, 2, 4, 8, 16, 32, 64], time_limit_s=5.0)
    bw = bandwidth_study(shards, [0.5, 1, 2, 5, 10, 20, 50, 100, 300], time_limit_s=5.0)
    args.png_dir.mkdir(parents=True, exist_ok=True)
    colours = [(30, 90, 200), (120, 170, 240), (200, 40, 40), (240, 150, 150), (30, 150, 60), (150, 210, 160)]
    series = []
    for (_, data), rgb in zip(spread.items(), colours, strict=False):
        pts = [(math.log2(n), t) for n, t, _ in data["series"] if t is not None]
        series.append(([x for x, _ in pts], [y for _, y in pts], rgb))
    write_timeline_png(args.png_dir / "sim-tokens-vs-devices.png", series)
    write_timeline_png(
        args.png_dir / "sim-latency-vs-bandwidth.png",
        [
            (
                [math.log10(r["mbit"]) - math.log10(0.5) for r in bw],
                [r["latency_s"] * 1e3 for r in bw],
                (200, 40, 40),
            )
        ],
    )
    print(f"plots: {args.png_dir}/sim-tokens-vs-devices.png, {args.png_dir}/sim-latency-vs-bandwidth.png")
    return {"plan_s": fleet["plan_s"], "fleet": fleet["fleet"], "spread": spread, "bandwidth": bw}
