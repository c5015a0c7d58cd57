"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), against a live
server running the real tiny-Llama LocalEngine.

Checks: no 5xx ever; anything outside the schema is refused with a 4xx; status codes, content types and
JSON bodies are the documented ones. "Schema-valid requests are accepted" is not checked: a chat's token
budget (template + messages + max_tokens within the context) cannot be expressed in a schema, and the
server rightly refuses such requests with a 400.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llnode.api import setup_openai_routes
from llnode.pipeline.local import LocalEngine

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "negative_data_rejection,unsupported_method"
)


async def test_schemathesis_finds_nothing(tiny_llama_shards: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (it is in the 'test' extra)")
    engine = LocalEngine(tiny_llama_shards, aliases=["tiny"])
    app = web.Application()
    setup_openai_routes(app, lambda: engine)
    server: TestServer[Any] = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/openapi.json"))
        proc = await asyncio.create_subprocess_exec(
            exe, "run", url, "--checks", CHECKS, "--max-examples", "8", "--workers", "1",
            "--phases", "coverage,fuzzing", "--seed", "20261121", "--request-timeout", "120", "--no-color",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 900)
        report = out.decode(errors="replace")
        assert proc.returncode == 0, report[-6000:]
        assert "passed" in report
        await engine.drain()
        assert engine.live_sessions() == []
    finally:
        await server.close()
        engine.close()
