"""``llnode cluster``: a local multi-node cluster on loopback, for trying llnode out and for tests.

It starts N real daemons (``python -m llnode run``) as child processes with distinct ports and data
directories and one freshly generated cluster key, waits until the cluster has an active plan, prints
every node's URL, optionally sends one prompt and streams the answer, then keeps running until Ctrl-C
(or SIGTERM), when it stops every child it started. Nothing is faked: the nodes find each other over
mDNS on loopback, elect a leader, plan, and run the pipeline exactly as devices on a LAN would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from llnode.api.sse import sse_events
from llnode.emulate.cgroups import CgroupError, CpuGroup

DEFAULT_BASE_PORT = 7700


@dataclass
class LocalCluster:
    """N daemons on loopback. Usable from tests as well as from the command line."""

    nodes: int
    base_port: int = DEFAULT_BASE_PORT
    model: str = "smollm2-135m"
    shards: Path = Path("shards")
    workdir: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    log_level: str = "info"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node
    cpus: list[list[int]] | None = None  # per node, the cores it may run on (simulates separate devices)
    # Nodes (by index) that start with an empty shard store of their own and must fetch from peers.
    empty_shards: set[int] = field(default_factory=set)
    quotas: list[float | None] | None = None  # per node, share of one core (cgroup v1 CPU quota; slow phones)
    groups: dict[int, CpuGroup] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.base_port + i}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(self.nodes)]

    def data_dir(self, i: int) -> Path:
        assert self.workdir is not None
        return self.workdir / f"node{i}"

    def start(self) -> None:
        """Start every node (returns at once; see :meth:`wait_ready`)."""
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llnode-cluster-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        key_file = self.workdir / "cluster.key"
        if not key_file.exists():
            key_file.write_text(secrets.token_hex(32) + "\n")
            key_file.chmod(0o600)
        for i in range(self.nodes):
            self.procs.append(self.spawn(i))

    def node_args(self, i: int) -> list[str]:
        assert self.workdir is not None
        return [
            sys.executable, "-m", "llnode", "run",
            "--port", str(self.base_port + i),
            "--peer-port", str(self.base_port + 1000 + i),
            "--data-dir", str(self.data_dir(i)),
            "--name", f"node{i}",
            "--cluster-key-file", str(self.workdir / "cluster.key"),
            "--shards", str(self.shards_root(i)),
            "--model", self.model,
            "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip

    def shards_root(self, i: int) -> Path:
        """Where node ``i`` keeps shard sets: the shared root, or its own (initially empty) one."""
        return self.data_dir(i) / "shards" if i in self.empty_shards else self.shards.resolve()

    def spawn(self, i: int) -> subprocess.Popen[bytes]:
        """Start (or restart) node ``i``; its output goes to ``<data-dir>/node.log``."""
        self.data_dir(i).mkdir(parents=True, exist_ok=True)
        log = (self.data_dir(i) / "node.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        cpus = self.cpus[i] if self.cpus is not None else None
        procs_file = None
        if self.quotas is not None:
            group = self.groups.get(i) or CpuGroup(f"llnode-{os.getpid()}-{self.base_port}-n{i}")
            group.set_quota(self.quotas[i])
            self.groups[i] = group
            procs_file = str(group.path / "cgroup.procs")

        def pin() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if procs_file is not None:  # join the CPU group before exec: every thread inherits it
                with open(procs_file, "w") as f:
                    f.write(str(os.getpid()))

        return subprocess.Popen(
            self.node_args(i), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin
        )

    def set_quota(self, i: int, quota: float | None) -> None:
        """Change node ``i``'s CPU quota while it runs (needs ``quotas`` at start)."""
        if i not in self.groups:
            raise CgroupError(f"node{i} runs in no CPU group: start the cluster with quotas")
        self.groups[i].set_quota(quota)

    async def status(self, i: int, session: aiohttp.ClientSession) -> dict[str, object] | None:
        try:
            async with session.get(f"{self.url(i)}/api/status", timeout=aiohttp.ClientTimeout(2)) as r:
                if r.status != 200:
                    return None
                data: dict[str, object] = await r.json()
                return data
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return None

    async def wait_ready(self, within_s: float = 300.0) -> None:
        """Wait until every node serves the same plan, one made with every node's profile; raise with the
        node logs' tail if not.

        Why all profiles: a node that profiles slowly (a CPU quota) is not in the leader's first plan, and
        the plan made once its profile arrives replaces that one seconds later; a benchmark that started
        measuring on the first plan measured the switch (a fresh cluster's "optimal plan" served 9.6
        tok/s with 2 of its 3 nodes, then moved to 3)."""
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                for i, p in enumerate(self.procs):
                    if p.poll() is not None:
                        raise RuntimeError(f"node{i} exited with {p.returncode}:\n{self.log_tail(i)}")
                states = [await self.status(i, session) for i in range(self.nodes)]
                if _settled(states):
                    return
                await asyncio.sleep(0.5)
        raise TimeoutError(
            f"the cluster had no active plan after {within_s:.0f} s:\n"
            + "\n".join(self.log_tail(i) for i in range(self.nodes))
        )

    def log_tail(self, i: int, lines: int = 30) -> str:
        path = self.data_dir(i) / "node.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return f"--- node{i} ---\n" + "\n".join(text[-lines:])

    def stop(self) -> None:
        """Terminate every node gracefully (SIGTERM, SIGKILL after 10 s); a node a test or a chaos run
        left stopped (SIGSTOP) is resumed first, or it could not act on the SIGTERM."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for group in self.groups.values():
            group.remove()
        self.groups.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def free_base_port(span: int) -> int:
    """A base port such that base..base+span (HTTP) and base+1000..base+1000+span (peer links) are free
    on loopback: the port layout of :class:`LocalCluster`."""
    for _ in range(500):
        base = random.randint(20000, 40000)
        try:
            for p in [base + i for i in range(span)] + [base + 1000 + i for i in range(span)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range on loopback")


def _serving(status: dict[str, object]) -> bool:
    pipeline = status.get("pipeline")
    return isinstance(pipeline, dict) and bool(pipeline.get("serving"))


def _settled(states: list[dict[str, object] | None]) -> bool:
    """Every node serves, all on one epoch, and that plan placed (or left out) every node."""
    if not all(s is not None and _serving(s) for s in states):
        return False
    pipes = [s["pipeline"] for s in states if s is not None and isinstance(s.get("pipeline"), dict)]
    epochs = {p.get("epoch") for p in pipes if isinstance(p, dict)}
    published = pipes[0].get("plan") if pipes and isinstance(pipes[0], dict) else None
    plan = published.get("plan") if isinstance(published, dict) else None
    if len(epochs) != 1 or not isinstance(published, dict) or not isinstance(plan, dict):
        return False
    if published.get("epoch") not in epochs:
        return False  # nodes on different plans, or a newer plan published that they have not taken up
    covered = {st.get("device_id") for st in plan.get("stages") or [] if isinstance(st, dict)}
    covered |= set(plan.get("left_out") or {})
    return all(s is not None and s.get("id") in covered for s in states)


async def stream_prompt(url: str, model: str, prompt: str, max_tokens: int) -> str:
    """Send one chat prompt and print the answer as it streams; returns the text."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        # A 135M-parameter model sampled at the API's default temperature of 1 rambles; the demo shows
        # what it does well: near-greedy decoding that does not repeat itself.
        "temperature": 0.2,
        "repetition_penalty": 1.15,
        "messages": [{"role": "user", "content": prompt}],
    }
    text: list[str] = []
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}: {await r.text()}")
        async for chunk in sse_events(r.content):
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text.append(piece)
                print(piece, end="", flush=True)
    print()
    return "".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="how many daemons to start (default 3)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, help="HTTP port of node 0")
    parser.add_argument("--model", default="smollm2-135m", help="shard set name (default smollm2-135m)")
    parser.add_argument("--shards", type=Path, default=Path("shards"), help="shard sets root (./shards)")
    parser.add_argument("--workdir", type=Path, help="where node data dirs go (default: a temp dir)")
    parser.add_argument("--prompt", help="send this prompt once the cluster is ready, stream the answer")
    parser.add_argument("--max-tokens", type=int, default=128, help="for --prompt (default 128)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a plan")
    parser.add_argument("--exit", action="store_true", help="stop the cluster after --prompt")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        print("llnode cluster: --nodes must be at least 1", file=sys.stderr)
        return 2
    if not (args.shards / args.model / "manifest.json").is_file():
        where = args.shards / args.model
        print(f"llnode cluster: no shard set {where}; run 'llnode prepare {args.model}'", file=sys.stderr)
        return 2
    cluster = LocalCluster(
        nodes=args.nodes,
        base_port=args.base_port,
        model=args.model,
        shards=args.shards,
        workdir=args.workdir,
        log_level=args.log_level,
    )
    stop = asyncio.Event()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        cluster.start()
        print(f"starting {args.nodes} nodes (logs in {cluster.workdir}) ...", flush=True)
        await cluster.wait_ready(args.timeout)
        for i, url in enumerate(cluster.urls):
            print(f"node{i}: {url}   dashboard: {url}/", flush=True)
        if args.prompt:
            print(f"\n> {args.prompt}\n", flush=True)
            await stream_prompt(cluster.url(0), args.model, args.prompt, args.max_tokens)
        if args.exit:
            return 0
        print("\ncluster running; Ctrl-C stops it", flush=True)
        await stop.wait()
        return 0

    try:
        return asyncio.run(main())
    except (TimeoutError, RuntimeError) as exc:
        print(f"llnode cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
