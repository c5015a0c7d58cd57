"""HTTP shape of the OpenAI routes, over real loopback sockets, with a scripted engine.

The engine here is a unit-test double (byte-level tokenizer, a fixed reply per request) so that every
response, chunk, stop-string edge and error can be asserted exactly; the end-to-end tests with the real
module chain are in test_api_local.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer

from llnode.api import require_token, setup_openai_routes
from llnode.pipeline.engine import ChatMessage, Engine, EngineUnavailable, GenerationRequest

EOS = 256
REPLY = "Hello, wörld! 🌍 The river ends here. Done."


class ByteTokenizer:
    """One token per UTF-8 byte (so multi-byte characters really do span tokens), 256 = end of text."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class ScriptedEngine:
    """Replies REPLY (then EOS) to everything; counts live sessions like a real engine's KV cache."""

    def __init__(self, reply: str = REPLY, delay_s: float = 0.0, max_context: int = 512) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self._max_context = max_context
        self.live: set[str] = set()
        self.requests: list[GenerationRequest] = []
        self.not_ready: str | None = None
        self.fail_with: Exception | None = None
        self.fail_after: int | None = None  # raise fail_with after this many tokens instead of at once
        self._tokenizer = ByteTokenizer()

    @property
    def model_ids(self) -> Sequence[str]:
        return ["tiny-test", "tiny-alias"]

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    def ready(self) -> str | None:
        return self.not_ready

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        self.requests.append(request)
        if self.fail_with is not None and self.fail_after is None:
            raise self.fail_with
        self.live.add(request.id)
        try:
            for i, token in enumerate([*self.reply.encode("utf-8"), EOS]):
                if i >= request.params.max_tokens:
                    return
                await asyncio.sleep(self.delay_s)
                if token == EOS:
                    return
                if self.fail_with is not None and i == self.fail_after:
                    raise self.fail_with
                yield token
        finally:
            self.live.discard(request.id)


def test_double_satisfies_the_protocol() -> None:
    assert isinstance(ScriptedEngine(), Engine)


async def _client(engine: ScriptedEngine | None, app: web.Application | None = None) -> TestClient[Any, Any]:
    app = app or web.Application()
    setup_openai_routes(app, lambda: engine)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


async def _sse(resp: Any) -> list[Any]:
    """Parse a whole SSE body into JSON payloads (``"[DONE]"`` kept as a string)."""
    text = await resp.text()
    events = [block for block in text.split("\n\n") if block]
    out: list[Any] = []
    for block in events:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_models_list_and_retrieve() -> None:
    client = await _client(ScriptedEngine())
    try:
        resp = await client.get("/v1/models")
        assert resp.status == 200
        body = await resp.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["tiny-test", "tiny-alias"]
        assert all(m["object"] == "model" for m in body["data"])
        resp = await client.get("/v1/models/tiny-alias")
        assert resp.status == 200 and (await resp.json())["id"] == "tiny-alias"
        resp = await client.get("/v1/models/nope")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"
    finally:
        await client.close()
    client = await _client(None)
    try:
        resp = await client.get("/v1/models")
        assert (await resp.json())["data"] == []
    finally:
        await client.close()


async def test_chat_completion_shape_and_usage() -> None:
    engine = ScriptedEngine()
    client = await _client(engine)
    try:
        resp = await client.post("/v1/chat/completions", json=_chat())
        assert resp.status == 200
        body = await resp.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["model"] == "tiny-test"
        assert isinstance(body["created"], int)
        (choice,) = body["choices"]
        assert choice["index"] == 0
        assert choice["message"] == {"role": "assistant", "content": REPLY, "refusal": None}
        assert choice["finish_reason"] == "stop"
        prompt = b"<user>hi\n<assistant>"
        assert body["usage"] == {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(REPLY.encode()),
            "total_tokens": len(prompt) + len(REPLY.encode()),
        }
        # The request the engine got: the templated prompt and the defaults.
        req = engine.requests[-1]
        assert bytes(req.prompt) == prompt
        assert req.params.max_tokens == 512 - len(prompt)  # chat default: the rest of the context
        assert engine.live == set()
    finally:
        await client.close()


async def test_max_tokens_gives_length() -> None:
    client = await _client(ScriptedEngine())
    try:
        resp = await client.post("/v1/chat/completions", json=_chat(max_tokens=5, temperature=0))
        body = await resp.json()
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5
        # 9 tokens end inside "ö" (bytes 8..9): the half character is held back while generation goes
        # on, and only shown (as U+FFFD) because generation really ended in the middle of it.
        resp = await client.post("/v1/chat/completions", json=_chat(max_completion_tokens=9))
        body = await resp.json()
        assert body["choices"][0]["message"]["content"] == "Hello, w\ufffd"
    finally:
        await client.close()


async def test_stream_chunks() -> None:
    engine = ScriptedEngine()
    client = await _client(engine)
    try:
        resp = await client.post("/v1/chat/completions", json=_chat(stream=True))
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await _sse(resp)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert all("usage" not in c for c in chunks)
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert "".join(pieces) == REPLY
        # Incremental UTF-8: multi-byte characters arrive whole, never as U+FFFD halves.
        assert all("\ufffd" not in p for p in pieces)
        assert "ö" in pieces and "🌍" in pieces
        assert engine.live == set()
    finally:
        await client.close()


async def test_stream_include_usage() -> None:
    client = await _client(ScriptedEngine())
    try:
        opts = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
        resp = await client.post("/v1/chat/completions", json=_chat(**opts))
        events = await _sse(resp)
        assert events[-1] == "[DONE]"
        usage_chunk = events[-2]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == 3
        assert all(c["usage"] is None for c in events[:-2])
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["river"], "Hello, wörld! 🌍 The "),
        ("🌍", "Hello, wörld! "),
        (
            ["xyz", "ends", "Hello, wörld! 🌍 The river ends here. Done. and more"],
            "Hello, wörld! 🌍 The river ",
        ),
        (["o, w", "ld"], "Hell"),  # the earliest match wins
        (["Done. not"], REPLY),  # a prefix that never completes is released at the end
    ],
)
async def test_stop_strings(stream: bool, stop: Any, expected: str) -> None:
    engine = ScriptedEngine()
    client = await _client(engine)
    try:
        resp = await client.post("/v1/chat/completions", json=_chat(stop=stop, stream=stream))
        assert resp.status == 200
        if stream:
            chunks = (await _sse(resp))[:-1]
            pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
            text, finish = "".join(pieces), chunks[-1]["choices"][0]["finish_reason"]
            stops = [stop] if isinstance(stop, str) else stop
            # No chunk ever carried a piece of a completed stop string.
            assert not any(s in text for s in stops)
        else:
            body = await resp.json()
            text, finish = body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]
        assert text == expected
        assert finish == "stop"
        assert engine.live == set()  # generation was closed at the stop string
    finally:
        await client.close()


async def test_completions_endpoint() -> None:
    engine = ScriptedEngine()
    client = await _client(engine)
    try:
        resp = await client.post("/v1/completions", json={"model": "tiny-test", "prompt": "Once"})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        # OpenAI's default max_tokens for completions is 16.
        assert body["choices"][0] == {
            "index": 0,
            "text": "Hello, wörld! \ufffd",
            "logprobs": None,
            "finish_reason": "length",
        }
        assert body["usage"]["prompt_tokens"] == 4
        resp = await client.post(
            "/v1/completions",
            json={"model": "tiny-test", "prompt": [[79, 110]], "echo": True, "max_tokens": 5},
        )
        body = await resp.json()
        assert body["choices"][0]["text"] == "OnHello"
        assert engine.requests[-1].prompt == (79, 110)
        resp = await client.post(
            "/v1/completions",
            json={"model": "tiny-test", "prompt": ["Once"], "stream": True, "max_tokens": 100},
        )
        events = await _sse(resp)
        assert events[-1] == "[DONE]"
        assert all(e["object"] == "text_completion" for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == REPLY
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
    finally:
        await client.close()


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    # (path, body (bytes are sent raw), status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", b"\xff\xfe{}", 400, None),
    ("/v1/chat/completions", b'{"model": "tiny-test", "temperature": NaN, "messages": []}', 400, None),
    ("/v1/chat/completions", b"[" * 100000, 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    (
        "/v1/chat/completions",
        b'{"model": "tiny-test", "messages": [{"role": "user", "content": "a\\ud905b"}]}',
        400,
        None,
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", _chat(model=5), 400, "model"),
    ("/v1/chat/completions", _chat(model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", {"model": "tiny-test"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-test", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-test", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-test", "messages": ["hi"]}, 400, "messages[0]"),
    (
        "/v1/chat/completions",
        {"model": "tiny-test", "messages": [{"role": "user"}]},
        400,
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny-test", "messages": [{"role": "bot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny-test", "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "tiny-test",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        400,
        "messages[0].content",
    ),
    ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens=-3), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens=10**30), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens="10"), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens=2.5), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens=True), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens=500), 400, "max_tokens"),  # prompt + 500 > 512 context
    ("/v1/chat/completions", _chat(max_tokens=500, max_completion_tokens=5), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", _chat(temperature=1e308), 400, "temperature"),
    ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("/v1/chat/completions", _chat(top_p=1.5), 400, "top_p"),
    ("/v1/chat/completions", _chat(top_k=-5), 400, "top_k"),
    ("/v1/chat/completions", _chat(top_k=10**12), 400, "top_k"),
    ("/v1/chat/completions", _chat(n=2), 400, "n"),
    ("/v1/chat/completions", _chat(n=0), 400, "n"),
    ("/v1/chat/completions", _chat(seed="abc"), 400, "seed"),
    ("/v1/chat/completions", _chat(seed=2**70), 400, "seed"),
    ("/v1/chat/completions", _chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("/v1/chat/completions", _chat(presence_penalty=3), 400, "presence_penalty"),
    ("/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/chat/completions", _chat(stop=[""]), 400, "stop"),
    ("/v1/chat/completions", _chat(stop=5), 400, "stop"),
    ("/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
    ("/v1/chat/completions", _chat(stream_options={"include_usage": "yes"}), 400, "include_usage"),
    ("/v1/chat/completions", _chat(stream=True, stream_options={"x": 1}), 400, "x"),
    ("/v1/chat/completions", _chat(logprobs=True), 400, "logprobs"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "tools"),
    ("/v1/chat/completions", _chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("/v1/chat/completions", _chat(logit_bias={"5": 10}), 400, "logit_bias"),
    ("/v1/chat/completions", _chat(max_token=5), 400, "max_token"),
    (
        "/v1/chat/completions",
        {"model": "tiny-test", "messages": [{"role": "user", "content": "x" * 600}]},
        400,
        "messages",
    ),
    ("/v1/completions", {"model": "tiny-test"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": "x" * 600}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-test", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": "tiny-test", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "tiny-test", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny-test", "prompt": "x", "echo": "no"}, 400, "echo"),
]


async def test_bad_requests_get_openai_errors() -> None:
    engine = ScriptedEngine()
    client = await _client(engine)
    try:
        for path, body, status, param in BAD_REQUESTS:
            if isinstance(body, bytes):
                resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
            else:
                resp = await client.post(path, json=body)
            assert resp.status == status, (
                path,
                body if not isinstance(body, bytes) else body[:40],
                await resp.text(),
            )
            assert resp.content_type == "application/json"
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert isinstance(err["message"], str) and err["message"]
            assert err["param"] == param, (body, err)
        assert engine.requests == []  # nothing reached the engine
    finally:
        await client.close()


async def test_huge_body_method_and_unknown_path() -> None:
    app = web.Application()
    setup_openai_routes(app, ScriptedEngine, max_body=4096)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await client.post("/v1/chat/completions", data=b'{"a": "' + b"x" * 10000 + b'"}')
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse up front
            for _ in range(10):
                yield b"x" * 1000

        resp = await client.post("/v1/chat/completions", data=chunks())
        assert resp.status == 413
        resp = await client.get("/v1/chat/completions")
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
        resp = await client.post("/v1/models")
        assert resp.status == 405
        resp = await client.get("/v1/embeddings")
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    finally:
        await client.close()


async def test_slow_body_times_out() -> None:
    app = web.Application()
    setup_openai_routes(app, ScriptedEngine, read_timeout_s=0.5)
    server = TestServer(app)
    await server.start_server()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert b" 408 " in status_line
        writer.close()
    finally:
        await server.close()


async def test_not_ready_is_an_immediate_503() -> None:
    engine = ScriptedEngine()
    engine.not_ready = "no plan yet: waiting for the leader"
    client = await _client(engine)
    try:
        for stream in (False, True):
            resp = await client.post("/v1/chat/completions", json=_chat(stream=stream))
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            err = (await resp.json())["error"]
            assert err["message"] == "no plan yet: waiting for the leader"
            assert err["type"] == "service_unavailable"
        # Bad input is still reported as bad input, not hidden behind the 503.
        resp = await client.post("/v1/chat/completions", json=_chat(temperature=9))
        assert resp.status == 400
        engine.not_ready = None
        engine.fail_with = EngineUnavailable("stage node lost; re-planning")
        for stream in (False, True):
            resp = await client.post("/v1/chat/completions", json=_chat(stream=stream))
            assert resp.status == 503
            assert (await resp.json())["error"]["message"] == "stage node lost; re-planning"
    finally:
        await client.close()
    client = await _client(None)
    try:
        resp = await client.post("/v1/chat/completions", json=_chat())
        assert resp.status == 503
        assert "no model" in (await resp.json())["error"]["message"]
    finally:
        await client.close()


async def _wait_until(pred: Any, limit_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_client_disconnect_frees_the_session() -> None:
    engine = ScriptedEngine(reply="x" * 400, delay_s=0.02)
    app = web.Application()
    setup_openai_routes(app, lambda: engine)
    server = TestServer(app)
    await server.start_server()
    try:
        url = str(server.make_url("/v1/chat/completions"))
        # Streaming: read a few chunks, then drop the connection.
        async with ClientSession() as session:
            resp = await session.post(url, json=_chat(stream=True))
            for _ in range(3):
                await resp.content.readline()
            assert len(engine.live) == 1
            resp.close()
        await _wait_until(lambda: not engine.live)
        # Non-streaming: give up while the engine is still generating.
        async with ClientSession() as session:
            task = asyncio.ensure_future(session.post(url, json=_chat()))
            await _wait_until(lambda: len(engine.live) == 1)
            task.cancel()
        await _wait_until(lambda: not engine.live)
        assert len(engine.requests) == 2
    finally:
        await server.close()


async def test_bearer_token_middleware() -> None:
    app = web.Application(middlewares=[require_token("s3cret")])

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/health", health)
    client = await _client(ScriptedEngine(), app)
    try:
        resp = await client.get("/v1/models")
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
        resp = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
        resp = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert resp.status == 200
        resp = await client.get("/health")
        assert resp.status == 200
    finally:
        await client.close()
    with pytest.raises(ValueError):
        require_token("")


async def test_openapi_document_describes_the_routes() -> None:
    client = await _client(ScriptedEngine())
    try:
        resp = await client.get("/openapi.json")
        doc = await resp.json()
        assert doc["openapi"].startswith("3.")
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])
        schema = doc["components"]["schemas"]["ChatCompletionRequest"]
        assert schema["required"] == ["model", "messages"]
        assert schema["properties"]["temperature"]["maximum"] == 2
    finally:
        await client.close()


async def test_openai_client_against_the_routes() -> None:
    openai = pytest.importorskip("openai")
    engine = ScriptedEngine()
    client = await _client(engine)
    try:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        out = await api.chat.completions.create(
            model="tiny-test", messages=[{"role": "user", "content": "hi"}]
        )
        assert out.choices[0].message.content == REPLY
        assert out.usage is not None and out.usage.completion_tokens == len(REPLY.encode())
        stream = await api.chat.completions.create(
            model="tiny-test", messages=[{"role": "user", "content": "hi"}], stream=True, stop=["river"]
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello, wörld! 🌍 The "
        with pytest.raises(openai.BadRequestError, match="temperature"):
            await api.chat.completions.create(
                model="tiny-test", messages=[{"role": "user", "content": "hi"}], temperature=5
            )
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        models = await api.models.list()
        assert [m.id for m in models.data] == ["tiny-test", "tiny-alias"]
        await api.close()
    finally:
        await client.close()


async def test_chat_command_streams_and_keeps_history() -> None:
    """``llnode chat`` as a user runs it (a subprocess fed on stdin) against a live server."""
    import sys

    engine = ScriptedEngine(reply="Rivers run.")
    client = await _client(engine)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llnode", "chat", "--node", str(client.make_url("")), "--temperature", "0",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(b"hi\nagain\n/reset\nhello\n"), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().splitlines() == [
            "Rivers run.",
            "Rivers run.",
            "(conversation reset)",
            "Rivers run.",
        ]
        prompts = [bytes(r.prompt).decode() for r in engine.requests]
        assert prompts[0] == "<user>hi\n<assistant>"
        assert prompts[1] == "<user>hi\n<assistant>Rivers run.\n<user>again\n<assistant>"
        assert prompts[2] == "<user>hello\n<assistant>"
        assert all(r.params.temperature == 0 for r in engine.requests)
        # A node that is not there: a clear message and exit code 1, no traceback.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llnode", "chat", "--node", "http://127.0.0.1:9",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(b""), 60)
        assert proc.returncode == 1
        assert b"cannot use http://127.0.0.1:9" in err and b"Traceback" not in err
    finally:
        await client.close()


async def test_failure_mid_stream_is_reported_in_band() -> None:
    engine = ScriptedEngine()
    engine.fail_with, engine.fail_after = EngineUnavailable("stage lost; no survivors hold the model"), 5
    client = await _client(engine)
    try:
        resp = await client.post("/v1/chat/completions", json=_chat(stream=True))
        assert resp.status == 200  # headers were sent with the first token
        events = await _sse(resp)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["message"] == "stage lost; no survivors hold the model"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        assert text == "Hello"
        engine.fail_with = RuntimeError("boom")
        resp = await client.post("/v1/chat/completions", json=_chat(stream=True))
        events = await _sse(resp)
        assert events[-2]["error"]["type"] == "server_error" and "boom" in events[-2]["error"]["message"]
        # Not streaming, nothing sent yet: a proper status code.
        engine.fail_with = EngineUnavailable("stage lost")
        resp = await client.post("/v1/chat/completions", json=_chat())
        assert resp.status == 503
        assert engine.live == set()
    finally:
        await client.close()
