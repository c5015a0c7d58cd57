"""Reading the API's own streams: the JSON events of an OpenAI-style server-sent-events response.

One reader for every client in the project (``llnode chat``, ``llnode cluster --prompt``, the benchmarks
and the tests), so that all of them stop at ``data: [DONE]`` and skip comments and blank keep-alive lines
the same way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Each ``data:`` event of the stream as a dict, until ``data: [DONE]`` or the end of the stream."""
    async for raw in content:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        event: dict[str, Any] = json.loads(data)
        yield event
