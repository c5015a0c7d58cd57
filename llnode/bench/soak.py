"""``llnode bench soak``: a cluster under steady load for a long time; does anything leak or degrade?

A local cluster of real daemons (3 by default) serves a steady stream of concurrent greedy completions
for ``--minutes``. Measured: requests completed, errors (must be 0), p50/p99 latency, and for every node
its resident memory and open file descriptors, sampled all along. A leak shows as growth *after*
warm-up (onnxruntime's arenas, the first KV caches and Python's allocator settle in the first requests),
so RSS growth is the ratio between the end of the run and the end of the warm-up (target < 5%), and the
descriptor count after the load stops is compared with the one during warm-up (must not grow: a leaked
socket or file per request would show at once).

With ``--json`` the last line is one JSON object holding ``completed``, ``errors``, ``rss_growth``
(the largest per-node ratio) and the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="how long to keep the load up (default 30)"
    )
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2 fp32)")
    parser.add_argument("--nodes", type=int, default=3, help="daemons to start (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per request (default 32)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")



def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


@dataclass
class Samples:
    """Per-node RSS and fd samples over time."""

    t: list[float] = field(default_factory=list)
    rss: list[list[int]] = field(default_factory=list)
    fds: list[list[int]] = field(default_factory=list)

    def take(self, pids: list[int], now: float) -> None:
        self.t.append(now)
        self.rss.append([rss_bytes(p) for p in pids])
        self.fds.append([open_fds(p) for p in pids])

    def at(self, when: float) -> int:
        """Index of the last sample taken at or before ``when`` (0 if none)."""
        best = 0
        for i, t in enumerate(self.t):
            if t <= when:
                best = i
        return best


async def soak(
    shards: Path,
    minutes: float,
    *,
    nodes: int = 3,
    concurrency: int = 4,
    tokens: int = 32,
    warmup_s: float | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run the soak; returns the figures (see the module docstring)."""
    duration = minutes * 60.0
    warmup = warmup_s if warmup_s is not None else min(120.0, max(10.0, duration * 0.2))
    with tempfile.TemporaryDirectory(prefix="llnode-soak-") as tmp:
        cluster = LocalCluster(
            nodes=nodes, base_port=free_base_port(nodes), model=shards.name, shards=shards.parent,
            workdir=workdir or Path(tmp), log_level="warning",
        )  # fmt: skip
        cluster.start()
        try:
            await cluster.wait_ready(600)
            pids = [p.pid for p in cluster.procs]
            latencies: list[float] = []
            errors: list[str] = []
            done = [0]
            samples = Samples()
            began = time.monotonic()
            stop_at = began + warmup + duration

            async def worker(k: int) -> None:
                timeout = aiohttp.ClientTimeout(total=300)
                n = k
                async with aiohttp.ClientSession(timeout=timeout) as s:
                    while time.monotonic() < stop_at:
                        body = {"model": shards.name, "prompt": PROMPTS[n % len(PROMPTS)],
                                "max_tokens": tokens, "temperature": 0}  # fmt: skip
                        url = cluster.url(n % nodes)  # entering at every node in turn
                        n += concurrency
                        t0 = time.monotonic()
                        try:
                            async with s.post(f"{url}/v1/completions", json=body) as r:
                                data = await r.json()
                                if r.status != 200 or not data.get("choices"):
                                    errors.append(f"HTTP {r.status}: {str(data)[:200]}")
                                    continue
                        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                            errors.append(f"{type(exc).__name__}: {exc}")
                            continue
                        done[0] += 1
                        if t0 >= began + warmup:
                            latencies.append(time.monotonic() - t0)

            async def sampler() -> None:
                while time.monotonic() < stop_at:
                    samples.take(pids, time.monotonic())
                    await asyncio.sleep(2.0)

            await asyncio.gather(sampler(), *(worker(k) for k in range(concurrency)))
            await asyncio.sleep(3.0)  # the load has stopped: connections close, sessions are freed
            samples.take(pids, time.monotonic())
            for i, p in enumerate(cluster.procs):
                if p.poll() is not None:
                    errors.append(f"node{i} exited with {p.returncode}")
        finally:
            cluster.stop()
    base = samples.at(began + warmup)
    rss_base, rss_end = samples.rss[base], samples.rss[-1]
    growth = [(e / b - 1.0) if b else 0.0 for b, e in zip(rss_base, rss_end, strict=True)]
    warm_fds = [max(s[i] for s in samples.fds[: base + 1]) for i in range(nodes)]
    end_fds = samples.fds[-1]
    latencies.sort()
    return {
        "benchmark": "soak",
        "model": shards.name,
        "nodes": nodes,
        "minutes": minutes,
        "warmup_s": warmup,
        "concurrency": concurrency,
        "completed": done[0],
        "completed_after_warmup": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3)
        if latencies
        else None,
        "rss_mib_after_warmup": [round(b / 2**20, 1) for b in rss_base],
        "rss_mib_end": [round(e / 2**20, 1) for e in rss_end],
        "rss_growth_per_node": [round(g, 4) for g in growth],
        "rss_growth": round(max(growth), 4),
        "fds_warmup": warm_fds,
        "fds_end": end_fds,
        "fd_growth": max(e - w for e, w in zip(end_fds, warm_fds, strict=True)),
    }


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.nodes < 1 or args.concurrency < 1 or args.tokens < 1:
        print("llnode bench soak: --minutes must be > 0; --nodes, --concurrency, --tokens >= 1")
        return 2
    shards = shard_dir(args.shards)
    print(
        f"soak: {args.nodes} nodes, {args.concurrency} concurrent requests for {args.minutes} min ...",
        flush=True,
    )
    r = asyncio.run(
        soak(shards, args.minutes, nodes=args.nodes, concurrency=args.concurrency, tokens=args.tokens)
    )
    print(
        f"completed {r['completed']} requests ({r['completed_after_warmup']} after warm-up), "
        f"errors {r['errors']}; "
        f"latency p50 {r['p50_s']} s p99 {r['p99_s']} s; RSS growth per node {r['rss_growth_per_node']} "
        f"({r['rss_mib_after_warmup']} -> {r['rss_mib_end']} MiB); fds {r['fds_warmup']} -> {r['fds_end']}"
    )
    for e in r["error_samples"]:
        print(f"error: {e}")
    if args.json:
        print(json.dumps(r))
    return 0 if r["errors"] == 0 else 1
