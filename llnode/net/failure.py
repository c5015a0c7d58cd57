"""Heartbeat failure detector: a node is alive while its heartbeat counter keeps growing.

Every node bumps its own counter each gossip round, and counters travel by gossip, so evidence of life
arrives even through third parties (a phone that cannot dial a peer directly still learns it is alive).
A node whose counter has not grown for ``suspect_after`` seconds is *suspect* (still a member, e.g. a
process paused by SIGSTOP or a phone that dozed), after ``dead_after`` it is *dead*. Any later growth
(a resumed process) or a new incarnation (a restarted one) makes it alive again by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"


class FailureDetector:
    def __init__(
        self, suspect_after: float, dead_after: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0 < suspect_after < dead_after:
            raise ValueError("need 0 < suspect_after < dead_after")
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self._clock = clock
        self._last: dict[str, float] = {}

    def heard(self, node_id: str, *, fresh: bool = True) -> None:
        """Record progress of ``node_id`` now; ``fresh=False`` records a node first seen already dead."""
        self._last[node_id] = self._clock() if fresh else self._clock() - self.dead_after - 1.0

    def forget(self, node_id: str) -> None:
        self._last.pop(node_id, None)

    def silent_for(self, node_id: str) -> float:
        last = self._last.get(node_id)
        return float("inf") if last is None else self._clock() - last

    def status(self, node_id: str) -> str:
        silent = self.silent_for(node_id)
        if silent < self.suspect_after:
            return ALIVE
        if silent < self.dead_after:
            return SUSPECT
        return DEAD
