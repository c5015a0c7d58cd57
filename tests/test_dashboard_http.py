"""The dashboard's HTTP side on real in-process nodes: public page, token-guarded data, the SSE stream."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
from cluster_util import free_port

from llnode.config import NodeConfig
from llnode.daemon import Node

KEY = os.urandom(32)
TOKEN = "dashboard-test-token-0123456789"


def _config(tmp_path: Path, name: str, peers: list[str] | None = None, token: str = "") -> NodeConfig:
    return NodeConfig(
        port=free_port(), peer_port=free_port(), data_dir=str(tmp_path / name), name=name,
        peer_host="127.0.0.1", mdns=False, peers=peers or [], gossip_interval=0.2, api_token=token,
    )  # fmt: skip


async def _next_event(content: aiohttp.StreamReader, wait_s: float = 5.0) -> dict[str, Any]:
    """Read one ``event: status`` block of the stream and return its JSON."""
    kind, data = None, []
    while True:
        line = (await asyncio.wait_for(content.readline(), wait_s)).decode()
        assert line, "the event stream ended"
        line = line.rstrip("\n")
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            assert kind == "status"
            doc: dict[str, Any] = json.loads("\n".join(data))
            return doc


async def test_page_is_public_data_needs_the_token(tmp_path: Path) -> None:
    node = Node(_config(tmp_path, "a", token=TOKEN), key=KEY)
    await node.start()
    base = node.http_url()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as r:
                page = await r.text()
                assert r.status == 200 and r.content_type == "text/html"
                assert "/dashboard/app.js" in page and "http://" not in page and "https://" not in page
            assets = (("app.js", "text/javascript"), ("app.css", "text/css"), ("icon.svg", "image/svg+xml"))
            for name, kind in assets:
                async with http.get(f"{base}/dashboard/{name}") as r:
                    assert r.status == 200 and r.content_type == kind
                    body = (await r.text()).replace('xmlns="http://www.w3.org/2000/svg"', "")
                    assert "http://" not in body and "https://" not in body  # nothing from the internet
            # the data is guarded like the rest of the API
            for path in ("/api/dashboard", "/api/events", "/api/status"):
                async with http.get(base + path) as r:
                    assert r.status == 401, path
            async with http.get(base + "/api/dashboard", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(base + "/dashboard/secret.txt") as r:
                assert r.status == 401
            async with http.get(base + "/dashboard/secret.txt", headers=auth) as r:
                assert r.status == 404
            async with http.get(base + "/dashboard/..%2Fview.py", headers=auth) as r:
                assert r.status == 404
            async with http.get(base + "/api/dashboard", headers=auth) as r:
                doc = await r.json()
            assert r.status == 200 and doc["id"] == node.node_id and doc["nodes"][0]["self"]
            assert doc["nodes"][0]["role"] == "leader" or doc["leader"] is None
            async with http.get(f"{base}/api/dashboard?token={TOKEN}&history=0") as r:
                assert r.status == 200 and "history" not in await r.json()
    finally:
        await node.stop()


async def test_event_stream_pushes_membership_and_ends_on_stop(tmp_path: Path) -> None:
    a = Node(_config(tmp_path, "a"), key=KEY)
    await a.start()
    b: Node | None = None
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.get(a.http_url() + "/api/events")
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            first = await _next_event(resp.content)
            assert isinstance(first["history"], list) and [n["name"] for n in first["nodes"]] == ["a"]
            second = await _next_event(resp.content)
            assert "history" not in second and second["t"] > first["t"]

            b = Node(_config(tmp_path, "b", peers=[f"127.0.0.1:{a.config.port}"]), key=KEY)
            await b.start()
            doc = second
            for _ in range(40):
                doc = await _next_event(resp.content)
                if len([n for n in doc["nodes"] if n["alive"]]) == 2 and doc["leader"]:
                    break
            names = {n["name"]: n for n in doc["nodes"]}
            assert set(names) == {"a", "b"} and names["b"]["address"] == f"{b.advertise_host}:{b.config.port}"
            # b stops cleanly: its goodbye marks it dead, the stream says so, an event records it
            await b.stop()
            b = None
            for _ in range(20):
                doc = await _next_event(resp.content)
                if {n["name"]: n["status"] for n in doc["nodes"]}.get("b") == "dead":
                    break
            assert {n["name"]: n["status"] for n in doc["nodes"]}["b"] == "dead"
            for _ in range(5):
                if any(e["kind"] == "leave" for e in doc["events"]):
                    break
                doc = await _next_event(resp.content)
            leaves = [e for e in doc["events"] if e["kind"] == "leave"]
            assert leaves and "b left (said goodbye)" in leaves[-1]["message"]
            assert any(e["kind"] == "join" and "b joined" in e["message"] for e in doc["events"])

            # stopping the node with a page still open must not wait for the stream
            await asyncio.wait_for(a.stop(), 15.0)
            await asyncio.wait_for(resp.content.read(), 5.0)  # the stream ends instead of hanging
            assert resp.content.at_eof()
            resp.release()
    finally:
        if b is not None:
            await b.stop()
        if a._runner is not None and not a._stopped.is_set():
            await a.stop()
