"""``llnode bench balance``: heterogeneous placement and runtime rebalancing, measured on real daemons.

Slow devices are emulated honestly: every node runs in its own cgroup v1 CPU group whose quota is a
share of one core (:mod:`llnode.emulate.cgroups`); never sleeps.

1. Static heterogeneity: 3 nodes at 100 % / 60 % / 30 % of a core, 4 concurrent sessions. Measured
   tokens/s of the MILP plan the leader chose, of an even split, of a memory-proportional split, and of
   the best few plans of a brute force over every order and cut point (ranked by the cost model with the
   speeds the nodes measured, then each measured for real). Plans are imposed through
   ``POST /api/bench/impose-plan`` (enabled only by ``LLNODE_BENCH_IMPOSE=1``), with rebalancing off so
   that nothing moves while a plan is measured, in ``--rounds`` interleaved rounds (each rotated by
   one) on the same cluster; the figures are medians, every round is printed with each stage's mean
   decode batch. One draw per plan was not a figure: the same code gave ``milp_over_best`` 0.41 and
   0.81 in two quiet runs, one plan shape measuring 12.8 and 29.9 tok/s.
2. Drift: 3 equal nodes, then the busiest stage node's quota is cut to 30 % mid-run. Tokens/s over time
   with and without rebalancing (fresh clusters), recovery time and where it went (detection, decision,
   loading, re-prefill, back to speed), failed requests; a timeline PNG. Recovered means within 10 % of
   what a fresh cluster measures when it starts with the cut quota (its leader's plan knows from the
   outset), measured in the same run.
3. Steady: 2 equal nodes, rebalancing on, 4 concurrent sessions: after a warm-up, how many times the
   plan changes (it should not: concurrency is not drift).

Plans are costed at the context the benchmark's sessions are really at (prompt + half the generated
tokens), as the leader does once it measures it: at the planner's default (half the model's maximum
context) a layer's attention weighs 2.3x more against the head than it does here.

The candidates are the plans the planner's own cost model ranks best (:func:`brute_force_ranked`) on
the profiles the leader would re-plan with (start-up profiles, decode speeds as measured while serving:
:func:`measured_profiles`). The best plan is the one with the best median; ``milp_over_best`` then comes
from ``--confirm`` fresh rounds of the MILP plans against it, because the rounds that pick the largest
of several noisy medians flatter the winner (``selection_milp_over_best`` is the figure from those).

The last line (``--json``) holds ``milp_over_even``, ``milp_over_best``, ``paired_milp_over_best``,
``rebalance_gain``, ``rebalance_gain_retained`` (each drift run over its own pre-cut rate),
``rebalance_gain_ceiling``, ``failed_requests``, ``recovery_s`` and ``steady_replans``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import struct
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from llnode.api.sse import sse_events
from llnode.bench.common import shard_dir
from llnode.cluster import LocalCluster, free_base_port
from llnode.emulate.cgroups import unavailable_reason
from llnode.model.manifest import Manifest, load_manifest
from llnode.model.tokenizer import load_tokenizer
from llnode.pipeline.rebalance import IMPOSE_PATH, calibrated_context, measured_ms, measured_profiles
from llnode.plan.baselines import _split
from llnode.plan.bruteforce import brute_force_ranked
from llnode.plan.costs import ModelCosts, build_instance
from llnode.plan.solve import solve
from llnode.plan.types import DeviceProfile, PlanOptions
from llnode.process import cpu_seconds

PROMPT = "Once upon a time, in a small village by the river,"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2 fp32)")
    parser.add_argument("--quotas", default="1.0,0.6,0.3", help="static part: share of a core per node")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per request")
    parser.add_argument("--measure-s", type=float, default=10.0, help="seconds per plan and round")
    parser.add_argument("--warmup-s", type=float, default=4.0, help="static part: load before each window")
    parser.add_argument("--rounds", type=int, default=3,
                        help="static part: interleaved rounds over the candidate plans (medians reported)")
    parser.add_argument("--candidates", type=int, default=3, help="brute-force plans measured for real")
    parser.add_argument("--confirm", type=int, default=3,
                        help="static part: fresh rounds of the MILP plans against the best one found "
                             "(the ratio reported; 0: take the ratio from the rounds that chose the best)")
    parser.add_argument("--drift-s", type=float, default=90.0, help="length of each drift run")
    parser.add_argument("--cut-at-s", type=float, default=25.0, help="when the quota is cut")
    # 0.5: the three quotas (1.5 cores) must bind on a 2-core host that also runs the load generator, or
    # the cut slows a node the host was already slowing (3 x 0.6: nodes used 82-97 % of their quota
    # before the cut, the unbalanced cluster lost only 20 % and rebalancing had x1.07 to win).
    parser.add_argument("--drift-quota", type=float, default=0.5, help="everyone's quota before the cut")
    parser.add_argument("--cut-to", type=float, default=0.3, help="the cut node's quota after the cut")
    parser.add_argument("--reference-s", type=float, default=40.0,
                        help="drift part: seconds measured on a fresh cluster started with the cut quota")
    parser.add_argument("--png", type=Path, default=Path("balance-timeline.png"), help="timeline plot")
    parser.add_argument("--steady-s", type=float, default=45.0, help="steady part: seconds after warm-up")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")




# ---- load ---------------------------------------------------------------------------------------
class Load:
    """``sessions`` clients streaming completions; every token's arrival time is recorded."""

    def __init__(self, cluster: LocalCluster, sessions: int, tokens: int) -> None:
        self.cluster = cluster
        self.sessions = sessions
        self.tokens = tokens
        self.stamps: list[float] = []
        self.failed: list[str] = []
        self.completed = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, k: int, session: aiohttp.ClientSession) -> None:
        url = self.cluster.url(k % self.cluster.nodes)
        body = {"model": self.cluster.model, "prompt": PROMPT, "max_tokens": self.tokens, "temperature": 0,
                "stream": True}
        while not self._stop.is_set():
            try:
                async with session.post(f"{url}/v1/completions", json=body,
                                        timeout=aiohttp.ClientTimeout(300)) as r:
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                    async for chunk in sse_events(r.content):
                        if "error" in chunk:
                            raise RuntimeError(str(chunk["error"])[:200])
                        if any(c.get("text") for c in chunk.get("choices", [])):
                            self.stamps.append(time.monotonic())
                self.completed += 1
            except Exception as exc:  # counted, reported; the benchmark goes on
                self.failed.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._client(k, session)) for k in range(self.sessions)]

    async def stop(self) -> None:
        """Let every request in flight finish (a request cut off by the benchmark is not a failure)."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 600)

    def rate(self, t0: float, t1: float) -> float:
        return sum(1 for s in self.stamps if t0 <= s < t1) / max(t1 - t0, 1e-9)


async def _status(cluster: LocalCluster, session: aiohttp.ClientSession, i: int) -> dict[str, Any]:
    return await cluster.status(i, session) or {}


async def _plan(cluster: LocalCluster, session: aiohttp.ClientSession, leader: int) -> Any:
    """The plan node ``leader`` serves (``pipeline.plan.plan`` of its status)."""
    return ((await _status(cluster, session, leader))["pipeline"]["plan"] or {})["plan"]


def _bench_cluster(
    shards: Path, nodes: int, prefix: str, env: dict[str, str], quotas: Sequence[float] | None = None
) -> LocalCluster:
    """``nodes`` daemons on a free port range, in a fresh work dir named after the run (``prefix``)."""
    return LocalCluster(
        nodes=nodes, base_port=free_base_port(nodes), model=shards.name, shards=shards.parent,
        workdir=Path(tempfile.mkdtemp(prefix=prefix)), quotas=None if quotas is None else list(quotas),
        env=env,
    )


async def _leader(cluster: LocalCluster, session: aiohttp.ClientSession) -> int:
    for _ in range(120):
        for i in range(cluster.nodes):
            if (await _status(cluster, session, i)).get("is_leader"):
                return i
        await asyncio.sleep(0.5)
    raise RuntimeError("no leader")


async def _serving_epoch(cluster: LocalCluster, session: aiohttp.ClientSession, epoch: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        states = [(await _status(cluster, session, i)).get("pipeline") or {} for i in range(cluster.nodes)]
        if all(s.get("serving") and (s.get("epoch") or 0) >= epoch for s in states):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"plan epoch {epoch} never served")


async def _impose(cluster: LocalCluster, session: aiohttp.ClientSession, leader: int,
                  stages: list[tuple[str, int, int]]) -> int:
    async with session.post(f"{cluster.url(leader)}{IMPOSE_PATH}",
                            json={"stages": [list(s) for s in stages]}) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"impose {stages}: {data}")
    epoch: int = data["epoch"]
    await _serving_epoch(cluster, session, epoch)
    return epoch


async def _measure(load: Load, session: aiohttp.ClientSession, seconds: float,
                   warmup_s: float | None = None) -> float:
    """Tokens/s with ``load.sessions`` concurrent sessions, after a warm-up (default: a third of the
    window, at most 8 s)."""
    await load.start(session)
    await asyncio.sleep(min(8.0, seconds / 3) if warmup_s is None else warmup_s)
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    t1 = time.monotonic()
    await load.stop()
    return load.rate(t0, t1)


async def _mean_batches(cluster: LocalCluster, session: aiohttp.ClientSession) -> dict[str, float]:
    """Each stage node's mean decode batch size under the plan in force (its stage worker counts the
    batches it ran since the plan began). Why: 4 sessions that move through the pipeline as one convoy
    (batches of 4, one stage busy at a time) serve far fewer tokens/s than the same sessions spread
    over the stages (small batches, every stage busy), on the same plan."""
    out: dict[str, float] = {}
    for i in range(cluster.nodes):
        pipeline = (await _status(cluster, session, i)).get("pipeline") or {}
        stage = pipeline.get("stage") or {}
        if stage.get("epoch") != pipeline.get("epoch"):  # a stage of an older plan, not yet closed
            continue
        counts = {int(k): v for k, v in (stage.get("batches") or {}).items()}
        if counts:
            out[f"node{i}"] = round(sum(k * v for k, v in counts.items()) / sum(counts.values()), 3)
    return out


def _ranges(plan: dict[str, Any], names: dict[str, str]) -> list[tuple[str, int, int]]:
    return [(names.get(s["device_id"], s["device_id"]), s["start"], s["end"]) for s in plan["stages"]]


Ranges = list[tuple[str, int, int]]


def served_options(manifest: Manifest, shards: Path, tokens: int) -> PlanOptions:
    """Plan options costed at the context this benchmark's decode steps are at on average."""
    prompt = len(load_tokenizer(shards, manifest.tokenizer_file).encode(PROMPT))
    return PlanOptions(cost_context=calibrated_context(prompt + tokens / 2), default_rtt_s=0.001)


def distinct_plans(plans: dict[str, Ranges]) -> tuple[dict[str, Ranges], dict[str, str]]:
    """The plans to measure, each once (first label wins), and every label's measured stand-in:
    the memory split is the even split when memory is equal, and the MILP on measured speeds is usually
    one of the brute-force candidates; measuring a plan twice per round would only spend the budget."""
    unique: dict[str, Ranges] = {}
    alias: dict[str, str] = {}
    by_key: dict[str, str] = {}
    for label, ranges in plans.items():
        key = json.dumps(ranges)
        if key not in by_key:
            by_key[key] = label
            unique[label] = ranges
        alias[label] = by_key[key]
    return unique, alias


def round_orders(labels: Sequence[str], rounds: int) -> list[list[str]]:
    """Interleaved rounds, each round rotated by one (A B C, B C A, C A B, ...): every plan is measured
    once per round, so a drift of the host over minutes moves every plan alike, and rotating keeps a
    plan from always running first after a cluster that just served the same one (or right after a
    particular other plan)."""
    n = len(labels)
    return [[labels[(r + k) % n] for k in range(n)] for r in range(rounds)]


def summarize_rounds(samples: dict[str, list[float]], alias: dict[str, str]) -> dict[str, Any]:
    """Median, min, max and relative spread ((max - min) / median) of every plan's rounds, under each of
    its labels, and the ratios the issue asks for, from medians: one 25 s draw per plan said 0.41 in one
    run and 0.81 in the next for the same code. ``paired_milp_over_best`` is the median over rounds of
    the MILP-on-measured-speeds plan over the best brute-force plan *of that round* (plans measured
    minutes apart share the host's state within a round)."""
    stats: dict[str, dict[str, float]] = {}
    for label, base in alias.items():
        xs = samples.get(base) or []
        if not xs:
            continue
        mid = statistics.median(xs)
        stats[label] = {"median": mid, "min": min(xs), "max": max(xs),
                        "spread": (max(xs) - min(xs)) / mid if mid > 0 else float("nan"), "rounds": len(xs)}
    med = {k: v["median"] for k, v in stats.items()}
    brutes = [k for k in med if k.startswith("brute")]
    best = max(brutes, key=lambda k: med[k])
    rounds = min(len(samples[alias[k]]) for k in [*brutes, "milp_measured"])
    paired = [samples[alias["milp_measured"]][r] / max(samples[alias[k]][r] for k in brutes)
              for r in range(rounds)]
    return {
        "stats": stats, "medians": med, "best": best,
        "milp_over_best": med["milp_measured"] / med[best],
        "milp_startup_over_best": med["milp"] / med[best],
        "milp_over_even": med["milp"] / med["even"],
        "milp_over_memory": med["milp"] / med["memory"],
        "milp_measured_over_even": med["milp_measured"] / med["even"],
        "paired_milp_over_best": statistics.median(paired) if paired else None,
        "paired_rounds": [round(x, 3) for x in paired],
    }


def confirmation_labels(alias: dict[str, str], best: str) -> list[str]:
    """The distinct plans measured again after the best one is chosen: the start-up MILP, the MILP on
    measured speeds and the best brute-force plan (fewer when some are the same plan)."""
    out: list[str] = []
    for label in ("milp_measured", "milp", best):
        if alias[label] not in out:
            out.append(alias[label])
    return out


def confirm_ratios(confirmed: dict[str, list[float]], alias: dict[str, str], best: str) -> dict[str, Any]:
    """``milp_over_best`` and ``milp_startup_over_best`` from rounds that did not choose the best plan.

    Why: the best plan is the largest of several noisy medians, so it is measured on its luckiest
    rounds: the same rounds cannot also say how much better it is (with spreads of 7-23 % per plan,
    picking the largest of 3-5 plans alone inflates it by several per cent, and the target is 5 %).
    Fresh rounds of the chosen plan and the MILP plans, interleaved, give an unbiased ratio: the median
    over rounds of each MILP plan over the best plan of the same round. A MILP plan that *is* the best
    plan scores 1."""
    out: dict[str, Any] = {}
    for key, label in (("milp_over_best", "milp_measured"), ("milp_startup_over_best", "milp")):
        a, b = alias[label], alias[best]
        if a == b:
            out[key], out[f"{key}_rounds"] = 1.0, []
            continue
        pairs = [x / y for x, y in zip(confirmed.get(a, []), confirmed.get(b, []), strict=False) if y > 0]
        out[key] = statistics.median(pairs) if pairs else None
        out[f"{key}_rounds"] = [round(x, 3) for x in pairs]
    return out


async def static_part(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    """Every candidate plan measured ``args.rounds`` times in interleaved rounds on one cluster.

    First the leader's start-up plan serves a calibration window, from which the stages' sustained
    speeds are read (what the leader would re-plan with); the candidates are then imposed in turn. One
    draw per plan was not a figure: the same code gave ``milp_over_best`` 0.41 and 0.81 in two runs."""
    quotas = [float(q) for q in args.quotas.split(",")]
    cluster = _bench_cluster(
        shards, len(quotas), "llnode-balance-",
        {"LLNODE_THREADS": "1", "LLNODE_BENCH_IMPOSE": "1", "LLNODE_REBALANCE": "0"}, quotas,
    )
    out: dict[str, Any] = {"quotas": quotas}
    manifest = load_manifest(shards)
    options = served_options(manifest, shards, args.tokens)
    costs = ModelCosts.from_manifest(manifest, options)
    m = costs.num_modules
    cluster.start()
    try:
        await cluster.wait_ready(600)
        async with aiohttp.ClientSession() as session:
            leader = await _leader(cluster, session)
            names = {}
            for i in range(cluster.nodes):
                names[(await _status(cluster, session, i)).get("id", "")] = f"node{i}"
            milp = await _plan(cluster, session, leader)
            milp_ranges = _ranges(milp, names)
            load = Load(cluster, args.sessions, args.tokens)
            calibration = await _measure(load, session, args.measure_s, args.warmup_s)
            print(f"calibration: MILP {milp_ranges}: {calibration:.2f} tok/s", flush=True)
            # the leader's way of re-planning: every node's start-up profile with the decode speed its
            # stage measured while serving the MILP plan (a node the plan left out keeps its profile)
            profiles: dict[str, DeviceProfile] = {}
            measured: dict[str, tuple[int, int, float]] = {}
            for i in range(cluster.nodes):
                pipe = (await _status(cluster, session, i)).get("pipeline") or {}
                name = f"node{i}"
                if pipe.get("profile"):
                    own = DeviceProfile.from_dict(pipe["profile"])
                    profiles[name] = dataclasses.replace(own, device_id=name, name=name)
                met = pipe.get("stage") or {}
                ms = measured_ms(met.get("metrics") or {}, recent=False)  # sustained, as the leader prices
                if ms and met.get("range"):
                    measured[name] = (int(met["range"][0]), int(met["range"][1]), ms)
            replanned = measured_profiles(costs, profiles, measured)
            even_cuts = _split([1.0] * len(quotas), m)
            plans: dict[str, Ranges] = {
                "milp": milp_ranges,
                "even": [(f"node{i}", even_cuts[i], even_cuts[i + 1]) for i in range(len(quotas))],
                # every node has the same memory here, so the memory split is the even split in memory order
                "memory": [(f"node{i}", even_cuts[i], even_cuts[i + 1]) for i in range(len(quotas))],
            }
            # the MILP again over the measured speeds (the plan rebalancing converges to), and the plans
            # the same cost model ranks best over every order and cut point
            devices = [replanned[k] for k in sorted(replanned)]
            remilp = solve(manifest, devices, [], options)
            plans["milp_measured"] = [(s.device_id, s.start, s.end) for s in remilp.stages]
            inst = build_instance(costs, devices, [], options)
            for j, ev in enumerate(brute_force_ranked(inst, args.candidates)):
                plans[f"brute{j}"] = [(inst.devices[d].device_id, ev.cuts[i], ev.cuts[i + 1])
                                      for i, d in enumerate(ev.order)]
            unique, alias = distinct_plans(plans)
            for label, ranges in plans.items():
                same = f" (= {alias[label]})" if alias[label] != label else ""
                print(f"plan {label} {ranges}{same}", flush=True)
            samples: dict[str, list[float]] = {k: [] for k in unique}
            batching: dict[str, list[dict[str, float]]] = {k: [] for k in unique}
            for r, order in enumerate(round_orders(list(unique), args.rounds)):
                for label in order:
                    await _impose(cluster, session, leader, unique[label])
                    rate = await _measure(load, session, args.measure_s, args.warmup_s)
                    samples[label].append(rate)
                    batching[label].append(await _mean_batches(cluster, session))
                    sizes = ", ".join(f"{n} {b:.2f}" for n, b in batching[label][-1].items())
                    print(f"round {r + 1} {label}: {rate:.2f} tok/s (mean decode batch: {sizes})", flush=True)
            summary = summarize_rounds(samples, alias)
            summary["selection_milp_over_best"] = summary["milp_over_best"]
            summary["selection_milp_startup_over_best"] = summary["milp_startup_over_best"]
            labels = confirmation_labels(alias, summary["best"])
            confirmed: dict[str, list[float]] = {k: [] for k in labels}
            if args.confirm > 0 and len(labels) > 1:
                for r, order in enumerate(round_orders(labels, args.confirm)):
                    for label in order:
                        await _impose(cluster, session, leader, unique[label])
                        rate = await _measure(load, session, args.measure_s, args.warmup_s)
                        confirmed[label].append(rate)
                        print(f"confirm round {r + 1} {label}: {rate:.2f} tok/s", flush=True)
                summary.update({k: v for k, v in confirm_ratios(confirmed, alias, summary["best"]).items()
                                if v is not None})
            for label, st in summary["stats"].items():
                print(f"{label:14s} median {st['median']:6.2f} tok/s  min {st['min']:6.2f}  "
                      f"max {st['max']:6.2f}  spread {100 * st['spread']:4.0f} %  {plans[label]}")
            out.update(
                plans=plans, milp_plan=milp_ranges, samples=samples, alias=alias, batching=batching,
                calibration_tokens_per_s=calibration,
                tokens_per_s=summary["medians"], stats=summary["stats"],
                speeds_gflops={k: v.decode_flops_per_s / 1e9 for k, v in replanned.items()},
                cost_context=options.cost_context,
                **{k: summary[k] for k in ("milp_over_even", "milp_over_memory", "milp_startup_over_best",
                                           "best", "milp_over_best", "milp_measured_over_even",
                                           "paired_milp_over_best", "paired_rounds",
                                           "selection_milp_over_best", "selection_milp_startup_over_best")},
                confirmed=confirmed,
                milp_over_best_rounds=summary.get("milp_over_best_rounds"),
                failed_requests=len(load.failed), failures=load.failed[:5],
            )
    finally:
        cluster.stop()
    return out


RECOVERED_WITHIN = 0.10  # recovered: within 10 % of the fresh plan's tokens/s ...
RECOVERED_FOR_S = 6.0  # ... on average over this long (2 s buckets swing by +-30 % under load)


def recovery_time(stamps: list[float], t_cut: float, t_end: float, reference: float) -> float | None:
    """Seconds from the cut until the throughput, averaged over the next ``RECOVERED_FOR_S``, is first
    within ``RECOVERED_WITHIN`` of ``reference`` (what a fresh cluster measured with the cut quota from
    the start, rebalancing off: the plan the leader makes when it knows from the outset). None: never."""
    if reference <= 0:
        return None
    ordered = sorted(stamps)
    t = t_cut
    while t + RECOVERED_FOR_S <= t_end:
        lo = np.searchsorted(ordered, t)
        hi = np.searchsorted(ordered, t + RECOVERED_FOR_S)
        if (hi - lo) / RECOVERED_FOR_S >= (1.0 - RECOVERED_WITHIN) * reference:
            return round(t - t_cut, 1)
        t += 0.5
    return None


async def reference_run(args: argparse.Namespace, shards: Path, slow: int) -> dict[str, Any]:
    """A fresh cluster whose node ``slow`` has the cut quota from the start, rebalancing off: the
    leader's plan from profiles taken under that quota, measured with the same load. What a rebalance
    after the cut should get back to (issue 6: within 10 % of a fresh optimal plan)."""
    quotas = [args.drift_quota] * 3
    quotas[slow] = args.cut_to
    env = {"LLNODE_THREADS": "1", "LLNODE_REBALANCE": "0"}
    cluster = _bench_cluster(shards, 3, "llnode-fresh-", env, quotas)
    cluster.start()
    try:
        await cluster.wait_ready(600)
        async with aiohttp.ClientSession() as session:
            leader = await _leader(cluster, session)
            plan = await _plan(cluster, session, leader)
            names = {(await _status(cluster, session, i)).get("id", ""): f"node{i}" for i in range(3)}
            load = Load(cluster, args.sessions, args.tokens)
            rate = await _measure(load, session, args.reference_s)
            batches = await _mean_batches(cluster, session)
    finally:
        cluster.stop()
    return {"quotas": quotas, "plan": _ranges(plan, names), "tokens_per_s": round(rate, 3),
            "failed_requests": len(load.failed), "failures": load.failed[:5], "mean_batch": batches}


BEFORE_FROM_S = 8.0  # a drift run's "before the cut" starts this long after the load (warm-up)


def _cpu_seconds(cluster: LocalCluster) -> list[float | None]:
    """Every node process's CPU seconds so far (all its threads: what its CPU group's quota charges)."""
    return [cpu_seconds(p.pid) for p in cluster.procs]


def quota_use(start: Sequence[float | None], end: Sequence[float | None], seconds: float,
              quotas: Sequence[float]) -> list[float | None]:
    """Each node's share of its CPU quota used over ``seconds``: 1.0 means the quota binds. Why: a cut
    from 0.6 to 0.3 of a core can only halve a node's speed if the 0.6 bound before the cut; on a host
    whose cores bind first (3 x 0.6 cores on 2), the cut costs less and so can a rebalance gain less."""
    return [None if a is None or b is None or seconds <= 0 or q <= 0 else round((b - a) / (seconds * q), 3)
            for a, b, q in zip(start, end, quotas, strict=True)]


async def drift_run(args: argparse.Namespace, shards: Path, rebalance: bool,
                    reference: dict[str, Any] | None = None) -> dict[str, Any]:
    env = {"LLNODE_THREADS": "1", "LLNODE_REBALANCE": "1" if rebalance else "0",
           "LLNODE_REBALANCE_WINDOW_S": "4", "LLNODE_REBALANCE_COOLDOWN_S": "8"}
    cluster = _bench_cluster(shards, 3, "llnode-drift-", env, [args.drift_quota] * 3)
    cluster.start()
    try:
        await cluster.wait_ready(600)
        async with aiohttp.ClientSession() as session:
            leader = await _leader(cluster, session)
            plan = await _plan(cluster, session, leader)
            ids = [(await _status(cluster, session, i)).get("id") for i in range(3)]
            load = Load(cluster, args.sessions, args.tokens)
            await load.start(session)
            t0 = time.monotonic()
            await asyncio.sleep(min(BEFORE_FROM_S, args.cut_at_s))
            t_from, cpu_from = time.monotonic(), _cpu_seconds(cluster)
            await asyncio.sleep(max(0.0, args.cut_at_s - BEFORE_FROM_S))
            # the busiest stage of the plan in force at the cut (a rebalance may have moved it since)
            now = ((await _status(cluster, session, leader))["pipeline"]["plan"] or {}).get("plan") or plan
            biggest = max(now["stages"], key=lambda s: s["end"] - s["start"])
            slow = ids.index(biggest["device_id"])
            cpu_cut = _cpu_seconds(cluster)
            cluster.set_quota(slow, args.cut_to)
            t_cut, wall_cut = time.monotonic(), time.time()
            await asyncio.sleep(max(0.0, args.drift_s - args.cut_at_s))
            t_end, cpu_end = time.monotonic(), _cpu_seconds(cluster)
            await load.stop()
            batches = await _mean_batches(cluster, session)  # the plan in force at the end
            events: list[dict[str, Any]] = []
            for i in range(3):
                for ev in ((await _status(cluster, session, i)).get("pipeline") or {}).get("events", []):
                    kind = ev.get("kind", "")
                    if kind in ("drift", "stage", "route") or kind.startswith("rebalance"):
                        events.append({**ev, "node": f"node{i}"})
            events.sort(key=lambda ev: ev.get("t", 0.0))
    finally:
        cluster.stop()
    bucket = 2.0
    times = np.arange(0.0, t_end - t0, bucket)
    rates = [load.rate(t0 + b, t0 + b + bucket) for b in times]
    before = load.rate(t0 + BEFORE_FROM_S, t_cut)
    quotas_after = [args.cut_to if i == slow else args.drift_quota for i in range(3)]
    after = load.rate(t_cut, t_end)
    tail = load.rate(t_end - (t_end - t_cut) / 3, t_end)
    fresh = reference["tokens_per_s"] if reference else 0.0
    recovery = recovery_time(load.stamps, t_cut, t_end, fresh)
    phases = recovery_phases(events, wall_cut, recovery)
    return {
        "rebalance": rebalance, "slowed": f"node{slow}", "phases": phases, "plan_before": [
            (s.get("name") or s["device_id"], s["start"], s["end"]) for s in now["stages"]],
        "tokens_per_s_before": round(before, 3), "tokens_per_s_after": round(after, 3),
        "tokens_per_s_tail": round(tail, 3), "recovery_s": recovery,
        "before_over_fresh": round(before / fresh, 3) if fresh else None,
        "after_over_fresh": round(after / fresh, 3) if fresh else None,
        "tail_over_fresh": round(tail / fresh, 3) if fresh else None,
        "timeline": {"t": [float(t) for t in times], "tokens_per_s": [round(r, 3) for r in rates]},
        "cut_at_s": round(t_cut - t0, 1), "failed_requests": len(load.failed), "failures": load.failed[:5],
        "completed": load.completed, "mean_batch": batches,
        "quota_use_before": quota_use(cpu_from, cpu_cut, t_cut - t_from, [args.drift_quota] * 3),
        "quota_use_after": quota_use(cpu_cut, cpu_end, t_end - t_cut, quotas_after),
        "rebalances": predicted_vs_measured(events),
        "events": [{k: ev.get(k) for k in ("kind", "node", "message", "predicted_gain", "measured_gain",
                                           "solve_s")}
                   | {"t_after_cut": round(ev.get("t", wall_cut) - wall_cut, 1)}
                   for ev in events if ev["kind"] not in ("stage", "route")],
    }


def predicted_vs_measured(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every accepted rebalance with the gain it predicted and the gain it then measured (``None``
    when its stages never reported enough fresh steps): how right the leader's pricing was."""
    measured = {ev.get("epoch"): ev.get("measured_gain")
                for ev in events if ev["kind"] == "rebalance-measured"}
    return [{"epoch": ev.get("epoch"), "predicted_gain": ev.get("predicted_gain"),
             "measured_gain": measured.get(ev.get("epoch"))}
            for ev in events if ev["kind"] == "rebalance"]


def recovery_phases(events: list[dict[str, Any]], cut: float, recovery_s: float | None) -> dict[str, Any]:
    """Where the time from the quota cut to full speed went, from the nodes' own events (wall clock).

    detection: cut -> the first ``drift`` event; decision: -> the leader's ``rebalance`` (``solve_s``:
    the re-solve's share of it, the rest is the request's trip and the leader's queue); loading: -> the
    last stage node running the new plan (with each node's own load time and modules built); serving:
    -> the last entry routing over it (sessions then re-prefill); back to speed: -> recovered
    (``recovery_s``: throughput within 10 % of the fresh plan's; negative when that came first).
    """
    after = [ev for ev in events if ev.get("t", 0.0) >= cut]
    drift = next((ev for ev in after if ev["kind"] == "drift"), None)
    rebalance = next((ev for ev in after if ev["kind"] == "rebalance"), None)
    out: dict[str, Any] = {"detection_s": None, "decision_s": None, "solve_s": None, "loading_s": None,
                           "serving_s": None, "back_to_speed_s": None, "load_s": {}}
    if drift is None or rebalance is None:
        return out
    out["solve_s"] = rebalance.get("solve_s")
    epoch = rebalance.get("epoch")
    stages = [ev for ev in after if ev["kind"] == "stage" and ev.get("epoch") == epoch]
    routes = [ev for ev in after if ev["kind"] == "route" and f"epoch {epoch} " in ev.get("message", "")]
    out["detection_s"] = round(drift["t"] - cut, 1)
    out["decision_s"] = round(rebalance["t"] - drift["t"], 1)
    loaded = max((ev["t"] for ev in stages), default=None)
    if loaded is not None:
        out["loading_s"] = round(loaded - rebalance["t"], 1)
        out["load_s"] = {ev["node"]: {"s": ev.get("load_s"), "built": ev.get("built")} for ev in stages}
    served = max((ev["t"] for ev in routes), default=None)
    if served is not None:
        out["serving_s"] = round(served - (loaded or rebalance["t"]), 1)
        if recovery_s is not None:
            out["back_to_speed_s"] = round(cut + recovery_s - served, 1)
    return out


async def steady_run(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    """2 equal nodes, rebalancing on with its default knobs, ``args.sessions`` concurrent sessions: plan
    changes after a warm-up (concurrency alone must not re-plan; a calibration of the start-up plan to
    the served context may happen during the warm-up and is reported apart)."""
    cluster = _bench_cluster(shards, 2, "llnode-steady-", {"LLNODE_THREADS": "1"})
    cluster.start()
    try:
        await cluster.wait_ready(600)
        async with aiohttp.ClientSession() as session:

            async def epochs() -> set[Any]:
                return {((await _status(cluster, session, i)).get("pipeline") or {}).get("epoch")
                        for i in range(cluster.nodes)}

            start = await epochs()
            load = Load(cluster, args.sessions, args.tokens)
            await load.start(session)
            await asyncio.sleep(30.0)
            warm = await epochs()
            seen = set(warm)
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.steady_s:
                await asyncio.sleep(2.0)
                seen |= await epochs()
            t1 = time.monotonic()
            await load.stop()
            kinds: dict[str, int] = {}
            for i in range(cluster.nodes):
                for ev in ((await _status(cluster, session, i)).get("pipeline") or {}).get("events", []):
                    if ev.get("kind") in ("drift", "rebalance", "rebalance-rejected"):
                        kinds[ev["kind"]] = kinds.get(ev["kind"], 0) + 1
    finally:
        cluster.stop()
    def spread(epochs: set[Any]) -> int | None:
        numbers = [e for e in epochs if isinstance(e, int)]
        return max(numbers) - min(numbers) if numbers else None

    return {
        "warmup_replans": spread(start | warm),
        "steady_replans": spread(seen),
        "tokens_per_s": round(load.rate(t0, t1), 3), "failed_requests": len(load.failed),
        "events": kinds,
    }


# ---- a tiny PNG plot (no plotting library needed) ---------------------------------------------------
def write_timeline_png(path: Path, series: list[tuple[list[float], list[float], tuple[int, int, int]]],
                       cut_at: float | None = None, size: tuple[int, int] = (640, 320)) -> None:
    """Line plot of each (x, y, rgb) series on a white canvas with axes; a grey bar marks the cut."""
    w, h = size
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    pad = 30
    xmax = max((max(x) for x, _, _ in series if x), default=1.0) or 1.0
    ymax = max((max(y) for _, y, _ in series if y), default=1.0) or 1.0

    def px(x: float, y: float) -> tuple[int, int]:
        return (pad + int((w - 2 * pad) * x / xmax), h - pad - int((h - 2 * pad) * y / (1.1 * ymax)))

    img[h - pad, pad : w - pad] = 0
    img[pad : h - pad, pad] = 0
    for k in range(1, 5):  # horizontal grid lines at quarters of the y range
        _, gy = px(0, 1.1 * ymax * k / 4)
        img[gy, pad : w - pad] = 220
    if cut_at is not None:
        cx, _ = px(cut_at, 0)
        img[pad : h - pad, max(cx - 1, 0) : cx + 1] = 150
    for xs, ys, rgb in series:
        pts = [px(x, y) for x, y in zip(xs, ys, strict=True)]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for t in np.linspace(0, 1, n + 1):
                x, y = int(x0 + t * (x1 - x0) + 0.5), int(y0 + t * (y1 - y0) + 0.5)
                img[max(y - 1, 0) : y + 1, max(x - 1, 0) : x + 1] = rgb
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + tag + data + crc

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _ratio(drift: dict[str, Any], key: str) -> float | None:
    if not drift or drift["without"][key] <= 0:
        return None
    return round(drift["with"][key] / drift["without"][key], 3)


def retained_gain(drift: dict[str, Any], key: str = "tokens_per_s_after") -> float | None:
    """With over without rebalancing, each run's throughput after the cut taken over *its own* before the
    cut. The two runs are two fresh clusters, and fresh clusters of the same code on the same shards
    differ by up to 20 % in onnxruntime time (the session-4 quiet run: 29.6 vs 33.4 tok/s before the
    cut, same quotas, same load); ``rebalance_gain`` carries that draw, this ratio cancels it. It is the
    conservative one: a rebalance *before* the cut raises the with-run's own baseline."""
    if not drift:
        return None
    w, wo = drift["with"], drift["without"]
    if min(w["tokens_per_s_before"], wo["tokens_per_s_before"], wo[key]) <= 0:
        return None
    return round((w[key] / w["tokens_per_s_before"]) / (wo[key] / wo["tokens_per_s_before"]), 3)


def gain_ceiling(drift: dict[str, Any]) -> float | None:
    """What a fresh cluster started with the cut quota serves over the run without rebalancing: about the
    most a rebalance could gain in this scenario (the session-4 quiet run: 1.20, against a 1.3 target)."""
    if not drift or drift["without"]["tokens_per_s_after"] <= 0:
        return None
    return round(drift["fresh"]["tokens_per_s"] / drift["without"]["tokens_per_s_after"], 3)


def run(args: argparse.Namespace) -> int:
    reason = unavailable_reason()
    if reason:
        print(f"llnode bench balance: needs cgroup v1 CPU quotas: {reason}")
        return 2
    shards = shard_dir(args.shards)
    summary: dict[str, Any] = {}

    async def main() -> None:
        if not args.skip_static:
            static = await static_part(args, shards)
            summary["static"] = static
            print(f"static, medians of {args.rounds} rounds: start-up MILP "
                  f"{static['tokens_per_s']['milp']:.2f} tok/s, over even x{static['milp_over_even']:.2f}, "
                  f"over memory x{static['milp_over_memory']:.2f}, over the best brute-force plan "
                  f"x{static['milp_startup_over_best']:.2f}; MILP on measured speeds over the best "
                  f"x{static['milp_over_best']:.2f} ({static['best']}; fresh rounds "
                  f"{static.get('milp_over_best_rounds')}); in the rounds that chose the best: "
                  f"x{static['selection_milp_over_best']:.2f} (per round {static['paired_rounds']}, "
                  f"median x{static['paired_milp_over_best']:.2f})", flush=True)
        if not args.skip_drift:
            # the slowed node is the busiest stage's; with equal quotas that is node 0 or 1 whatever the
            # run, and the fresh plan does not depend on which equal node is slow: measure it first
            reference = await reference_run(args, shards, slow=0)
            print(f"fresh plan with the cut quota from the start {reference['plan']}: "
                  f"{reference['tokens_per_s']:.2f} tok/s; mean decode batch {reference['mean_batch']}",
                  flush=True)
            without = await drift_run(args, shards, rebalance=False, reference=reference)
            print(f"drift without rebalancing: {without['tokens_per_s_before']:.2f} -> "
                  f"{without['tokens_per_s_after']:.2f} tok/s ({without['after_over_fresh']} of the fresh "
                  f"plan), recovered {without['recovery_s']} s; mean decode batch {without['mean_batch']}; "
                  f"share of each node's quota used before / after the cut {without['quota_use_before']} / "
                  f"{without['quota_use_after']}", flush=True)
            with_rb = await drift_run(args, shards, rebalance=True, reference=reference)
            print(f"drift with rebalancing: {with_rb['tokens_per_s_before']:.2f} -> "
                  f"{with_rb['tokens_per_s_after']:.2f} tok/s (tail {with_rb['tokens_per_s_tail']:.2f}; "
                  f"{with_rb['after_over_fresh']} / {with_rb['tail_over_fresh']} of the fresh plan; before "
                  f"the cut {with_rb['before_over_fresh']}), recovery {with_rb['recovery_s']} s; mean decode "
                  f"batch {with_rb['mean_batch']}; quota used before / after {with_rb['quota_use_before']} / "
                  f"{with_rb['quota_use_after']}", flush=True)
            for ev in with_rb["events"]:
                print(f"  event {ev['kind']}: {ev['message']}")
            for rb in with_rb["rebalances"]:
                print(f"  rebalance epoch {rb['epoch']}: predicted {rb['predicted_gain']}, "
                      f"measured {rb['measured_gain']}")
            summary["drift"] = {"without": without, "with": with_rb, "fresh": reference}
            print(f"rebalance_gain x{_ratio(summary['drift'], 'tokens_per_s_after')} (last third "
                  f"x{_ratio(summary['drift'], 'tokens_per_s_tail')}); each run over its own pre-cut rate "
                  f"x{retained_gain(summary['drift'])} (last third "
                  f"x{retained_gain(summary['drift'], 'tokens_per_s_tail')}); ceiling (fresh cluster with "
                  f"the cut quota over no rebalancing) x{gain_ceiling(summary['drift'])}", flush=True)
            write_timeline_png(
                args.png,
                [(without["timeline"]["t"], without["timeline"]["tokens_per_s"], (200, 40, 40)),
                 (with_rb["timeline"]["t"], with_rb["timeline"]["tokens_per_s"], (30, 90, 200))],
                cut_at=with_rb["cut_at_s"],
            )
            print(f"timeline: {args.png} (red: without rebalancing, blue: with; grey: the quota cut)")
            ph = with_rb["phases"]
            print(f"recovery {with_rb['recovery_s']} s after the cut: detection {ph['detection_s']} s, "
                  f"decision {ph['decision_s']} s (solve {ph['solve_s']} s), loading {ph['loading_s']} s "
                  f"{ph['load_s']}, "
                  f"serving (route switch) {ph['serving_s']} s, back to speed {ph['back_to_speed_s']} s",
                  flush=True)
        if not args.skip_steady:
            steady = await steady_run(args, shards)
            summary["steady"] = steady
            print(f"steady (2 equal nodes, {args.sessions} sessions, rebalancing on): "
                  f"{steady['warmup_replans']} plan change(s) in the 30 s warm-up, "
                  f"{steady['steady_replans']} in the next {args.steady_s:.0f} s; "
                  f"{steady['tokens_per_s']:.2f} tok/s; events {steady['events']}", flush=True)

    asyncio.run(main())
    static = summary.get("static", {})
    drift = summary.get("drift", {})
    result = {
        "milp_over_even": round(static["milp_over_even"], 3) if static else None,
        "milp_over_memory": round(static["milp_over_memory"], 3) if static else None,
        "milp_over_best": round(static["milp_over_best"], 3) if static else None,
        "milp_startup_over_best": round(static["milp_startup_over_best"], 3) if static else None,
        "milp_measured_over_even": round(static["milp_measured_over_even"], 3) if static else None,
        "paired_milp_over_best": round(static["paired_milp_over_best"], 3) if static else None,
        "selection_milp_over_best": round(static["selection_milp_over_best"], 3) if static else None,
        "confirm_rounds": args.confirm if static else None,
        "static_rounds": args.rounds if static else None,
        "rebalance_gain": _ratio(drift, "tokens_per_s_after"),
        "rebalance_gain_tail": _ratio(drift, "tokens_per_s_tail"),
        "rebalance_gain_retained": retained_gain(drift),
        "rebalance_gain_retained_tail": retained_gain(drift, "tokens_per_s_tail"),
        "rebalance_gain_ceiling": gain_ceiling(drift),
        "recovery_s": drift["with"]["recovery_s"] if drift else None,
        "rebalances": drift["with"]["rebalances"] if drift else None,
        "fresh_tokens_per_s": drift["fresh"]["tokens_per_s"] if drift else None,
        "after_over_fresh": drift["with"]["after_over_fresh"] if drift else None,
        "recovery_phases": {k: v for k, v in drift["with"]["phases"].items() if k != "load_s"} if drift
        else None,
        "steady_replans": summary["steady"]["steady_replans"] if "steady" in summary else None,
        "failed_requests": static.get("failed_requests", 0)
        + (drift["with"]["failed_requests"] + drift["without"]["failed_requests"]
           + drift["fresh"]["failed_requests"] if drift else 0)
        + summary.get("steady", {}).get("failed_requests", 0),
        "tokens_per_s": static.get("tokens_per_s"),
    }
    if args.json:
        print(json.dumps({"detail": summary}, default=str))
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0
