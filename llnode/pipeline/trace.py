"""Per-hop timing of decode steps: where one token's time goes between the entry and the stages.

Why: one stream through two daemons cost 10-15 ms per token more than the same modules in one process,
and only a timestamp at every hand-off says which hand-off. The entry marks some decode steps (every
``LLNODE_TRACE_EVERY``-th, default 16; 1 = every step, 0 = none): the step carries a list of
``[label, time]`` marks, every stage appends its own (received, queued, taken into a batch, on the
worker thread, onnxruntime done, sampled, back on the event loop, sent on), the last stage returns the
list with the token, and the entry adds the last marks and folds the differences into a
:class:`HopProfile` (``/api/status`` -> ``pipeline.hops``; ``llnode bench pipeline`` prints it).

Marks are wall-clock (``time.time``): on one machine every process reads the same clock, so a segment
from one node to the next is the hop itself; across devices it also holds their clock offset (NTP keeps
it to a few ms), while segments within a node stay exact.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import defaultdict, deque
from typing import Any

MAX_MARKS = 64
MAX_LABEL = 40
KEEP = 256  # traced steps the profile summarises (the most recent)
MAX_SEGMENTS = 256  # distinct segments a profile keeps (labels come from peers: bound the memory)

Trace = list[list[Any]]  # [[label, seconds], ...]


def mark(trace: Trace | None, label: str) -> None:
    """Append ``[label, now]`` to a step's trace (nothing if the step is not traced or the trace is full)."""
    if trace is not None and len(trace) < MAX_MARKS:
        trace.append([label, time.time()])


def parse_trace(value: Any) -> Trace:
    """A trace as received from a peer: a short list of ``[label, time]``; ``ValueError`` otherwise."""
    if not isinstance(value, list) or len(value) > MAX_MARKS:
        raise ValueError(f"trace must be a list of at most {MAX_MARKS} marks")
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not 0 < len(item[0]) <= MAX_LABEL
            or isinstance(item[1], bool)
            or not isinstance(item[1], int | float)
        ):
            raise ValueError("a trace mark must be [label, time]")
    return value


class HopProfile:
    """Durations between consecutive marks of the last :data:`KEEP` traced steps, by segment.

    A segment is named ``"a -> b"`` after its two marks; :meth:`snapshot` reports its mean, median and
    90th percentile over recent steps, in the order the marks occur. Means add up to the mean step (what
    a client's tokens/s sees); medians say what a typical step costs, without the stalls.
    """

    def __init__(self, keep: int = KEEP) -> None:
        self._segments: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))
        self._order: dict[str, int] = {}
        self._totals: deque[float] = deque(maxlen=keep)

    def add(self, trace: Trace) -> None:
        if len(trace) < 2:
            return
        names = [f"{a} -> {b}" for (a, _), (b, _) in itertools.pairwise(trace)]
        if len(self._segments.keys() | names) > MAX_SEGMENTS:
            return  # labels that keep changing (a misbehaving peer): not a profile worth the memory
        for i, (name, ((_, ta), (_, tb))) in enumerate(zip(names, itertools.pairwise(trace), strict=True)):
            self._segments[name].append(1000.0 * (tb - ta))
            self._order.setdefault(name, i)
        self._totals.append(1000.0 * (trace[-1][1] - trace[0][1]))

    @property
    def steps(self) -> int:
        return len(self._totals)

    def snapshot(self) -> dict[str, Any]:
        """``{steps, mean_ms, median_ms, segments: [[name, mean_ms, median_ms, p90_ms], ...]}``."""
        if not self._totals:
            return {"steps": 0, "mean_ms": None, "median_ms": None, "segments": []}
        rows = []
        for name in sorted(self._segments, key=lambda n: self._order[n]):
            values = sorted(self._segments[name])
            p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
            stats = (statistics.fmean(values), statistics.median(values), p90)
            rows.append([name, *(round(v, 3) for v in stats)])
        return {
            "steps": self.steps,
            "mean_ms": round(statistics.fmean(self._totals), 3),
            "median_ms": round(statistics.median(self._totals), 3),
            "segments": rows,
        }
