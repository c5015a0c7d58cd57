"""``llnode bench planner``: MILP solve time vs cluster size, plan quality vs baselines, MILP == brute force.

All instances are synthetic but SmolLM2-shaped (32 modules, the real per-module FLOPs, weights and KV
sizes) with heterogeneous device classes and Wi-Fi-like links (see ``llnode.plan.synthetic``), so the
benchmark runs without a model export. The last line (with ``--json``) is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from llnode.plan.baselines import even_split, memory_split
from llnode.plan.bruteforce import brute_force
from llnode.plan.costs import build_instance
from llnode.plan.solve import solve
from llnode.plan.synthetic import random_fleet, synthetic_manifest
from llnode.plan.types import PlanOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--sizes", default="4,8,16,32,64", help="device counts for the solve-time table")
    parser.add_argument("--instances", type=int, default=20, help="random small instances vs brute force")
    parser.add_argument("--time-limit", type=float, default=8.0, help="MILP time limit per solve, seconds")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    man = synthetic_manifest()  # 32 modules
    sizes = [int(s) for s in args.sizes.split(",") if s]
    solve_s: dict[str, float] = {}
    proven: dict[str, bool] = {}
    quality: list[dict[str, float | int | str]] = []
    print(f"== solve time, {man.num_modules} modules, throughput objective, time limit {args.time_limit:g} s")
    print(
        f"{'devices':>7} {'solve s':>8} {'solver':>6} {'proven':>6} {'stages':>6} {'tok/s':>7} "
        f"{'even':>7} {'mem-prop':>8}"
    )
    for n in sizes:
        rng = random.Random(args.seed * 1000 + n)
        devices, links = random_fleet(n, rng)
        options = PlanOptions(time_limit_s=args.time_limit)
        t0 = time.perf_counter()
        plan = solve(man, devices, links, options)
        dt = time.perf_counter() - t0
        inst = build_instance(man, devices, links, options)
        even, memp = even_split(inst), memory_split(inst)

        def rel(ev_ok: bool, value: float, best: float = plan.objective_value) -> float:
            return best / value if ev_ok else 0.0  # plan quality: tokens/s relative to the MILP plan

        q_even = rel(even.feasible, even.objective_value)
        q_mem = rel(memp.feasible, memp.objective_value)
        solve_s[str(n)] = round(dt, 3)
        proven[str(n)] = plan.optimal
        quality.append(
            {
                "devices": n,
                "milp_tps": plan.tokens_per_s,
                "even_rel": q_even,
                "memprop_rel": q_mem,
                "solver": plan.solver,
            }
        )
        print(
            f"{n:>7} {dt:>8.2f} {plan.solver:>6} {plan.optimal!s:>6} {len(plan.stages):>6} "
            f"{plan.tokens_per_s:>7.1f} {_pct(q_even):>7} {_pct(q_mem):>8}"
        )
    print(
        "(even / mem-prop: their predicted tokens/s as a fraction of the MILP plan's; 'oom' = does not fit)"
    )

    print(f"== MILP vs brute force on {args.instances} random instances (2-6 devices, 7 modules)")
    small = synthetic_manifest(num_layers=5)
    matches = 0
    worst = 0.0
    rng = random.Random(args.seed)
    for i in range(args.instances):
        n = 2 + i % 5
        devices, links = random_fleet(n, rng)
        objective = "latency" if i % 4 == 3 else "throughput"
        extra = {"energy_weight": 0.5} if i % 5 == 4 else {}
        options = PlanOptions(objective=objective, **extra)  # type: ignore[arg-type]
        plan = solve(small, devices, links, options)
        brute = brute_force(build_instance(small, devices, links, options))
        assert brute is not None
        diff = abs(plan.objective_value - brute.objective_value) / brute.objective_value
        worst = max(worst, diff)
        matches += diff <= 1e-6
    print(f"optimal matches: {matches}/{args.instances} (worst relative difference {worst:.2e})")
    if args.json:
        print(
            json.dumps(
                {
                    "instances": args.instances,
                    "optimal_matches": matches,
                    "solve_s": solve_s,
                    "proven_optimal": proven,
                    "quality": quality,
                    "modules": man.num_modules,
                    "time_limit_s": args.time_limit,
                }
            )
        )
    return 0 if matches == args.instances else 1


def _pct(x: float) -> str:
    return "oom" if x == 0 else f"{x:.0%}"
