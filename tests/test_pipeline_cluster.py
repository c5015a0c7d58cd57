"""The main job end to end: real daemons on loopback run SmolLM2 as a pipeline and answer over HTTP.

Greedy output through the cluster must equal the single-process module chain token for token, for
several prompts at once; killing a stage node mid-generation must not lose the request (the entry
re-prefills on the re-planned pipeline and the text is still exactly the reference).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import serving

from llnode.api.sse import sse_events
from llnode.cluster import LocalCluster, _settled, free_base_port
from llnode.model.reference import greedy_texts

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]



@pytest.fixture(scope="module")
def cluster3(smollm2_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        nodes=3,
        base_port=free_base_port(3),
        model=smollm2_shards.name,
        shards=smollm2_shards.parent,
        workdir=tmp_path_factory.mktemp("cluster3"),
        empty_shards={2},  # node2 starts with nothing and fetches what the plan gives it from its peers
    )
    yield from serving(cluster)


@pytest.fixture(scope="module")
def reference(smollm2_shards: Path) -> dict[str, str]:
    """Greedy continuations of every prompt from the single-process module chain."""
    return greedy_texts(smollm2_shards, PROMPTS, 64)


async def _complete(url: str, prompt: str, max_tokens: int = 64, stream: bool = False) -> dict[str, Any]:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        if not stream:
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                data: dict[str, Any] = await r.json()
                return data
        body["stream"] = True
        pieces: list[str] = []
        finish = None
        async with s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for chunk in sse_events(r.content):
                for c in chunk["choices"]:
                    pieces.append(c.get("text") or "")
                    finish = c.get("finish_reason") or finish
        return {"choices": [{"text": "".join(pieces), "finish_reason": finish}]}


def _status(cluster: LocalCluster, i: int) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            status = await cluster.status(i, s)
            assert status is not None
            return status

    return asyncio.run(get())


def test_plan_spans_nodes_and_every_node_agrees(cluster3: LocalCluster) -> None:
    statuses = [_status(cluster3, i) for i in range(3)]
    plans = [s["pipeline"]["plan"] for s in statuses]
    assert all(p == plans[0] for p in plans)
    stages = plans[0]["plan"]["stages"]
    assert len(stages) >= 2, stages
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 32
    for a, b in itertools.pairwise(stages):
        assert a["end"] == b["start"]


def test_ready_means_one_plan_that_placed_every_node(cluster3: LocalCluster) -> None:
    """``wait_ready`` returned on this cluster: its condition holds on the real statuses, and fails
    for the shapes that fooled benchmarks (a node the plan has not seen yet, a plan not taken up)."""
    statuses = [_status(cluster3, i) for i in range(3)]
    assert _settled(statuses)
    plan = statuses[0]["pipeline"]["plan"]["plan"]
    placed = [st["device_id"] for st in plan["stages"]] + list(plan["left_out"])
    assert sorted(placed) == sorted(s["id"] for s in statuses)
    late = [dict(s) for s in statuses]
    late[2] = {**late[2], "id": "a-node-whose-profile-came-late"}
    assert not _settled(late)
    behind = [dict(s) for s in statuses]
    behind[1] = {**behind[1], "pipeline": {**behind[1]["pipeline"], "epoch": -1}}
    assert not _settled(behind)
    assert not _settled([*statuses[:2], None])


def test_ignore_eos_runs_past_end_of_text_through_the_pipeline(cluster3: LocalCluster) -> None:
    """The distributed engine's stop rule: end-of-text ends an answer unless ``ignore_eos`` asks for
    max_tokens (what a benchmark's interference stream needs: a stream of known length)."""
    body = {"model": "smollm2-135m", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]}

    async def ask(extra: dict[str, Any]) -> dict[str, Any]:
        url = f"{cluster3.url(1)}/v1/chat/completions"
        async with aiohttp.ClientSession() as s, s.post(url, json={**body, **extra}) as r:
            assert r.status == 200, await r.text()
            data: dict[str, Any] = await r.json()
            return data

    short, long = asyncio.run(ask({})), asyncio.run(ask({"ignore_eos": True}))
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 16
    assert long["choices"][0]["finish_reason"] == "length" and long["usage"]["completion_tokens"] == 16
    assert long["choices"][0]["message"]["content"].startswith(short["choices"][0]["message"]["content"])


def test_greedy_through_cluster_equals_single_process(
    cluster3: LocalCluster, reference: dict[str, str]
) -> None:
    async def run_all() -> list[dict[str, Any]]:
        # Concurrent sessions, entering at different nodes, one of them streaming.
        return await asyncio.gather(
            *(
                _complete(cluster3.url(i % 3), p, stream=(i == 1))
                for i, p in enumerate(PROMPTS)
            )
        )

    results = asyncio.run(run_all())
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res["choices"][0]["text"] == reference[prompt]


def test_node_without_shards_fetched_its_modules_from_peers(cluster3: LocalCluster) -> None:
    status = _status(cluster3, 2)
    assert status["pipeline"]["fetch"]["bytes_received"] > 0
    assert (cluster3.shards_root(2) / "smollm2-135m" / "manifest.json").is_file()
    own = next(m for m in status["members"] if m.get("self"))
    held = own["inventory"]["smollm2-135m"]["modules"]
    stage = status["pipeline"]["stage"]
    if stage is not None:  # it runs a stage: every module of its range came from a peer, verified
        start, end = stage["range"]
        assert any(a <= start and end <= b for a, b in held), (held, stage)
    root = cluster3.shards_root(2) / "smollm2-135m"
    assert (root / "tokenizer.json").is_file()


def test_openai_client_against_the_cluster(cluster3: LocalCluster, reference: dict[str, str]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster3.url(1)}/v1", api_key="unused-on-loopback", timeout=120)
    prompt = PROMPTS[0]
    out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=64, temperature=0)
    assert out.choices[0].text == reference[prompt]
    assert out.usage is not None and out.usage.completion_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Name one river in Europe."}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        if c.choices
    ]
    assert "".join(pieces).strip()
    assert next(m.id for m in client.models.list().data) == "smollm2-135m"


def test_client_disconnect_frees_the_session_on_every_stage(cluster3: LocalCluster) -> None:
    async def scenario() -> None:
        body = {"model": "smollm2-135m", "prompt": PROMPTS[2], "max_tokens": 200, "stream": True}
        async with aiohttp.ClientSession() as s, s.post(f"{cluster3.url(0)}/v1/completions", json=body) as r:
            assert r.status == 200
            seen = 0
            async for raw in r.content:
                seen += raw.startswith(b"data:")
                if seen >= 4:
                    break  # hang up mid-generation
        for _ in range(120):
            await asyncio.sleep(0.5)
            async with aiohttp.ClientSession() as s:
                states = [await cluster3.status(i, s) for i in range(3)]
            held = [(st or {}).get("pipeline", {}).get("stage") for st in states]
            if all(h is None or h["sessions"] == 0 for h in held) and all(
                st and st["pipeline"]["sessions"] == 0 for st in states
            ):
                return
        raise AssertionError(f"sessions still held after the client left: {held}")

    asyncio.run(scenario())


def test_status_command_shows_the_plan(cluster3: LocalCluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llnode", "status", "--node", cluster3.url(1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "model smollm2-135m: serving" in out
    plan = _status(cluster3, 1)["pipeline"]["plan"]["plan"]
    assert f"plan epoch {plan['epoch']}" in out
    for k, st in enumerate(plan["stages"]):
        assert f"stage {k}:" in out and f"[{st['start']:>2}, {st['end']:>2})" in out


def test_stage_node_killed_mid_generation_loses_nothing(
    cluster3: LocalCluster, reference: dict[str, str]
) -> None:
    status = _status(cluster3, 0)
    stages = status["pipeline"]["plan"]["plan"]["stages"]
    ids = [m["id"] for m in status["members"]]
    names = {m["id"]: m["name"] for m in status["members"]}
    # A stage node that is not the entry (node0) dies while the request is in flight.
    victim_id = next(s["device_id"] for s in stages if names.get(s["device_id"]) != "node0")
    victim = int(names[victim_id].removeprefix("node"))
    assert victim_id in ids

    async def scenario() -> dict[str, Any]:
        task = asyncio.create_task(_complete(cluster3.url(0), PROMPTS[2], stream=True))
        await asyncio.sleep(1.0)
        cluster3.procs[victim].send_signal(signal.SIGKILL)
        return await asyncio.wait_for(task, 120)

    try:
        result = asyncio.run(scenario())
    except (TimeoutError, AssertionError, aiohttp.ClientError) as exc:
        logs = "\n".join(cluster3.log_tail(i, 60) for i in range(3))
        raise AssertionError(f"request lost after killing node{victim}: {exc!r}\n{logs}") from exc
    assert result["choices"][0]["text"] == reference[PROMPTS[2]]
    after = _status(cluster3, 0)
    assert after["pipeline"]["recoveries"] >= 1
    live_stages = after["pipeline"]["plan"]["plan"]["stages"]
    assert victim_id not in {s["device_id"] for s in live_stages}
