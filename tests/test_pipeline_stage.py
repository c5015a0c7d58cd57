"""Two real StageWorkers wired in one event loop: batched decode and chunked prefill keep greedy exact.

Several sessions step concurrently through a 2-stage pipeline of the tiny Llama (entry -> stage 0 ->
stage 1 -> entry), driven by the real entry (DistributedEngine); their decode steps meet at the stages
and run as batches. Every session's greedy tokens must equal the single-process chain's, and batches
must really have formed. A long prompt is prefilled in chunks while the others decode, just as exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from llnode.model.manifest import load_manifest
from llnode.model.runner import ChainRunner, ModuleRunner
from llnode.pipeline import protocol
from llnode.pipeline.distributed import DistributedEngine, Route
from llnode.pipeline.engine import GenerationParams, GenerationRequest
from llnode.pipeline.protocol import Step
from llnode.pipeline.stage import StageWorker

TOKENS = 12
T = TypeVar("T")


class Wire:
    """Two stages and a real entry (DistributedEngine) on one loop; ``send`` routes what goes on a link."""

    def __init__(self, shards: Path, *, max_batch: int = 0) -> None:
        manifest = load_manifest(shards)
        cut = manifest.num_modules // 2
        self.workers = {
            "a": StageWorker(node_id="a", epoch=1, manifest=manifest, send=self.send, next_node="b",
                             stages=2, runner=ModuleRunner(shards, manifest, 0, cut)),
            "b": StageWorker(node_id="b", epoch=1, manifest=manifest, send=self.send, next_node=None,
                             stages=2, runner=ModuleRunner(shards, manifest, cut, manifest.num_modules)),
        }  # fmt: skip
        for w in self.workers.values():
            w.max_batch = max_batch
        self.manifest = manifest

    async def send(self, peer: str, msg_type: str, payload: dict[str, Any]) -> None:
        if msg_type == protocol.STEP:
            await self.workers[peer].submit(payload)
        elif msg_type == protocol.FREE:
            self.workers[peer].free(payload["session"])
        elif msg_type == protocol.TOKEN:
            self.engine.on_token(payload)

    def start(self) -> None:
        route = Route(epoch=1, nodes=("a", "b"))
        self.engine = DistributedEngine(
            node_id="entry", model_ids=["m"], max_context=self.manifest.max_context,
            vocab_size=self.manifest.vocab_size, eos_ids=[], tokenizer=None,  # type: ignore[arg-type]
            route=lambda: route, route_changed=asyncio.Condition(), not_ready_reason=lambda: "",
            send=self.send,
        )  # fmt: skip
        for w in self.workers.values():
            w.start_worker()

    async def generate(
        self, prompt: list[int], tokens: int = TOKENS, stop_after: int | None = None
    ) -> list[int]:
        """One greedy generation, as a client calling the entry node; the client leaves after
        ``stop_after`` tokens if given."""
        params = GenerationParams(max_tokens=tokens, temperature=0)
        out: list[int] = []
        gen = self.engine.generate(GenerationRequest(prompt=tuple(prompt), params=params))
        async for token in gen:
            out.append(token)
            if len(out) == stop_after:
                break
        await gen.aclose()  # type: ignore[attr-defined]  # an async generator, as the API uses it
        return out

    async def run(self, prompts: dict[str, list[int]], stop_after: int | None = None) -> dict[str, list[int]]:
        """Generate every prompt at once; ``stop_after``: the first prompt's client leaves that early."""
        self.start()
        try:
            stops = [stop_after] + [None] * (len(prompts) - 1)
            results = await asyncio.gather(
                *(self.generate(p, stop_after=stop) for p, stop in zip(prompts.values(), stops, strict=True))
            )
            for w in self.workers.values():  # let the frees queued behind the last steps run
                await asyncio.get_running_loop().run_in_executor(w._executor, lambda: None)
            self.left = {name: w.sessions for name, w in self.workers.items()}
            return dict(zip(prompts, results, strict=True))
        finally:
            for w in self.workers.values():
                await w.close()


def _prompts(vocab: int, lengths: list[int]) -> dict[str, list[int]]:
    rng = np.random.default_rng(5)
    return {f"s{i}": rng.integers(3, vocab, n).tolist() for i, n in enumerate(lengths)}


def _reference(shards: Path, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    chain = ChainRunner(shards)
    return {s: chain.generate(p, TOKENS, session_id=s) for s, p in prompts.items()}


def test_concurrent_sessions_batch_and_stay_greedy_exact(tiny_llama_shards: Path) -> None:
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [3, 9, 17, 5, 30, 2])
    wire = Wire(tiny_llama_shards)
    got = asyncio.run(wire.run(prompts))
    assert got == _reference(tiny_llama_shards, prompts)
    for w in wire.workers.values():
        assert max(w.batch_sizes) > 1, w.batch_sizes  # decode steps did meet and ran as one call
    assert wire.left == {"a": 0, "b": 0}  # every finished session was freed on every stage


def test_client_gone_mid_stream_frees_its_session_and_others_go_on(tiny_llama_shards: Path) -> None:
    """The next step is already in flight when a client leaves: its session is still freed everywhere."""
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [6, 3, 8])
    wire = Wire(tiny_llama_shards)
    got = asyncio.run(wire.run(prompts, stop_after=4))
    want = _reference(tiny_llama_shards, prompts)
    assert got["s0"] == want["s0"][:4]
    assert got["s1"] == want["s1"] and got["s2"] == want["s2"]
    assert wire.left == {"a": 0, "b": 0}


def test_batching_off_gives_the_same_tokens(tiny_llama_shards: Path) -> None:
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [4, 11, 6])
    wire = Wire(tiny_llama_shards, max_batch=1)
    assert asyncio.run(wire.run(prompts)) == _reference(tiny_llama_shards, prompts)
    assert all(set(w.batch_sizes) == {1} for w in wire.workers.values())


def test_long_prompt_is_prefilled_in_chunks_between_decodes(tiny_llama_shards: Path) -> None:
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [3, 41, 2])
    wire = Wire(tiny_llama_shards)
    for w in wire.workers.values():
        w.prefill_chunk = 4
    got = asyncio.run(wire.run(prompts))
    assert got == _reference(tiny_llama_shards, prompts)
    for w in wire.workers.values():
        assert w.prefill_chunks >= 41 // 4 + 3  # the long prompt alone took 11 chunks at each stage


def _slowed(fn: Callable[[list[Step]], T]) -> Callable[[list[Step]], T]:
    def slow(steps: list[Step]) -> T:
        time.sleep(0.01)
        return fn(steps)

    return slow


def test_a_new_session_is_not_held_back_by_others_decoding(tiny_llama_shards: Path) -> None:
    """Four sessions decoding through two stages keep a decode step waiting at every moment; a late
    session's prefill must still get its turn (it used to wait until they had all finished)."""
    vocab = load_manifest(tiny_llama_shards).vocab_size
    prompts = _prompts(vocab, [5, 7, 4, 6, 3])
    wire = Wire(tiny_llama_shards, max_batch=1)  # no batching: one session's step at a time
    for w in wire.workers.values():  # decode steps as slow as a real model's, next to the event loop
        w._compute_decodes = _slowed(w._compute_decodes)  # type: ignore[method-assign,assignment]
    finished: list[str] = []

    async def one(name: str, tokens: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await wire.generate(prompts[name], tokens=tokens)
        finished.append(name)

    async def scenario() -> None:
        wire.start()
        try:
            await asyncio.gather(*(one(f"s{i}", 60, 0) for i in range(4)), one("s4", 3, 0.1))
        finally:
            for w in wire.workers.values():
                await w.close()

    asyncio.run(scenario())
    assert finished[0] == "s4", finished


class LossyWire(Wire):
    """The link from stage a to stage b drops once, taking the ``lose_at``-th step on it with it (written
    into the connection, never read): what a dropped or replaced TCP connection does to frames in flight."""

    def __init__(self, shards: Path, lose_at: int) -> None:
        super().__init__(shards)
        self.lose_at = lose_at
        self.steps_to_b = 0

    async def send(self, peer: str, msg_type: str, payload: dict[str, Any]) -> None:
        if peer == "b" and msg_type == protocol.STEP:
            self.steps_to_b += 1
            if self.steps_to_b == self.lose_at:
                # The links layer calls the disconnect hooks once it notices (service._on_link_down).
                asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(
                    self.workers["a"].link_down("b")))  # fmt: skip
                return
        await super().send(peer, msg_type, payload)


def test_a_step_lost_with_a_dropped_link_is_retried_at_once(tiny_llama_shards: Path) -> None:
    """A decode step lost on the link between two stages is reported to the entry by the stage that sent
    it, when that link goes down: the session re-prefills and its greedy output is exact. Before, the
    entry waited out its 30 s step timeout, the client seeing neither a token nor an error; the route
    here allows 10 minutes per step, so only the report can finish the generation within the wait."""
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [5, 8])
    wire = LossyWire(tiny_llama_shards, lose_at=6)  # a decode step of one of them
    orig_start = wire.start

    def start() -> None:
        orig_start()
        route = Route(epoch=1, nodes=("a", "b"), step_timeout_s=600)
        wire.engine._route = lambda: route

    wire.start = start  # type: ignore[method-assign]

    async def bounded() -> dict[str, list[int]]:
        return await asyncio.wait_for(wire.run(prompts), 60)

    assert asyncio.run(bounded()) == _reference(tiny_llama_shards, prompts)
    assert wire.steps_to_b > 6
    # The lost step was re-prefilled through the report; the other session's newest step on that link is
    # reported too if its token had not come back yet (a harmless re-prefill): at most one per session.
    assert 1 <= wire.engine.recoveries <= len(prompts)
    assert wire.left == {"a": 0, "b": 0}
