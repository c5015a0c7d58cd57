"""What a stage measures about itself, gossiped so that every node (and the dashboard) sees it.

Exponentially weighted ms per token for prefill and decode, queue length and busy fraction: the
inputs of drift detection and rebalancing, and what the planner's predictions are checked against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


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

    def record(self, tokens: int, seconds: float, *, prefill: bool) -> None:
        per_token_ms = 1000.0 * seconds / max(tokens, 1)
        if prefill:
            self.prefill_ms_per_token = _ewma(self.prefill_ms_per_token, per_token_ms, self.alpha)
        else:
            self.decode_ms = _ewma(self.decode_ms, per_token_ms, self.alpha)
        self.tokens += tokens
        self.steps += 1
        self._busy_s += seconds

    def busy_fraction(self) -> float:
        span = time.monotonic() - self._since
        return min(1.0, self._busy_s / span) if span > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "decode_ms": self.decode_ms,
            "prefill_ms_per_token": self.prefill_ms_per_token,
            "queue": self.queue_length,
            "tokens": self.tokens,
            "steps": self.steps,
            "busy": round(self.busy_fraction(), 4),
        }


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
