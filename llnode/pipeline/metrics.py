"""What a stage measures about itself, gossiped so that every node (and the dashboard) sees it.

Exponentially weighted ms per token for prefill and decode, queue length, busy fraction over the last
``BUSY_WINDOW_S`` and the context length its sessions are at: the inputs of drift detection and
rebalancing, and what the planner's predictions are checked against. The context matters because a
decode step's cost grows with it: a measurement is only comparable with a prediction made for the same
context (see :func:`llnode.pipeline.rebalance.expected_ms`).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

BUSY_WINDOW_S = 30.0  # busy fraction over this recent window (a cumulative one hides a slowdown)
RECENT_STEPS = 7  # decode_ms_recent: the median of this many latest decode steps


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

    def record(self, tokens: int, seconds: float, *, prefill: bool) -> None:
        per_token_ms = 1000.0 * seconds / max(tokens, 1)
        if prefill:
            self.prefill_ms_per_token = _ewma(self.prefill_ms_per_token, per_token_ms, self.alpha)
        else:
            self.decode_ms = _ewma(self.decode_ms, per_token_ms, self.alpha)
            self._recent.append(per_token_ms)
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

    def snapshot(self) -> dict[str, Any]:
        return {
            "decode_ms": self.decode_ms,
            "decode_ms_recent": self.recent_decode_ms(),
            "prefill_ms_per_token": self.prefill_ms_per_token,
            "queue": self.queue_length,
            "tokens": self.tokens,
            "steps": self.steps,
            "busy": round(self.busy_fraction(), 4),
        }


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
