"""End to end: the OpenAI routes over LocalEngine running real ONNX modules (tiny Llama shard set).

Checks what only a real model can show: the engine equals the plain module chain token for token,
interleaved sessions do not bleed into each other, seeds reproduce, the OpenAI client works unchanged,
and a client that goes away leaves no KV cache behind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer

from llnode.api import setup_openai_routes
from llnode.config import ConfigError
from llnode.model.runner import ChainRunner
from llnode.pipeline import local
from llnode.pipeline.engine import Engine, GenerationParams, GenerationRequest
from llnode.pipeline.local import LocalEngine

MESSAGES = [{"role": "user", "content": "Write a haiku about rivers"}]


@pytest.fixture(scope="module")
def engine(tiny_llama_shards: Path) -> Iterator[LocalEngine]:
    eng = LocalEngine(tiny_llama_shards, aliases=["tiny"])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def chain(tiny_llama_shards: Path) -> ChainRunner:
    return ChainRunner(tiny_llama_shards)


async def _client(engine: LocalEngine) -> TestClient[Any, Any]:
    app = web.Application()
    setup_openai_routes(app, lambda: engine)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


def _prompt(engine: LocalEngine, messages: list[dict[str, str]] = MESSAGES) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.render_chat(messages), add_special_tokens=False)


async def _generate(engine: LocalEngine, prompt: list[int], **params: Any) -> list[int]:
    request = GenerationRequest(tuple(prompt), GenerationParams(**params))
    return [t async for t in engine.generate(request)]


async def _no_live_sessions(engine: LocalEngine) -> None:
    await engine.drain()  # frees are queued behind the last step; after this they have run
    assert engine.live_sessions() == []


def _greedy_reference(chain: ChainRunner, prompt: list[int], n: int) -> list[int]:
    """The chain's greedy tokens, cut at the first end-of-sequence id as the engine does."""
    eos = set(chain.manifest.eos_token_ids)
    out = []
    for t in chain.generate(prompt, n, session_id="reference"):
        if t in eos:
            break
        out.append(t)
    return out


def test_is_an_engine(engine: LocalEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.model_ids[1] == "tiny"
    assert engine.ready() is None


async def test_greedy_equals_the_module_chain(engine: LocalEngine, chain: ChainRunner) -> None:
    for messages in (MESSAGES, [{"role": "user", "content": "1, 2, 3, 4,"}]):
        prompt = _prompt(engine, messages)
        got = await _generate(engine, prompt, max_tokens=24, temperature=0.0)
        assert got == _greedy_reference(chain, prompt, 24)
    await _no_live_sessions(engine)


async def test_interleaved_sessions_and_chunked_prefill(
    engine: LocalEngine, chain: ChainRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent sessions step in turns on one worker; each gets exactly its own sequential answer,
    also when its prompt is prefilled in several chunks."""
    monkeypatch.setenv("LLNODE_PREFILL_CHUNK", "7")
    prompts = [
        _prompt(engine, [{"role": "user", "content": f"Tell me about the number {i}"}]) for i in range(3)
    ]
    assert all(len(p) > 7 for p in prompts)
    expected = [_greedy_reference(chain, p, 16) for p in prompts]
    steps_before = engine.steps
    results = await asyncio.gather(*(_generate(engine, p, max_tokens=16, temperature=0.0) for p in prompts))
    assert list(results) == expected
    chunks = sum(-(-len(p) // 7) for p in prompts)
    decodes = sum(len(r) - 1 for r in results)
    assert engine.steps - steps_before == chunks + decodes
    # Sampled sessions interleaved with others are reproducible by seed.
    a, b, _ = await asyncio.gather(
        _generate(engine, prompts[0], max_tokens=12, temperature=1.0, seed=5),
        _generate(engine, prompts[0], max_tokens=12, temperature=1.0, seed=5),
        _generate(engine, prompts[1], max_tokens=12, temperature=1.0, seed=6),
    )
    assert a == b
    await _no_live_sessions(engine)


def test_prefill_chunk_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's prefill chunk: the default, an override, 0 for whole prompts, and a clear error for a
    value that is not a token count (a typo must not silently prefill whole prompts)."""
    monkeypatch.delenv("LLNODE_PREFILL_CHUNK", raising=False)
    assert local.prefill_chunk() == local.PREFILL_CHUNK == 256
    monkeypatch.setenv("LLNODE_PREFILL_CHUNK", "128")
    assert local.prefill_chunk() == 128
    monkeypatch.setenv("LLNODE_PREFILL_CHUNK", "0")
    assert local.prefill_chunk() >= 1 << 30
    for bad in ("12k", "-5"):
        monkeypatch.setenv("LLNODE_PREFILL_CHUNK", bad)
        with pytest.raises(ConfigError, match="LLNODE_PREFILL_CHUNK"):
            local.prefill_chunk()


async def test_http_chat_plain_and_streamed(engine: LocalEngine) -> None:
    client = await _client(engine)
    try:
        body = {"model": engine.model_ids[0], "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        plain = await resp.json()
        prompt = _prompt(engine)
        assert plain["usage"]["prompt_tokens"] == len(prompt)
        assert plain["choices"][0]["finish_reason"] in ("stop", "length")
        n = plain["usage"]["completion_tokens"]
        tokens = await _generate(engine, prompt, max_tokens=12, temperature=0.0)
        assert n == len(tokens)
        assert plain["choices"][0]["message"]["content"] == engine.tokenizer.decode(tokens)
        assert plain["choices"][0]["finish_reason"] == ("length" if n == 12 else "stop")

        resp = await client.post(
            "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        events = [
            json.loads(line[6:]) for line in (await resp.text()).split("\n\n") if line.startswith("data: {")
        ]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == plain["choices"][0]["message"]["content"]
        assert events[-1]["usage"] == plain["usage"]
    finally:
        await client.close()
    await _no_live_sessions(engine)


async def test_http_seed_and_stop_string(engine: LocalEngine) -> None:
    client = await _client(engine)
    try:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "seed": 1234}

        async def text_of(**extra: Any) -> tuple[str, str]:
            resp = await client.post("/v1/chat/completions", json={**body, **extra})
            assert resp.status == 200, await resp.text()
            choice = (await resp.json())["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]

        first, _ = await text_of()
        again, _ = await text_of()
        assert first == again and len(first) > 10
        other, _ = await text_of(seed=4321)
        assert other != first
        # A stop string taken from the middle of the seeded answer cuts it right there.
        stop = first[len(first) // 2 : len(first) // 2 + 3]
        cut, finish = await text_of(stop=[stop])
        assert cut == first[: first.index(stop)]
        assert finish == "stop"
    finally:
        await client.close()
    await _no_live_sessions(engine)


async def test_http_bad_input_against_the_real_engine(engine: LocalEngine) -> None:
    client = await _client(engine)
    try:
        name = engine.model_ids[0]
        too_long = [5] * engine.max_context
        cases: list[tuple[str, dict[str, Any], int, str]] = [
            ("/v1/completions", {"model": name, "prompt": too_long}, 400, "context_length_exceeded"),
            ("/v1/completions", {"model": name, "prompt": [engine.vocab_size]}, 400, "invalid_value"),
            (
                "/v1/completions",
                {"model": name, "prompt": "hi", "max_tokens": engine.max_context},
                400,
                "context_length_exceeded",
            ),
            ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404, "model_not_found"),
        ]
        for path, body, status, code in cases:
            resp = await client.post(path, json=body)
            assert resp.status == status
            assert (await resp.json())["error"]["code"] == code
    finally:
        await client.close()


async def test_disconnect_mid_stream_frees_the_kv_cache(engine: LocalEngine) -> None:
    client = await _client(engine)
    try:
        room = engine.max_context - len(_prompt(engine))
        steps_before = engine.steps
        url = str(client.make_url("/v1/chat/completions"))
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": room, "stream": True, "temperature": 0}
        async with ClientSession() as session:
            resp = await session.post(url, json=body)
            assert resp.status == 200
            for _ in range(4):
                await resp.content.readline()
            assert len(engine.live_sessions()) == 1
            resp.close()
        for _ in range(200):
            await engine.drain()
            if not engine.live_sessions():
                break
            await asyncio.sleep(0.02)
        assert engine.live_sessions() == []
        assert engine.steps - steps_before < room // 2  # it stopped early, it did not run to the end
    finally:
        await client.close()


async def test_openai_client_unchanged(engine: LocalEngine) -> None:
    openai = pytest.importorskip("openai")
    client = await _client(engine)
    try:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        out = await api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
        text = out.choices[0].message.content
        assert out.usage is not None and out.usage.prompt_tokens == len(_prompt(engine))
        stream = await api.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed == text
        comp = await api.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0
        )
        assert comp.choices[0].finish_reason in ("stop", "length")
        assert comp.usage is not None and comp.usage.completion_tokens <= 5
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            await api.completions.create(model="tiny", prompt="hi", max_tokens=engine.max_context)
        await api.close()
    finally:
        await client.close()
    await _no_live_sessions(engine)


async def test_closed_engine_answers_503(tiny_llama_shards: Path) -> None:
    eng = LocalEngine(tiny_llama_shards)
    eng.close()
    client = await _client(eng)
    try:
        resp = await client.post(
            "/v1/chat/completions", json={"model": eng.model_ids[0], "messages": MESSAGES}
        )
        assert resp.status == 503
        assert "shut down" in (await resp.json())["error"]["message"]
    finally:
        await client.close()


@pytest.mark.slow
async def test_smollm2_answers_sensibly(smollm2_shards: Path) -> None:
    """The real model through the whole stack: template, tokenizer, modules, sampler, detokenizer."""
    eng = LocalEngine(smollm2_shards)
    client = await _client(eng)
    try:
        body = {
            "model": eng.model_ids[0],
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            "max_tokens": 16,
            "temperature": 0,
        }
        resp = await client.post("/v1/chat/completions", json=body)
        done = await resp.json()
        answer = done["choices"][0]["message"]["content"]
        assert "Paris" in answer
        # the answer ends at end-of-text well before the limit; ignore_eos (vLLM's benchmark switch) runs
        # the same greedy stream on to max_tokens, the end-of-text token not shown as text
        assert done["choices"][0]["finish_reason"] == "stop" and done["usage"]["completion_tokens"] < 16
        resp = await client.post("/v1/chat/completions", json={**body, "ignore_eos": True})
        long = await resp.json()
        assert long["usage"]["completion_tokens"] == 16 and long["choices"][0]["finish_reason"] == "length"
        assert long["choices"][0]["message"]["content"].startswith(answer)
        assert "<|im_end|>" not in long["choices"][0]["message"]["content"]
        resp = await client.post("/v1/chat/completions", json={**body, "ignore_eos": "yes"})
        assert resp.status == 400 and "'ignore_eos' must be a boolean" in await resp.text()
    finally:
        await client.close()
        eng.close()
