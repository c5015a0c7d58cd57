"""``llnode bench soak``: a cluster under steady load for a long time; does anything leak or degrade?

A local cluster of real daemons (3 by default) serves a steady stream of concurrent greedy completions
for ``--minutes`` after a warm-up. Measured: requests completed, errors (must be 0), p50/p99 latency, and
for every node, sampled all along: resident memory, open file descriptors, asyncio tasks and threads
(the last two from the node's ``/api/status`` ``process`` section), and the plan epoch (a plan switch
builds new onnxruntime sessions: the thing that used to leave RSS higher for good, docs/faults.md).

Verdict, made to survive noise:

- warm-up ends when ``warmup_s`` has passed *and* every prompt has been served at every entry node at
  least once (so the KV buffers and onnxruntime's per-shape state of the longest session exist); on a
  loaded machine a time-only warm-up ended after a dozen requests;
- ``rss_growth`` is the *trend* of RSS over the steady part (from the end of warm-up to the end of the
  load): the Theil-Sen slope (median of the pairwise slopes, robust to the transient doubling while a plan
  switch builds its new stage before dropping the old one) times the steady duration, relative to the
  fitted RSS at the end of warm-up; the largest over the nodes. Target < 5 %. Only pairs of samples
  served under the same plan give slopes: a re-plan changes which modules a node holds, so its RSS level
  moves legitimately. The trend across plans (``rss_growth_across_plans``) and the end/start ratio of
  single samples (``rss_growth_raw``) are printed beside it;
- descriptors, tasks and threads once the load has stopped are compared with the most seen during
  warm-up (``fd_growth``, ``task_growth``, ``thread_growth``): one leaked per request would show at once.

With ``--json`` the last line is one JSON object holding ``completed``, ``errors``, ``rss_growth`` (the
largest per-node ratio) and the rest. ``--timeline FILE`` writes every sample as a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from llnode.bench.chaos import PROMPTS
from llnode.bench.common import shard_dir
from llnode.cluster import LocalCluster, free_base_port
from llnode.process import open_fds, rss_bytes

SAMPLE_EVERY_S = 5.0
SETTLE_S = 5.0  # after the load stops: connections close, sessions are freed
WARMUP_CAP_S = 600.0  # warm-up ends this long after its least duration even if some pair never completed
RSS_TARGET = 0.05
# Peer links and mDNS on loopback only: the soak measures the daemons, not the host's other interfaces.
# With automatic addresses, two nodes linked over a veth address that a network-namespace emulation on
# the same host deleted later: the TCP link kept accepting writes that were never delivered (Send-Q
# 2.6 MB, the peer's frames_in frozen), and the pipeline stalled with 0 requests completed.
LOOPBACK_ONLY = ["--advertise-host", "127.0.0.1", "--mdns-interface", "127.0.0.1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="how long to keep the load up after warm-up (default 30)"
    )
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2 fp32)")
    parser.add_argument("--nodes", type=int, default=3, help="daemons to start (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per request (default 32)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="least warm-up seconds (default 20%% of --minutes, 10-120)"
    )
    parser.add_argument("--timeline", type=Path, default=None, help="write every sample as a JSON line")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")


@dataclass
class Sample:
    t: float  # seconds since the load began
    completed: int
    rss: list[int]
    fds: list[int]
    tasks: list[int]  # -1 where the node did not answer its status in time
    threads: list[int]
    epochs: list[int | None]
    alive: list[int]  # members each node sees alive (itself included), -1 if it did not answer


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)

    def column(self, name: str, node: int, since: float = 0.0, until: float = float("inf")) -> list[Any]:
        return [getattr(s, name)[node] for s in self.samples if since <= s.t <= until]


def theil_sen(
    ts: list[float], ys: list[float], groups: list[Any] | None = None, max_pairs: int = 40_000
) -> tuple[float, float]:
    """Robust line fit: (slope, intercept), medians of the pairwise slopes and of ``y - slope * t``.

    With ``groups``, only pairs of samples in the same group give slopes (the level may jump between
    groups) and the intercept is fitted on the first group."""
    n = len(ts)
    if n < 2:
        return 0.0, ys[0] if ys else 0.0
    same = groups if groups is not None else [0] * n
    stride = max(1, int((n * (n - 1) / 2 / max_pairs) ** 0.5))
    slopes = [
        (ys[j] - ys[i]) / (ts[j] - ts[i])
        for i in range(0, n, stride)
        for j in range(i + 1, n, stride)
        if ts[j] > ts[i] and same[i] == same[j]
    ]
    slope = statistics.median(slopes) if slopes else 0.0
    first = [k for k in range(n) if same[k] == same[0]]
    return slope, statistics.median(ys[k] - slope * ts[k] for k in first)


def trend_growth(ts: list[float], ys: list[float], groups: list[Any] | None = None) -> float:
    """Growth over ``[ts[0], ts[-1]]`` predicted by the robust trend, relative to its value at ``ts[0]``."""
    if len(ts) < 2:
        return 0.0
    slope, intercept = theil_sen(ts, ys, groups)
    start = intercept + slope * ts[0]
    return slope * (ts[-1] - ts[0]) / start if start > 0 else 0.0


async def _node_status(session: aiohttp.ClientSession, url: str) -> tuple[dict[str, Any], int | None, int]:
    """The node's ``process`` section, serving epoch and members it sees alive; ``({}, None, -1)`` if it
    does not answer in time."""
    try:
        async with session.get(f"{url}/api/status", timeout=aiohttp.ClientTimeout(total=3)) as r:
            doc = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}, None, -1
    if not isinstance(doc, dict):
        return {}, None, -1
    proc, pipeline, members = doc.get("process"), doc.get("pipeline"), doc.get("members")
    epoch = pipeline.get("epoch") if isinstance(pipeline, dict) else None
    alive = -1
    if isinstance(members, list):
        alive = sum(1 for m in members if isinstance(m, dict) and m.get("alive"))
    return (proc if isinstance(proc, dict) else {}), (epoch if isinstance(epoch, int) else None), alive


async def soak(
    shards: Path,
    minutes: float,
    *,
    nodes: int = 3,
    concurrency: int = 4,
    tokens: int = 32,
    warmup_s: float | None = None,
    workdir: Path | None = None,
    timeline_file: Path | None = None,
    sample_every_s: float = SAMPLE_EVERY_S,
) -> dict[str, Any]:
    """Run the soak; returns the figures (see the module docstring)."""
    duration = minutes * 60.0
    least_warmup = warmup_s if warmup_s is not None else min(120.0, max(10.0, duration * 0.2))
    timeline = Timeline()
    latencies: list[tuple[float, float]] = []  # (began, seconds), every completed request
    errors: list[str] = []
    served: set[tuple[int, int]] = set()  # (prompt, entry node) pairs completed at least once
    everything = {(p, e) for p in range(len(PROMPTS)) for e in range(nodes)}
    with tempfile.TemporaryDirectory(prefix="llnode-soak-") as tmp:
        cluster = LocalCluster(
            nodes=nodes, base_port=free_base_port(nodes), model=shards.name, shards=shards.parent,
            workdir=workdir or Path(tmp), log_level="warning", extra_args=LOOPBACK_ONLY,
        )  # fmt: skip
        cluster.start()
        try:
            await cluster.wait_ready(600)
            pids = [p.pid for p in cluster.procs]
            began = time.monotonic()
            warm_at: list[float] = []  # set once, when warm-up ends (seconds since began)
            stop_at = [float("inf")]
            ends: list[float] = []  # when the load stopped (seconds since began)

            def warm_check(now: float) -> None:
                late = now - began >= least_warmup + WARMUP_CAP_S  # some pair never completes: go on
                if not warm_at and now - began >= least_warmup and (served >= everything or late):
                    warm_at.append(now - began)
                    stop_at[0] = now + duration

            async def worker(k: int) -> None:
                timeout = aiohttp.ClientTimeout(total=300)
                n = k
                async with aiohttp.ClientSession(timeout=timeout) as s:
                    while time.monotonic() < stop_at[0]:
                        prompt, entry = n % len(PROMPTS), (n // len(PROMPTS) + n) % nodes
                        body = {"model": shards.name, "prompt": PROMPTS[prompt],
                                "max_tokens": tokens, "temperature": 0}  # fmt: skip
                        n += concurrency
                        t0 = time.monotonic()
                        try:
                            async with s.post(f"{cluster.url(entry)}/v1/completions", json=body) as r:
                                data = await r.json()
                                if r.status != 200 or not data.get("choices"):
                                    errors.append(f"HTTP {r.status}: {str(data)[:200]}")
                                    continue
                        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                            errors.append(f"{type(exc).__name__}: {exc}")
                            continue
                        latencies.append((t0 - began, time.monotonic() - t0))
                        served.add((prompt, entry))
                        warm_check(time.monotonic())

            async def sample(s: aiohttp.ClientSession) -> None:
                now = time.monotonic()
                warm_check(now)
                answers = await asyncio.gather(*(_node_status(s, cluster.url(i)) for i in range(nodes)))
                smp = Sample(
                    t=round(now - began, 2), completed=len(latencies),
                    rss=[rss_bytes(p) for p in pids], fds=[open_fds(p) for p in pids],
                    tasks=[int(a[0].get("tasks", -1)) for a in answers],
                    threads=[int(a[0].get("threads", -1)) for a in answers],
                    epochs=[a[1] for a in answers], alive=[a[2] for a in answers],
                )  # fmt: skip
                timeline.samples.append(smp)
                if timeline_file is not None:
                    with timeline_file.open("a") as f:
                        f.write(json.dumps(smp.__dict__) + "\n")

            async def sampler() -> None:
                async with aiohttp.ClientSession() as s:
                    while time.monotonic() < stop_at[0]:
                        await sample(s)
                        await asyncio.sleep(sample_every_s)
                    await sample(s)  # the last sample of the load
                    load_end = time.monotonic() - began
                    await asyncio.sleep(SETTLE_S)  # the workers finish their last requests meanwhile
                    await sample(s)
                    ends.append(load_end)

            await asyncio.gather(sampler(), *(worker(k) for k in range(concurrency)))
            for i, p in enumerate(cluster.procs):
                if p.poll() is not None:
                    errors.append(f"node{i} exited with {p.returncode}")
        finally:
            cluster.stop()
    r = _figures(
        shards.name, minutes, nodes, concurrency, least_warmup, warm_at[0], ends[0], timeline,
        latencies, errors,
    )  # fmt: skip
    r["warmup_served_all"] = served >= everything  # every prompt at every entry before the steady part
    return r


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def _figures(
    model: str, minutes: float, nodes: int, concurrency: int, least_warmup: float, warm: float,
    load_end: float, timeline: Timeline, latencies: list[tuple[float, float]], errors: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The verdict from the timeline (see the module docstring)."""
    steady = [s for s in timeline.samples if warm <= s.t <= load_end]
    during_warmup = [s for s in timeline.samples if s.t <= warm] or timeline.samples[:1]
    last = timeline.samples[-1]
    growth, growth_all, raw, slope_mib_h = [], [], [], []
    for i in range(nodes):
        ts = [s.t for s in steady]
        ys = [float(s.rss[i]) for s in steady]
        # A plan switch changes which modules a node holds, so its RSS level legitimately moves: the
        # leak trend compares samples served under the same plan only (samples mid-switch are left out).
        planned = [k for k, s in enumerate(steady) if s.epochs[i] is not None]
        tp, yp = [ts[k] for k in planned], [ys[k] for k in planned]
        ep = [steady[k].epochs[i] for k in planned]
        growth.append(trend_growth(tp, yp, ep))
        growth_all.append(trend_growth(ts, ys))
        raw.append(ys[-1] / ys[0] - 1.0 if len(ys) > 1 and ys[0] else 0.0)
        slope_mib_h.append(theil_sen(tp, yp, ep)[0] * 3600 / 2**20 if len(tp) > 1 else 0.0)

    def most(name: str, i: int) -> int:
        return max(getattr(s, name)[i] for s in during_warmup)

    def growth_of(name: str) -> int:
        end = getattr(last, name)
        return max(end[i] - most(name, i) for i in range(nodes)) if all(v >= 0 for v in end) else -1

    after = sorted(d for t0, d in latencies if t0 >= warm)
    epochs = {e for s in timeline.samples for e in s.epochs if e is not None}
    # A node that loses its peers serves alone: then the soak no longer measures a 3-node cluster.
    split = [s.t for s in steady if any(0 <= a < nodes for a in s.alive)]
    return {
        "benchmark": "soak",
        "model": model,
        "nodes": nodes,
        "minutes": minutes,
        "concurrency": concurrency,
        "warmup_least_s": least_warmup,
        "warmup_s": round(warm, 1),
        "steady_s": round(load_end - warm, 1),
        "samples_steady": len(steady),
        "completed": len(latencies),
        "completed_after_warmup": len(after),
        "errors": len(errors),
        "error_samples": errors[:5],
        "p50_s": round(statistics.median(after), 3) if after else None,
        "p99_s": round(after[min(len(after) - 1, int(len(after) * 0.99))], 3) if after else None,
        "plan_epochs": sorted(epochs),
        "split_samples": len(split),
        "split_first_s": split[0] if split else None,
        "rss_mib_after_warmup": [_mib(steady[0].rss[i]) for i in range(nodes)] if steady else [],
        "rss_mib_end": [_mib(last.rss[i]) for i in range(nodes)],
        "rss_mib_max": [_mib(max(s.rss[i] for s in steady)) for i in range(nodes)] if steady else [],
        "rss_slope_mib_per_h": [round(v, 1) for v in slope_mib_h],
        "rss_growth_per_node": [round(g, 4) for g in growth],
        "rss_growth": round(max(growth), 4),
        "rss_growth_across_plans": round(max(growth_all), 4),
        "rss_growth_raw": round(max(raw), 4),
        "rss_target_met": max(growth) < RSS_TARGET,
        "fds_warmup": [most("fds", i) for i in range(nodes)],
        "fds_end": last.fds,
        "fd_growth": growth_of("fds"),
        "tasks_warmup": [most("tasks", i) for i in range(nodes)],
        "tasks_end": last.tasks,
        "task_growth": growth_of("tasks"),
        "threads_warmup": [most("threads", i) for i in range(nodes)],
        "threads_end": last.threads,
        "thread_growth": growth_of("threads"),
    }


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.nodes < 1 or args.concurrency < 1 or args.tokens < 1:
        print("llnode bench soak: --minutes must be > 0; --nodes, --concurrency, --tokens >= 1")
        return 2
    if args.warmup is not None and args.warmup < 0:
        print("llnode bench soak: --warmup must be >= 0")
        return 2
    shards = shard_dir(args.shards)
    if args.timeline is not None:
        args.timeline.write_text("")
    print(
        f"soak: {args.nodes} nodes, {args.concurrency} concurrent requests for {args.minutes} min "
        "after warm-up ...",
        flush=True,
    )
    r = asyncio.run(
        soak(
            shards, args.minutes, nodes=args.nodes, concurrency=args.concurrency, tokens=args.tokens,
            warmup_s=args.warmup, timeline_file=args.timeline,
        )
    )
    print(
        f"completed {r['completed']} requests ({r['completed_after_warmup']} after the {r['warmup_s']} s "
        f"warm-up), errors {r['errors']}; latency p50 {r['p50_s']} s p99 {r['p99_s']} s; "
        f"plan epochs {r['plan_epochs']}"
    )
    print(
        f"RSS per node {r['rss_mib_after_warmup']} -> {r['rss_mib_end']} MiB (max {r['rss_mib_max']}); "
        f"trend {r['rss_slope_mib_per_h']} MiB/h = growth {r['rss_growth_per_node']} over "
        f"{r['steady_s']} s (target < {RSS_TARGET:.0%}: {'met' if r['rss_target_met'] else 'NOT met'}; "
        f"across plans {r['rss_growth_across_plans']}, end/start {r['rss_growth_raw']})"
    )
    print(
        f"fds {r['fds_warmup']} -> {r['fds_end']}, asyncio tasks {r['tasks_warmup']} -> {r['tasks_end']}, "
        f"threads {r['threads_warmup']} -> {r['threads_end']}"
    )
    if r["split_samples"]:
        print(
            f"WARNING: in {r['split_samples']} of {r['samples_steady']} steady samples (from "
            f"{r['split_first_s']} s) a node saw fewer than {args.nodes} members alive: the cluster split"
        )
    for e in r["error_samples"]:
        print(f"error: {e}")
    if args.json:
        print(json.dumps(r))
    return 0 if r["errors"] == 0 else 1
