"""The layer-count MILP: the assignment as a ring of devices and a number of layers each, not positions.

Every model llnode splits is an embedding, a run of identical decoder layers and a head; every
boundary inside carries the same hidden state. Where a stage sits in the layer run then changes
nothing: its cost is ``t_embed * first + t_layer * n + t_head * last + hop to the next device``. The
stage-arc formulation (``milp.py``) still gives every one of the ~L positions of a range its own
binary; all those equivalent copies are symmetry the solver has to branch through, and near the optimum
CBC could not prove a 16-device cap infeasible within minutes. Here, per device d:

- ``a, s, l, g`` binaries: d takes part, holds the embedding (first), holds the head (last), holds
  everything (a one-stage plan); ``n`` integer: how many of the L identical layers it holds;
- ``u[d,e]`` binary: d hands its hidden state to e; ``r[d,e]`` binary: d (last) sends the token back to
  e (first): the ring. In- and out-degree equal ``a - g``; exactly one first;
- ``p`` continuous: layers before d's range. ``p[e] = p[d] + n[d]`` on every used ``u`` arc, and a
  device that is neither first nor last holds ``n >= 1``, so positions rise along the ring and a cycle
  of middle devices cannot close (subtour elimination; the only big-M, with M = L);
- memory: per device the largest n that fits as first, middle, last (weights, KV, activations,
  overhead computed by ``Instance.fits``), selected by ``s``/``l``: exact.

Under a stage cap T (the bisection in ``milp.solve_exact``) each device's stage time is capped exactly,
and the capacity of every arc is added as a cut: ``n[d] <= sum_e floor((T - hop(d,e)) / t_layer)
u[d,e] + ...``. That keeps the LP relaxation tight (the number of layers a device may take depends on
the arc it uses, not on a fraction of a big-M): 16 devices' infeasibility proofs take ~0.1 s.

Applicable when the model has that shape and no movement term is asked (moving bytes depends on
positions); :func:`layer_shape` says so, otherwise the stage-arc formulation runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from llnode.plan.costs import Instance

SCALE = 1e6  # seconds -> microseconds, as in milp.py (CBC's absolute tolerances)


@dataclass(frozen=True)
class LayerShape:
    """Per-device memory limits on the layer count in each stage role; -1: the role does not fit."""

    layers: int  # L identical modules 1..M-2
    first: dict[int, int]
    middle: dict[int, int]
    last: dict[int, int]
    single: dict[int, bool]


def _same(values: Sequence[float]) -> bool:
    lo, hi = min(values), max(values)
    return hi - lo <= 1e-12 * max(abs(hi), 1e-300)


def layer_shape(inst: Instance, devs: Sequence[int]) -> LayerShape | None:
    """The layer-count view of the instance, or None when modules 1..M-2 are not interchangeable."""
    m = inst.model
    n_m = inst.num_modules
    if n_m < 3 or (inst.options.movement_weight > 0 and inst.current):
        return None
    mid = range(1, n_m - 1)
    per_module = (m.weight_bytes, m.kv_bytes, m.act_bytes, m.out_bytes[: n_m - 1])
    if not all(_same([float(x[i]) for i in mid]) for x in per_module[:3]) or not _same(
        [float(b) for b in per_module[3]]
    ):
        return None
    if not all(_same([inst.t[d][i] for i in mid]) for d in devs):
        return None
    n_l = n_m - 2

    def most(d: int, rng: object) -> int:
        best = -1
        for k in range(n_l + 1):
            start, end = rng(k)  # type: ignore[operator]
            if not inst.fits(d, start, end):
                break
            best = k
        return best

    return LayerShape(
        layers=n_l,
        first={d: most(d, lambda k: (0, 1 + k)) for d in devs},
        middle={d: max(0, most(d, lambda k: (1, 1 + k))) for d in devs},
        last={d: most(d, lambda k: (n_m - 1 - k, n_m)) for d in devs},
        single={d: inst.fits(d, 0, n_m) for d in devs},
    )


def _binary(name: str, allowed: bool) -> pulp.LpVariable:
    """A 0/1 variable, fixed at 0 when not allowed (pulp resets the bounds of ``cat="Binary"``)."""
    var = pulp.LpVariable(name, cat="Binary")
    if not allowed:
        var.upBound = 0
    return var


def solve_layers(
    inst: Instance,
    devs: Sequence[int],
    shape: LayerShape,
    solver: pulp.LpSolver,
    stage_cap_s: float | None,
    feasibility: bool,
) -> tuple[str, bool, tuple[list[int], list[int]] | None, float, int, int]:
    """Build and solve the layer-count MILP; returns (status, proven, (order, cuts) or None, s, vars, rows).

    ``feasibility``: any plan with every stage under ``stage_cap_s`` will do (pure throughput
    bisection); otherwise minimise the objective (bottleneck or sum of stages, plus the energy term).
    """
    opts = inst.options
    n_m, n_l = inst.num_modules, shape.layers
    prob = pulp.LpProblem("llnode_layers", pulp.LpMinimize)
    cap = stage_cap_s if stage_cap_s is not None else math.inf
    te = {d: inst.t[d][0] for d in devs}
    tl = {d: inst.t[d][1] if n_l else 0.0 for d in devs}
    th = {d: inst.t[d][n_m - 1] for d in devs}
    fx = {d: inst.fixed_s(d) for d in devs}  # every stage step's fixed cost: a constant on ``a[d]``

    hops = {(d, e): inst.hop_s(d, e, 0) for d in devs for e in devs if d != e}
    rets = {(d, e): inst.hop_s(d, e, n_m - 1) for d in devs for e in devs if d != e}

    def kappa(budget: float, d: int) -> int:
        budget -= fx[d]  # >= 0: a budget already negative stays so
        if budget < 0:
            return -1
        if tl[d] <= 0 or math.isinf(budget):
            return n_l
        return min(n_l, math.floor(budget / tl[d] + 1e-9))

    a, s, last, g, n, pos = {}, {}, {}, {}, {}, {}
    for d in devs:
        single_ok = shape.single[d] and fx[d] + te[d] + n_l * tl[d] + th[d] <= cap
        a[d] = _binary(f"a{d}", True)
        s[d] = _binary(f"s{d}", shape.first[d] >= 0)
        last[d] = _binary(f"l{d}", shape.last[d] >= 0)
        g[d] = _binary(f"g{d}", single_ok)
        n[d] = pulp.LpVariable(f"n{d}", lowBound=0, upBound=n_l, cat="Integer")
        pos[d] = pulp.LpVariable(f"p{d}", lowBound=0, upBound=n_l)
    u: dict[tuple[int, int], pulp.LpVariable] = {}
    r: dict[tuple[int, int], pulp.LpVariable] = {}
    for d in devs:
        for e in devs:
            if d == e:
                continue
            if fx[d] + te[d] + hops[d, e] <= cap and kappa(cap - hops[d, e], d) >= 0:
                u[d, e] = _binary(f"u{d}_{e}", True)
            if kappa(cap - th[d] - rets[d, e], d) >= 0:
                r[d, e] = _binary(f"r{d}_{e}", True)
    out_u: dict[int, list[tuple[int, pulp.LpVariable]]] = {d: [] for d in devs}
    in_u: dict[int, list[pulp.LpVariable]] = {d: [] for d in devs}
    out_r: dict[int, list[tuple[int, pulp.LpVariable]]] = {d: [] for d in devs}
    in_r: dict[int, list[pulp.LpVariable]] = {d: [] for d in devs}
    for (d, e), var in u.items():
        out_u[d].append((e, var))
        in_u[e].append(var)
    for (d, e), var in r.items():
        out_r[d].append((e, var))
        in_r[e].append(var)
    ge, le, eq = pulp.LpConstraintGE, pulp.LpConstraintLE, pulp.LpConstraintEQ

    def row(terms: list[tuple[pulp.LpVariable, float]], sense: int, rhs: float) -> None:
        # built from (variable, coefficient) pairs: pulp's operator arithmetic made model building cost
        # several times CBC's own time on these small probes
        prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), sense, rhs=rhs))

    row([(v, 1.0) for v in s.values()], eq, 1)
    row([(v, 1.0) for v in n.values()], eq, n_l)
    stage: dict[int, pulp.LpAffineExpression] = {}
    for d in devs:
        outs = [(v, 1.0) for _, v in out_u[d]] + [(v, 1.0) for _, v in out_r[d]]
        row([*outs, (g[d], 1.0), (a[d], -1.0)], eq, 0)
        row([*[(v, 1.0) for v in in_u[d] + in_r[d]], (g[d], 1.0), (a[d], -1.0)], eq, 0)
        row([(last[d], 1.0), *[(v, -1.0) for _, v in out_r[d]], (g[d], -1.0)], eq, 0)
        row([(s[d], 1.0), *[(v, -1.0) for v in in_r[d]], (g[d], -1.0)], eq, 0)
        # mid = a - s - l + g is 1 exactly when d is a middle stage, which holds at least one layer
        row([(n[d], 1.0), (a[d], -1.0), (s[d], 1.0), (last[d], 1.0), (g[d], -1.0)], ge, 0)
        c_mid, c_first, c_last = shape.middle[d], max(shape.first[d], 0), max(shape.last[d], 0)
        row(
            [
                (n[d], 1.0),
                (a[d], -c_mid),
                (s[d], c_mid - c_first),
                (last[d], c_mid - c_last),
                (g[d], -c_mid + c_first + c_last - n_l),
            ],
            le,
            0,
        )
        row([(pos[d], 1.0), (s[d], float(n_l))], le, n_l)
        for e, var in out_u[d]:
            mtz = [(pos[e], 1.0), (pos[d], -1.0), (n[d], -1.0)]
            row([*mtz, (var, -float(n_l))], ge, -n_l)
            row([*mtz, (var, float(n_l))], le, n_l)
        stage[d] = pulp.LpAffineExpression(
            [
                (a[d], SCALE * fx[d]),
                (s[d], SCALE * te[d]),
                (n[d], SCALE * tl[d]),
                (last[d], SCALE * th[d]),
                *[(v, SCALE * hops[d, e]) for e, v in out_u[d]],
                *[(v, SCALE * rets[d, e]) for e, v in out_r[d]],
            ]
        )
        if stage_cap_s is not None:
            prob.addConstraint(pulp.LpConstraint(stage[d], le, rhs=cap * SCALE))
            arcs = [(v, -float(max(kappa(cap - hops[d, e], d), 0))) for e, v in out_u[d]]
            arcs += [(v, -float(max(kappa(cap - th[d] - rets[d, e], d), 0))) for e, v in out_r[d]]
            row([(n[d], 1.0), *arcs, (g[d], -float(n_l))], le, 0)
    energy = pulp.lpSum(
        SCALE
        * opts.energy_weight
        * inst.energy[d]
        * (fx[d] * a[d] + te[d] * s[d] + tl[d] * n[d] + th[d] * last[d])
        for d in devs
        if opts.energy_weight > 0 and inst.energy[d] > 0
    )
    if feasibility:
        # Any ring under the cap will do, but asking for as many hand-overs as possible points CBC at
        # rings that spread the layers thin, where feasible ones are: first solutions came 2-10x sooner.
        prob += -pulp.lpSum(u.values())
    elif opts.objective == "latency":
        prob += pulp.lpSum(stage.values()) + energy
    else:
        bott = pulp.LpVariable("bottleneck", lowBound=0)
        for d in devs:
            prob += bott >= stage[d]
        prob += bott + energy
    t0 = time.perf_counter()
    prob.solve(solver)
    dt = time.perf_counter() - t0
    status = pulp.LpStatus.get(prob.status, str(prob.status))
    sol_status = getattr(prob, "sol_status", None)
    size = len(prob.variables()), len(prob.constraints)
    proven = prob.status in (pulp.LpStatusOptimal, pulp.LpStatusInfeasible) and sol_status in (
        None,
        pulp.LpSolutionOptimal,
        pulp.LpSolutionInfeasible,
        pulp.LpSolutionNoSolutionFound,
    )
    if prob.status != pulp.LpStatusOptimal and sol_status != pulp.LpSolutionIntegerFeasible:
        return status, prob.status == pulp.LpStatusInfeasible, None, dt, *size
    firsts = [d for d in devs if (s[d].varValue or 0) > 0.5]
    if len(firsts) != 1:
        return "NoSolution", False, None, dt, *size
    order = [firsts[0]]
    while (last[order[-1]].varValue or 0) < 0.5 and len(order) <= len(devs):
        nxt = [e for e, v in out_u[order[-1]] if (v.varValue or 0) > 0.5]
        if len(nxt) != 1:
            return "NoSolution", False, None, dt, *size
        order.append(nxt[0])
    cuts = [0]
    for i, d in enumerate(order):
        held = round(n[d].varValue or 0) + (i == 0) + (i == len(order) - 1)
        cuts.append(cuts[-1] + held)
    if cuts[-1] != n_m:
        return "NoSolution", False, None, dt, *size
    return status, proven, (order, cuts), dt, *size
