"""Exhaustive search over every device subset, every order and every set of cut points.

Only for small instances (up to ~6 devices and ~10 modules): it is the ground truth the MILP and the DP
are checked against, using the very same :func:`llnode.plan.costs.evaluate`.
"""

from __future__ import annotations

import heapq
from itertools import combinations, permutations

from llnode.plan.costs import Evaluation, Instance, evaluate
from llnode.plan.types import PlanError

MAX_BRUTE_WORK = 5_000_000


def brute_force_work(num_devices: int, num_modules: int) -> int:
    """How many assignments :func:`brute_force` would evaluate."""
    from math import comb, perm

    return sum(
        perm(num_devices, k) * comb(num_modules - 1, k - 1)
        for k in range(1, min(num_devices, num_modules) + 1)
    )


def brute_force(inst: Instance) -> Evaluation | None:
    """The best feasible assignment, or None if nothing fits. Ties keep the first found."""
    ranked = brute_force_ranked(inst, 1)
    return ranked[0] if ranked else None


def brute_force_ranked(inst: Instance, k: int) -> list[Evaluation]:
    """The ``k`` best feasible assignments, best first (ties in the order found).

    Why more than one: a benchmark measures the few plans the cost model ranks highest on real nodes,
    because the plan that measures best need not be the one the model ranks first."""
    n, m = inst.num_devices, inst.num_modules
    work = brute_force_work(n, m)
    if work > MAX_BRUTE_WORK:
        raise PlanError(f"brute force over {n} devices x {m} modules would evaluate {work} plans; too many")
    max_k = min(n, m, inst.options.max_stages or n)
    if k <= 0:
        return []
    kept: list[tuple[float, int, Evaluation]] = []  # a max-heap of the k best: (-objective, -seen, plan)
    seen = 0
    for stages in range(1, max_k + 1):
        for inner in combinations(range(1, m), stages - 1):
            cuts = (0, *inner, m)
            for order in permutations(range(n), stages):
                if not all(inst.fits(d, cuts[i], cuts[i + 1]) for i, d in enumerate(order)):
                    continue
                ev = evaluate(inst, order, cuts)
                seen += 1
                if len(kept) < k:
                    heapq.heappush(kept, (-ev.objective_value, -seen, ev))
                elif ev.objective_value < -kept[0][0] - 1e-12:
                    heapq.heapreplace(kept, (-ev.objective_value, -seen, ev))
    best = sorted(kept, key=lambda x: (-x[0], -x[1]))
    return [ev for _, _, ev in best]
