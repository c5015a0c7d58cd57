"""``llnode bench chaos``: node failures under load, and what the clients see.

A local cluster of real daemons (4 by default) runs greedy completions, all entering at node0, while the
benchmark kills (SIGKILL) a random stage node other than the entry mid-run, waits for the re-planned
pipeline, then stops (SIGSTOP) another one. Every request's text is compared with the single-process
module chain (:class:`llnode.model.runner.ChainRunner`): the claim under test is that a stage node dying
or hanging costs the clients a pause, never a request and never a different answer.

Prints the requests sent, completed, lost and mismatched, and the longest pause any client saw between
two streamed pieces; with ``--json`` the last line is one JSON object with those figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from llnode.api.sse import sse_events
from llnode.bench.common import shard_dir
from llnode.cluster import LocalCluster, free_base_port
from llnode.model.manifest import load_manifest
from llnode.model.reference import greedy_texts

PROMPTS = [
    "Once upon a time, in a small village by the river,",
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "In the beginning of the twentieth century,",
    "A good breakfast consists of",
    "The quick brown fox",
    "import numpy as np\n",
    "Photosynthesis is the process by which",
    "My favourite book is",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2 fp32)")
    parser.add_argument("--nodes", type=int, default=4, help="daemons to start (default 4)")
    parser.add_argument("--requests", type=int, default=20, help="concurrent greedy requests (default 20)")
    parser.add_argument("--tokens", type=int, default=48, help="max tokens per request (default 48)")
    parser.add_argument("--seed", type=int, default=None, help="seed for picking the victims")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take at most")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")




class Client:
    """One streamed greedy completion; records when every piece arrived."""

    def __init__(self, url: str, model: str, prompt: str, tokens: int, timeout: float) -> None:
        self.url, self.model, self.prompt, self.tokens, self.timeout = url, model, prompt, tokens, timeout
        self.pieces: list[str] = []
        self.times: list[float] = []
        self.error: str | None = None

    async def run(self) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.tokens, "temperature": 0,
                "stream": True}  # fmt: skip
        self.times.append(time.monotonic())
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.post(f"{self.url}/v1/completions", json=body) as r,
            ):
                if r.status != 200:
                    self.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                    return
                async for chunk in sse_events(r.content):
                    if "error" in chunk:
                        self.error = str(chunk["error"])[:200]
                        return
                    for c in chunk.get("choices", []):
                        self.pieces.append(c.get("text") or "")
                        self.times.append(time.monotonic())
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def longest_pause_s(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)


async def _status(cluster: LocalCluster, i: int) -> dict[str, Any] | None:
    async with aiohttp.ClientSession() as s:
        return await cluster.status(i, s)


def _stage_nodes(status: dict[str, Any]) -> list[int]:
    """Indices (nodeK) of the stage nodes of the plan node0 serves."""
    plan = (status.get("pipeline") or {}).get("plan") or {}
    names = {m["id"]: m["name"] for m in status.get("members", [])}
    stages = (plan.get("plan") or {}).get("stages", [])
    return [int(names[s["device_id"]].removeprefix("node")) for s in stages if s["device_id"] in names]


async def _pick_victim(cluster: LocalCluster, rng: random.Random, spared: set[int]) -> int:
    st = await _status(cluster, 0)
    stages = [i for i in _stage_nodes(st or {}) if i not in spared]
    pool = stages or [i for i in range(1, cluster.nodes) if i not in spared]
    return rng.choice(pool)


async def _wait_serving_without(cluster: LocalCluster, gone: set[int], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        st = await _status(cluster, 0)
        if st and (st.get("pipeline") or {}).get("serving") and not gone & set(_stage_nodes(st)):
            return
        await asyncio.sleep(0.5)


async def _until(pred: Callable[[], bool], tasks: list[asyncio.Task[None]]) -> None:
    """Poll ``pred`` until true or every request is done (the clients append pieces as they stream)."""
    while True:
        if pred() or all(t.done() for t in tasks):
            return
        await asyncio.sleep(0.05)


async def chaos(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    print(f"reference: greedy {args.tokens} tokens for {len(set(prompts))} prompts (single process) ...",
          flush=True)  # fmt: skip
    ref = await asyncio.to_thread(greedy_texts, shards, prompts, args.tokens)
    manifest = load_manifest(shards)
    with tempfile.TemporaryDirectory(prefix="llnode-chaos-") as tmp:
        cluster = LocalCluster(
            nodes=args.nodes, base_port=free_base_port(args.nodes), model=shards.name, shards=shards.parent,
            workdir=Path(tmp), log_level="info",
        )  # fmt: skip
        cluster.start()
        try:
            await cluster.wait_ready(600)
            print(f"{args.nodes} nodes serving {manifest.name}; {args.requests} concurrent requests at node0",
                  flush=True)  # fmt: skip
            clients = [Client(cluster.url(0), shards.name, p, args.tokens, args.timeout) for p in prompts]
            began = time.monotonic()
            tasks = [asyncio.create_task(c.run()) for c in clients]
            # Mid-run: once a few tokens have streamed, kill a stage node that is not the entry.
            await _until(lambda: sum(len(c.pieces) for c in clients) >= max(2, args.requests), tasks)
            killed = await _pick_victim(cluster, rng, {0})
            cluster.procs[killed].send_signal(signal.SIGKILL)
            print(f"t={time.monotonic() - began:.1f}s: kill -9 node{killed}", flush=True)
            await _wait_serving_without(cluster, {killed}, 120)
            seen = sum(len(c.pieces) for c in clients)
            await _until(lambda: sum(len(c.pieces) for c in clients) >= seen + args.requests, tasks)
            stopped = await _pick_victim(cluster, rng, {0, killed})
            cluster.procs[stopped].send_signal(signal.SIGSTOP)
            print(f"t={time.monotonic() - began:.1f}s: SIGSTOP node{stopped}", flush=True)
            await asyncio.gather(*tasks)
            wall = time.monotonic() - began
            cluster.procs[stopped].send_signal(signal.SIGCONT)
            st = await _status(cluster, 0)
            recoveries = ((st or {}).get("pipeline") or {}).get("recoveries")
        finally:
            cluster.stop()
    completed = [c for c in clients if c.error is None]
    mismatched = [c for c in completed if c.text != ref[c.prompt]]
    for c in clients:
        if c.error is not None:
            print(f"LOST {c.prompt!r}: {c.error}", flush=True)
    for c in mismatched:
        print(f"MISMATCH {c.prompt!r}:\n  got {c.text!r}\n  ref {ref[c.prompt]!r}", flush=True)
    return {
        "benchmark": "chaos",
        "model": manifest.name,
        "nodes": args.nodes,
        "tokens": args.tokens,
        "sent": len(clients),
        "completed": len(completed),
        "lost": len(clients) - len(completed),
        "mismatched": len(mismatched),
        "longest_pause_s": round(max((c.longest_pause_s for c in clients), default=0.0), 2),
        "killed": f"node{killed}",
        "stopped": f"node{stopped}",
        "recoveries": recoveries,
        "wall_s": round(wall, 1),
    }


def run(args: argparse.Namespace) -> int:
    if args.nodes < 3 or args.requests < 1 or args.tokens < 1:
        print("llnode bench chaos: needs --nodes >= 3, --requests >= 1, --tokens >= 1")
        return 2
    shards = shard_dir(args.shards)
    result = asyncio.run(chaos(args, shards))
    print(
        f"sent {result['sent']}, completed {result['completed']}, lost {result['lost']}, "
        f"mismatched {result['mismatched']}; longest pause {result['longest_pause_s']:.2f} s "
        f"(killed {result['killed']}, stopped {result['stopped']}, {result['wall_s']} s)"
    )
    if args.json:
        print(json.dumps(result))
    return 0 if result["lost"] == 0 and result["mismatched"] == 0 else 1
