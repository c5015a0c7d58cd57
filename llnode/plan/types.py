"""Planner data types: what a device and a link measured, what the planner was asked, and what it decided.

Everything here round-trips through plain JSON dicts (``to_dict``/``from_dict``) because profiles and
plans are gossiped between nodes and written to files; ``from_dict`` rejects bad input with a
:class:`PlanError` instead of a ``KeyError`` deep inside a solver.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

OBJECTIVES = ("throughput", "latency")
SOLVERS = ("auto", "cbc", "highs", "dp", "brute")


class PlanError(ValueError):
    """Bad planner input (malformed profile, unknown option)."""


class PlanInfeasible(PlanError):
    """The model does not fit on the given devices; ``missing_bytes`` says by how much at least."""

    def __init__(self, message: str, missing_bytes: int) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


def _num(data: dict[str, Any], key: str, kind: str, *, positive: bool = False) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanError(f"{kind} field {key!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise PlanError(f"{kind} field {key!r} must be > 0, got {value!r}")
    if value < 0:
        raise PlanError(f"{kind} field {key!r} must be >= 0, got {value!r}")
    return float(value)


def _from_dict(cls: Any, data: Any, kind: str) -> dict[str, Any]:
    """Check keys against the dataclass so that a typo is an error, not a silently ignored field."""
    if not isinstance(data, dict):
        raise PlanError(f"{kind} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PlanError(f"{kind} has unknown field(s) {unknown}; known: {sorted(names)}")
    return dict(data)


@dataclass(frozen=True)
class DeviceProfile:
    """One device as measured by :func:`llnode.plan.profile.profile_device` (never assumed).

    Speeds are *effective* FLOP/s obtained by timing real modules of the model and dividing their
    FLOPs by the time taken; the planner scales them to the other modules by FLOPs. Decode is
    memory-bound on CPUs, so decode and prefill speeds differ and are measured separately.
    """

    device_id: str
    decode_flops_per_s: float
    memory_available_bytes: int
    prefill_flops_per_s: float = 0.0  # 0 -> same as decode
    module_overhead_s: float = 0.0  # fixed cost per module run (session.run call)
    # A range runs as fused blocks of ``fuse_block`` modules, one ``session.run`` each
    # (``llnode.model.runner``); each run costs ``call_overhead_s`` beyond its modules' own work, and
    # every stage step ``step_overhead_s`` more (the daemon's own CPU: frames, hand-off, event loop).
    # The cost model prices a range as fixed + per-module (``llnode.plan.costs.stage_fixed_s``).
    call_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    fuse_block: int = 1
    name: str = ""
    memory_total_bytes: int = 0
    cores: int = 1
    battery_pct: float | None = None  # None: no battery (mains powered) or not reported
    charging: bool | None = None
    load: float = 0.0  # 0..1, how busy the device is with other work
    profile_s: float = 0.0  # what profiling itself cost
    measured: dict[str, float] = field(default_factory=dict)  # raw figures behind the speeds

    def __post_init__(self) -> None:
        if not self.device_id:
            raise PlanError("device_id must be a non-empty string")
        if not (self.decode_flops_per_s > 0 and math.isfinite(self.decode_flops_per_s)):
            raise PlanError(f"device {self.device_id}: decode_flops_per_s must be > 0")
        if self.memory_available_bytes < 0:
            raise PlanError(f"device {self.device_id}: memory_available_bytes must be >= 0")

    @property
    def prefill_speed(self) -> float:
        return self.prefill_flops_per_s if self.prefill_flops_per_s > 0 else self.decode_flops_per_s

    @property
    def label(self) -> str:
        return self.name or self.device_id

    def with_measured_decode(self, flops_per_token: float, seconds_per_token: float) -> DeviceProfile:
        """A copy whose decode speed comes from a measured running range (used by rebalancing)."""
        if seconds_per_token <= 0 or flops_per_token <= 0:
            raise PlanError("measured flops and seconds per token must be > 0")
        return _replace(self, decode_flops_per_s=flops_per_token / seconds_per_token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DeviceProfile:
        d = _from_dict(cls, data, "device profile")
        for key in ("device_id", "decode_flops_per_s", "memory_available_bytes"):
            if key not in d:
                raise PlanError(f"device profile {d.get('device_id', '?')!r} lacks required field {key!r}")
        if not isinstance(d["device_id"], str):
            raise PlanError("device_id must be a string")
        kind = f"device {d['device_id']!r}"
        _num(d, "decode_flops_per_s", kind, positive=True)
        d["memory_available_bytes"] = int(_num(d, "memory_available_bytes", kind))
        numeric = ("prefill_flops_per_s", "module_overhead_s", "call_overhead_s", "step_overhead_s")
        for key in (*numeric, "fuse_block", "memory_total_bytes", "cores", "load"):
            if key in d:
                _num(d, key, kind)
        if "fuse_block" in d:
            d["fuse_block"] = max(1, int(d["fuse_block"]))
        if d.get("battery_pct") is not None:
            pct = _num(d, "battery_pct", kind)
            if pct > 100:
                raise PlanError(f"{kind}: battery_pct must be within 0..100, got {pct}")
        if "memory_total_bytes" in d:
            d["memory_total_bytes"] = int(d["memory_total_bytes"])
        if "cores" in d:
            d["cores"] = int(d["cores"])
        if "measured" in d and not isinstance(d["measured"], dict):
            raise PlanError(f"{kind}: measured must be an object")
        return cls(**d)


def _replace(profile: DeviceProfile, **changes: Any) -> DeviceProfile:
    return DeviceProfile(**{**asdict(profile), **changes})


@dataclass(frozen=True)
class LinkProfile:
    """A directed link as measured over the real peer link: round trip time and bandwidth."""

    src: str
    dst: str
    rtt_s: float
    bandwidth_bytes_per_s: float
    samples: int = 0

    def time_s(self, nbytes: float) -> float:
        """One-way time to send ``nbytes``: half the round trip plus serialisation at the bandwidth."""
        return self.rtt_s / 2.0 + nbytes / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LinkProfile:
        d = _from_dict(cls, data, "link profile")
        for key in ("src", "dst", "rtt_s", "bandwidth_bytes_per_s"):
            if key not in d:
                raise PlanError(f"link profile lacks required field {key!r}")
        kind = f"link {d['src']}->{d['dst']}"
        _num(d, "rtt_s", kind)
        _num(d, "bandwidth_bytes_per_s", kind, positive=True)
        return cls(**d)


@dataclass(frozen=True)
class PlanOptions:
    """What the planner is asked to optimise and under which limits.

    ``cost_context`` is the context length at which per-token FLOPs are costed (attention grows with
    the past); by default half of ``max_context``, the average over a full-length generation.
    """

    objective: str = "throughput"
    solver: str = "auto"
    time_limit_s: float = 10.0
    memory_fraction: float = 0.7
    max_context: int | None = None  # None -> the manifest's max_context
    max_sessions: int = 4
    cost_context: int | None = None
    prefill_chunk: int = 256  # tokens of one prefill step; sizes the activation reserve
    prompt_tokens: int = 128  # for the predicted prefill time of a typical prompt
    runtime_overhead_bytes: int = 150 * 1024 * 1024
    energy_weight: float = 0.0
    movement_weight: float = 0.0
    min_battery_pct: float | None = None  # leave out devices below this that are not charging
    default_rtt_s: float = 0.003
    default_bandwidth_bytes_per_s: float = 12.5e6  # 100 Mbit/s Wi-Fi
    milp_max_devices: int = 16  # above this the MILP runs over the best candidates only
    max_stages: int | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PlanError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.solver not in SOLVERS:
            raise PlanError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not 0 < self.memory_fraction <= 1:
            raise PlanError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.max_sessions < 1:
            raise PlanError("max_sessions must be >= 1")
        if self.energy_weight < 0 or self.movement_weight < 0:
            raise PlanError("energy_weight and movement_weight must be >= 0")
        if self.default_bandwidth_bytes_per_s <= 0:
            raise PlanError("default_bandwidth_bytes_per_s must be > 0")
        if self.milp_max_devices < 1:
            raise PlanError("milp_max_devices must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PlanOptions:
        return cls(**_from_dict(cls, data, "plan options"))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a device and its module range ``[start, end)`` with predicted costs."""

    device_id: str
    start: int
    end: int
    compute_s: float  # decode seconds per token for the range
    link_s: float  # sending this stage's output to the next stage (the last: token back to the first)
    prefill_s: float  # seconds for a prompt of ``PlanOptions.prompt_tokens`` through the range
    memory_bytes: int
    memory_limit_bytes: int
    name: str = ""

    @property
    def stage_s(self) -> float:
        return self.compute_s + self.link_s

    @property
    def modules(self) -> range:
        return range(self.start, self.end)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """The module assignment: which devices, in which order, hold which contiguous module ranges."""

    epoch: int
    objective: str
    solver: str  # what actually produced it: "cbc", "highs", "dp", "brute", with notes on fallbacks
    model: str
    num_modules: int
    stages: list[Stage]
    left_out: dict[str, str]  # device id -> why it takes no part
    bottleneck_s: float
    latency_s: float  # per generated token, through all stages and back to the first
    objective_value: float  # what the solver minimised (main term + optional weighted terms)
    energy_penalty_s: float = 0.0
    movement_penalty_s: float = 0.0
    moved_bytes: int = 0
    optimal: bool = True  # proven optimal for the solved problem (see notes for restrictions)
    solve_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # device id -> why it got its range
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate decode tokens/s with enough concurrent sessions to fill the pipeline."""
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else math.inf

    @property
    def single_stream_tokens_per_s(self) -> float:
        """Tokens/s of one session alone: every token waits for the whole ring."""
        return 1.0 / self.latency_s if self.latency_s > 0 else math.inf

    @property
    def devices(self) -> list[str]:
        return [s.device_id for s in self.stages]

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {s.device_id: (s.start, s.end) for s in self.stages}

    def stage_of_module(self, module: int) -> Stage:
        for s in self.stages:
            if s.start <= module < s.end:
                return s
        raise PlanError(f"module {module} is not in the plan (0..{self.num_modules - 1})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("plan must be a JSON object")
        d = {k: v for k, v in data.items() if k != "tokens_per_s"}
        try:
            d["stages"] = [Stage(**s) for s in d["stages"]]
            plan = cls(**d)
        except (KeyError, TypeError) as exc:
            raise PlanError(f"malformed plan: {exc}") from exc
        plan.check()
        return plan

    def check(self) -> None:
        """Every module placed exactly once, in order, on distinct devices."""
        pos = 0
        seen: set[str] = set()
        for s in self.stages:
            if s.start != pos or s.end <= s.start:
                raise PlanError(f"plan stages are not contiguous at module {pos}")
            if s.device_id in seen:
                raise PlanError(f"device {s.device_id} appears twice in the plan")
            seen.add(s.device_id)
            pos = s.end
        if pos != self.num_modules:
            raise PlanError(f"plan covers modules 0..{pos - 1}, expected 0..{self.num_modules - 1}")

    def explain(self) -> str:
        """Why each device got what it got, and why a device was left out (``llnode plan --explain``)."""
        lines = [
            f"objective {self.objective}: "
            + (
                "minimise the slowest stage (compute + sending its output on), which sets tokens/s "
                "with concurrent sessions"
                if self.objective == "throughput"
                else "minimise one token's trip through every stage and back to the first"
            )
        ]
        if self.energy_penalty_s or self.options.get("energy_weight"):
            lines.append(f"energy term: {self.energy_penalty_s * 1e3:.3f} ms added to the objective")
        if self.moved_bytes or self.options.get("movement_weight"):
            lines.append(
                f"movement term: {self.moved_bytes / 2**20:.1f} MiB of weights to fetch, "
                f"{self.movement_penalty_s * 1e3:.3f} ms added to the objective"
            )
        for i, s in enumerate(self.stages):
            lines.append(f"stage {i} {s.name or s.device_id}: {self.reasons.get(s.device_id, '')}")
        for dev, why in self.left_out.items():
            lines.append(f"left out {dev}: {why}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def table(self) -> str:
        """A fixed-width table for ``llnode plan``."""
        gib = 1024**3
        rows = [
            f"plan epoch {self.epoch} for {self.model}: objective {self.objective}, solver {self.solver}"
            f"{'' if self.optimal else ' (not proven optimal)'}, solved in {self.solve_s:.2f} s",
            f"{'#':>2} {'device':<20} {'modules':>9} {'compute ms':>10} {'link ms':>8} {'stage ms':>8} "
            f"{'prefill ms':>10} {'memory GiB':>15}",
        ]
        for i, s in enumerate(self.stages):
            rows.append(
                f"{i:>2} {(s.name or s.device_id)[:20]:<20} {f'{s.start}-{s.end - 1}':>9} "
                f"{s.compute_s * 1e3:>10.2f} {s.link_s * 1e3:>8.2f} {s.stage_s * 1e3:>8.2f} "
                f"{s.prefill_s * 1e3:>10.1f} "
                f"{f'{s.memory_bytes / gib:.2f}/{s.memory_limit_bytes / gib:.2f}':>15}"
            )
        rows.append(
            f"predicted: {self.tokens_per_s:.1f} tokens/s with concurrent sessions (bottleneck "
            f"{self.bottleneck_s * 1e3:.2f} ms), {self.latency_s * 1e3:.2f} ms per token for one session "
            f"({self.single_stream_tokens_per_s:.1f} tokens/s)"
        )
        for dev, why in self.left_out.items():
            rows.append(f"left out: {dev}: {why}")
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)
