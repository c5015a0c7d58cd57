"""llnode.process: the footprint readers, and that release_memory really gives freed heap back to the OS.

The release test reproduces what a plan switch does to a daemon (docs/faults.md, "Soak"): many
medium-sized blocks freed while a later block still pins the top of the heap, so glibc cannot shrink
it by itself and RSS stays up until ``malloc_trim``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llnode.process import _glibc, memory, open_fds, release_memory, rss_bytes, snapshot

MB = 2**20


def test_readers_see_this_process_and_a_missing_one() -> None:
    assert rss_bytes() > 10 * MB
    assert rss_bytes(os.getpid()) > 10 * MB
    assert open_fds() >= 3
    assert rss_bytes(2**22 + 12345) == 0  # no such pid
    assert open_fds(2**22 + 12345) == -1


_SPLIT = """
import json, mmap, sys
from llnode.process import memory, reset_peak
out = {"start": memory()}
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    sum(m[i] for i in range(0, len(m), 4096))  # touch every page of the file
    out["mapped"] = memory()
    block = bytearray(64 << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page of anonymous memory
    out["anon"] = memory()
    del block
    out["freed"] = memory()
    out["reset"] = reset_peak()
    out["after_reset"] = memory()
print(json.dumps(out))
"""


def test_memory_splits_anonymous_and_file_pages_and_the_peak_resets(tmp_path: Path) -> None:
    import json

    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(32 * MB))
    out = subprocess.run(
        [sys.executable, "-c", _SPLIT, str(data)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    r = json.loads(out)
    for m in r.values():
        if isinstance(m, dict):
            assert m["rss"] == m["anon"] + m["file"] and m["peak"] >= m["rss"]
    # 32 MiB of a mapped file count as file pages, 64 MiB of touched heap as anonymous ones
    assert r["mapped"]["file"] - r["start"]["file"] > 30 * MB
    assert abs(r["mapped"]["anon"] - r["start"]["anon"]) < 8 * MB
    assert r["anon"]["anon"] - r["mapped"]["anon"] > 60 * MB
    # freed: the peak remembers the block until it is reset
    assert r["freed"]["peak"] - r["freed"]["rss"] > 60 * MB
    assert r["reset"] and r["after_reset"]["peak"] - r["after_reset"]["rss"] < 8 * MB
    assert memory(2**22 + 12345) == {"rss": 0, "peak": 0, "anon": 0, "file": 0}  # no such pid


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


@pytest.mark.skipif(_glibc() is None, reason="no glibc malloc_trim here")
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


_AFTER_A_BIG_FREE = """
import os, sys
if sys.argv[1] == "tuned":
    import llnode.process
from pathlib import Path
def rss():
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith("VmRSS:")) * 1024
big = bytearray(16 * 2**20)  # freed: glibc raises its threshold to 16 MiB unless it is pinned
del big
base = rss()
blocks = [bytearray(4 * 2**20) for _ in range(16)]  # 64 MiB of activation-sized blocks, touched
for b in blocks:
    b[::4096] = b"\x01" * len(b[::4096])
pin = bytearray(256 * 1024)  # allocated last: pins the heap top, as a running session does
del blocks
print(rss() - base)
"""


@pytest.mark.skipif(_glibc() is None, reason="not glibc")
@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_pinned_mmap_threshold_gives_large_blocks_back_at_once(mode: str) -> None:
    """With llnode.process imported, blocks the size of a prefill's activations go back to the OS when
    freed, even after a larger block was freed first (which makes plain glibc keep them in its heap)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", _AFTER_A_BIG_FREE, mode], capture_output=True, text=True, env=env, check=True
    )
    held = int(out.stdout.strip())
    if mode == "tuned":
        assert held < 8 * MB, held
    else:  # the scenario: without the pin glibc keeps them (else the test above would prove nothing)
        assert held > 48 * MB, held
