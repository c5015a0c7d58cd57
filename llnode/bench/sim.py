"""``llnode bench sim``: the simulator checked against real emulated clusters, then run at swarm scale.

1. Validation (needs root: network namespaces, ``tc``, cgroup v1). For each configuration the harness
   can run (2-4 real daemons, each in its own namespace with a CPU quota and a shaped link), the
   cluster plans as usual; then, side by side: tokens/s and per-token latency *measured* under 1 and
   under ``--sessions`` concurrent streaming clients, and *predicted* by the simulator for the same
   plan, the same workload and each node's speed profiled again right before the measurement (the
   prediction from the start-up profiles the planner used is reported too). The simulator's compute
   costs are per-module times measured on this machine (``llnode.sim.costs``, cached); the daemon's
   fixed cost per stage step is calibrated on a 1-node run first (printed, excluded from the comparison).
2. Scale (no root needed): fleets of 16, 64, 256 and 1000 devices drawn from the device and Wi-Fi
   profiles; planning time, and the simulated tokens/s of the plan against an even split and a
   memory-proportional split; for a small, a medium and a large model, how many devices the plan
   uses and tokens/s as devices are added (where communication starts to dominate); latency vs link
   bandwidth. Two PNG plots.

With ``--json`` the last line holds ``validation`` (``{predicted_tps, measured_tps, ...}`` per run) and
``plan_s`` (device count -> planning seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from llnode.api.sse import sse_events
from llnode.bench.common import shard_dir
from llnode.emulate.cgroups import PERIOD_US, CpuGroup
from llnode.emulate.cgroups import unavailable_reason as cgroup_reason
from llnode.emulate.netns import Lan, NetnsCluster
from llnode.emulate.netns import unavailable_reason as netns_reason
from llnode.emulate.profiles import LinkClass
from llnode.model.manifest import load_manifest
from llnode.model.tokenizer import load_tokenizer
from llnode.plan.profile import DaemonCpu
from llnode.plan.types import DeviceProfile, Plan, Stage
from llnode.process import cpu_seconds
from llnode.sim.costs import ModuleCosts
from llnode.sim.engine import Overheads, Simulator, Workload

PROMPT = "Once upon a time, in a small village by the river,"

# (quotas as shares of one core, Mbit/s per node link or None for unshaped)
# Not 1 Mbit/s: there the control plane (gossip, link probes) starves the pipeline's own bytes (a real
# 4-node cluster served 0 tok/s with 4 sessions), a product bug the simulator does not model.
DEFAULT_CONFIGS = (
    "1,0.6@100;0.6,0.6@10;1,0.3@100;0.6,0.3@10;"
    "0.6,0.6,0.3@100;0.6,0.3,0.3@10;0.3,0.3,0.3,0.3@100;0.6,0.3,0.3,0.3@10"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, default=None, help="shard set (default: SmolLM2 fp32)")
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="validation runs 'q1,q2,...@mbit;...' (mbit 0: unshaped)"
    )
    parser.add_argument("--sessions", type=int, default=4, help="concurrent clients of the loaded run")
    parser.add_argument("--tokens", type=int, default=24, help="decode tokens per request")
    parser.add_argument("--measure-s", type=float, default=15.0, help="measuring window per run")
    parser.add_argument("--sizes", default="16,64,256,1000", help="fleet sizes for the scale part")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--png-dir", type=Path, default=Path("docs/img"), help="where the plots go")
    parser.add_argument("--skip-validation", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument(
        "--fused-check",
        action="store_true",
        help="only price the daemon's ranges (fused blocks and per module) against its runner's CPU per "
        "step, side by side in one process (seconds; no root)",
    )
    parser.add_argument(
        "--repredict",
        type=Path,
        default=None,
        metavar="SAVED",
        help="re-predict the validation rows of a saved --json output (its last line) with the current "
        "simulator, without running anything",
    )


@dataclass(frozen=True)
class Config:
    quotas: list[float]
    mbit: float | None

    @classmethod
    def parse(cls, text: str) -> Config:
        q, _, m = text.partition("@")
        quotas = [float(x) for x in q.split(",") if x]
        if not 1 <= len(quotas) <= 8 or not all(0.05 <= x <= 2 for x in quotas):
            raise ValueError(f"bad configuration {text!r}: 1-8 quotas within 0.05..2")
        mbit = float(m) if m else 0.0
        return cls(quotas, mbit if mbit > 0 else None)

    @property
    def label(self) -> str:
        link = f"{self.mbit:g} Mbit/s" if self.mbit else "unshaped"
        return f"{len(self.quotas)} nodes {'/'.join(f'{q:g}' for q in self.quotas)} cores, {link}"


# ---- measuring a real cluster --------------------------------------------------------------------------
async def _client(
    url: str,
    body: dict[str, Any],
    session: aiohttp.ClientSession,
    stop: asyncio.Event,
    stamps: list[tuple[float, float | None, bool]],
    failures: list[str],
) -> None:
    """Stream requests back to back until ``stop``; per token: (time, gap to the previous, first?)."""
    while not stop.is_set():
        t_req = time.monotonic()
        last: float | None = None
        try:
            async with session.post(
                f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(300)
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                async for chunk in sse_events(r.content):
                    if any(c.get("text") for c in chunk.get("choices", [])):
                        now = time.monotonic()
                        stamps.append((now, now - (last if last is not None else t_req), last is None))
                        last = now
        except Exception as exc:  # counted and reported; the measurement goes on
            failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)


_SHARE_PROBE = """
import sys, time
time.sleep(float(sys.argv[1]))
end = time.perf_counter() + float(sys.argv[2])
cpu = wall = 0.0
while time.perf_counter() < end:
    w0, c0 = time.perf_counter(), time.thread_time()
    while time.thread_time() - c0 < 0.002:
        pass
    cpu += time.thread_time() - c0
    wall += time.perf_counter() - w0
    time.sleep(0.02)
print(cpu / wall if wall else 1.0)
"""


PROBE_DUTY = 0.002 / 0.022  # the probe's busy fraction: 2 ms of CPU, then 20 ms asleep


def node_share(probe_share: float, cores: int) -> float:
    """The share of a core a busy node thread got, from the share the probe got in the same window.

    The probe is itself one of the runnable threads it measures: when it got ``s`` of a core, about
    ``cores / s`` threads were runnable with it, so a node's thread competed with ``cores / s - 1`` of
    them (and the probe only ``PROBE_DUTY`` of the time). Why not use ``s`` itself: with two nodes
    busy on two cores the probe got 0.69 while the nodes ran at full speed; pricing their compute at
    0.69 predicted the 2-node 1/1 cluster 14-24 % slow. On a quiet machine with one busy node, 1.0."""
    if probe_share >= 1.0:
        return 1.0
    return min(1.0, cores / (cores / probe_share - 1.0 + PROBE_DUTY))


async def measure_load(
    cluster: NetnsCluster, sessions: int, tokens: int, warm_s: float, measure_s: float
) -> dict[str, Any]:
    """Tokens/s and mean per-token gap with ``sessions`` clients on node 0, over the window only; and
    ``cpu_share``: the share of a core a process got meanwhile (a probe computing 2 ms at a time and
    timing it). Why: on a shared machine the load changes by the minute; the share measured during the
    window itself is what the simulator needs to price compute like the run experienced it (1.0 on
    a quiet machine; it also catches the nodes' own contention for the host's cores)."""
    body = {"model": cluster.model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    stamps: list[tuple[float, float | None, bool]] = []
    failures: list[str] = []
    stop = asyncio.Event()
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SHARE_PROBE, str(warm_s), str(measure_s), stdout=subprocess.PIPE
    )
    async with aiohttp.ClientSession(headers=cluster.headers) as session:
        t_start = time.monotonic()
        tasks = [
            asyncio.create_task(_client(cluster.url(0), body, session, stop, stamps, failures))
            for _ in range(sessions)
        ]
        await asyncio.sleep(warm_s)
        before = await _node_usage(cluster, session)
        await asyncio.sleep(t_start + warm_s + measure_s - time.monotonic())
        after = await _node_usage(cluster, session)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
    out, _ = await asyncio.wait_for(probe.communicate(), 60)
    t0, t1 = t_start + warm_s, t_start + warm_s + measure_s
    inside = [s for s in stamps if t0 <= s[0] < t1]
    gaps = [g for _, g, first in inside if not first and g is not None]
    firsts = [g for _, g, first in inside if first and g is not None]
    return {
        "tokens_per_s": len(inside) / measure_s,
        "ttft_s": statistics.fmean(firsts) if firsts else float("nan"),
        "token_latency_s": statistics.fmean(gaps) if gaps else float("nan"),
        "failures": float(len(failures)),
        "cpu_share": min(1.0, float(out.decode().strip() or 1.0)),
        "nodes": [_usage_delta(a, b) for a, b in zip(before, after, strict=True)],
    }


def _proc_cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds (0 if gone)."""
    return cpu_seconds(pid, tid) or 0.0


def _thread_cpu_s(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of every thread of ``pids``, by ``pid/tid``."""
    out = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            out[f"{pid}/{tid}"] = _proc_cpu_s(pid, tid)
    return out


async def _node_usage(cluster: NetnsCluster, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """Per node now: the CPU its processes used so far (what its CFS budget charges: onnxruntime's
    thread, the event loop, framing, gossip), its throttled time, and its stage's decode batches by
    size. The difference over a window, minus the modules' CPU for those batches, is the daemon's own
    CPU per token (cgroup v1 here has no ``cpuacct`` under the ``cpu`` hierarchy: ``/proc`` it is)."""
    out = []
    for i in range(cluster.nodes):
        group = cluster.groups.get(i)
        doc = await cluster.status(i, session) or {}
        pipeline: dict[str, Any] = doc.get("pipeline") or {}  # type: ignore[assignment]
        stage: dict[str, Any] = pipeline.get("stage") or {}
        out.append(
            {
                "cpu_s": sum(_proc_cpu_s(pid) for pid in group.pids()) if group else 0.0,
                "threads": _thread_cpu_s(group.pids()) if group else {},
                "throttled_s": group.throttled_s() if group else 0.0,
                "batches": {int(k): int(v) for k, v in (stage.get("batches") or {}).items()},
                "range": stage.get("range"),
                "decode_ms": (stage.get("metrics") or {}).get("decode_ms_recent"),
                "hops": pipeline.get("hops"),
            }
        )
    return out


def _usage_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    batches = {k: v - a["batches"].get(k, 0) for k, v in b["batches"].items()}
    threads = [v - a["threads"].get(k, 0.0) for k, v in b["threads"].items()]
    worker = max(threads, default=0.0)  # the stage's worker thread: onnxruntime runs on it (1 thread)
    return {
        "cpu_s": round(b["cpu_s"] - a["cpu_s"], 3),
        "worker_cpu_s": round(worker, 3),  # the modules' runs as the daemon does them
        "own_cpu_s": round(b["cpu_s"] - a["cpu_s"] - worker, 3),  # the rest: event loop, frames, HTTP
        "throttled_s": round(b["throttled_s"] - a["throttled_s"], 3),
        "batches": {k: v for k, v in sorted(batches.items()) if v > 0},
        "range": b["range"],
        "decode_ms": b["decode_ms"],  # the stage's recent wall ms per token of its decode batches
        "hops": b["hops"],  # the entry's per-hop trace (cumulative: its last steps)
    }


def predict(
    costs: ModuleCosts,
    plan: Plan,
    speeds: dict[str, float],
    quotas: dict[str, float] | None,
    cpu_share: float,
    mbit: float | None,
    entry: str,
    overheads: Overheads,
    sessions: int,
    tokens: int,
    prompt_tokens: int,
    warm_s: float,
    measure_s: float,
) -> dict[str, Any]:
    """The simulator on the cluster's own plan, speeds and links, with the same workload as measured.

    With ``quotas`` each node is a full core (``speeds``) under its CPU group's CFS budget, as in the
    harness; without, ``speeds`` are sustained speeds (the planner's view)."""
    link = LinkClass("tbf", mbit, 0.0) if mbit else None
    devices = [
        DeviceProfile(device_id=d, decode_flops_per_s=v, memory_available_bytes=2**33)
        for d, v in speeds.items()
    ]

    def no_replan(_: list[DeviceProfile]) -> Plan:
        raise RuntimeError("the validation simulates the cluster's own plan only")

    sim = Simulator(
        costs,
        devices,
        dict.fromkeys(speeds, link),
        no_replan,
        entries=[entry],
        overheads=overheads,
        plan=plan,
        quotas=quotas,
        period_s=PERIOD_US / 1e6,
        cpu_share=cpu_share,
    )
    res = sim.run(
        Workload(
            sessions=sessions,
            prompt_tokens=prompt_tokens,
            max_tokens=tokens,
            duration_s=warm_s + measure_s,
            warmup_s=warm_s,
        )
    )
    return {
        "tokens_per_s": res.tokens_per_s,
        "token_latency_s": res.token_latency_s,
        "ttft_s": res.ttft_s,
        "batches": dict(sorted(sim.batches.items())),
    }


async def run_config(cfg: Config, shards: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the emulated cluster, read its plan and profiles, measure 1 and N sessions."""
    lan = Lan(len(cfg.quotas), mbit=[cfg.mbit] * len(cfg.quotas)).up()
    cluster = NetnsCluster(
        nodes=len(cfg.quotas),
        lan=lan,
        base_port=7700,
        model=shards.name,
        shards=shards.parent,
        workdir=Path(tempfile.mkdtemp(prefix="llnode-sim-")),
        quotas=list(cfg.quotas),
        log_level="warning",
        env={"LLNODE_THREADS": "1", "LLNODE_REBALANCE": "0"},
    )
    try:
        cluster.start()
        await cluster.wait_ready(600)
        async with aiohttp.ClientSession(headers=cluster.headers) as session:
            docs = [await cluster.status(i, session) or {} for i in range(cluster.nodes)]
        plan = Plan.from_dict(docs[0]["pipeline"]["plan"]["plan"])  # type: ignore[index]
        speeds: dict[str, float] = {}
        names: dict[str, str] = {}
        members: list[dict[str, Any]] = docs[0]["members"]  # type: ignore[assignment]
        for m in members:
            names[m["id"]] = m.get("name", m["id"])
            prof = (m.get("profile") or {}).get("device")
            if prof:
                speeds[m["id"]] = float(prof["decode_flops_per_s"])
        await measure_load(cluster, 1, 8, 0.0, 1.0)  # warm-up: first runs allocate
        out: dict[str, Any] = {
            "config": cfg.label,
            "quotas": cfg.quotas,
            "mbit": cfg.mbit,
            "entry": str(docs[0]["id"]),
            "plan": [[names.get(s.device_id, s.device_id), s.start, s.end] for s in plan.stages],
            "speeds_gflops": {names[k]: round(v / 1e9, 3) for k, v in speeds.items()},
            "planner_tps": plan.tokens_per_s,
            "planner_latency_s": plan.latency_s,
            "_plan": plan,
            "_speeds": speeds,
            "_quotas": {str(docs[i]["id"]): q for i, q in enumerate(cfg.quotas)},
        }
        before = plan
        for s in sorted({1, args.sessions}):
            # The plan in force at the end of the window: the leader may re-plan after start-up (a
            # re-profiled member), and predicting the start-up plan then compares two different
            # pipelines (a 2-node row predicted one node holding all 32 modules while two served, +126 %).
            # A window the switch fell into measured neither plan (2 nodes 0.6/0.3 at one session, in
            # two runs: its stages ran 24 and 55, then 9 and 32 decode steps, 5.9-7.0 tok/s where the
            # same cluster served 15.6 with 4 sessions): it is measured once more, on the new plan.
            for attempt in range(2):
                out[f"measured_{s}"] = await measure_load(cluster, s, args.tokens, 4.0, args.measure_s)
                async with aiohttp.ClientSession(headers=cluster.headers) as session:
                    doc = await cluster.status(0, session) or {}
                now = Plan.from_dict(doc["pipeline"]["plan"]["plan"])  # type: ignore[index]
                out[f"remeasured_{s}"] = attempt
                switched, before = now.ranges() != before.ranges(), now
                if not switched:
                    break
            out[f"_plan_{s}"] = now
            out[f"plan_{s}"] = [
                [names.get(st.device_id, st.device_id), st.start, st.end] for st in now.stages
            ]
        async with aiohttp.ClientSession(headers=cluster.headers) as session:
            after = [await cluster.status(i, session) or {} for i in range(cluster.nodes)]
        out["batches"] = {}  # decode batches by size over both runs, per stage node: the simulator's check
        for i, doc in enumerate(after):
            pipeline: dict[str, Any] = doc.get("pipeline") or {}  # type: ignore[assignment]
            out["batches"][f"node{i}"] = (pipeline.get("stage") or {}).get("batches")
        return out
    finally:
        cluster.stop()
        lan.close()
        if cluster.workdir is not None:
            shutil.rmtree(cluster.workdir, ignore_errors=True)


_PROFILE = (
    "import json, sys; from llnode.sim.costs import profile_modules; "
    "print(json.dumps(profile_modules(sys.argv[1], threads=1, context=int(sys.argv[2])).to_dict()))"
)


def measure_costs(shards: Path, context: int = 64) -> ModuleCosts:
    """The per-module costs measured now, in a CPU group at 100 % of one core, like the nodes run, at
    ``context`` past tokens (the validation passes its workload's mean context).

    Why not the cache: costs cached under one load and used under another made every prediction start
    from the wrong speed (81.2 ms/token cached under load vs 59.4 measured quietly). Measured right
    before the real runs, under the same quota mechanism (the modules' own CPU cost; the load is
    measured during each run, see :func:`measure_load`). Not cached. Why the context: a batched decode
    step copies and pads every session's KV cache, so its cost grows with the context while a single
    step's hardly does: side by side, a batch of 4 took 69-75 ms at context 25 and 87-96 at 64 (a
    single step 62-66 at both), and the daemons' batches of 4 at the validation's context (13-37) took
    77 ms of CPU, not the 88 that context 64 predicted."""
    group = CpuGroup(f"llnode-simcal-{os.getpid()}", 1.0)
    try:
        procs_file = str(group.path / "cgroup.procs")

        def join() -> None:
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

        done = subprocess.run(
            [sys.executable, "-c", _PROFILE, str(shards), str(context)],
            capture_output=True,
            preexec_fn=join,
            text=True,
            timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        group.remove()
    if done.returncode != 0:
        raise RuntimeError(f"profiling the modules failed: {done.stderr.strip()[-500:]}")
    return ModuleCosts.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))


def validation(shards: Path, args: argparse.Namespace, log: list[str]) -> dict[str, Any]:
    manifest = load_manifest(shards)
    prompt_tokens = len(load_tokenizer(shards, manifest.tokenizer_file).encode(PROMPT))
    costs = measure_costs(shards, context=prompt_tokens + args.tokens // 2)  # the runs' mean context
    full = costs.reference_flops_per_s  # one full core: each node's speed before its quota
    curve = " ".join(
        f"b{b}:{costs.decode_range_s(0, costs.num_modules, full, b) * 1e3:.1f}" for b in (1, 2, 4, 8)
    )
    print(
        f"module costs measured in {costs.profile_s:.1f} s (CPU group at 100 %, context {costs.context}): "
        f"{sum(costs.decode_s) * 1e3:.1f} ms per token on one core "
        f"({full / 1e9:.2f} GFLOP/s on the layers); ms per step by batch size: {curve}; "
        f"the machine's load left {1 / costs.load_slowdown:.0%} of a core meanwhile",
        flush=True,
    )
    configs = [Config.parse(c) for c in args.configs.split(";") if c]
    cores = len(os.sched_getaffinity(0))  # the host's cores the nodes and the probe share

    def sim(r: dict[str, Any], over: Overheads, sessions: int, startup: bool = False) -> dict[str, Any]:
        speeds = r["_speeds"] if startup else dict.fromkeys(r["_quotas"], full)
        share = node_share(r[f"measured_{sessions}"]["cpu_share"], cores)
        return predict(
            costs,
            r.get(f"_plan_{sessions}", r["_plan"]),
            speeds,
            None if startup else r["_quotas"],
            1.0 if startup else share,
            r["mbit"],
            r["entry"],
            over,
            sessions,
            args.tokens,
            prompt_tokens,
            4.0,
            args.measure_s,
        )

    # Calibration 1: one node, one core; calibration 2: two nodes at one core each, unshaped.
    calib = asyncio.run(run_config(Config([1.0], None), shards, args))
    calib2 = asyncio.run(run_config(Config([1.0, 1.0], None), shards, args))
    workload = {
        "tokens": args.tokens,
        "prompt_tokens": prompt_tokens,
        "warm_s": 4.0,
        "measure_s": args.measure_s,
        "cores": cores,
    }
    cal = calibrate(costs, [_saved_form(calib), _saved_form(calib2)], workload)
    over = cal.overheads
    step_s, wait_s, hop_s = over.cpu.step_s, over.wait_s, over.hop_s
    print(cal.text, flush=True)
    rows = []
    print(
        f"{'configuration':<40} {'plan':<34} {'S':>2} {'pred tok/s':>10} {'meas tok/s':>10} {'err':>6} "
        f"{'pred ms/tok':>11} {'meas ms/tok':>11} {'err':>6}"
    )
    for r in (calib, calib2):  # the calibration runs at 4 sessions check batching (not counted)
        p, m = sim(r, over, args.sessions), r[f"measured_{args.sessions}"]
        plan_now = {"plan": r[f"plan_{args.sessions}"]}
        print(_line("(calibration) " + r["config"], _plan_text(plan_now), args.sessions, p, m), flush=True)
    for cfg in configs:
        r = asyncio.run(run_config(cfg, shards, args))
        for s in sorted({1, args.sessions}):
            p, m = sim(r, over, s), r[f"measured_{s}"]
            p0 = sim(r, over, s, startup=True)
            row = {
                "config": r["config"],
                "plan": r[f"plan_{s}"],  # in force at the end of this window
                "startup_plan": r["plan"],
                "quotas": r["quotas"],
                "mbit": r["mbit"],
                "sessions": s,
                "predicted_tps": round(p["tokens_per_s"], 3),
                "measured_tps": round(m["tokens_per_s"], 3),
                "predicted_latency_s": round(p["token_latency_s"], 4),
                "measured_latency_s": round(m["token_latency_s"], 4),
                "startup_predicted_tps": round(p0["tokens_per_s"], 3),
                "startup_predicted_latency_s": round(p0["token_latency_s"], 4),
                "planner_tps": round(r["planner_tps"], 3),
                "failures": m["failures"],
                "speeds_gflops": r["speeds_gflops"],
                "cpu_share": round(m["cpu_share"], 3),
                "predicted_ttft_s": round(p["ttft_s"], 3),
                "measured_ttft_s": round(m["ttft_s"], 3),
                "predicted_batches": p["batches"],
                "measured_batches": r["batches"] if s > 1 else None,
                "measured_nodes": [
                    {k: v for k, v in n.items() if k not in ("hops", "threads")} for n in m["nodes"]
                ],
                "entry_hops": m["nodes"][0]["hops"],  # node 0's per-hop trace (its latest steps)
                "own_cpu_ms_per_step": [round(_own_ms(n), 2) for n in m["nodes"]],
            }
            rows.append(row)
            line = _line(r["config"], _plan_text(row), s, p, m)
            print(line, flush=True)
            log.append(line)
    within = sum(1 for r in rows if _within(r, 0.15))
    print(f"within 15 % on both tokens/s and latency: {within}/{len(rows)}", flush=True)
    return {
        "rows": rows,
        "workload": workload,
        "step_s": step_s,
        "daemon_cpu": asdict(over.cpu),
        "wait_s": wait_s,
        "hop_s": hop_s,
        "batch_curve_s": {b: costs.decode_range_s(0, costs.num_modules, full, b) for b in (1, 2, 4, 8)},
        "costs": costs.to_dict(),  # with the rows' plans and quotas: enough to re-predict offline
        "calibration": [{k: v for k, v in c.items() if not k.startswith("_")} for c in (calib, calib2)],
        "within_15pct": within,
    }


def _own_cpu(node: dict[str, Any]) -> tuple[float, int]:
    """(CPU seconds outside the modules, decode steps) of one node over a window: its process CPU minus
    its stage worker thread's (onnxruntime runs on that one thread). Why per thread and not minus the
    profiled module costs: CPU time itself grows with the host's load (shared caches: the same profile
    measured 44.8, 51.3 and 61.3 ms per token in three runs), so the small difference of two big
    figures measured minutes apart swung from -2 to +7 ms per step; threads of one process over one
    window see the same load."""
    if not node.get("range"):
        return 0.0, 0
    return node["own_cpu_s"], sum(node["batches"].values())


def _own_ms(node: dict[str, Any]) -> float:
    own, steps = _own_cpu(node)
    return 1e3 * own / steps if steps else float("nan")


def _fit_step_row(samples: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(per step, per row) CPU seconds by least squares over (steps, rows, CPU seconds) samples, neither
    negative. With batches of one only (steps == rows) the two cannot be told apart: all per step."""
    sxx = sum(k * k for k, _, _ in samples)
    sxy = sum(k * r for k, r, _ in samples)
    syy = sum(r * r for _, r, _ in samples)
    sxc = sum(k * c for k, _, c in samples)
    syc = sum(r * c for _, r, c in samples)
    det = sxx * syy - sxy * sxy
    if det > 1e-9 * max(sxx * syy, 1.0):
        step, row = (sxc * syy - syc * sxy) / det, (syc * sxx - sxc * sxy) / det
        if step >= 0 and row >= 0:
            return step, row
    steps, rows, cpu = (sum(x[i] for x in samples) for i in range(3))
    step = cpu / steps if steps else 0.0
    if step <= 0 and rows:  # only the per-row part can be non-negative then
        return 0.0, max(0.0, cpu / rows)
    return max(0.0, step), 0.0


def measure_daemon_cpu(windows: list[dict[str, Any]], costs: ModuleCosts, w: dict[str, Any]) -> DaemonCpu:
    """The daemon's CPU beyond the modules (:class:`DaemonCpu`) from measured windows (``measure_load``
    results of clusters whose node 0 is the entry): every stage node's CPU outside its worker thread
    over its decode steps and the session rows they carried, fitted as ``step + row * rows`` on the
    other nodes and the entry's excess over that on the entry; and the worker threads' CPU over the
    price of the decode batches and the prefills they ran (``module_factor``; one prefill of the prompt
    per request, ``w["tokens"]`` tokens each: the worker runs both). Why by role and rows: the nodes
    spent 1.8-3.9 ms per step at 4 sessions, the entry the most, where one figure for all said 1.6;
    and the worker threads 1.08-1.39x the modules' price, which a quota-bound node pays."""
    others: list[tuple[int, int, float]] = []
    entries: list[tuple[int, int, float]] = []
    worker = price = 0.0
    full = costs.reference_flops_per_s
    for win in windows:
        requests = win["tokens_per_s"] * w["measure_s"] / w["tokens"]
        for i, n in enumerate(win["nodes"]):
            own, steps = _own_cpu(n)
            if not steps:
                continue
            a, b = n["range"]
            batches = {int(k): int(v) for k, v in n["batches"].items()}
            rows = sum(k * v for k, v in batches.items())
            (entries if i == 0 else others).append((steps, rows, own))
            worker += n["worker_cpu_s"]
            price += sum(costs.decode_range_s(a, b, full, k) * v for k, v in batches.items())
            price += requests * costs.prefill_range_s(a, b, w["prompt_tokens"], full)
    step, row = _fit_step_row(others or entries)
    entry_step = entry_row = 0.0
    if others and entries:
        entry_step, entry_row = _fit_step_row([(k, r, c - step * k - row * r) for k, r, c in entries])
    return DaemonCpu(step, row, entry_step, entry_row, worker / price if price > 0 and worker > 0 else 1.0)


@dataclass(frozen=True)
class Calibration:
    overheads: Overheads
    text: str  # what was measured, for the log


def calibrate(costs: ModuleCosts, clusters: list[dict[str, Any]], w: dict[str, Any]) -> Calibration:
    """The simulator's overheads from the two calibration clusters (saved form, see :func:`repredict`):
    the daemon's CPU beyond the modules from all their windows (:func:`measure_daemon_cpu`); the waiting
    per stage step, what is left of the 1-node run's time per token at 1 session once that CPU is
    simulated (thread wake-ups, the GIL: the trace's take -> run and done -> back); and per hop (the
    bridge, two event loops' wake-ups) what the 2-node run adds beyond all of that, over its hops.
    One function for the validation and ``--repredict``, so a saved run is re-calibrated with the
    model as it is now."""
    one, two = clusters
    windows = [c[k] for c in clusters for k in c if k.startswith("measured_")]
    cpu = measure_daemon_cpu(windows, costs, w)

    def at_one(c: dict[str, Any], over: Overheads) -> float:
        return float(_predict_saved(costs, _calibration_row(c, 1), over, w)["predicted_latency_s"])

    m1, m2 = one["measured_1"]["token_latency_s"], two["measured_1"]["token_latency_s"]
    bare = at_one(one, Overheads(cpu=cpu))
    wait_s = max(0.0, m1 - bare)
    chain = at_one(two, Overheads(cpu=cpu, wait_s=wait_s))
    hops = len(two.get("plan_1", two["plan"]))  # entry -> stage 0 is local; stage i -> i+1 and last -> entry
    hop_s = max(0.0, (m2 - chain) / hops)
    text = (
        "the daemon's CPU beyond the modules (calibration clusters): per step "
        f"{cpu.step_s * 1e3:.2f} ms + {cpu.row_s * 1e3:.2f} per session row, at the entry "
        f"{cpu.entry_step_s * 1e3:.2f} + {cpu.entry_row_s * 1e3:.2f} per row more; the worker threads "
        f"ran the modules at x{cpu.module_factor:.2f} their profiled price. Own CPU ms per step by node: "
        + ", ".join(
            f"{c['config']} S{k.split('_')[1]} node{i} {_own_ms(n):.2f}"
            for c in clusters
            for k in c
            if k.startswith("measured_")
            for i, n in enumerate(c[k]["nodes"])
        )
        + f"\ncalibration 1 (1 node, 1 core): measured {m1 * 1e3:.1f} ms/token, modules and the daemon's CPU "
        f"{bare * 1e3:.1f}: {wait_s * 1e3:.1f} ms per step waiting\n"
        f"calibration 2 (2 nodes, 1 core each): measured {m2 * 1e3:.1f} ms/token, simulated without hops "
        f"{chain * 1e3:.1f}: {hop_s * 1e3:.1f} ms per hop"
    )
    return Calibration(Overheads(cpu=cpu, wait_s=wait_s, hop_s=hop_s), text)


def _saved_form(c: dict[str, Any]) -> dict[str, Any]:
    """A cluster's result as the JSON keeps it (no live plans and ids: node<i> names, quota lists)."""
    return {k: v for k, v in c.items() if not k.startswith("_")}


def _calibration_row(c: dict[str, Any], sessions: int) -> dict[str, Any]:
    m = c[f"measured_{sessions}"]
    return {
        "config": "(calibration) " + c["config"],
        "calibration": True,
        "plan": c.get(f"plan_{sessions}", c["plan"]),
        "quotas": c["quotas"],
        "mbit": c["mbit"],
        "sessions": sessions,
        "cpu_share": m["cpu_share"],
        "measured_tps": m["tokens_per_s"],
        "measured_latency_s": m["token_latency_s"],
    }


def _plan_text(r: dict[str, Any]) -> str:
    return " ".join(f"{n}[{s},{e})" for n, s, e in r["plan"])


def _line(label: str, plan: str, sessions: int, p: dict[str, Any], m: dict[str, Any]) -> str:
    """One printed row: predicted and measured tokens/s and ms/token, with the errors."""
    tp, tm, lp, lm = p["tokens_per_s"], m["tokens_per_s"], p["token_latency_s"], m["token_latency_s"]
    return (
        f"{label:<40} {plan:<34} {sessions:>2} {tp:>10.2f} {tm:>10.2f} {_err(tp, tm):>6} "
        f"{lp * 1e3:>11.1f} {lm * 1e3:>11.1f} {_err(lp, lm):>6}"
    )


def _err(predicted: float, measured: float) -> str:
    """Relative error as printed ('n/a' when the run measured nothing)."""
    if not measured > 0:
        return "n/a"
    return f"{predicted / measured - 1:+.0%}"


def _within(row: dict[str, Any], tol: float) -> bool:
    """Both predictions within ``tol`` of the measurement; a run that served nothing (a collapsed
    cluster: 0 tok/s, no latency) never is."""
    tps, lat = row["measured_tps"], row["measured_latency_s"]
    if not (tps > 0 and lat > 0):  # also false for NaN
        return False
    return bool(
        abs(row["predicted_tps"] / tps - 1) <= tol and abs(row["predicted_latency_s"] / lat - 1) <= tol
    )


def _workload(saved: dict[str, Any]) -> dict[str, Any]:
    return saved.get("workload") or {
        "tokens": 24,
        "prompt_tokens": 13,
        "warm_s": 4.0,
        "measure_s": 15.0,
        "cores": 2,
    }


def _predict_saved(
    costs: ModuleCosts, row: dict[str, Any], over: Overheads, w: dict[str, Any]
) -> dict[str, Any]:
    """``row`` (saved form: node<i> names, a quota list, node 0 the entry) with fresh ``predicted_*``."""
    quotas = {f"node{i}": q for i, q in enumerate(row["quotas"])}  # plan names are node<i>
    plan = Plan(
        epoch=0,
        objective="",
        solver="saved",
        model=costs.model,
        num_modules=costs.num_modules,
        stages=[Stage(n, a, b, 0.0, 0.0, 0.0, 0, 0) for n, a, b in row["plan"]],
        left_out={},
        bottleneck_s=0.0,
        latency_s=0.0,
        objective_value=0.0,
    )
    p = predict(
        costs,
        plan,
        dict.fromkeys(quotas, costs.reference_flops_per_s),
        quotas,
        node_share(row["cpu_share"], w.get("cores", 2)),
        row["mbit"],
        "node0",
        over,
        row["sessions"],
        w["tokens"],
        w["prompt_tokens"],
        w["warm_s"],
        w["measure_s"],
    )
    return {
        **row,
        "predicted_tps": round(p["tokens_per_s"], 3),
        "predicted_latency_s": round(p["token_latency_s"], 4),
        "predicted_ttft_s": round(p["ttft_s"], 3),
        "predicted_batches": p["batches"],
    }


def repredict(saved: dict[str, Any], over: Overheads | None = None) -> list[dict[str, Any]]:
    """The saved run's rows predicted again by the simulator as it is now, without re-measuring.

    ``saved`` is the JSON line of ``bench sim --json``: its ``costs``, its rows' plans, quotas, links
    and CPU shares, the workload, and its calibration clusters, from which the overheads are calibrated
    again as the validation does now (:func:`calibrate`; a run saved without them keeps its calibrated
    ``step_s``/``wait_s``/``hop_s``); ``over`` replaces them: to try a term. Why: a validation run takes
    ten minutes of a quiet machine; a change to the model is checked against it in a second. Rows come
    back with fresh ``predicted_*`` figures."""
    costs = ModuleCosts.from_dict(saved["costs"])
    w = _workload(saved)
    clusters = saved.get("calibration") or []
    if over is None and len(clusters) == 2 and all("nodes" in c.get("measured_1", {}) for c in clusters):
        cal = calibrate(costs, clusters, w)
        print(cal.text)
        over = cal.overheads
    elif over is None:
        over = Overheads(
            cpu=DaemonCpu(step_s=saved.get("step_s", 0.0)),
            wait_s=saved.get("wait_s", 0.0),
            token_s=saved.get("token_s", 0.0),  # runs before session 4 charged their residual here
            hop_s=saved.get("hop_s", 0.0),
        )
    checks = [  # the calibration clusters under several sessions: not counted, but checked
        _calibration_row(c, s)
        for c in clusters
        for s in sorted(int(k.split("_")[1]) for k in c if k.startswith("measured_"))
        if s > 1
    ]
    return [_predict_saved(costs, row, over, w) for row in checks + saved["validation"]]


def _print_rows(rows: list[dict[str, Any]]) -> int:
    """The validation table of ``rows``; returns how many are within 15 % on both figures."""
    print(
        f"{'configuration':<40} {'plan':<34} {'S':>2} {'pred tok/s':>10} {'meas tok/s':>10} {'err':>6} "
        f"{'pred ms/tok':>11} {'meas ms/tok':>11} {'err':>6}"
    )
    for r in rows:
        p = {"tokens_per_s": r["predicted_tps"], "token_latency_s": r["predicted_latency_s"]}
        m = {"tokens_per_s": r["measured_tps"], "token_latency_s": r["measured_latency_s"]}
        print(_line(r["config"], _plan_text(r), r["sessions"], p, m))
    counted = [r for r in rows if not r.get("calibration")]
    within = sum(1 for r in counted if _within(r, 0.15))
    print(f"within 15 % on both tokens/s and latency: {within}/{len(counted)}", flush=True)
    return within


def fused_check(shards: Path, as_json: bool, context: int = 25) -> int:
    """Module costs as the validation measures them, then each range of :data:`CHECK_PIPELINES` priced
    (fused and per module) next to the CPU of a step of the daemon's own runner over it."""
    from llnode.sim.costs import profile_modules, range_check

    costs = profile_modules(shards, threads=1, context=context)
    rows = range_check(shards, costs)
    print(f"{'range':>9} {'runner CPU ms':>14} {'fused price':>17} {'per-module price':>17}")
    for r in rows:
        m, fused, single = r["measured_s"], r["fused_s"], r["per_module_s"]
        print(
            f"[{r['start']:>2},{r['end']:>2}) {m * 1e3:14.1f} {fused * 1e3:10.1f} ({fused / m - 1:+4.0%})"
            f" {single * 1e3:10.1f} ({single / m - 1:+4.0%})"
        )
    print(f"fixed cost per session.run saved (batch 1/2/4/8): {[round(c * 1e3, 2) for c in costs.call_s]} ms")
    if as_json:
        print(json.dumps({"fused_check": rows, "call_s": costs.call_s, "context": context}))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.repredict is not None:
        try:
            lines = args.repredict.read_text().strip().splitlines()
            saved = json.loads(lines[-1]) if lines else None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            print(f"--repredict {args.repredict}: cannot read a saved run: {exc}", file=sys.stderr)
            return 2
        if not isinstance(saved, dict) or "costs" not in saved or "validation" not in saved:
            print(
                f"--repredict {args.repredict}: its last line is not the JSON of 'llnode bench sim --json' "
                "with the module costs (runs before session 5 did not save them)",
                file=sys.stderr,
            )
            return 2
        rows = repredict(saved)
        within = _print_rows(rows)
        if args.json:
            rows = [r for r in rows if not r.get("calibration")]
            print(json.dumps({"validation": rows, "within_15pct": within}, default=str))
        return 0
    shards = shard_dir(args.shards)
    if args.fused_check:
        return fused_check(shards, args.json)
    summary: dict[str, Any] = {"validation": [], "plan_s": {}}
    log: list[str] = []
    if not args.skip_validation:
        reason = netns_reason() or cgroup_reason()
        if reason:
            print(f"validation skipped: {reason}")
        else:
            val = validation(shards, args, log)
            summary["validation"] = val["rows"]
            for key in (
                "workload", "step_s", "daemon_cpu", "wait_s", "hop_s", "batch_curve_s", "costs", "calibration"
            ):  # fmt: skip
                summary[key] = val[key]
            summary["within_15pct"] = val["within_15pct"]
    if not args.skip_scale:
        from llnode.sim.scale import scale_study

        scale = scale_study(shards, args, random.Random(args.seed))
        summary.update(scale)
    if args.json:
        print(json.dumps(summary, default=str))
    return 0
