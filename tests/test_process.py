"""llnode.process: the footprint readers, and that release_memory really gives freed heap back to the OS.

The release test reproduces what a plan switch does to a daemon (docs/faults.md, "Soak"): many
medium-sized blocks freed while a later block still pins the top of the heap, so glibc cannot shrink
it by itself and RSS stays up until ``malloc_trim``.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from llnode.process import _malloc_trim, open_fds, release_memory, rss_bytes, snapshot

MB = 2**20


def test_readers_see_this_process_and_a_missing_one() -> None:
    assert rss_bytes() > 10 * MB
    assert rss_bytes(os.getpid()) > 10 * MB
    assert open_fds() >= 3
    assert rss_bytes(2**22 + 12345) == 0  # no such pid
    assert open_fds(2**22 + 12345) == -1


def test_snapshot_counts_running_tasks() -> None:
    async def main() -> dict[str, int]:
        sleepers = [asyncio.create_task(asyncio.sleep(10)) for _ in range(5)]
        snap = snapshot()
        for t in sleepers:
            t.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
        return snap

    snap = asyncio.run(main())
    assert snap["tasks"] >= 6  # main + the 5 sleepers
    assert snap["pid"] == os.getpid() and snap["rss_bytes"] > 10 * MB and snap["fds"] >= 3
    assert snap["threads"] >= 1
    assert snapshot()["tasks"] == 0  # outside a loop


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim here")
def test_release_memory_returns_freed_heap_to_the_os() -> None:
    base = rss_bytes()
    blocks = [b"\x01" * (64 * 1024) for _ in range(4096)]  # 256 MB in blocks below glibc's mmap threshold
    pin = b"\x01" * (64 * 1024)  # allocated last: keeps the heap top in use, as a live new runner does
    grown = rss_bytes()
    assert grown - base > 200 * MB
    del blocks
    held = rss_bytes()
    assert held - base > 150 * MB, "glibc gave the memory back by itself: the scenario is not reproduced"
    released = release_memory()
    after = rss_bytes()
    assert released > 150 * MB and held - after > 150 * MB, (base, grown, held, after, released)
    assert len(pin) == 64 * 1024
