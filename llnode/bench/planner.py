"""``llnode bench planner``: solve time vs cluster size, plan quality vs baselines and vs a candidate pool,
MILP == brute force.

All instances are synthetic but SmolLM2-shaped (32 modules, the real per-module FLOPs, weights and KV
sizes) with heterogeneous device classes and Wi-Fi-like links (see ``llnode.plan.synthetic``), so the
benchmark runs without a model export. The last line (with ``--json``) is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace

from llnode.plan.baselines import even_split, memory_split
from llnode.plan.bruteforce import brute_force
from llnode.plan.costs import build_instance
from llnode.plan.solve import solve
from llnode.plan.synthetic import random_fleet, synthetic_manifest
from llnode.plan.types import PlanOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--sizes", default="4,8,16,32,64", help="device counts for the solve-time table")
    parser.add_argument(
        "--scale-sizes", default="256,1000", help="big clusters: planning time with the candidate pool"
    )
    parser.add_argument(
        "--pool", type=int, default=8, help="pool size whose gap to the full MILP is printed (sizes > pool)"
    )
    parser.add_argument("--solver", choices=["cbc", "highs"], default="cbc")
    parser.add_argument("--instances", type=int, default=20, help="random small instances vs brute force")
    parser.add_argument("--time-limit", type=float, default=8.0, help="MILP time limit per solve, seconds")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    man = synthetic_manifest()  # 32 modules
    sizes = [int(s) for s in args.sizes.split(",") if s]
    scale = [int(s) for s in args.scale_sizes.split(",") if s]
    solve_s: dict[str, float] = {}
    plan_s: dict[str, float] = {}  # the big clusters (candidate pool), kept apart from the MILP targets
    proven: dict[str, bool] = {}
    quality: list[dict[str, float | int | str | None]] = []
    print(
        f"== solve time, {man.num_modules} modules, throughput objective, {args.solver}, "
        f"time limit {args.time_limit:g} s"
    )
    print(
        f"{'devices':>7} {'solve s':>8} {'solver':>6} {'proven':>6} {'stages':>6} {'tok/s':>7} "
        f"{'even':>7} {'mem-prop':>8} {f'pool-{args.pool}':>8} {'pool s':>7}"
    )
    for n in sizes + scale:
        rng = random.Random(args.seed * 1000 + n)
        devices, links = random_fleet(n, rng)
        options = PlanOptions(time_limit_s=args.time_limit, solver=args.solver)
        t0 = time.perf_counter()
        plan = solve(man, devices, links, options)
        dt = time.perf_counter() - t0
        inst = build_instance(man, devices, links, options)
        even, memp = even_split(inst), memory_split(inst)

        def rel(ev_ok: bool, value: float, best: float = plan.objective_value) -> float:
            return best / value if ev_ok else 0.0  # plan quality: tokens/s relative to the MILP plan

        q_even = rel(even.feasible, even.objective_value)
        q_mem = rel(memp.feasible, memp.objective_value)
        # the candidate pool on its own, where the MILP over every device also ran: the price of pooling
        q_pool, pool_s = None, None
        if args.pool < n and n in sizes:
            t1 = time.perf_counter()
            pooled = solve(man, devices, links, replace(options, milp_max_devices=args.pool))
            pool_s = time.perf_counter() - t1
            q_pool = plan.objective_value / pooled.objective_value
        (solve_s if n in sizes else plan_s)[str(n)] = round(dt, 3)
        proven[str(n)] = plan.optimal
        quality.append(
            {
                "devices": n,
                "milp_tps": plan.tokens_per_s,
                "even_rel": q_even,
                "memprop_rel": q_mem,
                "pool_rel": q_pool,
                "solver": plan.solver,
                "stages": len(plan.stages),
            }
        )
        print(
            f"{n:>7} {dt:>8.2f} {plan.solver:>6} {plan.optimal!s:>6} {len(plan.stages):>6} "
            f"{plan.tokens_per_s:>7.1f} {_pct(q_even):>7} {_pct(q_mem):>8} "
            f"{'-' if q_pool is None else _pct(q_pool):>8} {'-' if pool_s is None else f'{pool_s:.2f}':>7}"
        )
    print(
        "(even / mem-prop / pool-k: their predicted tokens/s as a fraction of the plan's; 'oom' = does not "
        f"fit; pool-k: the MILP over a pool of k devices, as used above milp_max_devices="
        f"{PlanOptions().milp_max_devices}; {','.join(map(str, scale))}: pool of "
        f"{PlanOptions().milp_max_devices})"
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
        options = PlanOptions(objective=objective, solver=args.solver, **extra)  # type: ignore[arg-type]
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
                    "plan_s": plan_s,
                    "solver": args.solver,
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
