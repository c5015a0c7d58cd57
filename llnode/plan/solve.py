"""The planner's front door: profiles in, :class:`Plan` out, choosing and falling back between solvers.

Order of work: leave out devices that cannot take part at all (battery rule, too little memory for even
the smallest module) and say why; check that the model fits at all and otherwise raise
:class:`PlanInfeasible` with the missing bytes; then the MILP (CBC by default, HiGHS if asked and
installed; ``milp.solve_exact``), warm-started by a ring search or by the DP over heuristic device
orders, which is also the fallback where no solver runs. Above
``milp_max_devices`` the MILP (or the DP) runs over a pool of the most promising devices
(``pool.candidate_pool``); the notes say which solver produced the plan and what was restricted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from llnode.model.manifest import Manifest
from llnode.plan.bruteforce import brute_force
from llnode.plan.costs import Evaluation, Instance, ModelCosts, build_instance
from llnode.plan.dp import dp_best
from llnode.plan.milp import SolverUnavailable, available_solvers, solve_exact
from llnode.plan.pool import candidate_pool
from llnode.plan.types import DeviceProfile, LinkProfile, Plan, PlanInfeasible, PlanOptions, Stage

MIB = 1024 * 1024


def _fmt_bytes(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if abs(n) < 1024 * MIB else f"{n / (1024 * MIB):.2f} GiB"


def solve(
    model: Manifest | ModelCosts,
    devices: Sequence[DeviceProfile],
    links: Sequence[LinkProfile] | Mapping[tuple[str, str], LinkProfile] = (),
    options: PlanOptions | None = None,
    *,
    current: Plan | Mapping[str, tuple[int, int]] | None = None,
    epoch: int = 0,
) -> Plan:
    """Plan the module assignment. Raises PlanInfeasible (with ``missing_bytes``) if the model cannot fit.

    ``current`` (a Plan or device -> (start, end)) is the plan in force, for the movement term.
    """
    options = options or PlanOptions()
    t0 = time.perf_counter()
    cur_ranges = current.ranges() if isinstance(current, Plan) else dict(current or {})
    full = build_instance(model, devices, links, options, cur_ranges)
    left_out: dict[str, str] = {}
    keep: list[DeviceProfile] = []
    smallest = min(full.memory_bytes(m, m + 1) for m in range(full.num_modules))
    for i, d in enumerate(devices):
        if (
            options.min_battery_pct is not None
            and d.battery_pct is not None
            and d.battery_pct < options.min_battery_pct
            and not d.charging
        ):
            left_out[d.device_id] = (
                f"battery at {d.battery_pct:.0f}% and not charging (below min_battery_pct "
                f"{options.min_battery_pct:.0f}%)"
            )
        elif full.usable[i] < smallest:
            left_out[d.device_id] = (
                f"usable memory {_fmt_bytes(full.usable[i])} ({options.memory_fraction:.0%} of "
                f"{_fmt_bytes(d.memory_available_bytes)} available) is less than the "
                f"{_fmt_bytes(smallest)} the smallest module needs with KV cache and runtime overhead"
            )
        else:
            keep.append(d)
    if not keep:
        raise PlanInfeasible(
            f"no device can hold even one module (smallest needs {_fmt_bytes(smallest)}); "
            + "; ".join(f"{k}: {v}" for k, v in left_out.items()),
            missing_bytes=max(1, smallest - max(full.usable, default=0)),
        )
    inst = build_instance(full.model, keep, links, options, cur_ranges)
    check_fits(inst)

    notes: list[str] = []
    ev: Evaluation | None = None
    solver_used = ""
    optimal = False
    wanted = options.solver
    if wanted == "brute":
        ev = brute_force(inst)
        solver_used, optimal = "brute", True
    else:
        have = available_solvers() if wanted in ("auto", "cbc", "highs") else []
        name = wanted if wanted != "auto" else next((x for x in ("cbc", "highs") if x in have), "")
        use_milp = name in have
        cands, ring = candidate_pool(inst, options.milp_max_devices)
        restricted = len(cands) < inst.num_devices
        pure = (
            options.objective == "throughput"
            and not options.energy_weight
            and not (options.movement_weight and inst.current)
        )
        # the DP is the fallback without a solver, and the MILP's warm start where no ring search runs
        dp_ev = None if use_milp and pure else dp_best(inst, devices=cands if restricted else None)
        if use_milp:
            try:
                res = solve_exact(
                    inst,
                    cands,
                    solver=name,
                    time_limit_s=options.time_limit_s,
                    warm_start=_better(ring, dp_ev),
                )
            except SolverUnavailable as exc:
                notes.append(f"MILP solver failed ({exc}); used the DP over a fixed device order")
                dp_ev = dp_ev or dp_best(inst, devices=cands if restricted else None)
            else:
                if restricted:
                    notes.append(
                        f"{inst.num_devices} devices exceed milp_max_devices={options.milp_max_devices}: "
                        f"the MILP ran over a pool of {len(cands)} (the devices that could run the most "
                        "modules within a first ring's stage time, given their links to it); exact for "
                        "the pool, not proven for every device"
                    )
                if res.evaluation is not None:
                    ev, solver_used = res.evaluation, name
                    optimal = res.optimal and not restricted
                    if not res.optimal:
                        notes.append(
                            f"{name} stopped at the {options.time_limit_s:g} s time limit: best plan found, "
                            "optimality not proven"
                        )
                elif not restricted:
                    # the solver proved there is no assignment at all
                    raise PlanInfeasible(
                        "the modules cannot be packed into contiguous ranges on these devices "
                        f"({name}: {res.status}); at least one more device or "
                        f"{_fmt_bytes(_packing_gap(inst))} more memory on the largest device is needed",
                        missing_bytes=_packing_gap(inst),
                    )
        elif wanted in ("auto", "cbc", "highs"):
            why = f"{wanted} is not installed" if wanted != "auto" else "no MILP solver is installed here"
            notes.append(f"{why}: used the exact DP over cut points for a fixed device order")
        if restricted and not use_milp:
            notes.append(
                f"{inst.num_devices} devices exceed milp_max_devices={options.milp_max_devices}: the DP ran "
                f"over a pool of {len(cands)}"
            )
        if dp_ev is not None and (ev is None or dp_ev.objective_value < ev.objective_value - 1e-12):
            if solver_used:
                notes.append("the DP plan beat the restricted MILP plan")
            ev, solver_used = dp_ev, "dp"
            optimal = False
        if solver_used == "dp" and (
            inst.options.objective == "throughput" and (options.energy_weight or options.movement_weight)
        ):
            notes.append(
                "DP with weighted energy/movement terms under the throughput objective is a heuristic"
            )
    if ev is None:
        gap = _packing_gap(inst)
        raise PlanInfeasible(
            f"no feasible assignment found; about {_fmt_bytes(gap)} more memory on the largest device "
            "is needed",
            missing_bytes=gap,
        )
    return make_plan(inst, ev, solver_used, optimal, time.perf_counter() - t0, notes, left_out, epoch)


def _better(a: Evaluation | None, b: Evaluation | None) -> Evaluation | None:
    if a is None or (b is not None and b.objective_value < a.objective_value):
        return b
    return a


def check_fits(inst: Instance) -> None:
    """Raise PlanInfeasible, with a lower bound on the missing bytes, when the model cannot fit at all.

    Two bounds: the biggest single module (with KV, activations and overhead) must fit on the largest
    device, and all weights + KV must fit in the sum of what devices offer after their own overhead.
    """
    m = inst.model
    best = max(inst.usable)
    worst = max(range(inst.num_modules), key=lambda i: inst.memory_bytes(i, i + 1))
    need_single = inst.memory_bytes(worst, worst + 1)
    need = sum(m.weight_bytes) + sum(m.kv_bytes)
    offer = sum(max(0, u - inst.overhead - min(m.act_bytes)) for u in inst.usable)
    problems = []
    missing = 0
    if need_single > best:
        missing = need_single - best
        problems.append(
            f"module {worst} alone needs {_fmt_bytes(need_single)} (weights, KV cache, activations, runtime "
            f"overhead) but the largest device offers {_fmt_bytes(best)} ({_fmt_bytes(missing)} short)"
        )
    if need > offer:
        missing = max(missing, need - offer)
        problems.append(
            f"weights + KV cache ({inst.options.max_sessions} sessions) need {_fmt_bytes(need)} but the "
            f"{inst.num_devices} device(s) offer {_fmt_bytes(offer)} after overhead and activations "
            f"({_fmt_bytes(need - offer)} short)"
        )
    if problems:
        raise PlanInfeasible(
            "the model does not fit: "
            + "; ".join(problems)
            + f". At least {_fmt_bytes(missing)} missing: add devices, lower max_sessions/max_context, "
            "or raise memory_fraction",
            missing_bytes=missing,
        )


def _packing_gap(inst: Instance) -> int:
    """Extra bytes on the largest device that would make some contiguous packing fit (greedy bound)."""
    order = sorted(range(inst.num_devices), key=lambda d: -inst.usable[d])
    lo, hi = (
        0,
        sum(inst.model.weight_bytes) + sum(inst.model.kv_bytes) + inst.overhead + max(inst.model.act_bytes),
    )
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy_fits(inst, order, mid):
            hi = mid
        else:
            lo = mid + 1
    return max(lo, 1)


def _greedy_fits(inst: Instance, order: list[int], extra: int) -> bool:
    start = 0
    for i, d in enumerate(order):
        cap = inst.usable[d] + (extra if i == 0 else 0)
        end = start
        while end < inst.num_modules and inst.memory_bytes(start, end + 1) <= cap:
            end += 1
        start = end
        if start == inst.num_modules:
            return True
    return False


def make_plan(
    inst: Instance,
    ev: Evaluation,
    solver: str,
    optimal: bool,
    solve_s: float,
    notes: list[str],
    left_out: dict[str, str],
    epoch: int = 0,
) -> Plan:
    """Turn an evaluated assignment into a Plan with per-device reasons and left-out explanations."""
    opts = inst.options
    stages = []
    for i, d in enumerate(ev.order):
        s, e = ev.cuts[i], ev.cuts[i + 1]
        dev = inst.devices[d]
        stages.append(
            Stage(
                device_id=dev.device_id,
                start=s,
                end=e,
                compute_s=ev.compute_s[i],
                link_s=ev.link_s[i],
                prefill_s=opts.prompt_tokens * sum(inst.tp[d][s:e]),
                memory_bytes=ev.memory[i],
                memory_limit_bytes=inst.usable[d],
                name=dev.name,
            )
        )
    plan = Plan(
        epoch=epoch,
        objective=opts.objective,
        solver=solver,
        model=inst.model.name,
        num_modules=inst.num_modules,
        stages=stages,
        left_out=dict(left_out),
        bottleneck_s=ev.bottleneck_s,
        latency_s=ev.latency_s,
        objective_value=ev.objective_value,
        energy_penalty_s=ev.energy_penalty_s,
        movement_penalty_s=ev.movement_penalty_s,
        moved_bytes=ev.moved_bytes if inst.current else 0,
        optimal=optimal,
        solve_s=solve_s,
        notes=list(notes),
        options=opts.to_dict(),
    )
    _explain(inst, ev, plan)
    return plan


def _explain(inst: Instance, ev: Evaluation, plan: Plan) -> None:
    total_flops = sum(inst.model.decode_flops) or 1.0
    speeds = sorted((d.decode_flops_per_s for d in inst.devices), reverse=True)
    stage_times = [c + lk for c, lk in zip(ev.compute_s, ev.link_s, strict=True)]
    bott = max(range(len(stage_times)), key=lambda i: stage_times[i])
    for i, d in enumerate(ev.order):
        dev = inst.devices[d]
        s, e = ev.cuts[i], ev.cuts[i + 1]
        share = sum(inst.model.decode_flops[s:e]) / total_flops
        rank = speeds.index(dev.decode_flops_per_s) + 1
        parts = [
            f"modules {s}..{e - 1} ({e - s} of {inst.num_modules}, {share:.0%} of the FLOPs)",
            f"decode speed {dev.decode_flops_per_s / 1e9:.2f} GFLOP/s (#{rank} of {len(speeds)})",
            f"stage {stage_times[i] * 1e3:.2f} ms = compute {ev.compute_s[i] * 1e3:.2f} + "
            f"{'return hop' if i == len(ev.order) - 1 else 'hop'} {ev.link_s[i] * 1e3:.2f} ms",
            f"memory {_fmt_bytes(ev.memory[i])} of {_fmt_bytes(inst.usable[d])} usable",
        ]
        if i == bott and len(ev.order) > 1:
            parts.append("this is the bottleneck stage")
        if inst.memory_bytes(s, min(e + 1, inst.num_modules)) > inst.usable[d] and e < inst.num_modules:
            parts.append("memory-bound: one more module would not fit")
        if inst.options.energy_weight > 0 and inst.energy[d] > 0:
            parts.append(f"energy factor {inst.energy[d]:.2f} (battery/load) keeps it lighter")
        plan.reasons[dev.device_id] = "; ".join(parts)
    used = set(ev.order)
    hidden = max(inst.model.out_bytes)
    main = ev.latency_s if inst.options.objective == "latency" else ev.bottleneck_s
    for d in range(inst.num_devices):
        if d in used:
            continue
        dev = inst.devices[d]
        one = min(inst.t[d]) + inst.fixed_s(d)
        hop = min((inst.rtt[d][e] + hidden * inst.inv_bw[d][e] for e in used), default=0.0)
        if one + hop >= ev.bottleneck_s and inst.options.objective == "throughput":
            why = (
                f"even its cheapest single module ({one * 1e3:.2f} ms) plus a hop ({hop * 1e3:.2f} ms) "
                "exceeds the "
                f"plan's bottleneck stage ({ev.bottleneck_s * 1e3:.2f} ms): it would slow the pipeline"
            )
        elif inst.options.objective == "latency":
            why = (
                f"every extra stage adds a hop of at least {hop * 1e3:.2f} ms to each token; its speed "
                f"({dev.decode_flops_per_s / 1e9:.2f} GFLOP/s) does not buy that back"
            )
        else:
            why = (
                f"splitting further onto it adds a hop of at least {hop * 1e3:.2f} ms; no assignment "
                "using it "
                f"beat {main * 1e3:.2f} ms"
            )
        if inst.options.energy_weight > 0 and inst.energy[d] > 0:
            why += f"; energy factor {inst.energy[d]:.2f} (battery/load) weighs against it"
        plan.left_out[dev.device_id] = why
