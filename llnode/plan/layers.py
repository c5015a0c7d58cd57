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

    def hop(d: int, e: int) -> float:
        return inst.hop_s(d, e, 0)

    def ret(d: int, e: int) -> float:
        return inst.hop_s(d, e, n_m - 1)

    def kappa(budget: float, d: int) -> int:
        if budget < 0:
            return -1
        if tl[d] <= 0 or math.isinf(budget):
            return n_l
        return min(n_l, math.floor(budget / tl[d] + 1e-9))

    a, s, last, g, n, pos = {}, {}, {}, {}, {}, {}
    for d in devs:
        single_ok = shape.single[d] and te[d] + n_l * tl[d] + th[d] <= cap
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
            if te[d] + hop(d, e) <= cap and kappa(cap - hop(d, e), d) >= 0:
                u[d, e] = _binary(f"u{d}_{e}", True)
            if kappa(cap - th[d] - ret(d, e), d) >= 0:
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
    prob += pulp.lpSum(s.values()) == 1
    prob += pulp.lpSum(n.values()) == n_l
    stage: dict[int, pulp.LpAffineExpression] = {}
    for d in devs:
        mid = a[d] - s[d] - last[d] + g[d]  # 1 exactly when d is a middle stage
        prob += pulp.lpSum(v for _, v in out_u[d]) + pulp.lpSum(v for _, v in out_r[d]) + g[d] == a[d]
        prob += pulp.lpSum(in_u[d]) + pulp.lpSum(in_r[d]) + g[d] == a[d]
        prob += last[d] == pulp.lpSum(v for _, v in out_r[d]) + g[d]
        prob += s[d] == pulp.lpSum(in_r[d]) + g[d]
        prob += n[d] >= mid
        prob += (
            n[d]
            <= shape.middle[d] * mid
            + max(shape.first[d], 0) * (s[d] - g[d])
            + max(shape.last[d], 0) * (last[d] - g[d])
            + n_l * g[d]
        )
        prob += pos[d] <= n_l * (1 - s[d])
        for e, var in out_u[d]:
            prob += pos[e] >= pos[d] + n[d] - n_l * (1 - var)
            prob += pos[e] <= pos[d] + n[d] + n_l * (1 - var)
        stage[d] = SCALE * (
            te[d] * s[d]
            + tl[d] * n[d]
            + th[d] * last[d]
            + pulp.lpSum(hop(d, e) * v for e, v in out_u[d])
            + pulp.lpSum(ret(d, e) * v for e, v in out_r[d])
        )
        if stage_cap_s is not None:
            prob += stage[d] <= cap * SCALE
            arcs = [max(kappa(cap - hop(d, e), d), 0) * v for e, v in out_u[d]]
            arcs += [max(kappa(cap - th[d] - ret(d, e), d), 0) * v for e, v in out_r[d]]
            prob += n[d] <= pulp.lpSum(arcs) + n_l * g[d]
    energy = pulp.lpSum(
        SCALE * opts.energy_weight * inst.energy[d] * (te[d] * s[d] + tl[d] * n[d] + th[d] * last[d])
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
