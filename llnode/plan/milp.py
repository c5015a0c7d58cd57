"""The module-assignment MILP (PuLP; CBC bundled with pulp 3.x, or HiGHS through highspy).

Stage-arc formulation, linear throughout (the original LinguaLinked objective was quadratic and needed
Gurobi). With D devices and M modules:

- ``w[d,j,k]`` binary: device d holds exactly the modules ``[j, k)``. Only ranges that fit in d's memory
  get a variable, so memory (weights + KV + largest activation + overhead) is exact and needs no rows, and
  each variable carries its exact compute time, energy and movement cost as constants;
- flow: exactly one range starts at module 0, every device holds at most one range, and at every boundary
  k the range ending there is matched to the range starting there through
- ``y[d,e,k] >= 0``: d ends at boundary k and hands over to e (k = M: the last stage's token goes back to
  the first device, which starts at 0 -- the ring). With integral w each boundary is a 1-1 matching, so y
  needs no integrality; its coefficient is the exact hop time ``rtt/2 + bytes_after(k-1) / bandwidth``.
  A one-stage plan uses the self-arc ``y[d,d,M]`` at no cost.

The device order is therefore decided by the matching at each boundary, contiguity by the flow, and the
LP relaxation stays tight because every cost sits on a single variable (no big-M anywhere).
Objective ``throughput``: minimise ``B >= stage_d`` for every device (at most one stage per device, so
the per-device sum is that stage's time); ``latency``: minimise the sum over devices. Plus the optional
energy and movement terms. The solver's assignment is re-priced with ``costs.evaluate``.

Size: D*M*(M+1)/2 binaries and up to D^2*M continuous variables; 16 devices x 32 modules is ~8k binaries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from llnode.plan.costs import Evaluation, Instance, evaluate
from llnode.plan.layers import LayerShape, layer_shape, solve_layers
from llnode.plan.search import SearchTables, descend, recut

DISAGGREGATE = True
DEBUG = False
# Costs enter the solver in microseconds: CBC's absolute tolerances (~1e-7) would blur second-scale values.
SCALE = 1e6


class SolverUnavailable(RuntimeError):
    """No MILP solver can run here (e.g. a phone without the CBC binary)."""


def available_solvers() -> list[str]:
    """Our names ("cbc", "highs") of the MILP solvers that can actually run on this machine."""
    try:
        names = set(pulp.listSolvers(onlyAvailable=True))
    except Exception:  # a broken solver install must not take the planner down
        return []
    found = []
    if "PULP_CBC_CMD" in names:
        found.append("cbc")
    if "HiGHS" in names or "HiGHS_CMD" in names:
        found.append("highs")
    return found


@dataclass
class MilpResult:
    evaluation: Evaluation | None  # None: proven infeasible or nothing found
    optimal: bool
    status: str
    solve_s: float
    solver: str
    variables: int
    constraints: int


def _solver(name: str, time_limit_s: float, warm: bool, cuts: bool = True) -> pulp.LpSolver:
    """``cuts=False``: CBC skips its cut generators, which on the small layer-count feasibility probes
    cost more at the root than they save (CPU time of the probes near the optimum halved)."""
    if name == "cbc":
        return pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=time_limit_s,
            warmStart=warm,
            gapRel=1e-9,
            gapAbs=1e-6,
            options=[] if cuts else ["cuts off"],
        )
    if name == "highs":
        if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
            return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=1e-9)
        return pulp.HiGHS_CMD(msg=False, timeLimit=time_limit_s)
    raise SolverUnavailable(f"unknown MILP solver {name!r}")


def solve_milp(
    inst: Instance,
    devices: Sequence[int] | None = None,
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    warm_start: Evaluation | None = None,
    stage_cap_s: float | None = None,
    feasibility: bool = False,
) -> MilpResult:
    """Solve the assignment over ``devices`` (indices into the instance; default all) with ``solver``.

    ``stage_cap_s`` drops every range and hop that would make a stage slower than the cap (exact for any
    plan whose objective is below the cap, since each stage costs at most the objective); without it,
    the warm start's objective is the cap.
    """
    if solver not in available_solvers():
        raise SolverUnavailable(f"MILP solver {solver!r} is not available here (found {available_solvers()})")
    devs = list(devices if devices is not None else range(inst.num_devices))
    opts = inst.options
    n_m = inst.num_modules
    prob = pulp.LpProblem("llnode_assignment", pulp.LpMinimize)

    # w[d, j, k]: device d holds exactly [j, k); only ranges that fit in d's memory exist
    w: dict[tuple[int, int, int], pulp.LpVariable] = {}
    cost: dict[tuple[int, int, int], float] = {}
    extra: dict[tuple[int, int, int], float] = {}  # energy + movement terms of that stage
    move_scale = (
        opts.movement_weight * inst.movement_ref_s / inst.model_bytes
        if opts.movement_weight > 0 and inst.current
        else 0.0
    )
    # With an upper bound (a known plan's objective), every stage of a better plan costs at most that much
    # (the optional terms are >= 0), so longer ranges and slower hops are dropped: exact, and it removes
    # the fractional "every device runs everything" LP solutions that make the relaxation weak.
    ub = float("inf") if warm_start is None else warm_start.objective_value * (1 + 1e-9) + 1e-12
    if stage_cap_s is not None:
        ub = min(ub, stage_cap_s)
    min_hop = {
        (d, k): min((inst.hop_s(d, e, k - 1) for e in devs if e != d), default=0.0)
        for d in devs
        for k in range(1, n_m + 1)
    }
    for d in devs:
        for j in range(n_m):
            for k in range(j + 1, n_m + 1):
                if not inst.fits(d, j, k):
                    break
                c = inst.compute_s(d, j, k)
                if c + (0.0 if (j, k) == (0, n_m) else min_hop[d, k]) > ub:
                    continue
                w[d, j, k] = pulp.LpVariable(f"w_{d}_{j}_{k}", cat="Binary")
                cost[d, j, k] = c * SCALE
                extra[d, j, k] = SCALE * (
                    opts.energy_weight * inst.energy[d] * c + move_scale * inst.moved_bytes(d, j, k)
                )
    if not w or not any(j == 0 for _, j, _ in w):
        return MilpResult(None, True, "Infeasible", 0.0, solver, 0, 0)
    starts: dict[tuple[int, int], list[pulp.LpVariable]] = {}
    ends: dict[tuple[int, int], list[pulp.LpVariable]] = {}
    per_dev: dict[int, list[tuple[int, int, int]]] = {d: [] for d in devs}
    for key, var in w.items():
        d, j, k = key
        starts.setdefault((d, j), []).append(var)
        ends.setdefault((d, k), []).append(var)
        per_dev[d].append(key)
    # y[d, e, k]: d ends at boundary k and e starts there (k = n_m: the ring's return hop to the first
    # device, which starts at 0). Continuous: integral w makes each boundary a 1-1 matching.
    y: dict[tuple[int, int, int], pulp.LpVariable] = {}
    for k in range(1, n_m + 1):
        k_in = 0 if k == n_m else k
        enders = [d for d in devs if (d, k) in ends]
        starters = [e for e in devs if (e, k_in) in starts]
        for d in enders:
            shortest = min(cost[key] for key in per_dev[d] if key[2] == k) / SCALE
            for e in starters:
                if d == e and k < n_m:
                    continue
                if d != e and shortest + inst.hop_s(d, e, k - 1) > ub:
                    continue
                y[d, e, k] = pulp.LpVariable(f"y_{d}_{e}_{k}", lowBound=0)
    # flow: the ranges tile [0, n_m) exactly once; each device used at most once
    prob += pulp.lpSum(starts.get((d, 0), []) for d in devs) == 1
    for d in devs:
        prob += pulp.lpSum(w[key] for key in per_dev[d]) <= 1
    for k in range(1, n_m + 1):
        k_in = 0 if k == n_m else k
        for d in devs:
            out = [y[d, e, k] for e in devs if (d, e, k) in y]
            prob += pulp.lpSum(ends.get((d, k), [])) == pulp.lpSum(out)
        for e in devs:
            inc = [y[d, e, k] for d in devs if (d, e, k) in y]
            prob += pulp.lpSum(starts.get((e, k_in), [])) == pulp.lpSum(inc)
    stage: dict[int, pulp.LpAffineExpression] = {}
    for d in devs:
        hops = [
            (0.0 if d == e else inst.hop_s(d, e, k - 1)) * SCALE * var
            for (dd, e, k), var in y.items()
            if dd == d
        ]
        stage[d] = pulp.lpSum(cost[key] * w[key] for key in per_dev[d]) + pulp.lpSum(hops)
    penalty = pulp.lpSum(extra[key] * var for key, var in w.items() if extra[key])
    if opts.objective == "latency":
        prob += pulp.lpSum(stage.values()) + penalty
    else:
        bott = pulp.LpVariable(
            "bottleneck", lowBound=0, upBound=None if stage_cap_s is None else stage_cap_s * SCALE
        )
        for d in devs:
            prob += bott >= stage[d]
        if DISAGGREGATE:
            # the same bound per range variable: much tighter LP relaxation than the per-device sum
            out_hops = {
                (d, k): pulp.lpSum(
                    (0.0 if d == e else inst.hop_s(d, e, k - 1)) * SCALE * y[d, e, k]
                    for e in devs
                    if (d, e, k) in y
                )
                for d in devs
                for k in range(1, n_m + 1)
            }
            for (d, j, k), var in w.items():
                prob += bott >= cost[d, j, k] * var + out_hops[d, k]
        if feasibility:
            prob += 0 * bott  # any plan under the cap will do: CBC stops at the first one
        else:
            prob += bott + penalty

    warm = (
        warm_start is not None
        and solver == "cbc"
        and all(d in devs for d in warm_start.order)
        and warm_start.objective_value <= ub
    )
    if warm and warm_start is not None:
        _set_initial(warm_start, w, y, n_m)
    t0 = time.perf_counter()
    try:
        prob.solve(_solver(solver, time_limit_s, warm))
    except pulp.PulpSolverError as exc:
        raise SolverUnavailable(f"{solver} failed: {exc}") from exc
    solve_s = time.perf_counter() - t0
    status = pulp.LpStatus.get(prob.status, str(prob.status))
    sol_status = getattr(prob, "sol_status", None)
    nvars, ncons = len(prob.variables()), len(prob.constraints)
    if prob.status != pulp.LpStatusOptimal and sol_status != pulp.LpSolutionIntegerFeasible:
        return MilpResult(None, prob.status == pulp.LpStatusInfeasible, status, solve_s, solver, nvars, ncons)
    chosen = sorted((j, k, d) for (d, j, k), var in w.items() if (var.varValue or 0) > 0.5)
    if not chosen or chosen[0][0] != 0:
        return MilpResult(None, False, "NoSolution", solve_s, solver, nvars, ncons)
    ev = evaluate(inst, [d for _, _, d in chosen], [j for j, _, _ in chosen] + [n_m])
    optimal = prob.status == pulp.LpStatusOptimal and sol_status in (None, pulp.LpSolutionOptimal)
    return MilpResult(ev, optimal, status, solve_s, solver, nvars, ncons)


def _set_initial(
    ev: Evaluation,
    w: dict[tuple[int, int, int], pulp.LpVariable],
    y: dict[tuple[int, int, int], pulp.LpVariable],
    n_m: int,
) -> None:
    """Hand CBC a known feasible assignment (the DP's) so it starts with a good incumbent."""
    chosen = {(d, ev.cuts[i], ev.cuts[i + 1]) for i, d in enumerate(ev.order)}
    for key, var in w.items():
        var.setInitialValue(1 if key in chosen else 0)
    k_used = len(ev.order)
    arcs = {(d, ev.order[(i + 1) % k_used], ev.cuts[i + 1]) for i, d in enumerate(ev.order)}
    for key, var in y.items():
        var.setInitialValue(1 if key in arcs else 0)


def lower_bound(inst: Instance, devs: Sequence[int]) -> float:
    """A cheap valid lower bound on the main objective over ``devs`` (links ignored)."""
    n_m = inst.num_modules
    per_module = [min(inst.t[d][m] for d in devs) for m in range(n_m)]
    if inst.options.objective == "latency":
        return sum(per_module)
    parallel = 1.0 / sum(1.0 / sum(inst.t[d]) for d in devs)  # every device busy, perfectly balanced
    return max(max(per_module), parallel)


def probe(
    inst: Instance,
    devs: Sequence[int],
    solver: str,
    time_limit_s: float,
    warm_start: Evaluation | None,
    stage_cap_s: float | None,
    feasibility: bool,
    shape: LayerShape | None,
) -> MilpResult:
    """One MILP run: the layer-count formulation when the model has that shape, else the stage-arc one."""
    if shape is None:
        return solve_milp(inst, devs, solver, time_limit_s, warm_start, stage_cap_s, feasibility)
    if solver not in available_solvers():
        raise SolverUnavailable(f"MILP solver {solver!r} is not available here (found {available_solvers()})")
    try:
        status, proven, sol, dt, nvars, ncons = solve_layers(
            inst,
            devs,
            shape,
            _solver(solver, time_limit_s, False, cuts=not feasibility),
            stage_cap_s,
            feasibility,
        )
    except pulp.PulpSolverError as exc:
        raise SolverUnavailable(f"{solver} failed: {exc}") from exc
    ev = None if sol is None else evaluate(inst, *sol)
    if ev is not None and not ev.feasible:  # cannot happen with an exact model; never hand it on
        ev, proven, status = None, False, "NoSolution"
    return MilpResult(ev, proven, status, dt, solver, nvars, ncons)


def solve_exact(
    inst: Instance,
    devices: Sequence[int] | None = None,
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    warm_start: Evaluation | None = None,
    formulation: str = "auto",
) -> MilpResult:
    """The MILP under a stage cap, searched between a lower bound and the best known plan.

    Every stage of a plan better than T costs at most T, so a cap T drops every longer range and slower
    hop exactly, which makes the LP relaxation tight. For the plain throughput objective each probe is a
    pure feasibility problem (solvers prove "nothing under T" fast, while closing the gap of the minimax
    optimisation is slow): a feasible probe lowers the upper bound to that plan's value, an infeasible one
    raises the lower bound to T; bisection, then a last probe just under the best value proves it
    optimal. A bounded search (``search.descend``) gives the first upper bound, and each ring a probe
    finds gets the best cuts for its order (``search.recut``) before the next cap is chosen. With the
    latency objective or weighted terms, one probe optimises under the best known value (every stage of
    a better plan is under it): its optimum is the global one.

    ``formulation``: "layers" (layer counts, see ``layers.py``), "arcs" (stage ranges), or "auto": layers
    when the model is an embedding, identical layers and a head, and no movement term is asked.
    """
    devs = list(devices if devices is not None else range(inst.num_devices))
    opts = inst.options
    pure = (
        opts.objective == "throughput"
        and opts.energy_weight == 0
        and not (opts.movement_weight and inst.current)
    )
    shape = layer_shape(inst, devs) if formulation in ("auto", "layers") else None
    if formulation == "layers" and shape is None:
        raise ValueError("the layer-count formulation does not apply to this instance")
    deadline = time.perf_counter() + time_limit_s
    t0 = time.perf_counter()
    tables = SearchTables(inst, devs) if pure else None
    best = warm_start
    lb = lower_bound(inst, devs)
    if tables is not None:
        best = descend(tables, best, lb)
        if best is not None:
            lb = max(lb, tables.coverage_bound(lb, best.bottleneck_s))
    ub = best.objective_value if best is not None else float("inf")
    last: MilpResult | None = None
    unknown = lb  # highest cap whose probe ran out of time: look between it and ub next
    step = 0.02
    for _ in range(200):
        left = deadline - time.perf_counter()
        if left <= 0.05:
            break
        if ub < float("inf") and ub - lb <= 2e-9 * max(ub, 1e-12):
            return MilpResult(best, True, "Optimal", time.perf_counter() - t0, solver, *_size(last))
        low = max(lb, unknown)
        if ub == float("inf"):
            cap = None
        elif not pure:
            cap = ub * (1 + 1e-9)  # optimise under the best known value: its optimum is the global one
        elif ub - low < 0.05 * ub:
            cap = ub * (1 - 1e-9)  # prove the best plan optimal (or find a better one and go on)
        else:
            # galloping down from the best plan: the ring search usually lands within a few percent of
            # the optimum, so probe just under it first and widen the step after each feasible probe
            cap = max(low + 0.5 * (ub - low), ub * (1 - step))
        try:
            res = probe(
                inst,
                devs,
                solver,
                left if not pure or cap is None else max(0.5, left / 3),
                None if pure or cap is None or best is None or best.objective_value > cap else best,
                cap,
                pure and cap is not None,
                shape,
            )
        except SolverUnavailable:
            if last is None:
                raise
            break  # a late probe crashed (CBC at the very end of its time): keep what is proven/found
        last = res
        if DEBUG:
            print(
                f"cap={cap} lb={lb} ub={ub} -> {res.status} {res.optimal} "
                f"{None if res.evaluation is None else res.evaluation.objective_value} {res.solve_s:.2f}s"
            )
        if res.evaluation is not None:
            found = res.evaluation
            if pure and cap is not None:
                # a feasibility probe returns any ring under the cap: the best cuts for that ring's order
                # usually land well below it, which saves bisection steps
                polished = recut(inst, found.order)
                if polished is not None and polished.objective_value < found.objective_value:
                    found = polished
            if best is None or found.objective_value < best.objective_value:
                best = found
            ub = min(ub, found.objective_value)
            if pure and cap is not None:
                step *= 2
                continue
            if res.optimal and (cap is None or res.evaluation.objective_value <= cap * (1 + 1e-12)):
                return MilpResult(
                    best, True, "Optimal", time.perf_counter() - t0, solver, res.variables, res.constraints
                )
            if not res.optimal:
                break
            # the best plan with every stage under the cap costs more than the cap, and any plan with a
            # stage over it costs more too (the weighted terms are >= 0): the cap is a lower bound
            lb = max(lb, cap if cap is not None else lb)
        elif res.optimal:  # proven infeasible under the cap
            if cap is None:
                return MilpResult(None, True, "Infeasible", time.perf_counter() - t0, solver, *_size(last))
            lb = cap
        elif pure and cap is not None and cap < ub * (1 - 1e-6) and unknown == lb:
            unknown = cap  # this probe ran out of its time slice: one easier (higher) cap next
        elif pure and cap is not None:
            # feasibility keeps timing out: spend what is left optimising under the best value instead
            left = deadline - time.perf_counter()
            if left > 0.2 and best is not None:
                try:
                    res = probe(inst, devs, solver, left, best, ub * (1 + 1e-9), False, shape)
                except SolverUnavailable:
                    break
                if res.evaluation is not None and res.evaluation.objective_value < best.objective_value:
                    best = res.evaluation
                if res.optimal and res.evaluation is not None:
                    return MilpResult(best, True, "Optimal", time.perf_counter() - t0, solver, *_size(res))
            break
        else:
            break
    return MilpResult(best, False, "TimeLimit", time.perf_counter() - t0, solver, *_size(last))


def _size(res: MilpResult | None) -> tuple[int, int]:
    return (res.variables, res.constraints) if res is not None else (0, 0)
