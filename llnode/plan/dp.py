"""Exact dynamic program over cut points for a fixed device order: the planner where no MILP solver runs.

Devices are taken in the given order; each may be skipped, the used ones form the pipeline in that order.
For the ``latency`` objective (everything additive) and for ``throughput`` without the optional weighted
terms, the result is the optimum over all cut points and all order-preserving device subsets. With
``throughput`` plus energy/movement terms (a max plus a sum) the DP keeps, per state, the candidate with
the smallest combined value, which is a heuristic; the plan notes say so.

State ``(p, j)``: device at order position ``p`` starts its stage at module ``j``; value: the worst (or
summed) cost of the stages closed before it. Vectorised over the next device with numpy, so 64 devices x
32 modules runs in well under a second per choice of first device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llnode.plan.costs import Evaluation, Instance, evaluate


def dp_fixed_order(
    inst: Instance, order: Sequence[int], firsts: Sequence[int] | None = None
) -> Evaluation | None:
    """Best plan using devices in ``order`` (a subsequence of it); None if nothing fits.

    ``firsts`` restricts which order positions may hold module 0 (default: all). The ring's return hop
    depends on the first device, so each candidate first is a separate pass.
    """
    order = list(order)
    n, m = len(order), inst.num_modules
    if n == 0:
        return None
    latency = inst.options.objective == "latency"
    opts = inst.options
    move_scale = (
        opts.movement_weight * inst.movement_ref_s / inst.model_bytes
        if opts.movement_weight > 0 and inst.current
        else 0.0
    )
    # hop[p][q] arrays over the order positions, per byte size class
    rtt = np.array([[inst.rtt[a][b] for b in order] for a in order])
    inv_bw = np.array([[inst.inv_bw[a][b] for b in order] for a in order])
    prefix = [np.concatenate([[0.0], np.cumsum(inst.t[d])]) for d in order]
    best: Evaluation | None = None
    incumbent = np.inf  # best complete plan so far (any first device): a bound that prunes the rest
    for f in firsts if firsts is not None else range(n):
        big = np.inf
        val_b = np.full((n, m + 1), big)  # bottleneck part
        val_a = np.full((n, m + 1), big)  # additive part
        parent: dict[tuple[int, int], tuple[int, int]] = {}
        val_b[f, 0] = 0.0
        val_a[f, 0] = 0.0
        final: tuple[float, int, int] | None = None  # (value, p, j)
        for j in range(m):
            for p in range(f, n):
                if not np.isfinite(val_b[p, j]):
                    continue
                d = order[p]
                vb, va = val_b[p, j], val_a[p, j]
                if incumbent <= vb + va:
                    continue
                for e in range(j + 1, m + 1):
                    if not inst.fits(d, j, e):
                        break
                    c = prefix[p][e] - prefix[p][j] + inst.fixed_s(d)
                    pen = opts.energy_weight * inst.energy[d] * c
                    if move_scale:
                        pen += move_scale * inst.moved_bytes(d, j, e)
                    # every cost only grows with e: once this stage alone is no better than the best
                    # complete plan, longer ranges cannot help either
                    if (va + c + pen if latency else max(vb, c) + va + pen) >= incumbent:
                        break
                    if e == m:
                        hop = 0.0 if p == f else rtt[p, f] + inst.model.out_bytes[m - 1] * inv_bw[p, f]
                        stage = c + hop
                        tot = (va + stage + pen) if latency else (max(vb, stage) + va + pen)
                        if final is None or tot < final[0] - 1e-15:
                            final = (tot, p, j)
                            incumbent = min(incumbent, tot)
                        continue
                    if p + 1 >= n:
                        continue
                    stage = c + rtt[p, p + 1 :] + inst.model.out_bytes[e - 1] * inv_bw[p, p + 1 :]
                    if latency:
                        nb = np.zeros_like(stage)
                        na = va + stage + pen
                    else:
                        nb = np.maximum(vb, stage)
                        na = np.full_like(stage, va + pen)
                    cur = val_b[p + 1 :, e] + val_a[p + 1 :, e]
                    better = (nb + na) < cur - 1e-15
                    if better.any():
                        idx = np.nonzero(better)[0]
                        val_b[p + 1 + idx, e] = nb[idx]
                        val_a[p + 1 + idx, e] = na[idx]
                        for q in idx:
                            parent[(p + 1 + int(q), e)] = (p, j)
        if final is None:
            continue
        # walk back
        _, p, j = final
        seq = [(p, j)]
        while (p, j) != (f, 0):
            p, j = parent[(p, j)]
            seq.append((p, j))
        seq.reverse()
        devs = tuple(order[p] for p, _ in seq)
        cuts = (*tuple(j for _, j in seq), m)
        ev = evaluate(inst, devs, cuts)
        if best is None or ev.objective_value < best.objective_value - 1e-12:
            best = ev
    return best


def heuristic_orders(inst: Instance, devices: Sequence[int] | None = None) -> list[list[int]]:
    """Device orders worth trying with the DP: fastest first, and a nearest-link chain from the fastest."""
    devs = list(devices if devices is not None else range(inst.num_devices))
    by_speed = sorted(devs, key=lambda d: (-inst.devices[d].decode_flops_per_s, -inst.usable[d], d))
    hidden = max(inst.model.out_bytes)
    chain = [by_speed[0]]
    left = set(by_speed[1:])
    while left:
        last = chain[-1]
        # prefer a close neighbour, but weigh speed too: cost of a hop vs one module on the candidate
        nxt = min(
            left,
            key=lambda e: (
                (inst.rtt[last][e] + hidden * inst.inv_bw[last][e]) + inst.t[e][len(inst.t[e]) // 2]
            ),
        )
        chain.append(nxt)
        left.remove(nxt)
    return [by_speed] if chain == by_speed else [by_speed, chain]


def dp_best(inst: Instance, max_firsts: int = 6, devices: Sequence[int] | None = None) -> Evaluation | None:
    """The DP over each heuristic order of ``devices`` (default all); every position may be first for
    small clusters, else the top few."""
    best: Evaluation | None = None
    orders = heuristic_orders(inst, devices)
    if len(orders[0]) > 16:
        orders = orders[:1]  # big clusters: one pass, fastest device first (seconds, not minutes)
    for order in orders:
        firsts = None if len(order) <= max_firsts else ([0] if len(order) > 16 else [0, 1])
        ev = dp_fixed_order(inst, order, firsts)
        if ev is not None and (best is None or ev.objective_value < best.objective_value - 1e-12):
            best = ev
    return best
