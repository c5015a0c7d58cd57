"""The profiler times real modules and a real (loopback TCP) link; its cost is reported."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from llnode.model.manifest import load_manifest
from llnode.model.runner import fuse_block
from llnode.net import resources
from llnode.plan import PlanOptions, solve
from llnode.plan.profile import measure_link, profile_device
from llnode.plan.types import PlanError


def test_profile_tiny_shards(tiny_llama_shards: Path) -> None:
    man = load_manifest(tiny_llama_shards)
    # 31 steps: a tiny layer is ~0.3 ms of CPU and a run's fixed cost ~0.1, so 3 steps' medians let
    # the noise decide the split's sign (it came out 0 in one of three runs)
    prof = profile_device(tiny_llama_shards, man, device_id="me", repeats=31)
    assert prof.decode_flops_per_s > 0 and prof.prefill_flops_per_s > 0
    assert prof.memory_available_bytes > 0 and prof.cores >= 1
    assert 0 < prof.profile_s < 30
    assert any(k.startswith("decode_ms_modules_") for k in prof.measured)
    # both layers as one fused session and the first alone: what a run costs beyond its layers (a tiny
    # layer is mostly that cost), and the daemon's block size and own CPU per step for the cost model
    assert prof.call_overhead_s > 0 and prof.measured["call_overhead_ms"] == pytest.approx(
        prof.call_overhead_s * 1e3
    )
    assert prof.fuse_block == fuse_block() and prof.step_overhead_s > 0
    # the measured profile plans a real shard set
    plan = solve(man, [prof], [], PlanOptions(max_sessions=1))
    assert plan.devices == ["me"] and plan.stages[0].end == man.num_modules


def test_profile_rejects_embedding(tiny_llama_shards: Path) -> None:
    with pytest.raises(PlanError, match="embedding"):
        profile_device(tiny_llama_shards, device_id="me", module=0)


@pytest.mark.slow
def test_profile_smollm2_is_cheap(smollm2_shards: Path) -> None:
    prof = profile_device(smollm2_shards, device_id="me")
    print(
        f"SmolLM2 profile: {prof.profile_s:.2f} s, decode {prof.decode_flops_per_s / 1e9:.2f} GFLOP/s, "
        f"prefill {prof.prefill_flops_per_s / 1e9:.2f} GFLOP/s, {prof.measured}"
    )
    assert prof.decode_flops_per_s > 0
    assert prof.profile_s < 10  # "a few seconds per device"


def test_resource_readers() -> None:
    mem = resources.memory()
    assert 0 < mem["free"] <= mem["total"]
    assert 1 <= resources.cores() <= (os.cpu_count() or 1)
    battery = resources.battery()
    assert battery is None or 0 <= battery["level"] <= 100


async def test_measure_link_over_tcp() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.read(4)
            if not head:
                break
            n = int.from_bytes(head, "big")
            data = await reader.readexactly(n)
            writer.write(head + data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def echo(payload: bytes) -> bytes:
        writer.write(len(payload).to_bytes(4, "big") + payload)
        await writer.drain()
        n = int.from_bytes(await reader.readexactly(4), "big")
        return await reader.readexactly(n)

    link = await measure_link(echo, src="a", dst="b")
    writer.close()
    server.close()
    assert link.src == "a" and 0 < link.rtt_s < 0.1
    assert link.bandwidth_bytes_per_s > 1e6  # loopback moves far more than 1 MB/s


async def test_measure_link_times_out() -> None:
    async def never(payload: bytes) -> bytes:
        await asyncio.sleep(10)
        return payload

    with pytest.raises(PlanError, match="no echo"):
        await measure_link(never, timeout_s=0.1)
