"""Runtime load balancing: notice when stages drift from the plan, re-plan with measured speeds.

Why: the start-up profile is a snapshot. A phone heats up and throttles, a laptop starts a build, a
battery saver kicks in; the plan that was best at start then leaves a stage as the bottleneck.

- **Drift** (every node, about its own stage): the stage's *sustained* EWMA decode ms per token
  (``max(wall, CPU time / CPU limit)``, gossiped under ``metrics``, see :mod:`llnode.pipeline.metrics`)
  is compared with a baseline, the plan's predicted ``compute_s`` for the range. Drift is a
  ratio off by more than ``threshold`` (either way) that stays so for ``window_s`` and ``min_samples``
  fresh measurements; a measurement back within ``clear`` resets it (hysteresis: noise around the
  threshold never fires). A node that detects drift asks the leader with a ``plan.rebalance`` peer-link
  request carrying the reason. A node whose CPU limit (its cgroup quota) changed by more than
  ``threshold`` asks at once, without waiting for the window: like battery or memory, that is a change
  of the device itself, not noise.
- **Decision** (leader): every stage's measured decode time becomes a measured speed
  (:meth:`DeviceProfile.with_measured_decode` over the range's FLOPs); speeds measured on earlier plans
  are remembered per device. The current plan is priced with those speeds, the plan is re-solved with the
  movement term against the current plan (exhaustively on small clusters), a shrinking device keeps
  whole fused sessions where that costs little, and the new plan is published only if its predicted
  tokens/s beats the current one by ``min_gain`` (doubled for each rebalance of the last minute that
  did not deliver half its predicted gain) and pays for the switch. A rejected request re-bases the
  asking node's baseline on what it measures, so the same drift does not ask again and again.
- **Measured gain**: once the new plan's stages all report fresh measurements, the leader logs the
  measured bottleneck before and after as a second event.

Every decision is an event in ``/api/status`` (``pipeline.events``) and the log. Configuration comes
from the environment (see :meth:`RebalanceConfig.from_env`) so a LocalCluster can set it per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llnode.config import OFF_WORDS, ON_WORDS
from llnode.model.manifest import Manifest
from llnode.model.runner import fuse_block
from llnode.pipeline.metrics import live_context
from llnode.plan.bruteforce import brute_force_work
from llnode.plan.costs import ModelCosts, build_instance, evaluate, module_call_s, stage_fixed_s
from llnode.plan.solve import make_plan, solve
from llnode.plan.types import DeviceProfile, LinkProfile, Plan, PlanError, PlanOptions

if TYPE_CHECKING:
    from llnode.pipeline.service import PipelineService

log = logging.getLogger(__name__)

REBALANCE_MSG = "plan.rebalance"
IMPOSE_PATH = "/api/bench/impose-plan"
SPEED_TTL_S = 300.0  # how long a measured speed outlives its last fresh measurement
SLOW_MEMORY_S = 60.0  # a device's speed comes from the heaviest range it settled on within this long
SETTLED_STEPS = 8  # a stage's EWMA counts as a speed once it has this many steps on its plan
# The MILP's time limit for a rebalance: the DP's plan is the warm start, so a limit costs at most a
# little optimality, while a loaded 2-core machine ran CBC to its 10 s default limit mid-drift (10.9 s
# of a 25 s recovery went into deciding).
REBALANCE_SOLVE_S = 2.0
# Up to this many assignments a rebalance is decided by the exhaustive search instead: exact *with* the
# movement term (which the MILP's DP warm start only approximates) and fast. 3 devices x 32 modules are
# 2,979 assignments: 0.24 s, where CBC with the movement term ran to its 2 s limit even on an idle
# machine and then took the DP's plan, which re-ordered the devices (19 modules built instead of 4).
REBALANCE_BRUTE_WORK = 10_000
# Anti-flapping: every rebalance accepted within this window that has not (yet) measured at least
# DELIVERED of its predicted gain doubles the predicted gain the next one must bring. Speeds that move
# after a switch make each re-solve find a "gain" of 15-25 %: a drift run accepted three rebalances in a
# minute, the third measured -57 %. A rebalance that delivered what it predicted is no sign of that:
# counting those too raised the bar to 80 % after two corrective rebalances and refused the good
# requests after a real quota cut.
CHURN_WINDOW_S = 60.0
DELIVERED = 0.5
# A rebalance may give up this much predicted tokens/s to let a shrinking device keep whole sessions.
SNAP_LOSS = 0.05


@dataclass(frozen=True)
class RebalanceConfig:
    """Knobs of drift detection and of the leader's decision."""

    enabled: bool = True
    threshold: float = 1.4  # measured/baseline (or inverse) beyond this counts as drift
    clear: float = 1.2  # a measurement within this resets the drift timer (hysteresis)
    window_s: float = 6.0  # drift must last this long ...
    min_samples: int = 3  # ... over at least this many fresh measurements
    min_gain: float = 0.10  # predicted tokens/s gain a new plan must bring to be published
    cooldown_s: float = 15.0  # no new rebalance this soon after the last plan change
    movement_weight: float = 0.05  # cost of moving weights, relative to the current plan's objective
    horizon_s: float = 60.0  # a switch must pay for itself (re-prefill, loading) within this time
    limit_trigger: bool = True  # a CPU limit changed beyond ``threshold`` asks at once (no window)
    impose: bool = False  # benchmarks only: accept POST /api/bench/impose-plan on this node

    def __post_init__(self) -> None:
        if not 1.0 < self.clear <= self.threshold:
            raise ValueError(f"need 1 < clear <= threshold, got {self.clear} and {self.threshold}")
        if self.window_s < 0 or self.min_samples < 1 or self.min_gain < 0 or self.cooldown_s < 0:
            raise ValueError("window_s, min_gain, cooldown_s must be >= 0 and min_samples >= 1")
        if self.movement_weight < 0:
            raise ValueError("movement_weight must be >= 0")
        if self.horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RebalanceConfig:
        """``LLNODE_REBALANCE=0`` disables; ``LLNODE_REBALANCE_<FIELD>`` sets a field
        (THRESHOLD, CLEAR, WINDOW_S, MIN_SAMPLES, MIN_GAIN, COOLDOWN_S, MOVEMENT_WEIGHT, HORIZON_S;
        LIMIT_TRIGGER=0 leaves a CPU limit change to measured drift);
        ``LLNODE_BENCH_IMPOSE=1`` enables the benchmark-only plan override."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"LLNODE_REBALANCE_{f.name.upper()}")
            if raw is None or f.name in ("enabled", "impose"):
                continue
            if f.name == "limit_trigger":
                kw[f.name] = raw not in OFF_WORDS
                continue
            try:
                kw[f.name] = int(raw) if f.name == "min_samples" else float(raw)
            except ValueError as exc:
                raise ValueError(f"LLNODE_REBALANCE_{f.name.upper()}={raw!r} is not a number") from exc
        kw["enabled"] = env.get("LLNODE_REBALANCE", "1") not in OFF_WORDS
        kw["impose"] = env.get("LLNODE_BENCH_IMPOSE", "0") in ON_WORDS
        return cls(**kw)


@dataclass
class _Track:
    over_since: float | None = None
    samples: int = 0
    fired: bool = False


@dataclass
class DriftDetector:
    """Threshold + sustained window + hysteresis over a stream of measured/baseline ratios per key.

    A severe drift (twice the threshold, e.g. a device throttled to a tenth) needs only half the window:
    every second of waiting costs throughput, and an EWMA that far off for ``min_samples`` fresh
    measurements is not a spike (one 10x spike lifts an alpha 0.2 EWMA to 2.8x for one sample only).
    """

    config: RebalanceConfig = field(default_factory=RebalanceConfig)
    _tracks: dict[str, _Track] = field(default_factory=dict)

    def observe(self, key: str, measured: float, baseline: float, now: float) -> bool:
        """Feed one fresh measurement; True exactly once per sustained drift episode."""
        if not (measured > 0 and baseline > 0 and math.isfinite(measured) and math.isfinite(baseline)):
            return False
        ratio = max(measured / baseline, baseline / measured)
        track = self._tracks.setdefault(key, _Track())
        if ratio <= self.config.clear:
            self._tracks[key] = _Track()  # back to normal: the episode (if any) is over
            return False
        if ratio < self.config.threshold:
            return False  # the hysteresis band: neither starts nor ends an episode
        if track.over_since is None:
            track.over_since = now
        track.samples += 1
        if track.fired:
            return False
        window = self.config.window_s / 2 if ratio >= 2 * self.config.threshold else self.config.window_s
        if now - track.over_since >= window and track.samples >= self.config.min_samples:
            track.fired = True
            return True
        return False

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._tracks.clear()
        else:
            self._tracks.pop(key, None)


@dataclass(frozen=True)
class Decision:
    """What the leader concluded from one rebalance request."""

    accept: bool
    reason: str
    predicted_gain: float  # new predicted tokens/s over the current plan's, minus 1 (measured speeds)
    current_tokens_per_s: float
    new_tokens_per_s: float
    plan: Plan | None
    solve_s: float = 0.0  # wall time of the re-solve (a phase of the recovery)


def measured_profiles(
    costs: ModelCosts,
    profiles: Mapping[str, DeviceProfile],
    measured_ms: Mapping[str, tuple[int, int, float]],
) -> dict[str, DeviceProfile]:
    """Start-up profiles with decode (and prefill, in proportion) speeds replaced by measured ones.

    ``measured_ms`` maps device -> (start, end, decode ms per token of that range). The device's fixed
    per-module overhead is kept, so the speed explains the rest of the measured time.
    """
    out = dict(profiles)
    for dev, (start, end, ms) in measured_ms.items():
        base = profiles.get(dev)
        if base is None or ms <= 0 or not 0 <= start < end <= costs.num_modules:
            continue
        flops = sum(costs.decode_flops[start:end])
        seconds = ms / 1000.0
        # the cost model adds the fixed parts back (per module, per run, per stage step): take them out
        fixed = (end - start) * (base.module_overhead_s + module_call_s(base)) + stage_fixed_s(base)
        seconds = max(seconds - fixed, 0.1 * seconds)
        if flops <= 0:
            continue
        new = base.with_measured_decode(flops, seconds)
        scale = new.decode_flops_per_s / base.decode_flops_per_s
        prefill = base.prefill_flops_per_s * scale if base.prefill_flops_per_s > 0 else 0.0
        out[dev] = dataclasses.replace(new, prefill_flops_per_s=prefill)
    return out


def heaviest(
    costs: ModelCosts, measured: Mapping[str, list[tuple[int, int, float]]]
) -> dict[str, tuple[int, int, float]]:
    """Per device, the measurement (start, end, ms) taken on its heaviest range (the latest of equals;
    entries are oldest first).

    Why: a device's measured speed depends on how much work it was given. Under a CPU quota (or a
    thermal or battery governor) a light stage runs in bursts at full speed, a heavy one is held to
    the quota: after a rebalance gave a throttled device less, it measured 2x faster than its quota
    allows, was given more again, measured slow again... (the drift bench oscillated 4 times). So a
    device's speed comes from the most work it carried within ``SLOW_MEMORY_S``. (The slowest
    measurement would also do that, but it keeps any load spike for a minute and made every device
    look slow.)
    """
    out: dict[str, tuple[int, int, float]] = {}
    for dev, entries in measured.items():
        best = -1.0
        for start, end, ms in entries:
            flops = sum(costs.decode_flops[start:end])
            if flops >= best:
                best, out[dev] = flops, (start, end, ms)
    return out


Settled = tuple[float, int, int, float, float | None]  # (when, start, end, ms, CPU limit) of a measurement


def remembered(
    settled: list[Settled], latest: tuple[int, int, float], limit: float | None, now: float
) -> list[tuple[int, int, float]]:
    """What a device's speed is chosen from (by :func:`heaviest`): its settled measurements of the last
    ``SLOW_MEMORY_S`` taken under the CPU limit it has now, then its latest one.

    Why the limit: a measurement from before a quota cut describes another device. The drift bench
    (cut from 60 % to 10 % of a core) priced the throttled node by its heavier pre-cut range and gave it
    *more* work (epoch 3: [12,25) -> [11,29), predicted +33 %); the next rebalance had to undo it.
    """
    return [*((s, e, ms) for t, s, e, ms, lim in settled if now - t < SLOW_MEMORY_S and lim == limit),
            latest]


def price(
    model: Manifest | ModelCosts,
    profiles: Mapping[str, DeviceProfile],
    links: list[LinkProfile],
    options: PlanOptions,
    ranges: list[tuple[str, int, int]],
    *,
    epoch: int = 0,
    solver: str = "imposed",
) -> Plan:
    """A Plan for a given assignment (device, start, end in order), priced with the cost model.

    Used to price the current plan with measured speeds and to impose a plan in benchmarks.
    """
    devices = [profiles[d] for d, _, _ in ranges if d in profiles]
    if len(devices) != len(ranges):
        missing = [d for d, _, _ in ranges if d not in profiles]
        raise PlanError(f"no profile for device(s) {missing}")
    inst = build_instance(model, devices, links, options)
    cuts = [r[1] for r in ranges] + [ranges[-1][2]] if ranges else [0]
    if any(ranges[i][2] != ranges[i + 1][1] for i in range(len(ranges) - 1)):
        raise PlanError(f"ranges {ranges} are not contiguous")
    ev = evaluate(inst, list(range(len(devices))), cuts)
    return make_plan(inst, ev, solver, False, 0.0, [], {}, epoch)


LOAD_BYTES_PER_S = 30e6  # onnxruntime session building, measured on the 2-core build machine under load
LOAD_STALL = 0.5  # share of throughput lost while a node builds sessions beside its running stage


def cost_context(options: Mapping[str, Any], max_context: int) -> int:
    """The context length a plan's per-token decode FLOPs were costed at (``PlanOptions.cost_context``)."""
    ctx = options.get("cost_context")
    if isinstance(ctx, int) and ctx > 0:
        return ctx
    limit = options.get("max_context")
    return (limit if isinstance(limit, int) and limit > 0 else max_context) // 2


def calibrated_context(context: float) -> int:
    """A served context rounded to half powers of two (16, 22, 32, 45, 64, ...).

    Why rounded: plans are priced at this context, and a context that moves by a token whenever a
    session starts or ends must not make every re-solve see slightly different numbers.
    """
    c = max(16.0, float(context))
    return round(2 ** (round(2 * math.log2(c)) / 2))


def range_flops(manifest: Manifest, start: int, end: int, context: float) -> float:
    return sum(m.flops.at(int(context)) for m in manifest.modules[start:end])


def expected_ms(manifest: Manifest, plan: Plan, start: int, end: int, compute_s: float,
                context: float | None) -> float:
    """The plan's predicted decode ms/token of a stage, re-costed at the context actually served.

    Why: a plan is priced at ``cost_context`` (by default half the model's maximum context), while a
    decode step costs what its real context costs; comparing a 40-token chat with a 4,096-token
    prediction made every layer-only stage look 2x "faster than planned" and a stage holding the head
    (no attention, so no context term) look slower: drift that was only a change of units.
    """
    ms = 1000.0 * compute_s
    if context is None:
        return ms
    planned = range_flops(manifest, start, end, cost_context(plan.options, manifest.max_context))
    served = range_flops(manifest, start, end, context)
    return ms * served / planned if planned > 0 and served > 0 else ms


def switch_cost_s(
    costs: ModelCosts, current: Plan, new: Plan, *, live_tokens: float, prompt_tokens: int,
    load_bytes_per_s: float = LOAD_BYTES_PER_S,
) -> tuple[float, float]:
    """Seconds of full-speed output a switch costs: (re-prefilling the live sessions, loading modules).

    Re-prefill: every live session's history passes the new pipeline again; prefill is pipelined across
    sessions, so the new plan's slowest stage per prefill token sets the pace. Loading: each node builds
    sessions only for modules outside its current range (it keeps the rest), in parallel with the others
    and beside its running stage (make-before-break), which costs it ``LOAD_STALL`` of its speed.
    """
    per_token = max((s.prefill_s for s in new.stages), default=0.0) / max(prompt_tokens, 1)
    reprefill = max(live_tokens, 0.0) * per_token
    held = current.ranges()
    load = 0.0
    for s in new.stages:
        cur = held.get(s.device_id, (0, 0))
        moved = sum(w for m, w in enumerate(costs.weight_bytes[s.start:s.end], s.start)
                    if not cur[0] <= m < cur[1])
        load = max(load, moved / load_bytes_per_s)
    return reprefill, LOAD_STALL * load


def decide(
    model: Manifest | ModelCosts,
    profiles: Mapping[str, DeviceProfile],
    links: list[LinkProfile],
    options: PlanOptions,
    current: Plan,
    config: RebalanceConfig,
    *,
    epoch: int,
    live_tokens: float = 0.0,
    load_bytes_per_s: float = LOAD_BYTES_PER_S,
    session_block: int | None = None,
) -> Decision:
    """Re-solve with ``profiles`` (measured speeds) and the movement term; accept only a gain that beats
    ``min_gain`` and pays for the switch (re-prefill of ``live_tokens``, module loading) within
    ``config.horizon_s``."""
    live = [s for s in current.stages if s.device_id in profiles]
    if len(live) == len(current.stages):
        now_plan = price(model, profiles, links, options, [(s.device_id, s.start, s.end) for s in live])
        now_tps = now_plan.tokens_per_s
    else:
        now_tps = 0.0  # a stage node has no profile any more: anything that serves is a gain
    num_modules = model.num_modules
    small = brute_force_work(len(profiles), num_modules) <= REBALANCE_BRUTE_WORK
    opts = dataclasses.replace(
        options, movement_weight=max(options.movement_weight, config.movement_weight),
        time_limit_s=min(options.time_limit_s, REBALANCE_SOLVE_S),
        solver="brute" if small and options.solver == "auto" else options.solver,
    )
    began = time.perf_counter()
    new = solve(model, list(profiles.values()), links, opts, current=current, epoch=epoch)
    block = fuse_block() if session_block is None else session_block
    new = keep_whole_sessions(model, profiles, links, options, current, new, block, epoch)
    took = time.perf_counter() - began
    gain = new.tokens_per_s / now_tps - 1.0 if now_tps > 0 else math.inf
    if new.ranges() == current.ranges():
        return Decision(False, "the best plan is the current one", 0.0, now_tps, new.tokens_per_s, None, took)
    if gain < config.min_gain:
        return Decision(
            False,
            f"predicted gain {gain:+.1%} is below the {config.min_gain:.0%} threshold",
            gain, now_tps, new.tokens_per_s, None, took,
        )
    costs = model if isinstance(model, ModelCosts) else ModelCosts.from_manifest(model, options)
    reprefill, load = switch_cost_s(costs, current, new, live_tokens=live_tokens,
                                    prompt_tokens=options.prompt_tokens, load_bytes_per_s=load_bytes_per_s)
    # (new - now) * horizon tokens gained must beat now * (reprefill + load) tokens lost
    needed = (reprefill + load) / config.horizon_s
    if gain < needed:
        return Decision(
            False,
            f"predicted gain {gain:+.1%} does not pay for the switch within {config.horizon_s:.0f} s "
            f"(re-prefill {reprefill:.1f} s + loading {load:.1f} s need {needed:+.1%})",
            gain, now_tps, new.tokens_per_s, None, took,
        )
    return Decision(True, f"predicted gain {gain:+.1%} (switch costs ~{reprefill + load:.1f} s)", gain,
                    now_tps, new.tokens_per_s, new, took)


def session_bounds(start: int, end: int, block: int) -> set[int]:
    """Where the onnxruntime sessions of a runner over ``[start, end)`` begin and end: the runner fuses
    blocks of ``block`` modules aligned to module indices (:func:`llnode.model.runner.fuse_block`)."""
    return {start, end, *range((start // max(block, 1) + 1) * max(block, 1), end, max(block, 1))}


def keep_whole_sessions(
    model: Manifest | ModelCosts,
    profiles: Mapping[str, DeviceProfile],
    links: list[LinkProfile],
    options: PlanOptions,
    current: Plan,
    new: Plan,
    block: int,
    epoch: int,
) -> Plan:
    """``new`` with the range of a device that shrinks moved to its old sessions' boundaries, if that
    costs at most ``SNAP_LOSS`` of the predicted tokens/s.

    Why: a device given a sub-range of what it ran shares its sessions and builds nothing, but only
    whole fused blocks can be shared. The device that shrinks is usually the one just throttled, and
    rebuilding the 6-7 modules of a block its new range cut took it 12.6 and 16.0 s at 10 % of a core:
    the largest phase of the recovery. The movement term does not see it (it counts moved weights).
    """
    if block <= 1:
        return new
    held = current.ranges()
    stages = [(s.device_id, s.start, s.end) for s in new.stages]
    best = new
    for i, (dev, a, b) in enumerate(stages):
        old = held.get(dev)
        if old is None or not old[0] <= a < b <= old[1]:
            continue
        bounds = session_bounds(old[0], old[1], block)
        if a in bounds and b in bounds:
            continue
        starts = {a} if a in bounds else {max(x for x in bounds if x <= a), min(x for x in bounds if x >= a)}
        ends = {b} if b in bounds else {max(x for x in bounds if x <= b), min(x for x in bounds if x >= b)}
        for a2 in starts:
            for b2 in ends:
                if a2 >= b2 or (i > 0 and a2 <= stages[i - 1][1]) or (
                    i + 1 < len(stages) and b2 >= stages[i + 1][2]
                ):
                    continue  # every stage keeps at least one module
                ranges = list(stages)
                ranges[i] = (dev, a2, b2)
                if i > 0:
                    ranges[i - 1] = (stages[i - 1][0], stages[i - 1][1], a2)
                if i + 1 < len(stages):
                    ranges[i + 1] = (stages[i + 1][0], b2, stages[i + 1][2])
                plan = price(model, profiles, links, options, ranges, epoch=epoch,
                             solver=f"{new.solver}, whole sessions kept")
                if any(st.memory_bytes > st.memory_limit_bytes for st in plan.stages):
                    continue
                if plan.tokens_per_s >= (1 - SNAP_LOSS) * new.tokens_per_s and (
                    best is new or plan.tokens_per_s > best.tokens_per_s
                ):
                    best = plan
    return best


def churn_min_gain(min_gain: float, recent: int) -> float:
    """The predicted gain a rebalance must bring after ``recent`` undelivered ones within
    ``CHURN_WINDOW_S`` (:func:`undelivered`): ``min_gain`` doubled for each (10 %, 20 %, 40 %, ...).

    Why: speeds measured right after a switch are the least settled, so a re-solve then often predicts
    a modest gain that is mostly noise. A real change (a second device throttled) still predicts far more.
    """
    return min_gain * 2 ** max(recent, 0)


@dataclass
class Accepted:
    """One accepted rebalance, for anti-flapping: when, what it predicted, what it then measured."""

    at: float
    epoch: int
    predicted: float
    measured: float | None = None


def undelivered(accepted: list[Accepted], now: float) -> int:
    """Rebalances accepted within ``CHURN_WINDOW_S`` that have not measured ``DELIVERED`` of their
    predicted gain (not measured yet counts: its speeds have not settled)."""
    return sum(
        1 for a in accepted
        if now - a.at < CHURN_WINDOW_S and (a.measured is None or a.measured < DELIVERED * a.predicted)
    )


def limit_changed(before: float | None, now: float | None, threshold: float) -> bool:
    """Did a device's CPU limit (cores) move by more than ``threshold`` (a ratio, either way)?"""
    if before is None or now is None or before <= 0 or now <= 0:
        return False
    return max(now / before, before / now) > threshold


def measured_ms(m: Mapping[str, Any], *, recent: bool) -> float | None:
    """A stage's measured decode ms per token from its gossiped metrics: the sustained figure
    (``max(wall, CPU / limit)``) where it reports one, else wall time; ``recent``: the median of the
    latest steps (what a speed is taken from), else the EWMA (what drift judges)."""
    keys = ("sustained_ms_recent", "sustained_ms", "decode_ms_recent", "decode_ms") if recent else (
        "sustained_ms", "decode_ms")
    for key in keys:
        ms = m.get(key)
        if isinstance(ms, (int, float)) and ms > 0:
            return float(ms)
    return None


def stage_ratios(
    manifest: Manifest, plan: Plan, metrics: Mapping[str, Mapping[str, Any]], context: float | None
) -> dict[str, float]:
    """measured / expected decode ms of every stage of ``plan`` whose gossiped metrics are for it.

    ``metrics``: device -> gossiped stage metrics; a stage counts once it has 3+ steps on this plan.
    Each is re-costed at the context its sessions are at (``context`` when it does not say).
    """
    out: dict[str, float] = {}
    for s in plan.stages:
        m = metrics.get(s.device_id, {})
        ms, steps, ctx = measured_ms(m, recent=False), m.get("steps"), m.get("context")
        if m.get("epoch") != plan.epoch or m.get("range") != [s.start, s.end]:
            continue
        if ms is None or not isinstance(steps, int) or steps < 3:
            continue
        ctx = float(ctx) if isinstance(ctx, (int, float)) and ctx > 0 else context
        out[s.device_id] = ms / expected_ms(manifest, plan, s.start, s.end, s.compute_s, ctx)
    return out


def rest_of_pipeline(me: str, own: float, ratios: Mapping[str, float]) -> float:
    """What this stage's measured/expected (``own``) is judged against: the rest of the pipeline.

    The other stage's ratio in a two-stage plan; with three or more, the median over every stage
    including this one, so that one slow stage makes only itself look off (the median of the others
    would be dragged up by it and make the healthy stages look fast). 1.0 (the prediction itself)
    when no other stage reports.
    """
    others = [r for d, r in ratios.items() if d != me]
    if len(others) >= 2:
        return statistics.median([*others, own])
    return others[0] if others else 1.0


def describe(plan: Plan | None) -> str:
    if plan is None:
        return "-"
    return ", ".join(f"{s.name or s.device_id}[{s.start},{s.end})" for s in plan.stages)


@dataclass
class _Pending:
    """An accepted rebalance waiting for its measured gain."""

    epoch: int
    before_s: float  # measured bottleneck of the old plan at decision time
    at: float


class Rebalancer:
    """The service's load balancing: detector on every node, decisions on the leader.

    Attach with ``Rebalancer(service)`` inside ``PipelineService.__init__`` (registers the peer-link
    request and, for benchmarks, the impose route), call :meth:`tick` from the service's tick and
    :meth:`adjust` on the profiles the leader plans with.
    """

    def __init__(self, service: PipelineService, config: RebalanceConfig | None = None) -> None:
        self.service = service
        self.config = config or RebalanceConfig.from_env()
        self.detector = DriftDetector(self.config)
        self.speeds: dict[str, tuple[int, int, float]] = {}  # device -> last measured (start, end, ms)
        self._speed_seen: dict[str, tuple[int, float]] = {}  # device -> (steps, when they last moved)
        # device -> (when, start, end, ms, CPU limit) of its settled measurements
        self._settled: dict[str, list[Settled]] = {}
        self._limits: dict[str, float | None] = {}  # device -> the CPU limit of its latest measurement
        self._seen_steps: dict[str, int] = {}
        self._contexts: dict[str, float] = {}  # device -> context its stage's sessions are at
        self._context: int | None = None  # the served context plans are priced at, once measured
        self._skew: tuple[int, float] = (0, 1.0)  # (epoch, relative speed accepted as normal)
        self._relative: float | None = None  # this stage's last measured/expected over the others'
        self._last_change = time.monotonic()
        self._last_epoch: int | None = None
        self._asking: asyncio.Task[None] | None = None
        self._pending: _Pending | None = None
        self._accepted: list[Accepted] = []  # recent accepted rebalances (anti-flapping)
        self._limit_seen: float | None = None  # this node's CPU limit when it last acted on it
        self._limit_retry_at = 0.0
        self._lock = asyncio.Lock()
        self.requests = 0
        self.accepted = 0
        node = service.node
        node.links.on(REBALANCE_MSG, self._on_request)
        node.status_providers["rebalance"] = self.status
        if self.config.impose:
            node.app.router.add_post(IMPOSE_PATH, self._on_impose)

    def status(self) -> dict[str, Any]:
        """``/api/status`` → ``rebalance``: the knobs, the counters, the speeds measured while serving."""
        return {
            "config": dataclasses.asdict(self.config),
            "requests": self.requests,
            "accepted": self.accepted,
            "relative": None if self._relative is None else round(self._relative, 3),
            "accepted_skew": round(self._skew[1], 3),
            "context": self._context,
            "measured_ms": {
                d: {"range": [s, e], "decode_ms": round(ms, 3)} for d, (s, e, ms) in self.speeds.items()
            },
        }

    # ---- measurements (every node reads everyone's gossip) ----------------------------------------
    def _metrics(self) -> dict[str, dict[str, Any]]:
        from llnode.pipeline.service import METRICS_KEY

        node = self.service.node
        out: dict[str, dict[str, Any]] = {}
        for n in node.live_members():
            m = node.gossip.get(n, METRICS_KEY)
            if isinstance(m, dict):
                out[n] = m
        return out

    def _refresh_speeds(self, plan: Plan, fresh: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Take every stage's measured speed on ``plan`` from the gossiped metrics, or from ``fresh``
        ones (an asker's own, sent with its request: gossip lags by up to ``METRICS_EVERY_S`` + a round).

        The speed is the sustained ms of the latest steps where a stage reports it, else the EWMA: see
        :func:`measured_ms` and :meth:`StageMetrics.recent_decode_ms`."""
        ranges = plan.ranges()
        metrics: dict[str, Mapping[str, Any]] = dict(self._metrics())
        for dev, m in (fresh or {}).items():
            steps, known = m.get("steps"), metrics.get(dev, {}).get("steps")
            if isinstance(steps, int) and (not isinstance(known, int) or steps >= known):
                metrics[dev] = m
        for dev, m in metrics.items():
            ms, rng = measured_ms(m, recent=True), m.get("range")
            if ms is None or not isinstance(rng, list) or len(rng) != 2:
                continue
            if m.get("epoch") != plan.epoch or tuple(rng) != ranges.get(dev):
                continue
            self.speeds[dev] = (int(rng[0]), int(rng[1]), float(ms))
            lim = m.get("cpu_limit")
            limit = float(lim) if isinstance(lim, (int, float)) and lim > 0 else None
            self._limits[dev] = limit
            ctx = m.get("context")
            if isinstance(ctx, (int, float)) and ctx > 0:
                self._contexts[dev] = float(ctx)
            steps = m.get("steps")
            if not isinstance(steps, int) or self._speed_seen.get(dev, (None, 0.0))[0] != steps:
                now = time.monotonic()
                self._speed_seen[dev] = (steps if isinstance(steps, int) else -1, now)
                if isinstance(steps, int) and steps >= SETTLED_STEPS:
                    kept = [x for x in self._settled.get(dev, []) if now - x[0] < SLOW_MEMORY_S]
                    self._settled[dev] = [*kept, (now, int(rng[0]), int(rng[1]), float(ms), limit)]

    def options(self) -> PlanOptions:
        """The service's plan options, costed at the context sessions are really at once it is measured.

        Why: a measured ms/token becomes a speed by dividing the range's FLOPs, and a plan is only as
        good as the relative cost of its modules; both must be taken at the served context (a layer's
        attention grows with it, the head's vocabulary matmul does not). An explicit ``cost_context``
        in the options wins.
        """
        opts = self.service.plan_options
        if opts.cost_context is not None or not self.config.enabled:
            return opts
        live = sorted(self._contexts.values())
        if live:
            self._context = calibrated_context(live[len(live) // 2])
        return opts if self._context is None else dataclasses.replace(opts, cost_context=self._context)

    def live_tokens(self) -> float:
        """Tokens of history the live sessions would re-prefill on a switch (sessions x context)."""
        from llnode.pipeline.service import METRICS_KEY

        node = self.service.node
        sessions = 0
        for n in node.live_members():
            m = node.gossip.get(n, METRICS_KEY)
            if isinstance(m, dict) and isinstance(m.get("sessions"), int):
                sessions += m["sessions"]
        live = sorted(self._contexts.values())
        return sessions * (live[len(live) // 2] if live else 0.0)

    def adjust(self, profiles: dict[str, DeviceProfile]) -> dict[str, DeviceProfile]:
        """Profiles with the speeds measured while serving (used for every plan the leader makes)."""
        manifest = self.service.manifest
        if manifest is None or not self.config.enabled:
            return profiles
        costs = ModelCosts.from_manifest(manifest, self.options())
        # a speed nobody re-measured for SPEED_TTL_S (e.g. a device the plan left out because it was slow)
        # is forgotten: the start-up profile applies again, so a device that recovered gets a chance
        now = time.monotonic()
        fresh = {
            d: remembered(self._settled.get(d, []), v, self._limits.get(d), now)
            for d, v in self.speeds.items()
            if d in profiles and now - self._speed_seen.get(d, (0, now))[1] < SPEED_TTL_S
        }
        return measured_profiles(costs, profiles, heaviest(costs, fresh))

    # ---- every tick ------------------------------------------------------------------------------
    async def tick(self) -> None:
        plan = self.service.following
        if plan is None:
            return
        now = time.monotonic()
        if plan.epoch != self._last_epoch:
            self._last_epoch = plan.epoch
            self._last_change = now
            self._relative = None
            self.detector.reset()
        self._refresh_speeds(plan)
        if self.service.node.is_leader:
            self._check_measured_gain(plan, now)
        if self.config.enabled:
            self._detect(plan, now)
            self._check_limit(plan, now)

    def _check_limit(self, plan: Plan, now: float) -> None:
        """Ask at once when this node's CPU limit moved by more than ``threshold`` since it last acted.

        Why not wait for drift: a quota cut is a change of the device, like its battery or memory, and
        the sustained ms/token (CPU per token over the limit) shows it in the very next metrics, while
        the detector would wait out its window. Only once the stage has measured CPU per token: without
        it the leader would price the device as before.
        """
        worker = self.service.worker
        if not self.config.limit_trigger or worker is None or worker.epoch != plan.epoch:
            return
        if worker.metrics.recent_cpu_ms() is None:
            return
        limit = worker.metrics.cpu_limit()
        if self._limit_seen is None:
            self._limit_seen = limit
            return
        if not limit_changed(self._limit_seen, limit, self.config.threshold) or now < self._limit_retry_at:
            return
        if self._asking is not None and not self._asking.done():
            return
        reason = (f"the CPU limit of {self.service.node.name} changed from {self._limit_seen:.2f} to "
                  f"{limit:.2f} cores (stage [{worker.start},{worker.end}))")
        self._asking = asyncio.create_task(self._ask(reason, plan.epoch, None, limit=limit))

    def _detect(self, plan: Plan, now: float) -> None:
        """Feed this stage's speed *relative to the other stages'* to the detector.

        Why relative: what a rebalance can fix is one stage being slow (or fast) compared with the
        rest. Contention between concurrent sessions on a shared machine, batching, or a prediction
        that is off by the same factor everywhere move every stage's measured/expected alike and cancel
        out here; they used to read as drift and re-plan again and again. A one-stage plan is judged
        against its own prediction.
        """
        worker = self.service.worker
        manifest = self.service.manifest
        if worker is None or worker.epoch != plan.epoch or manifest is None:
            return
        snap = worker.metrics.snapshot()
        steps, ms = snap.get("steps", 0), measured_ms(snap, recent=False)
        key = f"{worker.start}-{worker.end}"
        if ms is None or steps == self._seen_steps.get(key):
            return  # nothing new measured: a stale EWMA is no evidence
        self._seen_steps[key] = steps
        me = self.service.node.node_id
        stage = next((s for s in plan.stages if s.device_id == me), None)
        if stage is None:
            return
        ctx = live_context(worker.runner)
        expected = expected_ms(manifest, plan, stage.start, stage.end, stage.compute_s, ctx)
        own = ms / expected
        ratios = stage_ratios(manifest, plan, self._metrics(), ctx)
        rest = rest_of_pipeline(me, own, ratios)
        others = len(ratios) - (me in ratios)
        if others == 0 and len(plan.stages) > 1:
            return  # the other stages have not reported on this plan yet: nothing to compare with
        skew = self._skew[1] if self._skew[0] == plan.epoch else 1.0
        self._relative = own / rest
        if self.detector.observe(key, own, rest * skew, now):
            reason = (
                f"stage [{worker.start},{worker.end}) on {self.service.node.name}: {ms:.1f} ms/token, "
                f"{own:.2f}x the {expected:.1f} ms expected"
                + (f" while the other stages run at {rest:.2f}x theirs" if others else "")
                + f", for {self.config.window_s:.0f} s"
            )
            if self._asking is None or self._asking.done():
                self._asking = asyncio.create_task(self._ask(reason, plan.epoch, own / rest))

    async def _ask(
        self, reason: str, epoch: int, relative: float | None, *, limit: float | None = None
    ) -> None:
        """Ask the leader (or ourselves) for a rebalance, with this stage's measurements as of now; a
        refusal makes this skew (drift) or this CPU limit (``limit``) the new normal."""
        self.service.event("drift", reason)
        node = self.service.node
        leader = node.leader_id
        if leader is None:
            return
        measured = self.service.stage_metrics()
        try:
            if leader == node.node_id:
                reply = await self.handle(reason, node.node_id, measured)
            else:
                raw = await node.links.request(leader, REBALANCE_MSG, {"reason": reason, "metrics": measured},
                                               timeout=60.0)
                reply = raw if isinstance(raw, dict) else {"accepted": False, "reason": "bad reply"}
        except Exception as exc:  # the leader may be dying; the detector fires again on the next episode
            log.warning("rebalance request failed: %s", exc)
            self.detector.reset()
            self._limit_retry_at = time.monotonic() + self.config.window_s / 2
            return
        if reply.get("cooldown"):
            self.detector.reset()  # not a judgement on this drift: ask again after another window
            self._limit_retry_at = time.monotonic() + self.config.window_s / 2
            return
        worker = self.service.worker
        if limit is None and worker is not None:
            limit = worker.metrics.cpu_limit()
        if limit is not None:
            # decided on (accepted or not), whatever asked: the leader priced the stage's sustained
            # figure, which carries the limit as it is now; that limit is the new normal
            self._limit_seen = limit
        if not reply.get("accepted") and relative is not None:
            self._skew = (epoch, relative)  # the new normal for this plan: do not keep asking
            self.detector.reset()

    # ---- leader ----------------------------------------------------------------------------------
    async def _on_request(self, peer: str, payload: Any) -> dict[str, Any]:
        reason = payload.get("reason") if isinstance(payload, dict) else None
        if not isinstance(reason, str) or not reason or len(reason) > 1000:
            return {"accepted": False, "reason": "a rebalance request needs a reason (a string)"}
        measured = payload.get("metrics")
        return await self.handle(reason, peer, measured if isinstance(measured, dict) else None)

    async def handle(
        self, reason: str, asker: str, measured: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Leader: decide on one rebalance request and publish the new plan if it is worth it.

        ``measured``: the asker's stage metrics as of its request, fresher than what gossip has."""
        svc = self.service
        self.requests += 1
        if not svc.node.is_leader:
            return {"accepted": False, "reason": "not the leader", "leader": svc.node.leader_id}
        if not self.config.enabled:
            return {"accepted": False, "reason": "rebalancing is disabled on the leader"}
        async with self._lock:
            published = svc._published()
            if svc.manifest is None or not published or not published.get("plan"):
                return {"accepted": False, "reason": "no plan in force"}
            current = Plan.from_dict(published["plan"])
            since = time.monotonic() - self._last_change
            if since < self.config.cooldown_s:
                return {"accepted": False, "cooldown": True,
                        "reason": f"the plan changed {since:.0f} s ago (cooldown)"}
            self._refresh_speeds(current, {asker: measured} if measured else None)
            profiles = self.adjust(svc._profiles())
            links = svc._links(list(profiles))
            epoch = svc._max_epoch() + 1
            now = time.monotonic()
            self._accepted = [a for a in self._accepted if now - a.at < CHURN_WINDOW_S]
            bar = churn_min_gain(self.config.min_gain, undelivered(self._accepted, now))
            config = dataclasses.replace(self.config, min_gain=bar)
            try:
                decision = await asyncio.to_thread(
                    decide, svc.manifest, profiles, links, self.options(), current, config,
                    epoch=epoch, live_tokens=self.live_tokens(),
                )
            except PlanError as exc:
                return {"accepted": False, "reason": f"re-solving failed: {exc}"}
            data = {
                "reason": reason, "asker": asker, "old": describe(current), "new": describe(decision.plan),
                "predicted_gain": round(decision.predicted_gain, 4) if math.isfinite(decision.predicted_gain)
                else None,
                "current_tokens_per_s": round(decision.current_tokens_per_s, 3),
                "new_tokens_per_s": round(decision.new_tokens_per_s, 3),
                "solve_s": round(decision.solve_s, 3), "min_gain": config.min_gain,
            }
            if not decision.accept or decision.plan is None:
                # a refusal starts the cooldown too (without it, noisy speeds on two equal nodes got
                # re-solved for every asker until one solve saw a "gain"); an asker refused for the
                # cooldown asks again after another window instead of re-basing
                self._last_change = time.monotonic()
                svc.event("rebalance-rejected", f"{decision.reason}; asked because {reason}", **data)
                return {"accepted": False, **data, "reason": decision.reason}
            self._publish(decision.plan, why="rebalance")
            self._accepted.append(Accepted(time.monotonic(), decision.plan.epoch, decision.predicted_gain))
            before = self._measured_bottleneck_s(current, {asker: measured} if measured else None)
            self._pending = _Pending(decision.plan.epoch, before or 0.0,
                                     time.monotonic())
            self.accepted += 1
            svc.event(
                "rebalance",
                f"epoch {epoch}: {describe(current)} -> {describe(decision.plan)}, predicted "
                f"{decision.current_tokens_per_s:.1f} -> {decision.new_tokens_per_s:.1f} tok/s "
                f"({decision.predicted_gain:+.0%}); because {reason}",
                epoch=epoch, **data,
            )
            return {"accepted": True, **data}

    def _publish(self, plan: Plan, *, why: str) -> None:
        from llnode.pipeline.service import PLAN_KEY

        svc = self.service
        entry = {"model": svc.model, "epoch": plan.epoch, "leader": svc.node.node_id, "plan": plan.to_dict(),
                 "why": why}
        svc.node.gossip.set_local(PLAN_KEY, entry)
        self._last_change = time.monotonic()

    def _measured_bottleneck_s(
        self, plan: Plan, fresh: Mapping[str, Mapping[str, Any]] | None = None
    ) -> float | None:
        """The slowest stage as measured (sustained decode ms of the range plus the predicted hop), if all
        report. ``fresh``: an asker's own metrics as of its request, which replace its gossiped ones (a
        node asking because its quota was just cut sends the figure under the new quota; gossip still
        had the old one, and the measured gain was then judged against a state that no longer existed)."""
        worst = 0.0
        metrics = {**self._metrics(), **(fresh or {})}
        for s in plan.stages:
            m = metrics.get(s.device_id, {})
            ms = measured_ms(m, recent=False)
            if m.get("epoch") != plan.epoch or ms is None or m.get("steps", 0) < 8:
                return None
            worst = max(worst, ms / 1000.0 + s.link_s)
        return worst or None

    def _check_measured_gain(self, plan: Plan, now: float) -> None:
        pending = self._pending
        if pending is None or plan.epoch != pending.epoch:
            return
        after = self._measured_bottleneck_s(plan)
        if after is None:
            if now - pending.at > 300:
                self._pending = None
            return
        self._pending = None
        gain = pending.before_s / after - 1.0 if pending.before_s > 0 else math.nan
        for a in self._accepted:
            if a.epoch == plan.epoch and not math.isnan(gain):
                a.measured = gain
        self.service.event(
            "rebalance-measured",
            f"epoch {plan.epoch}: measured bottleneck {pending.before_s * 1e3:.1f} -> {after * 1e3:.1f} "
            f"ms/token ({gain:+.0%})",
            epoch=plan.epoch, measured_gain=None if math.isnan(gain) else round(gain, 4),
            before_ms=round(pending.before_s * 1e3, 3), after_ms=round(after * 1e3, 3),
        )

    # ---- benchmarks only -------------------------------------------------------------------------
    async def _on_impose(self, request: web.Request) -> web.Response:
        """POST {"stages": [[node name or id, start, end], ...]}: publish exactly this plan (leader only).

        Only enabled with ``LLNODE_BENCH_IMPOSE=1``: it lets a benchmark measure plans the solver would
        not choose (even split, brute-force candidates) on the same running cluster.
        """
        svc = self.service
        if not svc.node.is_leader:
            return web.json_response({"error": "not the leader", "leader": svc.node.leader_id}, status=409)
        try:
            body = await request.json()
            stages = body["stages"]
            profiles = svc._profiles()
            names = {p.name or d: d for d, p in profiles.items()}
            ranges = [(names.get(str(d), str(d)), int(s), int(e)) for d, s, e in stages]
            if svc.manifest is None:
                raise PlanError("no model loaded yet")
            plan = price(svc.manifest, profiles, svc._links(list(profiles)), svc.plan_options, ranges,
                         epoch=svc._max_epoch() + 1)
        except (ValueError, KeyError, TypeError, PlanError) as exc:
            return web.json_response({"error": f"bad plan: {exc}"}, status=400)
        with contextlib.suppress(AttributeError):
            svc._planned_key = (tuple(sorted(profiles)), svc.manifest_sha)
        self._publish(plan, why="imposed")
        svc.event("plan", f"epoch {plan.epoch}: imposed {describe(plan)}", epoch=plan.epoch)
        return web.json_response({"epoch": plan.epoch, "plan": describe(plan)})
