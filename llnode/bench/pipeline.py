"""``llnode bench pipeline``: what running SmolLM2 across real daemons costs and buys, side by side.

1. Latency: decode ms/token of one greedy stream through 2 and 3 daemons on loopback vs the
   single-process module chain (target for 2 nodes: ratio <= 1.10). One stream through a pipeline is
   never faster than one device; this measures what the hops and the stage hand-offs add. Every
   decode step of these runs is traced (``llnode/pipeline/trace.py``): the bench prints where a
   token's milliseconds go (onnxruntime, sampling, thread hand-offs, links), and runs 2 nodes once
   more with a lone session's steps on the stages' event loop threads (``LLNODE_INLINE_DECODE=1``)
   and once with the stages' pool threads spinning during runs (``LLNODE_SPIN=run``, next to the
   chain with the same pools): what the two kinds of thread wake-ups cost, side by side. Fresh
   processes of the same code differ by up to ~20 % in onnxruntime's own time, so the chain, 2- and
   3-node latencies are medians over ``--clusters`` (default 3) draws of fresh chain processes and
   fresh clusters, interleaved (``latency_draws``), each draw printed.
2. Throughput: aggregate tokens/s with 1, 2, 4 and 8 concurrent sessions, 1 node vs 2 nodes, each node
   pinned to its own core (``taskset``) with one onnxruntime thread: the pipeline's real gain, because
   while stage 2 runs one session's step, stage 1 runs another's.
   Both with batched decode at the stages (the default) and with it off (``LLNODE_MAX_BATCH=1``),
   side by side, so what batching buys is measured in the same run.
3. Time to first token, and each node's peak RSS against the bytes of the modules it holds.
4. Prefill interference: the longest gap between two tokens of a stream while another request's long
   prompt is prefilled, with chunked prefill (the default) and with whole prefills.

Every figure comes from real daemons answering HTTP; the JSON line at the end carries
``latency_ratio_2``, ``latency_ratio_3`` and ``throughput_ratio_2`` (2 nodes over 1 at 4 sessions,
batched: ``throughput_ratio_2_mode``; ``throughput_ratios_2`` has every mode and session count, and
``throughput_bound_2_batched`` what two batched nodes can serve at most: 2 x one node at half the
sessions, since each of two stages batches half of them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from llnode.api.sse import sse_events
from llnode.bench.common import shard_dir
from llnode.cluster import LocalCluster, free_base_port
from llnode.model.manifest import load_manifest
from llnode.model.runner import ChainRunner, disable_spinning
from llnode.model.tokenizer import load_tokenizer
from llnode.process import cpu_seconds, rss_bytes

# A raw-completion prompt the instruct model continues at length (a finished question would often get an
# immediate end-of-turn, and a benchmark needs every request to decode its full token budget).
PROMPT = "Once upon a time, in a small village by the river,"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2)")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (median)")
    parser.add_argument("--sessions", default="1,2,4,8", help="concurrency levels for throughput")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--long-prompt", type=int, default=1500, help="tokens of the interfering prompt")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the batching-off throughput runs")
    parser.add_argument(
        "--clusters",
        type=int,
        default=3,
        help="draws per latency figure: fresh chain processes and fresh clusters, interleaved (medians)",
    )




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


async def timed_request(
    url: str, model: str, prompt: str, tokens: int, arrivals: list[float] | None = None,
    *, ignore_eos: bool = False,
) -> dict[str, Any]:
    """Stream one greedy completion; returns ttft_s, decode ms/token, the token count, the gaps.
    ``arrivals`` collects each token's arrival time as it comes (for a caller watching a live stream);
    ``ignore_eos`` keeps it going past end-of-text to ``tokens``."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    t0 = time.perf_counter()
    first = last = None
    count = 0
    gaps: list[float] = []
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for chunk in sse_events(r.content):
            now = time.perf_counter()
            if chunk.get("usage"):
                count = int(chunk["usage"]["completion_tokens"])
            if chunk.get("choices"):
                if arrivals is not None:
                    arrivals.append(now)
                if last is not None:
                    gaps.append(now - last)
                first = first or now
                last = now
    if first is None or last is None or count < 2:
        raise RuntimeError(f"{url}: the completion produced {count} token(s); the benchmark needs more")
    return {
        "ttft_s": first - t0,
        "decode_ms": 1000 * (last - first) / max(count - 1, 1),
        "tokens": float(count),
        "total_s": last - t0,
        "gaps_s": gaps,
    }


def _chain_worker(
    shards: str, prompt_ids: list[int], tokens: int, rounds: int, sleeping: bool, spin: bool = False
) -> float:
    if sleeping:
        disable_spinning()
    if spin:
        os.environ["LLNODE_SPIN"] = "run"  # this fresh process only
    return chain_decode_ms(Path(shards), prompt_ids, tokens, rounds)


def chain_in_subprocess(
    shards: Path, prompt_ids: list[int], tokens: int, rounds: int, *, sleeping: bool, spin: bool = False
) -> float:
    """The chain's decode ms/token in a fresh process: onnxruntime's thread-pool kind is per process.

    ``sleeping``: the per-session pools, as the daemons use them; otherwise the spinning global pool a
    lone process uses (faster on an idle machine: no wake-ups between ops). ``spin``: those per-session
    pools spin while a run is in flight (``LLNODE_SPIN=run``, ``llnode.model.runner.spin_during_runs``)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        args = (str(shards), prompt_ids, tokens, rounds, sleeping, spin)
        return pool.submit(_chain_worker, *args).result()


def _cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user + system); NaN once it is gone."""
    cpu = cpu_seconds(pid)
    return float("nan") if cpu is None else cpu


async def prefill_interference(url: str, model: str, long_prompt: str) -> dict[str, float]:
    """Longest gap between the tokens of a live stream while a long prompt is prefilled, and the
    stream's median gap before it.

    The long request starts once the stream has produced a few tokens; its prefill shares the stages
    with the stream's decode steps, which wait for it whole, or for one chunk at a time when prefill is
    chunked. The stream asks for far more tokens than it will get the time for and is closed once the
    long answer is in, so it is alive during the whole prefill: only gaps that overlap the prefill count.
    (An earlier version streamed a fixed number of tokens, which ran out before a slow prefill started
    and reported a 53 ms "longest gap" for whole prefills.)"""
    arrivals: list[float] = []
    # ignore_eos: under load a whole 1500-token prefill outlasted the greedy answer, which ended at
    # end-of-text, and the run failed with "the stream did not outlast the long prompt's prefill"
    stream = asyncio.create_task(timed_request(url, model, PROMPT, 4096, arrivals, ignore_eos=True))
    try:
        while len(arrivals) < 5:
            if stream.done():
                stream.result()  # raises what went wrong
                raise RuntimeError("the stream ended before the long prompt could be sent")
            await asyncio.sleep(0.01)
        began = time.perf_counter()
        long = await timed_request_any(url, model, long_prompt)
        ended = time.perf_counter()
        # The stream's first token after the prefill closes the last gap: wait for it.
        for _ in range(6000):
            if arrivals[-1] >= ended or stream.done():
                break
            await asyncio.sleep(0.01)
    finally:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await stream
    before = [b - a for a, b in itertools.pairwise(arrivals) if b <= began]
    during = [b - a for a, b in itertools.pairwise(arrivals) if b > began and a < ended]
    if not during or arrivals[-1] < ended:
        raise RuntimeError("the stream did not outlast the long prompt's prefill")
    return {
        "max_gap_ms": 1000 * max(during),
        "median_gap_ms": 1000 * statistics.median(before),
        "long_ttft_s": long,
    }


async def timed_request_any(url: str, model: str, prompt: str) -> float:
    """Time to the answer of a one-token completion (the prompt's prefill, mostly)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        await r.read()
    return time.perf_counter() - t0


def hop_summary(hops: dict[str, Any]) -> dict[str, float]:
    """A traced step's mean ms by kind: onnxruntime, sampling, thread hand-offs, links, the rest."""
    kinds = {"onnxruntime": 0.0, "sampling": 0.0, "thread hand-offs": 0.0, "links": 0.0, "rest": 0.0}
    for name, mean_ms, _median, _p90 in hops.get("segments", []):
        a, b = (part.rsplit(".", 1)[-1] for part in name.split(" -> "))
        if (a, b) == ("run", "ort"):
            kind = "onnxruntime"
        elif (a, b) == ("ort", "done"):
            kind = "sampling"
        elif (a, b) in (("take", "run"), ("done", "back")):
            kind = "thread hand-offs"
        elif a == "send" and b in ("recv", "token"):
            kind = "links"
        else:
            kind = "rest"
        kinds[kind] += mean_ms
    return kinds


def _print_hops(nodes: int, hops: dict[str, Any], full: bool) -> None:
    if not hops.get("steps"):
        return
    kinds = hop_summary(hops)
    print(
        f"  {nodes} nodes, where a token's {hops['mean_ms']:.2f} ms go "
        f"(mean of {hops['steps']} traced steps): "
        + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()),
        flush=True,
    )
    if full:
        print(f"    {'segment':34s} {'mean':>7s} {'median':>7s} {'p90':>7s}")
        for name, mean_ms, median_ms, p90 in hops["segments"]:
            print(f"    {name:34s} {mean_ms:7.2f} {median_ms:7.2f} {p90:7.2f}")


def _held_mb(shard_dir: Path, stages: list[list[Any]]) -> dict[str, float]:
    """MB of module files each stage node holds for its range."""
    modules = load_manifest(shard_dir).modules
    return {name: sum(m.size_bytes for m in modules[a:b]) / 2**20 for name, a, b in stages}


async def _cluster_run(
    cluster: LocalCluster,
    model: str,
    tokens: int,
    rounds: int,
    sessions: list[int],
    long_prompt: str | None = None,
) -> dict[str, Any]:
    await cluster.wait_ready(300)
    url = cluster.url(0)
    await timed_request(url, model, PROMPT, 8)  # warm-up
    lat = [await timed_request(url, model, PROMPT, tokens) for _ in range(rounds)]
    out: dict[str, Any] = {
        "decode_ms": statistics.median(r["decode_ms"] for r in lat),
        "ttft_s": statistics.median(r["ttft_s"] for r in lat),
        "throughput": {},
        "cpu_bound": {},
        "busy": {},
        "cpu_ms": {},
        "batches": {},
    }
    async with aiohttp.ClientSession() as s:  # the latency rounds' per-hop profile (every step traced)
        entry: dict[str, Any] = await cluster.status(0, s) or {}
    out["hops"] = entry.get("pipeline", {}).get("hops") or {}
    for n in sessions:
        batches0 = await _decode_batches(cluster)
        cpu0 = [_cpu_s(p.pid) for p in cluster.procs]
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(timed_request(cluster.url(i % cluster.nodes), model, PROMPT, tokens) for i in range(n))
        )
        span = time.perf_counter() - t0
        done = sum(r["tokens"] for r in results)
        out["throughput"][n] = done / span
        used = [_cpu_s(p.pid) - c for p, c in zip(cluster.procs, cpu0, strict=True)]
        busiest = max(used)
        out["cpu_bound"][n] = done / busiest if busiest > 0 else float("nan")
        # Each node's share of its (pinned) core: ~1.0 is a saturated node, well below 1 on every node
        # means the sessions wait for each other (queueing order, hand-offs) or for the host.
        out["busy"][n] = [u / span for u in used]
        # Each node's CPU ms per token served: how evenly the plan split the work (the pinned cores are
        # alike, so an uneven split is the planner's start-up profiles, measured under whatever load).
        out["cpu_ms"][n] = [1000 * u / done for u in used]
        # Each stage's decode batches by size in this run: groups that stay whole show as batches of
        # ceil(n / stages); fragments (smaller batches, each nearly a whole batch's cost) show the
        # scheduling stall of issue #5.
        out["batches"][n] = [
            {k: v - before.get(k, 0) for k, v in sorted(after.items(), key=lambda kv: int(kv[0]))
             if v > before.get(k, 0)}
            for before, after in zip(batches0, await _decode_batches(cluster), strict=True)
        ]  # fmt: skip
    async with aiohttp.ClientSession() as s:
        status: dict[str, Any] = await cluster.status(0, s) or {}
    stages = status.get("pipeline", {}).get("plan", {}).get("plan", {}).get("stages", [])
    out["stages"] = [[st.get("name") or st["device_id"], st["start"], st["end"]] for st in stages]
    out["rss_mb"] = [rss_bytes(p.pid, peak=True) / 2**20 for p in cluster.procs]
    out["rss_now_mb"] = [rss_bytes(p.pid) / 2**20 for p in cluster.procs]
    if long_prompt is not None:
        await prefill_interference(url, model, long_prompt)  # warm-up: the long shapes' first run
        out["interference"] = await prefill_interference(url, model, long_prompt)
    return out


async def _decode_batches(cluster: LocalCluster) -> list[dict[str, int]]:
    """Each node's decode batches so far by size (its stage's counter; empty for a node with no stage)."""
    async with aiohttp.ClientSession() as s:
        docs: list[dict[str, Any]] = [await cluster.status(i, s) or {} for i in range(cluster.nodes)]
    return [dict((doc.get("pipeline", {}).get("stage") or {}).get("batches") or {}) for doc in docs]


def _run_cluster(
    shard_dir: Path,
    nodes: int,
    tokens: int,
    rounds: int,
    sessions: list[int],
    pin: bool,
    env: dict[str, str] | None = None,
    long_prompt: str | None = None,
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
    cluster.env = {"LLNODE_REBALANCE": "0", "LLNODE_TRACE_EVERY": "1", **(env or {})}
    if pin:
        cluster.env["LLNODE_THREADS"] = "1"
        cluster.cpus = [[i % (os.cpu_count() or 1)] for i in range(nodes)]
    cluster.start()
    try:
        return asyncio.run(_cluster_run(cluster, shard_dir.name, tokens, rounds, sessions, long_prompt))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median decode ms/token (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: float(r["decode_ms"]))
    return ordered[(len(ordered) - 1) // 2]


def _chain_draw(
    shards: Path, prompt_ids: list[int], tokens: int, rounds: int, *, sleeping: bool
) -> dict[str, Any]:
    return {"decode_ms": chain_in_subprocess(shards, prompt_ids, tokens, rounds, sleeping=sleeping)}


def latency_draws(
    shards: Path, prompt_ids: list[int], tokens: int, rounds: int, draws: int, long_prompt: str
) -> dict[str, list[dict[str, Any]]]:
    """``draws`` draws of each latency figure, interleaved: each draw is a fresh chain process (spinning
    global pool), one with sleeping per-session pools, a fresh 2-node and a fresh 3-node cluster, the
    chains first in even draws and last in odd ones, every draw printed as it comes.

    WHY: fresh processes of the same code differ by up to ~20 % in onnxruntime's own time, and the
    machine's speed drifts within minutes (the chain took 34.2 ms/token at 04:51 and 42.1 at 05:00 on the
    same VM). The clusters' median over ONE chain process compared a median with a single draw taken at
    another moment; drawn alike (same count, same moments, each side first in turn),
    ``median(2 nodes) / median(chain)`` is a fair figure. The first 2-node cluster also measures
    prefill interference (``long_prompt``)."""
    out: dict[str, list[dict[str, Any]]] = {"chain": [], "sleeping": [], "2": [], "3": []}
    for i in range(draws):
        lp = long_prompt if i == 0 else None
        parts = [  # (key, how to draw it once)
            ("chain", partial(_chain_draw, shards, prompt_ids, tokens, rounds, sleeping=False)),
            ("sleeping", partial(_chain_draw, shards, prompt_ids, tokens, rounds, sleeping=True)),
            ("2", partial(_run_cluster, shards, 2, tokens, rounds, [], pin=False, long_prompt=lp)),
            ("3", partial(_run_cluster, shards, 3, tokens, rounds, [], pin=False)),
        ]
        for key, draw in parts if i % 2 == 0 else parts[::-1]:
            out[key].append(draw())
        c, sl, two, three = (out[k][-1] for k in ("chain", "sleeping", "2", "3"))
        print(
            f"latency draw {i + 1}/{draws}: chain {c['decode_ms']:.2f} ms/token (sleeping pools "
            f"{sl['decode_ms']:.2f}), 2 nodes {two['decode_ms']:.2f} {two['stages']} "
            f"(x{two['decode_ms'] / c['decode_ms']:.2f}), 3 nodes {three['decode_ms']:.2f} "
            f"{three['stages']} (x{three['decode_ms'] / c['decode_ms']:.2f})",
            flush=True,
        )
    return out


def run(args: argparse.Namespace) -> int:
    if args.clusters < 1:
        print("llnode bench pipeline: --clusters must be >= 1", file=sys.stderr)
        return 2
    shards = shard_dir(args.shards)
    manifest = load_manifest(shards)
    tok = load_tokenizer(shards, manifest.tokenizer_file)
    prompt_ids = tok.encode(PROMPT)
    sessions = [int(s) for s in args.sessions.split(",") if s]
    print(f"{manifest.name}: {manifest.num_modules} modules, {args.tokens} tokens per request", flush=True)

    long_prompt = long_text(tok, args.long_prompt)
    draws = latency_draws(shards, prompt_ids, args.tokens, args.rounds, args.clusters, long_prompt)
    chains, sleepings, twos, threes = draws["chain"], draws["sleeping"], draws["2"], draws["3"]
    chain_ms = _median_run(chains)["decode_ms"]
    sleeping_ms = _median_run(sleepings)["decode_ms"]
    two, three = _median_run(twos), _median_run(threes)
    first_two = twos[0]  # the draw that also measured prefill interference
    spin_ms = chain_in_subprocess(shards, prompt_ids, args.tokens, args.rounds, sleeping=True, spin=True)
    paired_2 = [t["decode_ms"] / c["decode_ms"] for t, c in zip(twos, chains, strict=True)]
    print(
        f"single-process module chain, median of {len(chains)} fresh processes: {chain_ms:.2f} ms/token "
        f"(spinning global pool), {sleeping_ms:.2f} ms/token (sleeping per-session pools, as in the "
        f"daemons); {spin_ms:.2f} ms/token (per-session pools spinning during runs, LLNODE_SPIN=run, one "
        f"process); 2 nodes over the chain draw by draw: "
        + " / ".join(f"x{r:.2f}" for r in paired_2),
        flush=True,
    )
    # The same 2 nodes with a lone session's decode steps run on the stages' event loop threads instead
    # of handed to the worker thread and back: what those two thread wake-ups per stage cost.
    inline_on = {"LLNODE_INLINE_DECODE": "1"}
    inline = _run_cluster(shards, 2, args.tokens, args.rounds, [], pin=False, env=inline_on)
    # The same 2 nodes with the stages' pool threads spinning while a run is in flight and sleeping
    # between runs (LLNODE_SPIN=run): what the sleeping pools' per-operator wake-ups cost.
    spinning = _run_cluster(shards, 2, args.tokens, args.rounds, [], pin=False, env={"LLNODE_SPIN": "run"})
    for n, res in ((2, two), (3, three)):
        held = _held_mb(shards, res["stages"])
        print(
            f"{n} nodes {res['stages']}: {res['decode_ms']:.2f} ms/token "
            f"(x{res['decode_ms'] / chain_ms:.2f} of one process, x{res['decode_ms'] / sleeping_ms:.2f} of "
            f"one with the same pools), TTFT {res['ttft_s'] * 1000:.0f} ms, "
            f"RSS MB peak {[round(r) for r in res['rss_mb']]} "
            f"at the end {[round(r) for r in res['rss_now_mb']]} holding module MB "
            f"{ {k: round(v) for k, v in held.items()} }",
            flush=True,
        )
        _print_hops(n, res["hops"], full=n == 2)
    print(
        f"2 nodes, a lone session's decode steps on the event loop thread: {inline['decode_ms']:.2f} "
        f"ms/token (x{inline['decode_ms'] / sleeping_ms:.2f} of one process with the same pools; "
        f"plan {inline['stages']})",
        flush=True,
    )
    _print_hops(2, inline["hops"], full=True)
    print(
        f"2 nodes, pool threads spinning during runs (LLNODE_SPIN=run): {spinning['decode_ms']:.2f} "
        f"ms/token (x{spinning['decode_ms'] / chain_ms:.2f} of one process, "
        f"x{spinning['decode_ms'] / spin_ms:.2f} of one with the same pools; plan {spinning['stages']})",
        flush=True,
    )
    _print_hops(2, spinning["hops"], full=True)
    whole = _run_cluster(
        shards, 2, 8, 1, [], pin=False, env={"LLNODE_PREFILL_CHUNK": "0"}, long_prompt=long_prompt
    )
    chunked, unchunked = first_two["interference"], whole["interference"]
    print(
        f"stream's longest token gap while a {args.long_prompt}-token prompt is prefilled (2 nodes): "
        f"chunked {chunked['max_gap_ms']:.0f} ms, whole {unchunked['max_gap_ms']:.0f} ms "
        f"(median gap {chunked['median_gap_ms']:.0f} / {unchunked['median_gap_ms']:.0f} ms; "
        f"long prompt answered in {chunked['long_ttft_s']:.2f} / {unchunked['long_ttft_s']:.2f} s)",
        flush=True,
    )
    modes: list[tuple[str, dict[str, str]]] = [("batched", {})]
    if not args.no_unbatched:
        modes.append(("unbatched", {"LLNODE_MAX_BATCH": "1"}))
    tput: dict[str, dict[int, dict[int, float]]] = {}
    bound: dict[str, dict[int, dict[int, float]]] = {}
    busy: dict[str, dict[int, list[float]]] = {}
    cpu_ms: dict[str, dict[int, list[float]]] = {}
    batches: dict[str, dict[int, list[dict[str, int]]]] = {}
    for mode, env in modes:
        by_nodes = {n: _run_cluster(shards, n, args.tokens, 1, sessions, pin=True, env=env) for n in (1, 2)}
        tput[mode] = {n: r["throughput"] for n, r in by_nodes.items()}
        bound[mode] = {n: r["cpu_bound"] for n, r in by_nodes.items()}
        busy[mode] = by_nodes[2]["busy"]
        cpu_ms[mode] = by_nodes[2]["cpu_ms"]
        batches[mode] = by_nodes[2]["batches"]
        print(
            f"{mode}, 2 nodes {by_nodes[2]['stages']}, each node's busy share of its core / CPU ms per "
            "token: "
            + ", ".join(
                f"{n} sessions {[round(b, 2) for b in busy[mode][n]]} / "
                f"{[round(c, 1) for c in cpu_ms[mode][n]]}"
                for n in sessions
            ),
            flush=True,
        )
        print(
            f"{mode}, 2 nodes, each stage's decode batches by size: "
            + ", ".join(f"{n} sessions {batches[mode][n]}" for n in sessions),
            flush=True,
        )
    # With batching, two stages each batch half the sessions (two groups keep both busy), so two
    # nodes can serve at most what one node serves to half the sessions, twice: 2 * T1(n/2). On a
    # memory-bound CPU a batch of n costs little more than one of n/2, so this bound is close to T1(n).
    limit2 = {n: 2 * tput["batched"][1][n // 2] for n in sessions if n % 2 == 0 and n // 2 in sessions}
    print("aggregate tokens/s, one core and one onnxruntime thread per node:")
    header = "".join(f"  {m[:5]} 1n  {m[:5]} 2n  ratio" for m, _ in modes)
    print(f"  sessions{header}  batched bound 2n (ratio)")
    for n in sessions:
        row = f"  {n:8d}"
        for mode, _ in modes:
            a, b = tput[mode][1][n], tput[mode][2][n]
            row += f"  {a:8.1f}  {b:8.1f}  {b / a if a else float('nan'):5.2f}"
        if n in limit2:
            row += f"  {limit2[n]:8.1f} ({limit2[n] / tput['batched'][1][n]:.2f})"
        print(row)
    # On a machine shared with other jobs, wall-clock tokens/s mostly measures the others' load. Tokens
    # per CPU-second of the busiest node is what the pinned cores would give if they were really
    # dedicated and the busiest node never waited (an upper bound for the pipeline).
    print("tokens per CPU-second of the busiest node (the dedicated-core bound):")
    for n in sessions:
        row = f"  {n:8d}"
        for mode, _ in modes:
            a, b = bound[mode][1][n], bound[mode][2][n]
            row += f"  {a:8.1f}  {b:8.1f}  {b / a if a else float('nan'):5.2f}"
        print(row)
    # What decides whether a stage batches by default: 2 nodes' tokens/s batched over unbatched, same run.
    gain_2: dict[int, float] = {}
    if "unbatched" in tput:
        two_n = {mode: t[2] for mode, t in tput.items()}
        gain_2 = {n: two_n["batched"][n] / two_n["unbatched"][n] for n in sessions if two_n["unbatched"][n]}
        print(
            "2 nodes batched over unbatched (what batching buys a pipeline): "
            + ", ".join(f"x{g:.2f} at {n}" for n, g in gain_2.items()),
            flush=True,
        )
    batched = tput["batched"]
    summary = {
        "chain_decode_ms": chain_ms,
        "decode_ms_2": two["decode_ms"],
        "decode_ms_3": three["decode_ms"],
        "decode_ms_2_clusters": [r["decode_ms"] for r in twos],  # every fresh cluster's, median reported
        "decode_ms_3_clusters": [r["decode_ms"] for r in threes],
        "chain_decode_ms_draws": [r["decode_ms"] for r in chains],  # interleaved with the clusters
        "chain_sleeping_ms_draws": [r["decode_ms"] for r in sleepings],
        "latency_ratio_2_draws": paired_2,  # each 2-node cluster over the chain drawn next to it
        "latency_ratio_2": two["decode_ms"] / chain_ms,
        "latency_ratio_3": three["decode_ms"] / chain_ms,
        "chain_sleeping_ms": sleeping_ms,
        "latency_ratio_2_same_pools": two["decode_ms"] / sleeping_ms,
        "decode_ms_2_inline": inline["decode_ms"],  # LLNODE_INLINE_DECODE=1
        "hops_2_inline": hop_summary(inline["hops"]),
        "chain_spin_ms": spin_ms,  # per-session pools spinning during runs (LLNODE_SPIN=run)
        "decode_ms_2_spin": spinning["decode_ms"],
        "latency_ratio_2_spin": spinning["decode_ms"] / chain_ms,
        "hops_2_spin": hop_summary(spinning["hops"]),
        "ttft_s_2": two["ttft_s"],
        "ttft_s_3": three["ttft_s"],
        "rss_mb_3": three["rss_mb"],
        "held_mb_3": _held_mb(shards, three["stages"]),
        "throughput_1": batched[1],
        "throughput_2": batched[2],
        "throughput_ratio_2": batched[2].get(4, float("nan")) / batched[1].get(4, float("nan")),
        "throughput_ratio_2_mode": "batched",  # throughput_ratio_2 is 2 over 1 node at 4 sessions, batched
        "throughput_ratios_2": {
            mode: {n: t[2][n] / t[1][n] if t[1][n] else float("nan") for n in sessions}
            for mode, t in tput.items()
        },
        "throughput_bound_2_batched": limit2,  # 2 * one node's batched tokens/s at half the sessions
        "cpu_bound_1": bound["batched"][1],
        "cpu_bound_2": bound["batched"][2],
        "busy_2": busy,  # mode -> sessions -> each node's CPU seconds per wall second
        "cpu_ms_per_token_2": cpu_ms,  # mode -> sessions -> each node's CPU ms per token served
        "batches_2": batches,  # mode -> sessions -> each node's decode batches by size in that run
        "prefill_gap_ms": {"chunked": chunked["max_gap_ms"], "whole": unchunked["max_gap_ms"]},
        "prefill_long_s": {"chunked": chunked["long_ttft_s"], "whole": unchunked["long_ttft_s"]},
        "hops_2": hop_summary(two["hops"]),
        "hops_3": hop_summary(three["hops"]),
        "hop_mean_ms_2": two["hops"].get("mean_ms"),
    }
    if "unbatched" in tput:
        summary["throughput_unbatched_1"] = tput["unbatched"][1]
        summary["throughput_unbatched_2"] = tput["unbatched"][2]
        summary["cpu_bound_unbatched_1"] = bound["unbatched"][1]
        summary["cpu_bound_unbatched_2"] = bound["unbatched"][2]
        summary["batching_gain_2"] = gain_2
    if args.json:
        print(json.dumps(summary))
    return 0


def long_text(tok: Any, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens (the story prompt repeated)."""
    per = max(1, len(tok.encode(PROMPT + " ")))
    return " ".join([PROMPT] * max(1, tokens // per))
