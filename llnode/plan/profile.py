"""Measuring a device and a link for the planner: real modules, real memory, the real peer link.

``profile_device`` runs a few real modules of the shard set with onnxruntime (through the pipeline's own
:class:`llnode.model.runner.ModuleRunner`, so the measurement includes exactly the work the daemon will
do): two decoder layers for decode and prefill, and the head, which is a different kind of matmul. The
measured time over the FLOPs of those modules gives effective FLOP/s that the cost model scales to every
other module. It costs well under a few seconds for SmolLM2 and reports its own cost.

The time is what the device can *sustain*: ``max(wall time, process CPU time / CPU limit)`` per step.
A profile runs in short bursts, and under a CFS quota (a container, or the bench's slowed nodes) a
burst runs at full speed until the quota is spent: a device at 30 % of a core timed like a whole core,
and the start-up plan built on that reached 0.67 of the best plan. CPU time per step does not depend
on the quota, and the limit (:func:`llnode.net.resources.cpu_limit`) says how much of it a second holds.

``measure_link`` is transport-agnostic: it takes an async echo callable (the daemon passes one that sends
bytes over the authenticated peer link and awaits the echo) and returns RTT and bandwidth.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llnode.model.manifest import Manifest, load_manifest
from llnode.net import resources
from llnode.plan.types import DeviceProfile, LinkProfile, PlanError


def read_load(cores: int | None = None) -> float:
    """One-minute load average per core, clipped to 0..1: how busy the device already is."""
    try:
        return min(1.0, max(0.0, os.getloadavg()[0] / (cores or resources.cores())))
    except OSError:
        return 0.0


def _time_rounds(calls: list[Callable[[], object]], repeats: int) -> list[tuple[float, float, float]]:
    """Per call, (median wall, process CPU and this thread's CPU seconds) over ``repeats`` rounds of all the
    calls in turn, after one warm-up round (the first run allocates). CPU is the whole process's (every
    onnxruntime thread, and whatever else the daemon does meanwhile): what a quota charges.

    Why in turn and not each call ``repeats`` times in a row: in a hot loop a few layers keep their
    weights in the L3 cache (two SmolLM2 layers, 28 MB, fit in 36 MB; four do not), which made two
    layers cost more than half of four; a pipeline reads its weights from memory. Between two runs of a
    probe the others run, the head's 113 MB among them."""
    for call in calls:
        call()
    walls: list[list[float]] = [[] for _ in calls]
    cpus: list[list[float]] = [[] for _ in calls]
    own: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for k, call in enumerate(calls):
            t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
            call()
            walls[k].append(time.perf_counter() - t0)
            cpus[k].append(time.process_time() - c0)
            own[k].append(time.thread_time() - h0)
    med = statistics.median
    return [(med(w), med(c), med(h)) for w, c, h in zip(walls, cpus, own, strict=True)]


def sustained(wall: float, cpu: float, limit: float) -> float:
    """How long a step takes when the device runs such steps back to back (in the unit of ``wall`` and
    ``cpu``): its wall time, or its CPU time spread over the ``limit`` cores the process may use,
    whichever is longer. The start-up profile and the stage metrics both price a device by it."""
    return max(wall, cpu / max(limit, 1e-3))


@dataclass(frozen=True)
class DaemonCpu:
    """The daemon's CPU per stage step beyond the profiled modules, by role and by the session rows the
    step carries: what a node's CPU budget pays that no module timing sees.

    ``own_s``: the process's CPU outside the stage worker thread (frames, the executor hand-off, the
    event loop, gossip) per step, ``step_s + row_s * rows``, and at the *entry* node (the one the
    clients talk to: tokenizing, detokenizing, one SSE event per token per session, the HTTP server)
    ``entry_step_s + entry_row_s * rows`` more. ``module_factor``: the stage worker thread's own CPU
    over the profiled price of the modules it ran (sampling, the batch's inputs, and modules running
    slower inside a busy daemon than in the profile's loop). ``llnode bench sim`` measures all five
    from its calibration clusters (``measure_daemon_cpu``). Why: with one fixed 1.6 ms per step the
    quiet session-5 validation was optimistic by +8..+25 % at 4 sessions; the nodes' own CPU per step
    ran 1.8-3.9 ms (the entry highest) and their worker threads 1.08-1.39x the modules' price, which a
    quota-bound node pays in tokens/s."""

    step_s: float = 0.0
    row_s: float = 0.0
    entry_step_s: float = 0.0
    entry_row_s: float = 0.0
    module_factor: float = 1.0

    def own_s(self, rows: int = 1, entry: bool = False) -> float:
        """CPU seconds of one stage step of ``rows`` sessions outside the modules (at the entry: more)."""
        own = self.step_s + self.row_s * rows
        if entry:
            own += self.entry_step_s + self.entry_row_s * rows
        return own


# Measured by ``llnode bench sim`` on one core of the build machine (the quiet session-5 calibration
# clusters, fitted again offline by ``--repredict``; docs/simulation.md). The planner charges a stage step
# of one session, ``own_s()``, at a device's CPU limit (it does not know which node the clients will
# use, and its device speeds come from its own profile); the validation's simulator charges every part
# where it happens, from its own calibration. A stage's measured ms per token (rebalancing) includes it.
DAEMON_CPU = DaemonCpu(
    step_s=1.41e-3, row_s=0.04e-3, entry_step_s=0.25e-3, entry_row_s=0.17e-3, module_factor=1.07
)


def profile_device(
    shard_dir: Path | str,
    manifest: Manifest | None = None,
    *,
    device_id: str = "",
    name: str = "",
    module: int | None = None,
    repeats: int = 7,
    threads: int | None = None,
    context: int = 32,
    prompt_tokens: int = 32,
    layers: int = 6,
    memory_limit: int = 0,
) -> DeviceProfile:
    """Time real modules of ``shard_dir`` for decode and prefill and read memory, cores and battery.

    Probes: ``module`` alone if given, else up to ``layers`` consecutive decoder layers and the head,
    whichever of them are on disk (a fresh node may hold only the one module it fetched to profile
    with). The layers run as ONE fused session, as the daemon runs its range (``ModuleRunner``'s fused
    blocks), as two probes of different lengths, so that the step time splits into a per-run fixed
    cost and a per-layer cost (cost(k) = a + b * k). Why: a per-module time carries the fixed cost of
    one ``session.run`` per module, which a daemon running fused blocks of 8 does not pay (SmolLM2 on
    one core: 74.8 ms per token priced per module, 64.3 measured by the 1-node daemon). The head is
    timed alone (one run: its own cost is that time minus ``a``). Decode is timed at a context of
    ``context`` tokens (prefilled first) over ``repeats`` steps; FLOPs are taken at the same context so
    the speed carries over to other modules. Keep the defaults small: the result must come in a few
    seconds even on a phone.
    """
    from llnode.model.runner import ModuleRunner, fuse_block

    t_start = time.perf_counter()
    manifest = manifest or load_manifest(shard_dir)
    on_disk = [m for m in manifest.modules if (Path(shard_dir) / m.file).is_file()]
    probes: list[tuple[int, int]] = []
    split = False  # probes 0 and 1: a shorter and a longer run of layers
    if module is not None:
        if not 0 <= module < manifest.num_modules:
            raise PlanError(f"module {module} is not in 0..{manifest.num_modules - 1}")
        probes.append((module, module + 1))
    else:
        run: list[int] = []
        for m in on_disk:
            if m.kind == "layer" and len(run) < layers and (not run or m.index == run[-1] + 1):
                run.append(m.index)
        # Two probes of different lengths split a step into a + b * k. Disjoint when there are layers
        # enough (the first third, then the rest): a probe over layers the other one has just run reads
        # them from the L3 (overlapping 2- and 4-layer probes put a run's fixed cost at 1.25 ms of CPU
        # where the daemon's blocks save 0.44 per run).
        if len(run) >= 3:
            cut = run[0] + len(run) // 3
            probes += [(run[0], cut), (cut, run[-1] + 1)]
            split = True
        elif len(run) == 2:  # a tiny model: everything stays cached anyway
            probes += [(run[0], run[0] + 1), (run[0], run[-1] + 1)]
            split = True
        elif run:
            probes.append((run[0], run[-1] + 1))
        head = manifest.num_modules - 1
        if any(m.index == head for m in on_disk):
            probes.append((head, head + 1))
    if not probes:
        raise FileNotFoundError(f"no decoder-layer or head module of {manifest.name} in {shard_dir} to time")
    hidden = manifest.hidden_size
    limit = resources.cpu_limit()
    rng = np.random.default_rng(0)
    measured: dict[str, float] = {}
    timed: list[tuple[float, float, float, float]] = []  # per probe: decode s, its FLOPs, prefill s, FLOPs
    cpu_ms: list[float] = []  # per probe: decode CPU ms per step
    prefills: list[Callable[[], object]] = []
    decodes: list[Callable[[], object]] = []
    runners = []
    for start, end in probes:
        if start == 0:
            raise PlanError("profile a decoder layer or the head, not the embedding (a table lookup)")
        # one session for the whole probe wherever it sits (``fuse`` >= every module index: one block)
        runner = ModuleRunner(shard_dir, manifest, start, end, threads=threads, fuse=manifest.num_modules)
        runners.append(runner)
        x_prompt = rng.standard_normal((1, prompt_tokens, hidden), dtype=np.float32)
        pos_prompt = np.arange(prompt_tokens, dtype=np.int64)[None, :]

        def prefill(r: ModuleRunner = runner, x: np.ndarray = x_prompt, p: np.ndarray = pos_prompt) -> None:
            sid = uuid.uuid4().hex
            r.step(sid, x, p)
            r.free(sid)

        # decode: fill a context, then time single-token steps
        ctx = rng.standard_normal((1, context, hidden), dtype=np.float32)
        runner.step("profile-decode", ctx, np.arange(context, dtype=np.int64)[None, :])
        one = rng.standard_normal((1, 1, hidden), dtype=np.float32)

        def decode(r: ModuleRunner = runner, x: np.ndarray = one, p: list[int] = [context]) -> None:  # noqa: B006
            r.step("profile-decode", x, np.array([[p[0]]], dtype=np.int64))
            p[0] += 1

        prefills.append(prefill)
        decodes.append(decode)
    pf_times = _time_rounds(prefills, 2)
    dc_times = _time_rounds(decodes, repeats)
    for runner in runners:
        runner.free("profile-decode")
    for (start, end), (pf_wall, pf_cpu, _), (dc_wall, dc_cpu, dc_own) in zip(
        probes, pf_times, dc_times, strict=True
    ):
        mods = manifest.modules[start:end]
        pf = sustained(pf_wall, pf_cpu, limit)
        dc = sustained(dc_wall, dc_cpu, limit)
        timed.append(
            (
                dc,
                sum(m.flops.at(context) for m in mods),
                pf,
                prompt_tokens * sum(m.flops.at(prompt_tokens // 2) for m in mods),
            )
        )
        # the split below reads this thread's CPU when it did the work (one onnxruntime thread runs in
        # the caller's): a daemon profiles while its loop gossips and measures links, and that CPU in
        # the process's time made the difference of two probes swing (start-up speeds of 1 to 5 GFLOP/s
        # for the same quota in one validation run)
        cpu_ms.append((dc_own if dc_own >= 0.5 * dc_cpu else dc_cpu) * 1e3)
        measured[f"decode_ms_modules_{start}_{end}"] = dc * 1e3
        measured[f"decode_wall_ms_modules_{start}_{end}"] = dc_wall * 1e3
        measured[f"decode_cpu_ms_modules_{start}_{end}"] = dc_cpu * 1e3
        measured[f"prefill_ms_modules_{start}_{end}_{prompt_tokens}tok"] = pf * 1e3
    call = 0.0
    if split:
        # Split by CPU time, then scale to the sustained time: on a loaded machine the wall time of a
        # few-ms step is mostly waiting for the core (2 and 4 layers took 29.5 and 29.0 ms of wall time
        # at load 11, 3.9 and 7.7 ms of CPU), while CPU time is the work's own and is what a quota charges.
        (s_half, e_half), (s_full, e_full) = probes[:2]
        half, full = cpu_ms[0], cpu_ms[1]
        per_layer = (full - half) / ((e_full - s_full) - (e_half - s_half))
        # negative only by timing noise (the two probes a few ms apart): no fixed cost then
        call = max(0.0, full - (e_full - s_full) * per_layer) / full * timed[1][0] if full > 0 else 0.0
        timed = timed[1:]  # the short probe served the split; the speed comes from the long one and the head
        # a probe is one run: it cannot cost less than a run's fixed cost. Only noise makes the split say
        # so (tiny layers, where the fixed cost is most of a step), and then the speed left over would be
        # absurd (60 GFLOP/s for a throttled tiny model): bound the fixed cost by the cheapest probe.
        call = min(call, *(t[0] for t in timed))
    decode_s = sum(t[0] for t in timed) - call * len(timed)
    decode_flops = sum(t[1] for t in timed)
    prefill_s = sum(t[2] for t in timed)
    prefill_flops = sum(t[3] for t in timed)
    if decode_s <= 0:  # cannot happen unless the fixed cost swallowed everything: price it per module
        decode_s, call = sum(t[0] for t in timed), 0.0
    measured["call_overhead_ms"] = call * 1e3
    mem = resources.memory()
    avail, total = mem.get("free", 0), mem.get("total", 0)
    if memory_limit:
        # The owner caps what this node offers (a shared device, or a small one simulated): the planner
        # then sees exactly that much, and never places more on it.
        avail = min(avail, memory_limit) if avail else memory_limit
        total = min(total, memory_limit) if total else memory_limit
    cores = resources.cores()
    battery = resources.battery()
    cost = time.perf_counter() - t_start
    measured["profile_s"] = cost
    measured["cpu_limit"] = limit
    return DeviceProfile(
        device_id=device_id or os.uname().nodename,
        name=name,
        decode_flops_per_s=decode_flops / decode_s,
        prefill_flops_per_s=prefill_flops / prefill_s,
        module_overhead_s=0.0,
        call_overhead_s=call,
        step_overhead_s=sustained(0.0, DAEMON_CPU.own_s(), limit),
        fuse_block=fuse_block(),
        memory_available_bytes=avail,
        memory_total_bytes=total,
        cores=cores,
        battery_pct=float(battery["level"]) if battery else None,
        charging=bool(battery["charging"]) if battery else None,
        load=read_load(cores),
        profile_s=cost,
        measured=measured,
    )


async def measure_link(
    send_echo: Callable[[bytes], Awaitable[bytes]],
    *,
    src: str = "",
    dst: str = "",
    pings: int = 5,
    bulk_bytes: int = 256 * 1024,
    bulk_rounds: int = 2,
    timeout_s: float = 5.0,
) -> LinkProfile:
    """RTT (median of small echoes) and bandwidth (large echoes, minus the RTT) over any transport.

    ``send_echo(payload)`` must return the same payload from the other end. The bulk echo carries the
    payload both ways, so bandwidth = 2 * size / (time - rtt).
    """
    if pings < 1 or bulk_rounds < 1 or bulk_bytes < 1:
        raise PlanError("pings, bulk_rounds and bulk_bytes must be >= 1")

    async def echo(payload: bytes) -> float:
        t0 = time.perf_counter()
        try:
            back = await asyncio.wait_for(send_echo(payload), timeout_s)
        except TimeoutError as exc:
            raise PlanError(f"link {src}->{dst}: no echo within {timeout_s} s") from exc
        if len(back) != len(payload):
            raise PlanError(f"link {src}->{dst}: echo returned {len(back)} bytes for {len(payload)}")
        return time.perf_counter() - t0

    await echo(b"w" * 16)  # warm-up (connection setup, first-frame costs)
    rtt = statistics.median([await echo(b"p" * 16) for _ in range(pings)])
    payload = os.urandom(bulk_bytes)
    bulk = min([await echo(payload) for _ in range(bulk_rounds)])
    bw = 2 * bulk_bytes / max(bulk - rtt, 1e-6)
    return LinkProfile(src=src, dst=dst, rtt_s=rtt, bandwidth_bytes_per_s=bw, samples=pings + bulk_rounds)
