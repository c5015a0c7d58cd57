"""Two real StageWorkers wired in one event loop: batched decode and chunked prefill keep greedy exact.

Several sessions step concurrently through a 2-stage pipeline of the tiny Llama (entry -> stage 0 ->
stage 1 -> entry), as the entry node drives them; their decode steps meet at the stages and run as
batches. Every session's greedy tokens must equal the single-process chain's, and batches must really
have formed. A long prompt is prefilled in chunks while the others decode, with the same exactness.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llnode.model.manifest import load_manifest
from llnode.model.runner import ChainRunner, ModuleRunner
from llnode.pipeline import protocol, stage
from llnode.pipeline.protocol import Step
from llnode.pipeline.sampling import SamplingConfig
from llnode.pipeline.stage import StageWorker

TOKENS = 12


class Wire:
    """The two stages and the entry on one loop: ``send`` routes what a stage puts on a link."""

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
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def send(self, peer: str, msg_type: str, payload: dict[str, Any]) -> None:
        if msg_type == protocol.STEP:
            await self.workers[peer].submit(payload)
        elif msg_type == protocol.TOKEN:
            self.waiters.pop(payload["session"]).set_result(payload)

    async def generate(self, session: str, prompt: list[int]) -> list[int]:
        """What the entry node does: a reset step with the prompt, then one step per token."""
        history, out = list(prompt), []
        for n in range(TOKENS):
            reset = n == 0
            step = Step(session=session, epoch=1, seq=n + 1, entry="entry",
                        pos0=0 if reset else len(history) - 1, ids=list(history) if reset else [history[-1]],
                        reset=reset,
                        sampling=SamplingConfig(temperature=0) if reset else None)  # fmt: skip
            self.waiters[session] = asyncio.get_running_loop().create_future()
            await self.send("a", protocol.STEP, step.to_wire(None))
            reply = await asyncio.wait_for(self.waiters[session], 60)
            assert "error" not in reply, reply
            history.append(reply["token"])
            out.append(reply["token"])
        return out

    async def run(self, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
        for w in self.workers.values():
            w.start_worker()
        try:
            results = await asyncio.gather(*(self.generate(s, p) for s, p in prompts.items()))
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
        assert w.sessions == 0  # closing freed every session's cache


def test_batching_off_gives_the_same_tokens(tiny_llama_shards: Path) -> None:
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [4, 11, 6])
    wire = Wire(tiny_llama_shards, max_batch=1)
    assert asyncio.run(wire.run(prompts)) == _reference(tiny_llama_shards, prompts)
    assert all(set(w.batch_sizes) == {1} for w in wire.workers.values())


def test_long_prompt_is_prefilled_in_chunks_between_decodes(
    tiny_llama_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage, "PREFILL_CHUNK", 4)
    prompts = _prompts(load_manifest(tiny_llama_shards).vocab_size, [3, 41, 2])
    wire = Wire(tiny_llama_shards)
    got = asyncio.run(wire.run(prompts))
    assert got == _reference(tiny_llama_shards, prompts)
    for w in wire.workers.values():
        assert w.prefill_chunks >= 41 // 4 + 3  # the long prompt alone took 11 chunks at each stage
