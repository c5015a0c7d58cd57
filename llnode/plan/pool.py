"""Which devices the exact solver looks at when the cluster is big (hundreds to a thousand devices).

A pipeline for a given model uses a handful to a dozen stages: beyond that every extra hop costs more
than the compute it takes off the others. So the planner does what large systems do and pre-selects
a pool: a first ring is found among the ``k`` fastest devices (``search.descend``), its stage time T
says what a useful stage looks like, and every device is scored by how many modules it could run
within T after paying its average hop to that ring's devices (bounded by what fits in its memory).
The ring's devices and the best-scored others, ``k`` in all, form the pool; the MILP is then exact
over the pool. A slow device with superb links, or a fast one behind a poor link, is ranked by what it
would actually contribute, not by its FLOP/s alone.
"""

from __future__ import annotations

from llnode.plan.costs import Evaluation, Instance
from llnode.plan.milp import lower_bound
from llnode.plan.search import SearchTables, descend


def _speed_order(inst: Instance, devs: range | list[int]) -> list[int]:
    return sorted(devs, key=lambda d: (-inst.devices[d].decode_flops_per_s, -inst.usable[d], d))


def candidate_pool(inst: Instance, k: int) -> tuple[list[int], Evaluation | None]:
    """Up to ``k`` device indices worth the exact solver, and the first ring found (a warm start)."""
    n = inst.num_devices
    if n <= k:
        return list(range(n)), None
    fastest = _speed_order(inst, range(n))[:k]
    ring = descend(SearchTables(inst, fastest), None, lower_bound(inst, fastest))
    if ring is None:
        return sorted(fastest), None
    cap = ring.bottleneck_s
    mid = inst.num_modules // 2
    members = list(ring.order)

    def score(d: int) -> float:
        hops = [inst.hop_s(d, e, mid) for e in members if e != d]
        hop = sum(hops) / len(hops) if hops else 0.0
        fit = 0
        while mid + fit < inst.num_modules and inst.fits(d, mid, mid + fit + 1):
            fit += 1
        return min(max(cap - hop - inst.fixed_s(d), 0.0) / inst.t[d][mid], float(fit))

    ranked = sorted(range(n), key=lambda d: (-score(d), -inst.devices[d].decode_flops_per_s, d))
    pool = members + [d for d in ranked if d not in members][: max(0, k - len(members))]
    return sorted(pool), ring
