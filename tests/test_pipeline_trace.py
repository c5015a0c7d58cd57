"""Per-hop tracing of decode steps, and what it shows: micro-batches keep both stages busy at once.

Real StageWorkers of the tiny Llama wired on one loop (``Wire`` of test_pipeline_stage) with the real
entry; the entry traces every decode step and the last stage returns the marks with the token.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from test_pipeline_stage import Wire, _prompts, _reference, _slowed

from llnode.bench.pipeline import hop_summary
from llnode.model.manifest import load_manifest
from llnode.pipeline import protocol
from llnode.pipeline.protocol import ProtocolError, parse_step
from llnode.pipeline.trace import MAX_SEGMENTS, HopProfile, parse_trace

STAGE_MARKS = ["recv", "queued", "take", "run", "ort", "done", "back", "send"]


class TracingWire(Wire):
    """Traces every decode step and keeps the traces the last stage sends back with the tokens."""

    def __init__(self, shards: Path, **kw: Any) -> None:
        super().__init__(shards, **kw)
        self.traces: list[list[list[Any]]] = []

    def start(self) -> None:
        super().start()
        self.engine.trace_every = 1

    async def send(self, peer: str, msg_type: str, payload: dict[str, Any]) -> None:
        if msg_type == protocol.TOKEN and "trace" in payload:
            self.traces.append([list(m) for m in payload["trace"]])
        await super().send(peer, msg_type, payload)


def test_every_decode_step_is_traced_through_every_stage(tiny_llama_shards: Path) -> None:
    manifest = load_manifest(tiny_llama_shards)
    prompts = _prompts(manifest.vocab_size, [5, 9])
    wire = TracingWire(tiny_llama_shards)
    got = asyncio.run(wire.run(prompts))
    assert got == _reference(tiny_llama_shards, prompts)  # tracing changes nothing in the answers
    cut = manifest.num_modules // 2
    want = ["entry.send", *(f"s0.{m}" for m in STAGE_MARKS), *(f"s{cut}.{m}" for m in STAGE_MARKS)]
    # every decode step of both sessions (the prefills are not traced); the first has no previous wake
    assert len(wire.traces) == 2 * (len(next(iter(got.values()))) - 1)
    for trace in wire.traces:
        labels = [label for label, _ in trace]
        assert labels[-len(want):] == want
        assert labels[0] in ("entry.wake", "entry.send")
        times = [t for _, t in trace]
        assert times == sorted(times)
    profile = wire.engine.hops.snapshot()
    assert profile["steps"] == len(wire.traces)
    names = [row[0] for row in profile["segments"]]
    assert names[0] == "entry.wake -> entry.send" and names[-1] == "entry.token -> entry.wake"
    assert f"s0.send -> s{cut}.recv" in names  # the hop between the stages
    assert profile["mean_ms"] > 0
    # the segments' means add up to the mean step (what a client sees per token)
    assert sum(row[1] for row in profile["segments"]) == pytest.approx(profile["mean_ms"], rel=0.05)


def test_micro_batches_keep_both_stages_busy_at_once(tiny_llama_shards: Path) -> None:
    """Four sessions through two stages form two groups of two: while stage a runs one group, stage b
    runs the other, so the stages' compute intervals intersect (one group of four would alternate)."""
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [4, 6, 3, 5])
    wire = TracingWire(tiny_llama_shards)
    for w in wire.workers.values():  # compute as slow as a real model's next to the event loop
        w._compute_decodes = _slowed(w._compute_decodes)  # type: ignore[method-assign,assignment]
    got = asyncio.run(wire.run(prompts))
    assert got == _reference(tiny_llama_shards, prompts)
    cut = load_manifest(tiny_llama_shards).num_modules // 2

    def busy(trace: list[list[Any]], stage: int) -> tuple[float, float]:
        marks = dict((label, t) for label, t in trace)
        return marks[f"s{stage}.take"], marks[f"s{stage}.back"]

    a = {busy(t, 0) for t in wire.traces}
    b = {busy(t, cut) for t in wire.traces}
    overlaps = sum(1 for a0, a1 in a for b0, b1 in b if a0 < b1 and b0 < a1)
    assert overlaps >= len(a) // 2, (overlaps, len(a))
    for w in wire.workers.values():
        assert max(w.batch_sizes) == 2, w.batch_sizes  # ceil(4 sessions / 2 stages)


def test_hop_profile_reports_means_medians_and_order() -> None:
    profile = HopProfile()
    assert profile.snapshot() == {"steps": 0, "mean_ms": None, "median_ms": None, "segments": []}
    profile.add([["a", 1.000], ["b", 1.001], ["c", 1.004]])
    profile.add([["a", 2.000], ["b", 2.003], ["c", 2.004]])
    snap = profile.snapshot()
    assert snap["steps"] == 2
    assert [row[0] for row in snap["segments"]] == ["a -> b", "b -> c"]
    assert snap["segments"][0][1] == pytest.approx(2.0)  # mean ms of 1 and 3
    assert snap["mean_ms"] == pytest.approx(4.0)


def test_a_profile_keeps_a_bounded_number_of_segments() -> None:
    """Labels come from peers: a stream of ever-new labels must not grow the profile without end."""
    profile = HopProfile()
    for i in range(1000):
        profile.add([[f"a{i}", 1.0], [f"b{i}", 1.001]])
    assert len(profile.snapshot()["segments"]) == MAX_SEGMENTS
    profile.add([["a0", 2.0], ["b0", 2.002]])  # a known segment still counts
    first = profile.snapshot()["segments"][0]
    assert first[0] == "a0 -> b0" and first[1] == pytest.approx(1.5)  # mean of 1 ms and 2 ms


@pytest.mark.parametrize(
    "trace",
    [
        "x",
        [["a"]],
        [["a", "late"]],
        [[1, 2.0]],
        [["", 2.0]],
        [["a", True]],
        [["a", 1.0]] * 65,
        [["x" * 41, 1.0]],
    ],
)
def test_a_malformed_trace_is_rejected_with_a_reason(trace: Any) -> None:
    payload = {"session": "s", "epoch": 1, "seq": 1, "entry": "e", "pos0": 0, "ids": [1], "trace": trace}
    with pytest.raises(ProtocolError, match="trace"):
        parse_step(payload, 100)
    with pytest.raises(ValueError, match="trace"):
        parse_trace(trace)


def test_a_trace_travels_with_the_step() -> None:
    payload = {"session": "s", "epoch": 1, "seq": 1, "entry": "e", "pos0": 0, "ids": [1],
               "trace": [["entry.send", 12.5]]}  # fmt: skip
    step = parse_step(payload, 100)
    assert step.trace == [["entry.send", 12.5]]
    assert step.to_wire(None)["trace"] == [["entry.send", 12.5]]
    untraced = {k: v for k, v in payload.items() if k != "trace"}
    assert "trace" not in parse_step(untraced, 100).to_wire(None)


def _threads_of_decodes(wire: Wire) -> dict[str, set[int]]:
    """Wrap each stage's decode computation to record the thread it runs on."""
    seen: dict[str, set[int]] = {name: set() for name in wire.workers}
    for name, w in wire.workers.items():
        compute = w._compute_decodes

        def on_thread(steps: list[Any], compute: Any = compute, name: str = name) -> Any:
            seen[name].add(threading.get_ident())
            return compute(steps)

        w._compute_decodes = on_thread  # type: ignore[method-assign]
    return seen


def test_a_lone_session_decodes_on_the_event_loop_thread(tiny_llama_shards: Path) -> None:
    """With inline_decode on (LLNODE_INLINE_DECODE=1), one session's steps skip the hand-off to the
    worker thread and back (two thread wake-ups per stage per token); answers unchanged. Off (the
    default), the worker thread runs them."""
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [7])
    for inline in (True, False):
        wire = Wire(tiny_llama_shards)
        for w in wire.workers.values():
            w.inline_decode = inline
        seen = _threads_of_decodes(wire)
        main = threading.get_ident()  # asyncio.run runs the loop on this thread
        assert asyncio.run(wire.run(prompts)) == _reference(tiny_llama_shards, prompts)
        for threads in seen.values():
            assert (threads == {main}) is inline, threads


def test_several_sessions_decode_on_the_worker_thread(tiny_llama_shards: Path) -> None:
    """With more than one session the loop stays free to gather and forward the others' steps."""
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [4, 6, 3])
    wire = Wire(tiny_llama_shards)
    seen = _threads_of_decodes(wire)
    main = threading.get_ident()
    assert asyncio.run(wire.run(prompts)) == _reference(tiny_llama_shards, prompts)
    for threads in seen.values():
        assert threads - {main}, threads  # the batches ran on the worker thread


def test_bench_sorts_a_profile_by_kind() -> None:
    """What `bench pipeline` prints: a profile's segment means summed by kind."""
    profile = {"segments": [
        ["entry.wake -> entry.send", 0.05, 0, 0], ["entry.send -> s0.recv", 0.5, 0, 0],
        ["s0.take -> s0.run", 0.2, 0, 0], ["s0.run -> s0.ort", 20.0, 0, 0], ["s0.ort -> s0.done", 0.1, 0, 0],
        ["s0.done -> s0.back", 0.3, 0, 0], ["s0.send -> s9.recv", 0.4, 0, 0],
        ["s9.run -> s9.ort", 15.0, 0, 0], ["s9.send -> entry.token", 0.6, 0, 0],
    ]}  # fmt: skip
    kinds = hop_summary(profile)
    assert kinds["onnxruntime"] == pytest.approx(35.0)
    assert kinds["sampling"] == pytest.approx(0.1)
    assert kinds["thread hand-offs"] == pytest.approx(0.5)
    assert kinds["links"] == pytest.approx(1.5)  # entry -> stage 0, stage 0 -> stage 9, stage 9 -> entry
    assert kinds["rest"] == pytest.approx(0.05)


def test_bench_latency_is_the_median_fresh_cluster() -> None:
    """`bench pipeline` reports the median of several fresh clusters' latencies (lower middle if even)."""
    from llnode.bench.pipeline import _median_run

    runs = [{"decode_ms": 43.5, "id": "a"}, {"decode_ms": 36.9, "id": "b"}, {"decode_ms": 38.2, "id": "c"}]
    assert _median_run(runs)["id"] == "c"
    assert _median_run(runs[:2])["id"] == "b"
    assert _median_run(runs[:1])["id"] == "a"
