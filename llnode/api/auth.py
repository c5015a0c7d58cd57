"""Bearer-token middleware for nodes whose HTTP API is reachable from other machines.

By default a node binds its API to 127.0.0.1 and needs no token. Bound to another interface it must be
started with ``--api-token``; then every request except the explicitly public paths needs
``Authorization: Bearer <token>`` (which is what OpenAI clients send as their ``api_key``).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from llnode.api.errors import AUTH, ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

DEFAULT_PUBLIC_PATHS = ("/health",)


def require_token(token: str, public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS) -> Middleware:
    """An aiohttp middleware accepting only requests that carry ``token`` (constant-time comparison).

    Wrong or missing tokens get an OpenAI-shaped 401, so clients report "invalid API key" as usual.
    Pass it in ``web.Application(middlewares=[...])`` or append to ``app.middlewares`` before startup.
    """
    if not token:
        raise ValueError("an empty API token would let everyone in")
    expected = token.encode()
    public = frozenset(public_paths)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            err = ApiError(
                401,
                "missing or invalid API token: send 'Authorization: Bearer <token>' (the node's --api-token)",
                type=AUTH,
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="llnode"'},
            )
            return err.response()
        return await handler(request)

    return middleware
