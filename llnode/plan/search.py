"""A bounded depth-first search for a ring whose every stage stays under a cap: the MILP's primal heuristic.

Finding *some* plan under a cap T is easy when T is loose and hard only close to the optimum, where
proving that none exists is the MILP's job. This search builds rings stage by stage: from the device
holding module 0, try each unused next device, giving the current device the longest range that still
keeps compute + hop under T (a later start never hurts the devices after it), longest first, and
return the first complete ring. It prunes when the unused devices' longest possible ranges cannot
cover the rest, remembers failed states, and gives up after ``node_limit`` nodes (``None``: unknown).

It is not a proof of anything: ``solve_exact`` calls it before each CBC probe so that the feasible
probes of the bisection (most of them) cost milliseconds instead of a solver run, and to give CBC a
good incumbent to start from.
"""

from __future__ import annotations

from collections.abc import Sequence

from llnode.plan.costs import Evaluation, Instance, evaluate


class SearchTables:
    """Per-device prefix sums of compute and the furthest memory-feasible end of each start."""

    def __init__(self, inst: Instance, devs: Sequence[int]) -> None:
        self.inst = inst
        self.devs = list(devs)
        n_m = inst.num_modules
        self.prefix: dict[int, list[float]] = {}
        self.mem_end: dict[int, list[int]] = {}
        for d in self.devs:
            acc = [0.0]
            for x in inst.t[d]:
                acc.append(acc[-1] + x)
            self.prefix[d] = acc
            ends = []
            k = 0
            for j in range(n_m):
                k = max(k, j)
                while k < n_m and inst.fits(d, j, k + 1):
                    k += 1
                ends.append(k)
            self.mem_end[d] = ends
        inner = min(inst.model.out_bytes[: n_m - 1], default=0)  # the smallest hand-over inside
        self.min_hop = {
            d: min((inst.rtt[d][e] + inner * inst.inv_bw[d][e] for e in self.devs if e != d), default=0.0)
            for d in self.devs
        }

    def longest(self, cap: float) -> dict[int, int]:
        """Per device, the most modules one stage of it can hold under ``cap`` (with its cheapest hop)."""
        n_m = self.inst.num_modules
        out: dict[int, int] = {}
        for d in self.devs:
            prefix, mem_end, hop = self.prefix[d], self.mem_end[d], self.min_hop[d]
            fixed = self.inst.fixed_s(d)
            best = 0
            for j in range(n_m):
                if mem_end[j] == n_m and prefix[n_m] - prefix[j] + fixed <= cap:
                    best = max(best, n_m - j)  # up to the end: no hop in a one-stage plan
                    continue
                k = j
                while k < min(mem_end[j], n_m - 1) and prefix[k + 1] - prefix[j] + fixed + hop <= cap:
                    k += 1
                best = max(best, k - j)
            out[d] = best
        return out

    def coverage_bound(self, lower: float, upper: float, rounds: int = 20) -> float:
        """A cap proven infeasible by counting: each device holds one range, so if the longest ranges
        all devices could hold under T add up to fewer than M modules, every plan has a stage over T.
        Bisection between ``lower`` and ``upper``; returns the highest cap shown infeasible (a valid
        lower bound on the bottleneck), which spares the MILP its first, easy probes."""
        n_m = self.inst.num_modules
        lo, hi = lower, upper
        for _ in range(rounds):
            mid = 0.5 * (lo + hi)
            if sum(self.longest(mid).values()) < n_m:
                lo = mid
            else:
                hi = mid
        return lo


def ring_under_cap(tables: SearchTables, cap: float, node_limit: int = 2000) -> Evaluation | None:
    """A plan with every stage at most ``cap`` seconds, or None (none found within ``node_limit``)."""
    inst, devs = tables.inst, tables.devs
    n_m = inst.num_modules
    ob = inst.model.out_bytes
    prefix, mem_end = tables.prefix, tables.mem_end
    rtt, inv_bw = inst.rtt, inst.inv_bw
    index = {d: i for i, d in enumerate(devs)}
    longest = tables.longest(cap)
    useful = sorted((d for d in devs if longest[d] > 0), key=lambda d: -longest[d])
    failed: set[tuple[int, int, int, int]] = set()
    nodes = 0

    Path = list[tuple[int, int]]

    def extend(first: int, d: int, j: int, used: int, path: Path) -> Path | None:
        nonlocal nodes
        nodes += 1
        if nodes > node_limit:
            return None
        key = (first, d, j, used)
        if key in failed:
            return None
        if mem_end[d][j] >= n_m:
            back = 0.0 if d == first else rtt[d][first] + ob[n_m - 1] * inv_bw[d][first]
            if prefix[d][n_m] - prefix[d][j] + inst.fixed_s(d) + back <= cap:
                return [*path, (d, j)]
        reach = longest[d] + sum(longest[e] for e in useful if not used >> index[e] & 1)
        if reach < n_m - j:
            failed.add(key)
            return None
        options = []
        limit = min(mem_end[d][j], n_m - 1)
        for e in useful:
            if used >> index[e] & 1:
                continue
            k, base = j, inst.fixed_s(d) - prefix[d][j]
            while k < limit and prefix[d][k + 1] + base + rtt[d][e] + ob[k] * inv_bw[d][e] <= cap:
                k += 1
            if k > j:
                options.append((k, e))
        options.sort(key=lambda x: -x[0])
        for k, e in options:
            found = extend(first, e, k, used | 1 << index[e], [*path, (d, j)])
            if found is not None:
                return found
            if nodes > node_limit:
                return None
        failed.add(key)
        return None

    for first in useful:
        if nodes > node_limit:
            break
        ring = extend(first, first, 0, 1 << index[first], [])
        if ring is not None:
            ev = evaluate(inst, [d for d, _ in ring], [j for _, j in ring] + [n_m])
            return ev if ev.feasible else None
    return None


def descend(
    tables: SearchTables,
    upper: Evaluation | None,
    lower_s: float,
    probes: int = 12,
    node_limit: int = 2000,
) -> Evaluation | None:
    """Bisect a cap between ``lower_s`` and the best plan with :func:`ring_under_cap`: a good plan, fast.

    A cap where the search finds nothing only *looks* infeasible (it may have given up), so this is a
    heuristic; the MILP decides.
    """
    best = upper
    hi = upper.bottleneck_s if upper is not None else None
    lo = lower_s
    for _ in range(probes):
        cap = 2 * lo if hi is None else lo + 0.5 * (hi - lo)
        ev = ring_under_cap(tables, cap, node_limit)
        if ev is None:
            lo = cap
            continue
        if best is None or ev.objective_value < best.objective_value:
            best = ev
        hi = ev.bottleneck_s
        if hi - lo <= 1e-3 * hi:
            break
    return best


def recut(inst: Instance, order: Sequence[int], rounds: int = 40) -> Evaluation | None:
    """The smallest bottleneck for a ring in this device ``order`` (every device kept), by bisection.

    Under a cap, giving each device in turn the longest range that keeps compute + hop within it and
    fits in memory covers the most modules (a later start never hurts the devices after it), so a cap
    is feasible for the order exactly when that greedy walk reaches the end and the return hop also
    fits. Milliseconds, where the DP over order-preserving subsets takes a large part of a second.
    """
    order = list(order)
    n_m = inst.num_modules
    ob = inst.model.out_bytes
    first = order[0]

    def cuts_under(cap: float) -> list[int] | None:
        cuts = [0]
        for i, d in enumerate(order):
            j = cuts[-1]
            if i == len(order) - 1:
                back = 0.0 if d == first else inst.rtt[d][first] + ob[n_m - 1] * inst.inv_bw[d][first]
                ok = inst.fits(d, j, n_m) and inst.compute_s(d, j, n_m) + back <= cap
                return [*cuts, n_m] if ok and j < n_m else None
            e = order[i + 1]
            k, c = j, inst.fixed_s(d)
            while k < n_m - (len(order) - 1 - i) and inst.fits(d, j, k + 1):
                c += inst.t[d][k]
                if c + inst.rtt[d][e] + ob[k] * inst.inv_bw[d][e] > cap:
                    break
                k += 1
            if k == j:
                return None
            cuts.append(k)
        return None

    lo, hi = 0.0, sum(max(inst.t[d]) * n_m + inst.fixed_s(d) for d in order) + 1.0
    best = cuts_under(hi)
    if best is None:
        return None
    for _ in range(rounds):
        mid = 0.5 * (lo + hi)
        cuts = cuts_under(mid)
        if cuts is None:
            lo = mid
        else:
            hi, best = mid, cuts
    ev = evaluate(inst, order, best)
    return ev if ev.feasible else None
