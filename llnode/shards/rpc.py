"""Shard requests as plain request/response messages, for any link that can carry a dict.

The peer links move msgpack maps; wiring shard distribution onto them needs only a generic
``call(peer_id, request) -> reply`` on the client side and :func:`handle_shard_request` on the server
side. Messages (all msgpack/JSON-friendly; ``data`` is raw bytes):

    {"op": "shard_index", "model": str, "file": str}
        -> {"ok": True, "index": {size, sha256, chunk_size, chunk_sha256}}
    {"op": "shard_read", "model": str, "file": str, "offset": int, "length": int}
        -> {"ok": True, "data": bytes}
    any error -> {"ok": False, "error": {"code": str, "message": str}}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from llnode.shards.errors import ShardServeError
from llnode.shards.serve import ShardServer

OP_INDEX = "shard_index"
OP_READ = "shard_read"
SHARD_OPS = (OP_INDEX, OP_READ)

Call = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


async def handle_shard_request(server: ShardServer, request: Mapping[str, Any]) -> dict[str, Any]:
    """Answer one shard request message; never raises for bad input (the reply carries the error)."""
    if not isinstance(request, Mapping):
        return _error("bad_request", "shard request is not a map")
    op, model, file = request.get("op"), request.get("model"), request.get("file")
    if not isinstance(model, str) or not isinstance(file, str):
        return _error("bad_request", "shard request needs string 'model' and 'file'")
    try:
        if op == OP_INDEX:
            return {"ok": True, "index": await server.index_async(model, file)}
        if op == OP_READ:
            offset, length = request.get("offset"), request.get("length")
            if not isinstance(offset, int) or not isinstance(length, int):
                return _error("bad_request", "shard_read needs integer 'offset' and 'length'")
            return {"ok": True, "data": await server.read_async(model, file, offset, length)}
    except ShardServeError as exc:
        return _error(exc.code, str(exc))
    return _error("bad_request", f"unknown shard op {op!r}")


def _unwrap(reply: Mapping[str, Any], key: str) -> Any:
    if not isinstance(reply, Mapping):
        raise ShardServeError("shard reply is not a map", "bad_reply")
    if not reply.get("ok"):
        err = reply.get("error")
        if isinstance(err, Mapping):
            raise ShardServeError(str(err.get("message", "peer error")), str(err.get("code", "bad_reply")))
        raise ShardServeError("shard reply carries neither a result nor an error", "bad_reply")
    if key not in reply:
        raise ShardServeError(f"shard reply has no {key!r}", "bad_reply")
    return reply[key]


class RpcShardTransport:
    """A :class:`~llnode.shards.fetch.ShardTransport` over any ``call(peer_id, request) -> reply``."""

    def __init__(self, call: Call) -> None:
        self._call = call

    async def index(self, peer_id: str, model: str, file: str) -> dict[str, Any]:
        index = _unwrap(await self._call(peer_id, {"op": OP_INDEX, "model": model, "file": file}), "index")
        if not isinstance(index, dict):
            raise ShardServeError("shard index is not a map", "bad_reply")
        return index

    async def read(self, peer_id: str, model: str, file: str, offset: int, length: int) -> bytes:
        reply = await self._call(
            peer_id, {"op": OP_READ, "model": model, "file": file, "offset": offset, "length": length}
        )
        data = _unwrap(reply, "data")
        if not isinstance(data, bytes | bytearray):
            raise ShardServeError("shard data is not bytes", "bad_reply")
        return bytes(data)
