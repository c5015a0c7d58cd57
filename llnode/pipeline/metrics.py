"""What a stage measures about itself, gossiped so that every node (and the dashboard) sees it.

Exponentially weighted ms per token for prefill and decode, queue length, busy fraction over the last
``BUSY_WINDOW_S`` and the context length its sessions are at: the inputs of drift detection and
rebalancing, and what the planner's predictions are checked against. The context matters because a
decode step's cost grows with it: a measurement is only comparable with a prediction made for the same
context (see :func:`llnode.pipeline.rebalance.expected_ms`).

Beside wall-clock time, the process CPU time per decode token and the process's CPU limit give the
*sustained* ms per token, ``max(wall, cpu / limit)``: under a CFS quota a stage with little work runs
its steps in bursts at full speed, so its wall time per step overstates what it can sustain once it is
given more (a drift run's corrective rebalances measured -33 % / -22 % against +270 % / +60 %
predicted). CPU time per token does not depend on the quota, so the sustained figure also moves the
moment a quota is cut, before the wall time shows it.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llnode.net.resources import cpu_limit
from llnode.plan.profile import sustained

BUSY_WINDOW_S = 30.0  # busy fraction over this recent window (a cumulative one hides a slowdown)
RECENT_STEPS = 7  # decode_ms_recent: the median of this many latest decode steps
RECENT_CPU_STEPS = 16  # cpu_ms: CPU seconds over tokens of this many latest decode steps
# CPU time between two steps further apart than this is not charged to the second: the stage was idle,
# and what the process did meanwhile (gossip, HTTP) is not a cost of its tokens.
IDLE_GAP_S = 0.25
LIMIT_EVERY_S = 0.25  # re-read the CPU limit at most this often (a quota can change at run time)


class _Sessions(Protocol):
    def sessions(self) -> list[str]: ...

    def context_length(self, session_id: str) -> int: ...


def live_context(runner: _Sessions) -> float | None:
    """Mean cache length of the sessions a stage holds now (None without sessions).

    Every session passes every stage, so this is also the pipeline's context: what per-token decode
    FLOPs must be costed at to compare with what the stage measures.
    """
    lengths = [runner.context_length(s) for s in runner.sessions()]
    lengths = [n for n in lengths if n > 0]
    return sum(lengths) / len(lengths) if lengths else None


@dataclass
class StageMetrics:
    alpha: float = 0.2
    decode_ms: float | None = None
    prefill_ms_per_token: float | None = None
    queue_length: int = 0
    tokens: int = 0
    steps: int = 0
    _busy_s: float = 0.0
    _since: float = field(default_factory=time.monotonic)
    _marks: deque[tuple[float, float]] = field(default_factory=deque)  # (when, busy seconds so far)
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    cpu_ms: float | None = None  # EWMA of process CPU ms per decode token
    limit_reader: Callable[[], float] = cpu_limit  # cores this process may use (quota, affinity)
    clock: Callable[[], tuple[float, float]] = field(
        default_factory=lambda: lambda: (time.monotonic(), time.process_time())
    )  # (wall, process CPU) seconds; injectable so tests can feed a known quota's figures
    _cpu_mark: tuple[float, float] | None = None  # (wall, CPU) at the end of the previous step
    _recent_cpu: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=RECENT_CPU_STEPS))
    _limit: tuple[float, float] | None = None  # (when read, cores)

    def record(self, tokens: int, seconds: float, *, prefill: bool) -> None:
        per_token_ms = 1000.0 * seconds / max(tokens, 1)
        wall, cpu = self.clock()
        mark, self._cpu_mark = self._cpu_mark, (wall, cpu)
        if prefill:
            self.prefill_ms_per_token = _ewma(self.prefill_ms_per_token, per_token_ms, self.alpha)
        else:
            self.decode_ms = _ewma(self.decode_ms, per_token_ms, self.alpha)
            self._recent.append(per_token_ms)
            # The whole process's CPU since the previous step (what the quota charges: onnxruntime's
            # threads, the links' frames, the event loop) is this step's cost, unless the stage sat idle.
            if mark is not None and wall - mark[0] - seconds <= IDLE_GAP_S and cpu >= mark[1]:
                used = cpu - mark[1]
                self.cpu_ms = _ewma(self.cpu_ms, 1000.0 * used / max(tokens, 1), self.alpha)
                self._recent_cpu.append((max(tokens, 1), used))
        self.tokens += tokens
        self.steps += 1
        self._busy_s += seconds
        now = time.monotonic()
        self._marks.append((now, self._busy_s))
        while len(self._marks) > 1 and now - self._marks[1][0] >= BUSY_WINDOW_S:
            self._marks.popleft()

    def busy_fraction(self) -> float:
        """Share of about the last ``BUSY_WINDOW_S`` (or of the stage's life, if shorter) spent computing.

        The anchor is the newest step mark at least a window old; ``record`` keeps exactly one such mark.
        """
        now = time.monotonic()
        t0, busy0 = self._since, 0.0
        for when, busy in self._marks:
            if now - when < BUSY_WINDOW_S:
                break
            t0, busy0 = when, busy
        span = now - t0
        return min(1.0, (self._busy_s - busy0) / span) if span > 0 else 0.0

    def recent_decode_ms(self) -> float | None:
        """The median ms per token of the last ``RECENT_STEPS`` decode steps (None before any).

        Why beside the EWMA: the EWMA (what drift detection judges, smooth so that noise never fires)
        lags a step change: after a device is cut to a tenth of a core it still showed 2x when the truth
        was 3x, and the leader, pricing the device from it, gave it too much work twice (two rebalances
        measured -15 % and -27 % before a third left it out). A median follows a step change within
        half its window and ignores one- to three-step spikes: what a *speed* should be taken from.
        """
        return statistics.median(self._recent) if self._recent else None

    def cpu_limit(self) -> float:
        """Cores this process may use now, re-read at most every ``LIMIT_EVERY_S``."""
        now = self.clock()[0]
        if self._limit is None or now - self._limit[0] >= LIMIT_EVERY_S:
            self._limit = (now, self.limit_reader())
        return self._limit[1]

    def recent_cpu_ms(self) -> float | None:
        """Process CPU ms per decode token over the last ``RECENT_CPU_STEPS`` steps (None before any)."""
        tokens = sum(n for n, _ in self._recent_cpu)
        return 1000.0 * sum(c for _, c in self._recent_cpu) / tokens if tokens else None

    def sustained_ms(self, *, recent: bool) -> float | None:
        """ms per decode token this device can sustain: ``max(wall, cpu / limit)``.

        ``recent``: from the median of the latest steps and the CPU over the latest steps (what a speed
        is taken from), else from the EWMAs (what drift detection judges). Wall time alone where no CPU
        was measured."""
        wall = self.recent_decode_ms() if recent else self.decode_ms
        cpu = self.recent_cpu_ms() if recent else self.cpu_ms
        if wall is None or cpu is None:
            return wall
        return sustained(wall, cpu, self.cpu_limit())

    def snapshot(self) -> dict[str, Any]:
        return {
            "decode_ms": self.decode_ms,
            "decode_ms_recent": self.recent_decode_ms(),
            "cpu_ms": self.recent_cpu_ms(),
            "cpu_limit": self.cpu_limit(),
            "sustained_ms": self.sustained_ms(recent=False),
            "sustained_ms_recent": self.sustained_ms(recent=True),
            "prefill_ms_per_token": self.prefill_ms_per_token,
            "queue": self.queue_length,
            "tokens": self.tokens,
            "steps": self.steps,
            "busy": round(self.busy_fraction(), 4),
        }


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
