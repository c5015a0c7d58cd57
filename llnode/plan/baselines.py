"""The placements other systems use, priced with the same cost model, to show what the MILP buys.

- even split: every device gets the same number of modules (the original LinguaLinked baseline, and
  many "split by layers" tools);
- memory-proportional split: modules in proportion to each device's memory, devices sorted by memory
  (exo's default ring partitioning).
Neither leaves a device out or looks at speed or links; they may not even fit (``feasible`` says so).
"""

from __future__ import annotations

from collections.abc import Sequence

from llnode.plan.costs import Evaluation, Instance, evaluate


def _split(weights: Sequence[float], m: int) -> list[int]:
    """Cut points giving each part a share of m modules proportional to its weight (>= 1 each)."""
    k = min(len(weights), m)
    weights = list(weights)[:k]
    total = sum(weights)
    cuts = [0]
    acc = 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        c = round(m * acc / total)
        c = max(c, cuts[-1] + 1)  # at least one module per part
        c = min(c, m - (k - 1 - i))  # leave at least one for each remaining part
        cuts.append(c)
    cuts.append(m)
    return cuts


def even_split(inst: Instance, order: Sequence[int] | None = None) -> Evaluation:
    order = list(order if order is not None else range(inst.num_devices))[: inst.num_modules]
    return evaluate(inst, order, _split([1.0] * len(order), inst.num_modules))


def memory_split(inst: Instance) -> Evaluation:
    order = sorted(range(inst.num_devices), key=lambda d: (-inst.devices[d].memory_available_bytes, d))
    order = order[: inst.num_modules]
    weights = [float(max(inst.devices[d].memory_available_bytes, 1)) for d in order]
    return evaluate(inst, order, _split(weights, inst.num_modules))
