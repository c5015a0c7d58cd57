"""Shard requests over plain HTTP (aiohttp): server routes and a client transport.

The peer links carry the same two calls in production; this HTTP form serves tests, tools and setups where
nodes reach each other's HTTP API (mount the routes behind the API's auth). Errors travel as JSON
``{"error": {"code", "message"}}`` with 400/404/416 statuses and come back as ShardServeError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from llnode.shards.errors import ShardServeError
from llnode.shards.serve import ShardServer

_STATUS = {"unknown_model": 404, "unknown_file": 404, "not_verified": 404, "out_of_range": 416}
SERVER_KEY = web.AppKey("shard_server", ShardServer)


def _error(exc: ShardServeError) -> web.Response:
    return web.json_response(
        {"error": {"code": exc.code, "message": str(exc)}}, status=_STATUS.get(exc.code, 400)
    )


def _int_param(request: web.Request, name: str) -> int:
    raw = request.query.get(name)
    try:
        return int(raw) if raw is not None else -1
    except ValueError:
        raise ShardServeError(f"{name} must be an integer, got {raw!r}", "bad_request") from None


async def _handle_index(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    try:
        chunk = request.query.get("chunk_size")
        index = await server.index_async(
            request.match_info["model"], request.query.get("file", ""),
            _int_param(request, "chunk_size") if chunk is not None else None,
        )
    except ShardServeError as exc:
        return _error(exc)
    return web.json_response(index)


async def _handle_read(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    try:
        data = await server.read_async(
            request.match_info["model"], request.query.get("file", ""),
            _int_param(request, "offset"), _int_param(request, "length"),
        )
    except ShardServeError as exc:
        return _error(exc)
    return web.Response(body=data, content_type="application/octet-stream")


def add_routes(app: web.Application, server: ShardServer, prefix: str = "/shards") -> None:
    """Mount ``GET {prefix}/{model}/index?file=`` and ``GET {prefix}/{model}/read?file=&offset=&length=``."""
    app[SERVER_KEY] = server
    app.router.add_get(prefix + "/{model}/index", _handle_index)
    app.router.add_get(prefix + "/{model}/read", _handle_read)


class HttpShardTransport:
    """A :class:`~llnode.shards.fetch.ShardTransport` over HTTP; ``peers`` maps peer id -> base URL."""

    def __init__(
        self,
        peers: Mapping[str, str] | Callable[[str], str],
        session: aiohttp.ClientSession | None = None,
        headers: Mapping[str, str] | None = None,
        prefix: str = "/shards",
    ) -> None:
        self._peers = peers
        self._session = session
        self._own_session = session is None
        self._headers = dict(headers or {})
        self._prefix = prefix

    def _url(self, peer_id: str, model: str, what: str) -> str:
        if callable(self._peers):
            base = self._peers(peer_id)
        else:
            if peer_id not in self._peers:
                raise ShardServeError(f"no address known for peer {peer_id!r}", "unknown_peer")
            base = self._peers[peer_id]
        return f"{base.rstrip('/')}{self._prefix}/{model}/{what}"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def _get(self, url: str, params: dict[str, Any]) -> aiohttp.ClientResponse:
        resp = await self._client().get(url, params={k: str(v) for k, v in params.items()})
        if resp.status != 200:
            try:
                err = (await resp.json())["error"]
                raise ShardServeError(str(err["message"]), str(err["code"]))
            except (aiohttp.ContentTypeError, KeyError, TypeError, ValueError):
                raise ShardServeError(f"HTTP {resp.status} from {url}", "bad_request") from None
            finally:
                resp.release()
        return resp

    async def index(self, peer_id: str, model: str, file: str) -> dict[str, Any]:
        resp = await self._get(self._url(peer_id, model, "index"), {"file": file})
        async with resp:
            data = await resp.json()
        if not isinstance(data, dict):
            raise ShardServeError("index response is not a JSON object", "bad_request")
        return data

    async def read(self, peer_id: str, model: str, file: str, offset: int, length: int) -> bytes:
        resp = await self._get(
            self._url(peer_id, model, "read"), {"file": file, "offset": offset, "length": length}
        )
        async with resp:
            return await resp.read()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
