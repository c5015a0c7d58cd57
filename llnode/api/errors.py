"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

OpenAI clients read ``error.message`` and the HTTP status to decide what to raise (``BadRequestError``,
``NotFoundError``, ...), so every failure of these routes, bad input included, is answered in this shape,
never as aiohttp's plain-text pages.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

INVALID = "invalid_request_error"
NOT_FOUND = "not_found_error"
UNAVAILABLE = "service_unavailable"
AUTH = "authentication_error"
SERVER = "server_error"


class ApiError(Exception):
    """A request that gets an error answer. Raised anywhere below a handler; turned into a response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,  # the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(reason: str) -> ApiError:
    # Retry-After tells well-behaved clients (the openai one included) to back off instead of hammering.
    return ApiError(503, reason, type=UNAVAILABLE, code="not_ready", headers={"Retry-After": "1"})
