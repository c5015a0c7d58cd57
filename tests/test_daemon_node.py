"""The ``Node`` class in-process: the extension points other parts of llnode build on."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cluster_util import free_port

from llnode.config import NodeConfig
from llnode.daemon import NODE_KEY, Node
from llnode.net.codec import decode_tensor

KEY = os.urandom(32)


def _config(tmp_path: Path, name: str, peers: list[str] | None = None) -> NodeConfig:
    return NodeConfig(
        port=free_port(), peer_port=free_port(), data_dir=str(tmp_path / name), name=name,
        peer_host="127.0.0.1", mdns=False, peers=peers or [], gossip_interval=0.2,
    )  # fmt: skip


async def _until(pred: Any, limit: float = 10.0) -> None:
    for _ in range(int(limit / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_node_extension_points(tmp_path: Path) -> None:
    a = Node(_config(tmp_path, "a"), key=KEY)
    events: list[str] = []

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hi": request.app[NODE_KEY].name})

    a.app.router.add_get("/v1/hello", hello)
    a.status_providers["pipeline"] = lambda: {"stages": 2}
    a.subscribe(events.append)
    await a.start()
    b = Node(_config(tmp_path, "b", peers=[f"127.0.0.1:{a.config.port}"]), key=KEY)

    async def async_section() -> dict[str, int]:
        return {"sessions": 0}

    b.status_providers["api"] = async_section
    await b.start()
    try:
        await _until(
            lambda: a.leader_id is not None and a.leader_id == b.leader_id and len(a.live_members()) == 2
        )
        assert a.term == b.term >= 1 and a.is_leader != b.is_leader
        assert {"membership", "leader"} <= set(events)

        # gossip is open: a part publishes a key, the other node reads it
        b.gossip.set_local("metrics", {"tok_s": 41.5})
        await _until(lambda: a.gossip.get(b.node_id, "metrics") == {"tok_s": 41.5})

        # link handlers with tensors, in both directions over the same link
        async def double(peer: str, payload: Any) -> Any:
            return {"h": decode_tensor(payload["h"]) * 2}

        b.links.on("test.double", double)
        import numpy as np

        out = await a.links.request(b.node_id, "test.double", {"h": np.ones((1, 1, 576), np.float32)})
        assert float(decode_tensor(out["h"]).sum()) == 2 * 576

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{a.config.port}/v1/hello") as resp:
                assert (await resp.json()) == {"hi": "a"}
            async with http.get(f"http://127.0.0.1:{b.config.port}/api/status") as resp:
                doc = await resp.json()
        assert doc["api"] == {"sessions": 0} and doc["leader"] == a.leader_id
        assert sorted(m["name"] for m in doc["members"]) == ["a", "b"]
        assert (await a.status())["pipeline"] == {"stages": 2}

        # link measurements for the planner, published in gossip
        await _until(lambda: b.node_id in (a.gossip.get(a.node_id, "links") or {}), limit=5)
        measured = a.gossip.get(a.node_id, "links")[b.node_id]
        assert 0 < measured["rtt_s"] < 1 and measured["bandwidth_bytes_per_s"] > 1e6
        await _until(lambda: a.node_id in (a.gossip.get(b.node_id, "links") or {}), limit=5)
    finally:
        await b.stop()
    await _until(lambda: b.node_id not in a.live_members(), limit=1.0)  # b said goodbye: no timeout
    assert a.is_leader and "membership" in events
    await a.stop()
