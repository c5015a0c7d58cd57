"""Per-module costs measured on this device: what the simulator charges for compute (never constants).

Every module of the shard set is run with the pipeline's own :class:`ModuleRunner` (one onnxruntime
thread, as the harness's nodes run), one module after the other as a pipeline runs them (so that each
finds its weights out of the caches, as in a real run): decode steps at a fixed context, decode
batches, and one prefill of a prompt. The result is cached as JSON (keyed by the shard set's
manifest, the thread count and the context), so the simulator profiles once per machine and model.

Other devices are scaled from it by their planner speed: module ``m`` on device ``d`` takes
``decode_s[m] * reference_flops_per_s / d.decode_flops_per_s``, where ``reference_flops_per_s`` is
the FLOP rate these very measurements show on the decoder layers. This is the planner's own unit, so a
profile gossiped by a daemon, a device class, or a measured speed all plug in unchanged, while the
shape across modules (a cheap embedding gather, an expensive head, the fixed cost of each
``session.run``) comes from measurement instead of FLOP counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llnode.model.manifest import Manifest, load_manifest
from llnode.plan.costs import runs_per_step

CACHE_DIR = Path(os.environ.get("LLNODE_SIM_CACHE", Path.home() / ".cache" / "llnode" / "sim"))
TOKEN_ID_BYTES = 8  # a token id between the entry and the first/last stage (int64)
BATCH_SIZES = (2, 4, 8)  # decode batch sizes measured besides single steps (the batching curve)
FORMAT = 7  # bump when the measured fields change: older caches are re-measured


@dataclass(frozen=True)
class ModuleCosts:
    """Measured seconds per module on the reference device, and the bytes crossing each cut."""

    model: str
    manifest_sha: str
    threads: int
    context: int
    prompt_tokens: int
    decode_s: list[float]  # one decode step of module m at ``context`` past tokens
    decode_batch_s: list[list[float]]  # [k][m]: a decode step of BATCH_SIZES[k] sessions (``model.batching``)
    prefill_s: list[float]  # one prefill of ``prompt_tokens`` tokens through module m
    out_bytes_per_token: list[int]  # hidden-state bytes per token after module m (the last: a token id)
    reference_flops_per_s: float  # decode FLOPs of the decoder layers / their seconds net of call_s[0]
    measured_at: float = 0.0
    profile_s: float = 0.0
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    # mean / fastest decode step while profiling: > 1 when other processes took part of the core (a
    # loaded machine); the simulator's ``cpu_share`` for runs at the same time is its inverse
    load_slowdown: float = 1.0
    # How the daemon runs a range: blocks of ``fuse_block`` modules aligned to module indices, one
    # ``session.run`` each (``ModuleRunner``); 1: one session per module, i.e. exactly ``decode_s``.
    fuse_block: int = 1
    # CPU seconds each module's own session costs beyond its share of a fused block, per batch size
    # (1, *batch_sizes): (sum of single-module steps - sum of fused-block steps) / (runs saved). Empty: 0.
    call_s: list[float] = field(default_factory=list)
    prefill_call_s: float = 0.0  # the same for a prefill

    def _saved_runs(self, start: int, end: int) -> int:
        """``session.run`` calls a fused range makes fewer than one per module."""
        return (end - start) - runs_per_step(start, end, self.fuse_block)

    @property
    def num_modules(self) -> int:
        return len(self.decode_s)

    def decode_range_s(self, start: int, end: int, flops_per_s: float, batch: int = 1) -> float:
        """One decode step of ``batch`` sessions through ``[start, end)`` on a device of ``flops_per_s``.

        Piecewise linear between the measured batch sizes (1 and ``batch_sizes``), and beyond the largest
        along its last segment: the curve is not a straight line (the weights are read once, but the
        batch's KV padding and the per-row work grow), so one marginal cost from a batch of 4 priced a
        batch of 2 too cheaply. Never cheaper than a smaller batch."""
        sizes = [1, *self.batch_sizes]
        times = [sum(self.decode_s[start:end])] + [sum(b[start:end]) for b in self.decode_batch_s]
        saved = self._saved_runs(start, end)
        if saved and self.call_s:
            times = [t - saved * c for t, c in zip(times, self.call_s, strict=True)]
        for i in range(1, len(times)):
            times[i] = max(times[i], times[i - 1])
        k = next((i for i in range(1, len(sizes)) if batch <= sizes[i]), len(sizes) - 1)
        slope = (times[k] - times[k - 1]) / (sizes[k] - sizes[k - 1])
        t = times[k - 1] + (batch - sizes[k - 1]) * slope
        return t * self.reference_flops_per_s / flops_per_s

    def prefill_range_s(self, start: int, end: int, tokens: int, flops_per_s: float) -> float:
        """A prefill of ``tokens`` tokens through ``[start, end)``, linear in tokens from the measured one;
        the head (the last module) runs on the last token only (``last_only``), so its cost is fixed."""
        head = self.num_modules - 1
        call = self.prefill_call_s  # a run's fixed cost does not grow with the tokens
        body = sum(t - call for t in self.prefill_s[start : min(end, head)])
        fixed = (self.prefill_s[head] - call if end > head else 0.0) + call * runs_per_step(
            start, end, self.fuse_block
        )
        return (body * tokens / self.prompt_tokens + fixed) * self.reference_flops_per_s / flops_per_s

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModuleCosts:
        data = dict(data)
        sizes: list[int] = data.get("batch_sizes", BATCH_SIZES)  # type: ignore[assignment]
        data["batch_sizes"] = tuple(sizes)  # JSON has lists; the dataclass compares tuples
        return cls(**data)  # type: ignore[arg-type]


def manifest_sha(shard_dir: Path) -> str:
    return hashlib.sha256((Path(shard_dir) / "manifest.json").read_bytes()).hexdigest()[:16]


def _cpu_s(call: Callable[[], None]) -> float:
    """Process CPU seconds of one call. CPU time, not wall time: on a loaded machine even the fastest
    wall time of a 20 ms module (the head) includes preemptions, while CPU time is the module's own and
    is what a CPU quota (CFS) charges."""
    c0 = time.process_time()
    call()
    return time.process_time() - c0


def _in_pipeline_order(calls: list[Callable[[], None]], repeats: int) -> tuple[list[float], float]:
    """(median CPU seconds of each call, mean wall / CPU time over all): ``repeats`` rounds of every
    call in order, after one warm-up round.

    Why in order and not each call ``repeats`` times in a row: a pipeline runs module 0, 1, ... once per
    token, so each module's weights have been pushed out of the caches by the others' by the time it
    runs again. Timed in a hot loop, a module keeps its weights cached: SmolLM2's 32 modules summed
    to 44.8 ms per token that way, while the same modules chained in one process took 57.5 ms, and
    the daemon's 13 ms per token "outside the modules" was mostly that difference (inside them).
    The median, not the fastest: the steady state, not the luckiest round. The mean wall time over the
    CPU time says how much of a core this process got meanwhile (``ModuleCosts.load_slowdown``)."""
    for call in calls:
        call()
    cpu: list[list[float]] = [[] for _ in calls]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for k, call in enumerate(calls):
            cpu[k].append(_cpu_s(call))
    wall, used = time.perf_counter() - t0, time.process_time() - c0
    return [statistics.median(c) for c in cpu], wall / used if used > 0 else 1.0


def profile_modules(
    shard_dir: Path,
    *,
    threads: int = 1,
    context: int = 64,
    prompt_tokens: int = 16,
    repeats: int = 9,
) -> ModuleCosts:
    """Time every module of ``shard_dir`` as a pipeline runs them: one after the other, a decode step at
    ``context``, decode batches of ``BATCH_SIZES``, and one prefill of the prompt."""
    from llnode.model.batching import decode_batch
    from llnode.model.runner import ModuleRunner, fuse_block

    t_start = time.perf_counter()
    manifest: Manifest = load_manifest(shard_dir)
    rng = np.random.default_rng(0)
    hidden = manifest.hidden_size
    runners = [
        ModuleRunner(shard_dir, manifest, i.index, i.index + 1, threads=threads) for i in manifest.modules
    ]

    def inputs(runner: ModuleRunner, tokens: int, rows: int = 1) -> np.ndarray:
        if runner.is_first:
            return rng.integers(0, manifest.vocab_size, (rows, tokens), dtype=np.int64)
        return rng.standard_normal((rows, tokens, hidden), dtype=np.float32)

    def prefill_call(r: ModuleRunner) -> Callable[[], None]:
        x = inputs(r, prompt_tokens)

        def run() -> None:
            sid = uuid.uuid4().hex
            # the last stage runs the head on the last token only (``last_only``), as the stage does
            r.step(sid, x, np.arange(x.shape[1], dtype=np.int64)[None, :], last_only=r.is_last)
            r.free(sid)

        return run

    def decode_call(r: ModuleRunner, kind: str, size: int) -> Callable[[], None]:
        """A decode step of ``size`` sessions at ``context`` past tokens (``size`` 1: a single step)."""
        sids = [f"sim-{size}-{k}" for k in range(size)]
        for sid in sids:
            r.step(sid, inputs(r, context), np.arange(context, dtype=np.int64)[None, :])
        x = np.concatenate([inputs(r, 1) for _ in sids])
        pos = [context]

        def run() -> None:
            if size == 1:
                r.step(sids[0], x, np.array([[pos[0]]], dtype=np.int64))
            elif kind == "layer":
                decode_batch(r, sids, x, [pos[0]] * size)
            else:  # no KV cache: the module takes the rows as one batch directly
                r.step("sim-rows", x, np.full((size, 1), pos[0], dtype=np.int64))
                r.free("sim-rows")
            pos[0] += 1

        return run

    def measure(rs: list[ModuleRunner]) -> tuple[list[float], list[float], list[list[float]], float]:
        """(prefill, decode, decode per batch size, load slowdown) of runners in pipeline order."""
        kinds = ["layer" if r.layers else "other" for r in rs]
        prefill, _ = _in_pipeline_order([prefill_call(r) for r in rs], 3)
        decode, slowdown = _in_pipeline_order(
            [decode_call(r, k, 1) for r, k in zip(rs, kinds, strict=True)], repeats
        )
        batched = [
            _in_pipeline_order([decode_call(r, k, size) for r, k in zip(rs, kinds, strict=True)], repeats)[0]
            for size in BATCH_SIZES
        ]
        for r in rs:
            for sid in r.sessions():
                r.free(sid)
        return prefill, decode, batched, slowdown

    prefill, decode, batched, slowdown = measure(runners)
    del runners
    # The daemon's blocks (``fuse_block``), timed the same way: what a fused run saves over one session
    # per module is the fixed cost of the runs it does not make (cost(k) = calls * a + sum of bodies).
    block = fuse_block()
    n = manifest.num_modules
    call_s: list[float] = []
    prefill_run = 0.0
    saved = n - runs_per_step(0, n, block)
    if saved > 0:
        fused = [
            ModuleRunner(shard_dir, manifest, a, min(a + block, n), threads=threads)
            for a in range(0, n, block)
        ]
        f_prefill, f_decode, f_batched, _ = measure(fused)
        del fused
        call_s = [
            max(0.0, (sum(single) - sum(joint)) / saved)
            for single, joint in zip([decode, *batched], [f_decode, *f_batched], strict=True)
        ]
        prefill_run = max(0.0, (sum(prefill) - sum(f_prefill)) / saved)
    layers = [i.index for i in manifest.modules if i.kind == "layer"]
    flops = sum(manifest.modules[m].flops.at(context) for m in layers)
    out = [manifest.boundary_bytes(m) for m in range(manifest.num_modules - 1)] + [TOKEN_ID_BYTES]
    return ModuleCosts(
        model=manifest.name,
        manifest_sha=manifest_sha(shard_dir),
        threads=threads,
        context=context,
        prompt_tokens=prompt_tokens,
        decode_s=decode,
        decode_batch_s=batched,
        prefill_s=prefill,
        out_bytes_per_token=out,
        # net of a run's fixed cost, as ``profile_device`` measures a device's speed (cost(k) = a + b k):
        # a profile, a device class and these costs then mean the same by a FLOP rate, and a planner
        # pricing b = FLOPs / speed plus a per run agrees with ``decode_range_s`` (the single-module
        # rate, run cost included, made a class ~20 % slower here than to the planner)
        reference_flops_per_s=flops / sum(decode[m] - (call_s[0] if call_s else 0.0) for m in layers),
        measured_at=time.time(),
        profile_s=time.perf_counter() - t_start,
        load_slowdown=slowdown,
        fuse_block=block if saved > 0 else 1,
        call_s=call_s,
        prefill_call_s=prefill_run,
    )


def cached_costs(
    shard_dir: Path,
    *,
    threads: int = 1,
    context: int = 64,
    refresh: bool = False,
    cache_dir: Path = CACHE_DIR,
) -> tuple[ModuleCosts, bool]:
    """The cached profile of ``shard_dir`` (profiling it first if absent or stale); (costs, from_cache)."""
    sha = manifest_sha(shard_dir)
    path = cache_dir / f"{sha}-t{threads}-c{context}-v{FORMAT}.json"
    if path.is_file() and not refresh:
        try:
            costs = ModuleCosts.from_dict(json.loads(path.read_text()))
            if costs.manifest_sha == sha:
                return costs, True
        except (ValueError, TypeError):
            pass  # an unreadable cache is re-measured, not trusted
    costs = profile_modules(shard_dir, threads=threads, context=context)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(costs.to_dict()))
    tmp.replace(path)
    return costs, False


# Pipelines of the daemon's own ranges timed by :func:`range_check`: one node, and the cuts the
# validation's 2- and 4-node clusters ran (each pipeline's ranges in turn, so that no range finds its
# weights in the caches).
CHECK_PIPELINES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 32),),
    ((0, 14), (14, 32)),
    ((0, 22), (22, 32)),
    ((0, 9), (9, 18), (18, 26), (26, 32)),
)


def range_check(
    shard_dir: Path,
    costs: ModuleCosts,
    pipelines: tuple[tuple[tuple[int, int], ...], ...] = CHECK_PIPELINES,
    *,
    threads: int = 1,
    repeats: int = 9,
) -> list[dict[str, float]]:
    """The price of each range (fused and per module) next to the median CPU of a decode step of the
    daemon's own runner over it (``ModuleRunner``: fused blocks), at ``costs.context``, in the same
    process as ``costs`` was measured: a check of the module pricing alone, by CPU time, so that the
    host's load hardly moves it (unlike the clusters' wall time)."""
    from llnode.model.runner import ModuleRunner

    manifest = load_manifest(shard_dir)
    n, ctx = manifest.num_modules, costs.context
    rng = np.random.default_rng(0)
    rows: list[dict[str, float]] = []
    for pipeline in pipelines:
        ranges = [(a, b) for a, b in pipeline if 0 <= a < b <= n]
        calls: list[Callable[[], None]] = []
        for a, b in ranges:
            r = ModuleRunner(shard_dir, manifest, a, b, threads=threads)
            x = (
                rng.integers(0, manifest.vocab_size, (1, ctx), dtype=np.int64)
                if a == 0
                else rng.standard_normal((1, ctx, manifest.hidden_size), dtype=np.float32)
            )
            r.step("check", x, np.arange(ctx, dtype=np.int64)[None, :])

            def step(r: ModuleRunner = r, one: np.ndarray = x[:, :1], pos: list[int] = [ctx]) -> None:  # noqa: B006
                r.step("check", one, np.array([[pos[0]]], dtype=np.int64))
                pos[0] += 1

            calls.append(step)
        cpu, _ = _in_pipeline_order(calls, repeats)
        for (a, b), measured in zip(ranges, cpu, strict=True):
            rows.append(
                {
                    "start": a,
                    "end": b,
                    "measured_s": measured,
                    "fused_s": costs.decode_range_s(a, b, costs.reference_flops_per_s),
                    "per_module_s": sum(costs.decode_s[a:b]),
                }
            )
    return rows
