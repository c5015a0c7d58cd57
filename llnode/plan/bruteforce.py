"""Exhaustive search over every device subset, every order and every set of cut points.

Only for small instances (up to ~6 devices and ~10 modules): it is the ground truth the MILP and the DP
are checked against, using the very same :func:`llnode.plan.costs.evaluate`.
"""

from __future__ import annotations

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
    n, m = inst.num_devices, inst.num_modules
    work = brute_force_work(n, m)
    if work > MAX_BRUTE_WORK:
        raise PlanError(f"brute force over {n} devices x {m} modules would evaluate {work} plans; too many")
    max_k = min(n, m, inst.options.max_stages or n)
    best: Evaluation | None = None
    for k in range(1, max_k + 1):
        for inner in combinations(range(1, m), k - 1):
            cuts = (0, *inner, m)
            for order in permutations(range(n), k):
                if not all(inst.fits(d, cuts[i], cuts[i + 1]) for i, d in enumerate(order)):
                    continue
                ev = evaluate(inst, order, cuts)
                if best is None or ev.objective_value < best.objective_value - 1e-12:
                    best = ev
    return best
