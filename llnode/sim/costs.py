"""Per-module costs measured on this device: what the simulator charges for compute (never constants).

Every module of the shard set is run alone with the pipeline's own :class:`ModuleRunner` (one
onnxruntime thread, as the harness's nodes run): decode steps at a fixed context, and one prefill of a
prompt. The result is cached as JSON (keyed by the shard set's manifest, the thread count and the
context), so the simulator profiles once per machine and model.

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
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llnode.model.manifest import Manifest, load_manifest

CACHE_DIR = Path(os.environ.get("LLNODE_SIM_CACHE", Path.home() / ".cache" / "llnode" / "sim"))
TOKEN_ID_BYTES = 8  # a token id between the entry and the first/last stage (int64)
BATCH_SIZES = (2, 4, 8)  # decode batch sizes measured besides single steps (the batching curve)
FORMAT = 4  # bump when the measured fields change: older caches are re-measured


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
    reference_flops_per_s: float  # decode FLOPs of the decoder layers / their measured seconds
    measured_at: float = 0.0
    profile_s: float = 0.0
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    # mean / fastest decode step while profiling: > 1 when other processes took part of the core (a
    # loaded machine); the simulator's ``cpu_share`` for runs at the same time is its inverse
    load_slowdown: float = 1.0

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
        linear = sum(self.prefill_s[start : min(end, head)]) * tokens / self.prompt_tokens
        fixed = self.prefill_s[head] if end > head else 0.0
        return (linear + fixed) * self.reference_flops_per_s / flops_per_s

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


def _time_s(call: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(CPU seconds, mean wall seconds) per call, ``repeats`` calls after a warm-up.

    The cost is CPU time (the fastest of the calls' process CPU time), not wall time: on a loaded
    machine even the fastest wall time of a 20 ms module (the head) includes preemptions, while CPU
    time is the module's own and is what a CPU quota (CFS) charges. The mean wall time over the CPU
    time says how much of a core this process got meanwhile (``ModuleCosts.load_slowdown``)."""
    call()
    cpu, wall = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return min(cpu), sum(wall) / len(wall)


def profile_modules(
    shard_dir: Path,
    *,
    threads: int = 1,
    context: int = 64,
    prompt_tokens: int = 16,
    repeats: int = 9,
) -> ModuleCosts:
    """Time every module of ``shard_dir`` alone (decode at ``context``; one prefill of the prompt; decode
    batches of ``BATCH_SIZES``)."""
    from llnode.model.batching import decode_batch
    from llnode.model.runner import ModuleRunner

    t_start = time.perf_counter()
    manifest: Manifest = load_manifest(shard_dir)
    rng = np.random.default_rng(0)
    hidden = manifest.hidden_size
    decode: list[float] = []
    decode_mean: list[float] = []
    prefill: list[float] = []
    batched: list[list[float]] = []  # [m][k]
    for info in manifest.modules:
        m = info.index
        runner = ModuleRunner(shard_dir, manifest, m, m + 1, threads=threads)
        first = runner.is_first

        def inputs(tokens: int, first: bool = first) -> np.ndarray:
            if first:
                return rng.integers(0, manifest.vocab_size, (1, tokens), dtype=np.int64)
            return rng.standard_normal((1, tokens, hidden), dtype=np.float32)

        x_prompt = inputs(prompt_tokens)

        def run_prefill(r: ModuleRunner = runner, x: np.ndarray = x_prompt) -> None:
            sid = uuid.uuid4().hex
            # the last stage runs the head on the last token only (``last_only``), as the stage does
            r.step(sid, x, np.arange(x.shape[1], dtype=np.int64)[None, :], last_only=r.is_last)
            r.free(sid)

        prefill.append(_time_s(run_prefill, 3)[0])
        sid = "sim-profile"
        runner.step(sid, inputs(context), np.arange(context, dtype=np.int64)[None, :])
        one = inputs(1)
        pos = [context]

        def run_decode(
            r: ModuleRunner = runner, x: np.ndarray = one, p: list[int] = pos, sid: str = sid
        ) -> None:
            r.step(sid, x, np.array([[p[0]]], dtype=np.int64))
            p[0] += 1

        fastest, mean = _time_s(run_decode, repeats)
        decode.append(fastest)
        decode_mean.append(mean)
        runner.free(sid)
        per_size = []
        for size in BATCH_SIZES:
            sids = [f"sim-batch-{k}" for k in range(size)]
            for k in sids:
                runner.step(k, inputs(context), np.arange(context, dtype=np.int64)[None, :])
            xb = np.concatenate([inputs(1) for _ in sids])
            posb = [context]

            def run_batch(
                r: ModuleRunner = runner,
                x: np.ndarray = xb,
                p: list[int] = posb,
                kind: str = info.kind,
                sids: list[str] = sids,
            ) -> None:
                if kind == "layer":
                    decode_batch(r, sids, x, [p[0]] * len(sids))
                else:  # no KV cache: the module takes the rows as one batch directly
                    r.step("sim-rows", x, np.full((len(sids), 1), p[0], dtype=np.int64))
                    r.free("sim-rows")
                p[0] += 1

            per_size.append(_time_s(run_batch, repeats)[0])
            for k in sids:
                runner.free(k)
        batched.append(per_size)
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
        decode_batch_s=[[b[k] for b in batched] for k in range(len(BATCH_SIZES))],
        prefill_s=prefill,
        out_bytes_per_token=out,
        reference_flops_per_s=flops / sum(decode[m] for m in layers),
        measured_at=time.time(),
        profile_s=time.perf_counter() - t_start,
        load_slowdown=sum(decode_mean) / sum(decode),
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
