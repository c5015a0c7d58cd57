"""The OpenAI-compatible HTTP routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Mount them on the node's application with :func:`setup_openai_routes`; they serve from whatever
:class:`~llnode.pipeline.engine.Engine` the ``engine_provider`` returns at request time (``None`` while the
node has no model or plan), so the daemon can swap engines (a new plan, a failover) without touching the
routes.

A request goes: read the body (size-capped, time-capped) -> parse JSON -> validate every field (400s) ->
engine ready? (503 with the reason) -> model name (404) -> chat template + tokenize -> context checks
(400 ``context_length_exceeded``) -> generate. Generation is consumed token by token through a
detokenizer and stop matcher; a stop string, the client going away, or an error closes the engine's
generator, which frees the session's KV cache.

Streaming waits for the first token before sending headers: if the engine turns out unable to serve, the
client still gets a proper 503 instead of a stream that breaks off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from llnode.api.errors import NOT_FOUND, SERVER, ApiError, bad_request, unavailable
from llnode.api.openapi import openapi_document
from llnode.api.validate import ChatBody, CompletionBody, SamplingFields, parse_chat, parse_completion
from llnode.pipeline.detok import TextStream
from llnode.pipeline.engine import (
    Engine,
    EngineUnavailable,
    GenerationParams,
    GenerationRequest,
)

log = logging.getLogger(__name__)

EngineProvider = Callable[[], Engine | None]

DEFAULT_MAX_BODY = 2 << 20  # 2 MiB: far more than any context this project's models hold, as JSON text
DEFAULT_READ_TIMEOUT_S = 30.0
DISCONNECT_POLL_S = 0.25  # how often a request waiting on the engine checks that its client is still there
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ClientGone(Exception):
    """The HTTP client closed its connection; generation is abandoned."""


@dataclass
class _Job:
    """A validated request, ready to run."""

    kind: str  # "chat" | "completion"
    engine: Engine
    model: str
    fields: SamplingFields
    request: GenerationRequest
    echo_text: str = ""


class OpenAIRoutes:
    def __init__(self, engine_provider: EngineProvider, max_body: int, read_timeout_s: float) -> None:
        self.engine_provider = engine_provider
        self.max_body = max_body
        self.read_timeout_s = read_timeout_s
        self.active = 0  # requests currently generating (for status pages)
        self.served = 0

    # ---- entry points -----------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, "POST", self._chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, "POST", self._completions)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, "GET", self._models)

    async def model(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, "GET", self._model)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, "GET", self._openapi)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        err = ApiError(
            404, f"no such endpoint: {request.method} {request.path}", type=NOT_FOUND, code="unknown_url"
        )
        return err.response()

    async def _guard(
        self,
        request: web.Request,
        method: str,
        handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        """Method check, and the one place an error of any kind becomes an OpenAI-shaped answer."""
        if request.method != method:
            return ApiError(
                405,
                f"{request.method} is not allowed here; use {method}",
                code="method_not_allowed",
                headers={"Allow": method},
            ).response()
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as err:
            return err.response()
        except ClientGone:
            # Nobody is listening; aiohttp needs a response object all the same.
            return web.Response(status=499)
        except Exception as exc:  # a bug, not bad input: log it fully, answer in the usual shape
            log.exception("internal error serving %s %s", request.method, request.path)
            return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type=SERVER).response()

    # ---- simple routes ----------------------------------------------------------------------------
    def _model_list(self) -> list[dict[str, Any]]:
        engine = self.engine_provider()
        if engine is None:
            return []
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "llnode"} for name in engine.model_ids
        ]

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": self._model_list()})

    async def _model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        for entry in self._model_list():
            if entry["id"] == name:
                return web.json_response(entry)
        raise ApiError(
            404, f"The model '{name}' does not exist", type=NOT_FOUND, param="model", code="model_not_found"
        )

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        engine = self.engine_provider()
        if engine is None:
            return web.json_response(openapi_document())
        return web.json_response(openapi_document(engine.model_ids, engine.max_context, engine.vocab_size))

    # ---- body ---------------------------------------------------------------------------------------
    async def _read_json(self, request: web.Request) -> Any:
        too_big = ApiError(413, f"request body larger than {self.max_body} bytes", code="request_too_large")
        if request.content_length is not None and request.content_length > self.max_body:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > self.max_body:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408, f"request body not received within {self.read_timeout_s:g} s", code="timeout"
            ) from None
        raw = b"".join(chunks)
        if not raw.strip():
            raise bad_request("the request body is empty; expected a JSON object", code="invalid_json")
        try:
            text = raw.decode("utf-8")
            body = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if "\\ud" in text.lower() and _has_lone_surrogate(body):
            # JSON may escape half a UTF-16 pair ("\ud800"); no tokenizer can encode that text.
            raise bad_request("the request holds an unpaired UTF-16 surrogate escape", code="invalid_json")
        return body

    # ---- generation routes --------------------------------------------------------------------------
    def _engine(self, model: str) -> Engine:
        engine = self.engine_provider()
        if engine is None:
            raise unavailable("this node has no model loaded yet (no active plan)")
        reason = engine.ready()
        if reason is not None:
            raise unavailable(reason)
        if model not in engine.model_ids:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this node serves {', '.join(engine.model_ids)}",
                type=NOT_FOUND,
                param="model",
                code="model_not_found",
            )
        return engine

    def _job(
        self, kind: str, engine: Engine, fields: SamplingFields, prompt: list[int], echo: str = ""
    ) -> _Job:
        limit = engine.max_context
        if not prompt:
            raise bad_request(
                "the prompt is empty", param="messages" if kind == "chat" else "prompt", code="invalid_value"
            )
        room = limit - len(prompt)
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, and your prompt has {len(prompt)} "
                "tokens, which leaves no room for an answer. Please shorten it.",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if fields.max_tokens is None:
            max_tokens = room if kind == "chat" else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
        elif fields.max_tokens > room:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + fields.max_tokens} tokens ({len(prompt)} in the prompt, {fields.max_tokens} "
                "in the completion). Please reduce the prompt or the completion length.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        else:
            max_tokens = fields.max_tokens
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k,
            seed=fields.seed,
            repetition_penalty=fields.repetition_penalty,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            stop=fields.stop,
            ignore_eos=fields.ignore_eos,
        )
        return _Job(kind, engine, fields.model, fields, GenerationRequest(tuple(prompt), params), echo)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatBody = parse_chat(await self._read_json(request))
        engine = self._engine(body.fields.model)
        try:
            text = engine.tokenizer.render_chat(body.messages)
        except Exception as exc:  # a template may refuse a conversation (e.g. roles that do not alternate)
            raise bad_request(
                f"the model's chat template rejected these messages: {exc}",
                param="messages",
                code="invalid_value",
            ) from None
        prompt = await _encode(engine, text, False)
        return await self._run(request, self._job("chat", engine, body.fields, prompt))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionBody = parse_completion(await self._read_json(request))
        engine = self._engine(body.fields.model)
        if body.prompt_ids is not None:
            vocab = engine.vocab_size
            bad = next((t for t in body.prompt_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(
                    f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                    param="prompt",
                    code="invalid_value",
                )
            prompt = body.prompt_ids
            prompt_text = engine.tokenizer.decode(prompt) if body.echo else ""
        else:
            assert body.prompt_text is not None
            prompt = await _encode(engine, body.prompt_text, True)
            prompt_text = body.prompt_text if body.echo else ""
        return await self._run(request, self._job("completion", engine, body.fields, prompt, prompt_text))

    async def _run(self, request: web.Request, job: _Job) -> web.StreamResponse:
        self.active += 1
        tokens = _TokenSource(job.engine.generate(job.request), request)
        try:
            if job.fields.stream:
                return await self._stream(request, job, tokens)
            return await self._complete(job, tokens)
        finally:
            await tokens.close()
            self.active -= 1
            self.served += 1

    async def _complete(self, job: _Job, tokens: _TokenSource) -> web.StreamResponse:
        text_stream = TextStream(job.engine.tokenizer, job.request.prompt, job.fields.stop)
        parts = [job.echo_text]
        count = 0
        try:
            while (token := await tokens.next()) is not None:
                count += 1
                parts.append(text_stream.push(token))
                if text_stream.stopped:
                    break
        except EngineUnavailable as exc:
            raise unavailable(str(exc)) from None
        finish = _finish(job, text_stream, count)
        if not text_stream.stopped:
            parts.append(text_stream.finish())
        text = "".join(parts)
        base = _base(job)
        if job.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return web.json_response({**base, "choices": [choice], "usage": _usage(job, count)})

    async def _stream(self, request: web.Request, job: _Job, tokens: _TokenSource) -> web.StreamResponse:
        text_stream = TextStream(job.engine.tokenizer, job.request.prompt, job.fields.stop)
        base = _base(job, chunk=True)
        chat = job.kind == "chat"
        usage_field = {"usage": None} if job.fields.include_usage else {}

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice], **usage_field})

        try:
            first = await tokens.next()
        except EngineUnavailable as exc:
            raise unavailable(str(exc)) from None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        count = 0
        try:
            if chat:
                await response.write(chunk(None, role=True))
            elif job.echo_text:
                await response.write(chunk(job.echo_text))
            token = first
            while token is not None:
                count += 1
                text = text_stream.push(token)
                if text:
                    await response.write(chunk(text))
                if text_stream.stopped:
                    break
                token = await tokens.next()
            finish = _finish(job, text_stream, count)
            if not text_stream.stopped:
                tail = text_stream.finish()
                if tail:
                    await response.write(chunk(tail))
            await response.write(chunk(None, finish))
            if job.fields.include_usage:
                await response.write(_sse({**base, "choices": [], "usage": _usage(job, count)}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, ClientGone):
            log.info(
                "client went away during %s; generation abandoned after %d tokens", job.request.id, count
            )
        except Exception as exc:
            # Headers are sent: report in-band, the way OpenAI streams report errors.
            if isinstance(exc, EngineUnavailable):
                err = unavailable(str(exc))
            else:
                log.exception("generation of %s failed mid-stream", job.request.id)
                err = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type=SERVER)
            with contextlib.suppress(ConnectionError):
                await response.write(_sse(err.body()))
                await response.write(b"data: [DONE]\n\n")
        return response


class _TokenSource:
    """The engine's token iterator, watched for client disconnects and always closed.

    aiohttp does not (by default) cancel a handler when its client disconnects, so while waiting for the
    next token we look at the connection every :data:`DISCONNECT_POLL_S`; a vanished client raises
    :class:`ClientGone`, and :meth:`close` then ends the engine session (freeing its KV cache).
    """

    def __init__(self, gen: AsyncIterator[int], request: web.Request) -> None:
        self.gen = gen
        self.request = request
        self._pending: asyncio.Task[int] | None = None

    def _gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def next(self) -> int | None:
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self.gen))
        task = self._pending
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                self._pending = None
                try:
                    return task.result()
                except StopAsyncIteration:
                    return None
            if self._gone():
                raise ClientGone()

    async def close(self) -> None:
        task, self._pending = self._pending, None
        if task is not None:
            task.cancel()  # throws CancelledError into the generator, which frees its session
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.debug("engine raised while being closed: %r", task.exception())
        aclose = getattr(self.gen, "aclose", None)
        if aclose is not None:
            await aclose()


async def _encode(engine: Engine, text: str, special: bool) -> list[int]:
    """Tokenize; long texts off the event loop so that other requests' streams keep flowing."""
    if len(text) < 20000:
        return engine.tokenizer.encode(text, special)
    return await asyncio.to_thread(engine.tokenizer.encode, text, special)


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _finish(job: _Job, text_stream: TextStream, count: int) -> str:
    if text_stream.stopped:
        return "stop"
    return "length" if count >= job.request.params.max_tokens else "stop"


def _base(job: _Job, chunk: bool = False) -> dict[str, Any]:
    chat = job.kind == "chat"
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.request.id}",
        "object": obj,
        "created": int(time.time()),
        "model": job.model,
        "system_fingerprint": None,
    }


def _usage(job: _Job, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(job.request.prompt)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def setup_openai_routes(
    app: web.Application,
    engine_provider: EngineProvider,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> OpenAIRoutes:
    """Add the OpenAI routes and ``/openapi.json`` to ``app``; returns the handler object (its
    ``active``/``served`` counters can go into a status page).

    Call it after the node's own ``/v1/...`` routes, if any: it ends with a catch-all ``/v1/{tail}`` that
    answers unknown endpoints with an OpenAI-shaped 404. Body size is capped here (``max_body``), not by
    the application's ``client_max_size``, so an oversized body gets a JSON 413 too.
    """
    routes = OpenAIRoutes(engine_provider, max_body, read_timeout_s)
    app.router.add_route("*", "/v1/chat/completions", routes.chat)
    app.router.add_route("*", "/v1/completions", routes.completions)
    app.router.add_route("*", "/v1/models", routes.models)
    app.router.add_route("*", "/v1/models/{model}", routes.model)
    app.router.add_route("*", "/openapi.json", routes.openapi)
    app.router.add_route("*", "/v1/{tail:.*}", routes.not_found)
    app[OPENAI_ROUTES_KEY] = routes
    return routes


OPENAI_ROUTES_KEY: web.AppKey[OpenAIRoutes] = web.AppKey("llnode_openai_routes", OpenAIRoutes)
