"""``llnode bench pipeline``: what running SmolLM2 across real daemons costs and buys, side by side.

1. Latency: decode ms/token of one greedy stream through 2 and 3 daemons on loopback vs the
   single-process module chain (target for 2 nodes: ratio <= 1.10). One stream through a pipeline is
   never faster than one device; this measures what the hops and the stage hand-offs add.
2. Throughput: aggregate tokens/s with 1, 2, 4 and 8 concurrent sessions, 1 node vs 2 nodes, each node
   pinned to its own core (``taskset``) with one onnxruntime thread: the pipeline's real gain, because
   while stage 2 runs one session's step, stage 1 runs another's.
3. Time to first token, and each node's peak RSS against the bytes of the modules it holds.

Every figure comes from real daemons answering HTTP; the JSON line at the end carries
``latency_ratio_2``, ``latency_ratio_3`` and ``throughput_ratio_2`` (2 nodes over 1 at 4 sessions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from llnode.bench.common import shard_dir
from llnode.cluster import LocalCluster, free_base_port
from llnode.model.manifest import load_manifest
from llnode.model.runner import ChainRunner
from llnode.model.tokenizer import load_tokenizer

# A raw-completion prompt the instruct model continues at length (a finished question would often get an
# immediate end-of-turn, and a benchmark needs every request to decode its full token budget).
PROMPT = "Once upon a time, in a small village by the river,"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2)")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (median)")
    parser.add_argument("--sessions", default="1,2,4,8", help="concurrency levels for throughput")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")




def chain_decode_ms(shard_dir: Path, prompt_ids: list[int], tokens: int, rounds: int) -> float:
    chain = ChainRunner(shard_dir)
    runs = []
    for r in range(rounds):
        session = f"bench{r}"
        logits = chain.logits(session, np.asarray([prompt_ids]), np.arange(len(prompt_ids))[None])
        pos = len(prompt_ids)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = int(np.argmax(logits[0, -1]))
            logits = chain.logits(session, np.asarray([[tok]]), np.asarray([[pos]]))
            pos += 1
        runs.append((time.perf_counter() - t0) * 1000 / tokens)
        chain.runner.free(session)
    return statistics.median(runs)


async def timed_request(url: str, model: str, prompt: str, tokens: int) -> dict[str, float]:
    """Stream one greedy completion; returns ttft_s, decode ms/token and the token count."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            now = time.perf_counter()
            if chunk.get("usage"):
                count = int(chunk["usage"]["completion_tokens"])
            if chunk.get("choices"):
                first = first or now
                last = now
    if first is None or last is None or count < 2:
        raise RuntimeError(f"{url}: the completion produced {count} token(s); the benchmark needs more")
    return {
        "ttft_s": first - t0,
        "decode_ms": 1000 * (last - first) / max(count - 1, 1),
        "tokens": float(count),
        "total_s": last - t0,
    }


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _cluster_run(
    cluster: LocalCluster, model: str, tokens: int, rounds: int, sessions: list[int]
) -> dict[str, Any]:
    await cluster.wait_ready(300)
    url = cluster.url(0)
    await timed_request(url, model, PROMPT, 8)  # warm-up
    lat = [await timed_request(url, model, PROMPT, tokens) for _ in range(rounds)]
    out: dict[str, Any] = {
        "decode_ms": statistics.median(r["decode_ms"] for r in lat),
        "ttft_s": statistics.median(r["ttft_s"] for r in lat),
        "throughput": {},
    }
    for n in sessions:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(timed_request(cluster.url(i % cluster.nodes), model, PROMPT, tokens) for i in range(n))
        )
        span = time.perf_counter() - t0
        out["throughput"][n] = sum(r["tokens"] for r in results) / span
    async with aiohttp.ClientSession() as s:
        status: dict[str, Any] = await cluster.status(0, s) or {}
    stages = status.get("pipeline", {}).get("plan", {}).get("plan", {}).get("stages", [])
    out["stages"] = [[st.get("name") or st["device_id"], st["start"], st["end"]] for st in stages]
    out["rss_mb"] = [_rss_mb(p.pid) for p in cluster.procs]
    return out


def _run_cluster(
    shard_dir: Path, nodes: int, tokens: int, rounds: int, sessions: list[int], pin: bool
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="llnode-bench-"))
    cluster = LocalCluster(
        nodes=nodes,
        base_port=free_base_port(nodes),
        model=shard_dir.name,
        shards=shard_dir.parent,
        workdir=work,
        log_level="warning",
    )
    # This benchmark measures the pipeline itself; plan changes belong to `bench balance`. With drift
    # detection on, contention between concurrent sessions on a pinned core was read as drift and
    # re-planned (each switch re-prefills every session): 0.52x instead of 1.68x at 4 sessions.
    cluster.env = {"LLNODE_REBALANCE": "0"}
    if pin:
        cluster.env["LLNODE_THREADS"] = "1"
        cluster.cpus = [[i % (os.cpu_count() or 1)] for i in range(nodes)]
    cluster.start()
    try:
        return asyncio.run(_cluster_run(cluster, shard_dir.name, tokens, rounds, sessions))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    shards = shard_dir(args.shards)
    manifest = load_manifest(shards)
    tok = load_tokenizer(shards, manifest.tokenizer_file)
    prompt_ids = tok.encode(PROMPT)
    sessions = [int(s) for s in args.sessions.split(",") if s]
    print(f"{manifest.name}: {manifest.num_modules} modules, {args.tokens} tokens per request", flush=True)

    chain_ms = chain_decode_ms(shards, prompt_ids, args.tokens, args.rounds)
    print(f"single-process module chain: {chain_ms:.2f} ms/token", flush=True)
    two = _run_cluster(shards, 2, args.tokens, args.rounds, [], pin=False)
    three = _run_cluster(shards, 3, args.tokens, args.rounds, [], pin=False)
    for n, res in ((2, two), (3, three)):
        print(
            f"{n} nodes {res['stages']}: {res['decode_ms']:.2f} ms/token "
            f"(x{res['decode_ms'] / chain_ms:.2f} of one process), TTFT {res['ttft_s'] * 1000:.0f} ms, "
            f"peak RSS MB {[round(r) for r in res['rss_mb']]}",
            flush=True,
        )
    one_pinned = _run_cluster(shards, 1, args.tokens, 1, sessions, pin=True)
    two_pinned = _run_cluster(shards, 2, args.tokens, 1, sessions, pin=True)
    print("aggregate tokens/s, one core and one thread per node:")
    print("  sessions  1 node  2 nodes  ratio")
    for n in sessions:
        a, b = one_pinned["throughput"][n], two_pinned["throughput"][n]
        print(f"  {n:8d}  {a:6.1f}  {b:7.1f}  {b / a if a else float('nan'):5.2f}")
    summary = {
        "chain_decode_ms": chain_ms,
        "decode_ms_2": two["decode_ms"],
        "decode_ms_3": three["decode_ms"],
        "latency_ratio_2": two["decode_ms"] / chain_ms,
        "latency_ratio_3": three["decode_ms"] / chain_ms,
        "ttft_s_2": two["ttft_s"],
        "ttft_s_3": three["ttft_s"],
        "rss_mb_3": three["rss_mb"],
        "throughput_1": one_pinned["throughput"],
        "throughput_2": two_pinned["throughput"],
        "throughput_ratio_2": two_pinned["throughput"].get(4, float("nan"))
        / one_pinned["throughput"].get(4, float("nan")),
    }
    if args.json:
        print(json.dumps(summary))
    return 0
