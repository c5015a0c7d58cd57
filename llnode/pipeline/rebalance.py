"""Runtime load balancing: notice when stages drift from the plan, re-plan with measured speeds.

Why: the start-up profile is a snapshot. A phone heats up and throttles, a laptop starts a build, a
battery saver kicks in; the plan that was best at start then leaves a stage as the bottleneck.

- **Drift** (every node, about its own stage): the stage's EWMA decode ms per token (gossiped under
  ``metrics``) is compared with a baseline, the plan's predicted ``compute_s`` for the range. Drift is a
  ratio off by more than ``threshold`` (either way) that stays so for ``window_s`` and ``min_samples``
  fresh measurements; a measurement back within ``clear`` resets it (hysteresis: noise around the
  threshold never fires). A node that detects drift asks the leader with a ``plan.rebalance`` peer-link
  request carrying the reason.
- **Decision** (leader): every stage's measured decode time becomes a measured speed
  (:meth:`DeviceProfile.with_measured_decode` over the range's FLOPs); speeds measured on earlier plans
  are remembered per device. The current plan is priced with those speeds, the plan is re-solved with the
  movement term against the current plan, and the new plan is published only if its predicted tokens/s
  beats the current one by ``min_gain``. A rejected request re-bases the asking node's baseline on what
  it measures, so the same drift does not ask again and again.
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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llnode.model.manifest import Manifest
from llnode.plan.costs import ModelCosts, build_instance, evaluate
from llnode.plan.solve import make_plan, solve
from llnode.plan.types import DeviceProfile, LinkProfile, Plan, PlanError, PlanOptions

if TYPE_CHECKING:
    from llnode.pipeline.service import PipelineService

log = logging.getLogger(__name__)

REBALANCE_MSG = "plan.rebalance"
IMPOSE_PATH = "/api/bench/impose-plan"
SPEED_TTL_S = 300.0  # how long a measured speed outlives its last fresh measurement


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
    impose: bool = False  # benchmarks only: accept POST /api/bench/impose-plan on this node

    def __post_init__(self) -> None:
        if not 1.0 < self.clear <= self.threshold:
            raise ValueError(f"need 1 < clear <= threshold, got {self.clear} and {self.threshold}")
        if self.window_s < 0 or self.min_samples < 1 or self.min_gain < 0 or self.cooldown_s < 0:
            raise ValueError("window_s, min_gain, cooldown_s must be >= 0 and min_samples >= 1")
        if self.movement_weight < 0:
            raise ValueError("movement_weight must be >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RebalanceConfig:
        """``LLNODE_REBALANCE=0`` disables; ``LLNODE_REBALANCE_<FIELD>`` sets a field
        (THRESHOLD, CLEAR, WINDOW_S, MIN_SAMPLES, MIN_GAIN, COOLDOWN_S, MOVEMENT_WEIGHT);
        ``LLNODE_BENCH_IMPOSE=1`` enables the benchmark-only plan override."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"LLNODE_REBALANCE_{f.name.upper()}")
            if raw is None or f.name in ("enabled", "impose"):
                continue
            try:
                kw[f.name] = int(raw) if f.name == "min_samples" else float(raw)
            except ValueError as exc:
                raise ValueError(f"LLNODE_REBALANCE_{f.name.upper()}={raw!r} is not a number") from exc
        kw["enabled"] = env.get("LLNODE_REBALANCE", "1") not in ("0", "false", "no", "off")
        kw["impose"] = env.get("LLNODE_BENCH_IMPOSE", "0") in ("1", "true", "yes", "on")
        return cls(**kw)


@dataclass
class _Track:
    over_since: float | None = None
    samples: int = 0
    fired: bool = False


@dataclass
class DriftDetector:
    """Threshold + sustained window + hysteresis over a stream of measured/baseline ratios per key."""

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
        if now - track.over_since >= self.config.window_s and track.samples >= self.config.min_samples:
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
        seconds = max(seconds - (end - start) * base.module_overhead_s, 0.1 * seconds)
        if flops <= 0:
            continue
        new = base.with_measured_decode(flops, seconds)
        scale = new.decode_flops_per_s / base.decode_flops_per_s
        prefill = base.prefill_flops_per_s * scale if base.prefill_flops_per_s > 0 else 0.0
        out[dev] = dataclasses.replace(new, prefill_flops_per_s=prefill)
    return out


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


def decide(
    model: Manifest | ModelCosts,
    profiles: Mapping[str, DeviceProfile],
    links: list[LinkProfile],
    options: PlanOptions,
    current: Plan,
    config: RebalanceConfig,
    *,
    epoch: int,
) -> Decision:
    """Re-solve with ``profiles`` (measured speeds) and the movement term; accept only a real gain."""
    live = [s for s in current.stages if s.device_id in profiles]
    if len(live) == len(current.stages):
        now_plan = price(model, profiles, links, options, [(s.device_id, s.start, s.end) for s in live])
        now_tps = now_plan.tokens_per_s
    else:
        now_tps = 0.0  # a stage node has no profile any more: anything that serves is a gain
    opts = dataclasses.replace(options, movement_weight=max(options.movement_weight, config.movement_weight))
    new = solve(model, list(profiles.values()), links, opts, current=current, epoch=epoch)
    gain = new.tokens_per_s / now_tps - 1.0 if now_tps > 0 else math.inf
    if new.ranges() == current.ranges():
        return Decision(False, "the best plan is the current one", 0.0, now_tps, new.tokens_per_s, None)
    if gain < config.min_gain:
        return Decision(
            False,
            f"predicted gain {gain:+.1%} is below the {config.min_gain:.0%} threshold",
            gain, now_tps, new.tokens_per_s, None,
        )
    return Decision(True, f"predicted gain {gain:+.1%}", gain, now_tps, new.tokens_per_s, new)


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
        self._seen_steps: dict[str, int] = {}
        self._baseline: tuple[int, float] | None = None  # (epoch, ms) for this node's stage
        self._last_change = time.monotonic()
        self._last_epoch: int | None = None
        self._asking: asyncio.Task[None] | None = None
        self._pending: _Pending | None = None
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
            "baseline_ms": None if self._baseline is None else round(self._baseline[1], 3),
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

    def _refresh_speeds(self, plan: Plan) -> None:
        ranges = plan.ranges()
        for dev, m in self._metrics().items():
            ms, rng = m.get("decode_ms"), m.get("range")
            if not isinstance(ms, (int, float)) or not isinstance(rng, list) or len(rng) != 2:
                continue
            if m.get("epoch") != plan.epoch or tuple(rng) != ranges.get(dev):
                continue
            self.speeds[dev] = (int(rng[0]), int(rng[1]), float(ms))
            steps = m.get("steps")
            if not isinstance(steps, int) or self._speed_seen.get(dev, (None, 0.0))[0] != steps:
                self._speed_seen[dev] = (steps if isinstance(steps, int) else -1, time.monotonic())

    def adjust(self, profiles: dict[str, DeviceProfile]) -> dict[str, DeviceProfile]:
        """Profiles with the speeds measured while serving (used for every plan the leader makes)."""
        manifest = self.service.manifest
        if manifest is None or not self.config.enabled:
            return profiles
        costs = ModelCosts.from_manifest(manifest, self.service.plan_options)
        # a speed nobody re-measured for SPEED_TTL_S (e.g. a device the plan left out because it was slow)
        # is forgotten: the start-up profile applies again, so a device that recovered gets a chance
        now = time.monotonic()
        fresh = {
            d: v for d, v in self.speeds.items()
            if d in profiles and now - self._speed_seen.get(d, (0, now))[1] < SPEED_TTL_S
        }
        return measured_profiles(costs, profiles, fresh)

    # ---- every tick ------------------------------------------------------------------------------
    async def tick(self) -> None:
        plan = self.service.following
        if plan is None:
            return
        now = time.monotonic()
        if plan.epoch != self._last_epoch:
            self._last_epoch = plan.epoch
            self._last_change = now
            self._baseline = None
            self.detector.reset()
        self._refresh_speeds(plan)
        if self.service.node.is_leader:
            self._check_measured_gain(plan, now)
        if self.config.enabled:
            self._detect(plan, now)

    def _detect(self, plan: Plan, now: float) -> None:
        worker = self.service.worker
        if worker is None or worker.epoch != plan.epoch:
            return
        snap = worker.metrics.snapshot()
        steps, ms = snap.get("steps", 0), snap.get("decode_ms")
        key = f"{worker.start}-{worker.end}"
        if not isinstance(ms, float) or steps == self._seen_steps.get(key):
            return  # nothing new measured: a stale EWMA is no evidence
        self._seen_steps[key] = steps
        if self._baseline is None or self._baseline[0] != plan.epoch:
            stage = next((s for s in plan.stages if s.device_id == self.service.node.node_id), None)
            if stage is None:
                return
            self._baseline = (plan.epoch, 1000.0 * stage.compute_s)
        baseline = self._baseline[1]
        if self.detector.observe(key, ms, baseline, now):
            reason = (
                f"stage [{worker.start},{worker.end}) on {self.service.node.name}: {ms:.1f} ms/token, "
                f"{ms / baseline:.2f}x the {baseline:.1f} ms expected, for {self.config.window_s:.0f} s"
            )
            if self._asking is None or self._asking.done():
                self._asking = asyncio.create_task(self._ask(reason, ms))

    async def _ask(self, reason: str, measured_ms: float) -> None:
        """Ask the leader (or ourselves) for a rebalance; a refusal re-bases our expectation."""
        self.service.event("drift", reason)
        node = self.service.node
        leader = node.leader_id
        if leader is None:
            return
        try:
            if leader == node.node_id:
                reply = await self.handle(reason, node.node_id)
            else:
                raw = await node.links.request(leader, REBALANCE_MSG, {"reason": reason}, timeout=60.0)
                reply = raw if isinstance(raw, dict) else {"accepted": False, "reason": "bad reply"}
        except Exception as exc:  # the leader may be dying; the detector fires again on the next episode
            log.warning("rebalance request failed: %s", exc)
            self.detector.reset()
            return
        if not reply.get("accepted") and self._baseline is not None:
            self._baseline = (self._baseline[0], measured_ms)  # this is the new normal for this plan
            self.detector.reset()

    # ---- leader ----------------------------------------------------------------------------------
    async def _on_request(self, peer: str, payload: Any) -> dict[str, Any]:
        reason = payload.get("reason") if isinstance(payload, dict) else None
        if not isinstance(reason, str) or not reason or len(reason) > 1000:
            return {"accepted": False, "reason": "a rebalance request needs a reason (a string)"}
        return await self.handle(reason, peer)

    async def handle(self, reason: str, asker: str) -> dict[str, Any]:
        """Leader: decide on one rebalance request and publish the new plan if it is worth it."""
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
                return {"accepted": False, "reason": f"the plan changed {since:.0f} s ago (cooldown)"}
            self._refresh_speeds(current)
            profiles = self.adjust(svc._profiles())
            links = svc._links(list(profiles))
            epoch = svc._max_epoch() + 1
            try:
                decision = await asyncio.to_thread(
                    decide, svc.manifest, profiles, links, svc.plan_options, current, self.config, epoch=epoch
                )
            except PlanError as exc:
                return {"accepted": False, "reason": f"re-solving failed: {exc}"}
            data = {
                "reason": reason, "asker": asker, "old": describe(current), "new": describe(decision.plan),
                "predicted_gain": round(decision.predicted_gain, 4) if math.isfinite(decision.predicted_gain)
                else None,
                "current_tokens_per_s": round(decision.current_tokens_per_s, 3),
                "new_tokens_per_s": round(decision.new_tokens_per_s, 3),
            }
            if not decision.accept or decision.plan is None:
                self._last_change = time.monotonic()  # do not re-solve for every asker right away
                svc.event("rebalance-rejected", f"{decision.reason}; asked because {reason}", **data)
                return {"accepted": False, **data, "reason": decision.reason}
            self._publish(decision.plan, why="rebalance")
            self._pending = _Pending(decision.plan.epoch, self._measured_bottleneck_s(current) or 0.0,
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

    def _measured_bottleneck_s(self, plan: Plan) -> float | None:
        """The slowest stage as measured (decode ms of the range plus the predicted hop), if all report."""
        worst = 0.0
        metrics = self._metrics()
        for s in plan.stages:
            m = metrics.get(s.device_id, {})
            ms = m.get("decode_ms")
            if m.get("epoch") != plan.epoch or not isinstance(ms, (int, float)) or m.get("steps", 0) < 8:
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
