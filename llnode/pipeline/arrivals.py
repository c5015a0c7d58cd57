"""When each session's next decode step should reach a stage, from that session's own round trips.

Why a stage needs this: with S stages a batched stage runs its sessions as S groups (batch limit
``ceil(sessions / S)``), and a group must stay whole. The steps of one group leave a stage together but
come back one by one (over different entry nodes and links), a few milliseconds apart; a stage that
starts the batch without the stragglers runs each straggler later as a batch of its own, which costs
nearly a whole batch (reading the weights is most of a decode step). Measured with 8 sessions on 2
nodes: groups of 4 broke into 4 + 3 + 1 that kept circulating, so each stage ran three batches per
round instead of two and the stages waited for each other (docs/pipeline.md). Waiting a fixed short
moment does not tell a straggler (due in 2 ms) from a session of the other group (due in a whole batch
time, waiting for it would idle the stage); a session's last round trip does.
"""

from __future__ import annotations

from collections.abc import Iterable

SMOOTHING = 0.5  # weight of the newest round trip in a session's estimate


class Arrivals:
    """Per session: when its last step left this stage and how long its round trips take (smoothed).

    A round trip is the time from a step leaving this stage (its batch or its prefill done here) to the
    session's next step arriving here: the later stages, the entry and the links."""

    def __init__(self) -> None:
        self._left: dict[str, float] = {}
        self._round_trip: dict[str, float] = {}

    def left(self, session: str, at: float) -> None:
        """The session's step just finished here (``at``, monotonic seconds)."""
        self._left[session] = at

    def arrived(self, session: str, at: float) -> None:
        """The session's next step reached this stage: learn the round trip."""
        left = self._left.pop(session, None)
        if left is None:
            return
        took = max(0.0, at - left)
        old = self._round_trip.get(session)
        self._round_trip[session] = took if old is None else old + SMOOTHING * (took - old)

    def forget(self, session: str) -> None:
        self._left.pop(session, None)
        self._round_trip.pop(session, None)

    def expected(self, session: str) -> float | None:
        """When the session's next step should arrive; None if it is here already or never went round."""
        left = self._left.get(session)
        took = self._round_trip.get(session)
        return None if left is None or took is None else left + took

    def due(self, sessions: Iterable[str], now: float, late_by: float) -> list[float]:
        """When the steps of ``sessions`` are expected, soonest first; a session without a round trip
        yet, or late by more than ``late_by`` seconds (its client slowed down, its entry is busy), is not
        counted as coming: waiting for it would only hold the others up."""
        times = (self.expected(session) for session in sessions)
        return sorted(at for at in times if at is not None and at >= now - late_by)
