"""A short soak in the suite: a 3-node tiny-Llama cluster under steady concurrent load for half a minute.

No request may fail, and no node may hold more file descriptors once the load stops than it did during
warm-up, give or take a link reconnecting (a socket or file leaked per request would show at once).
RSS growth is printed, not asserted: half a minute on a loaded machine is too short to tell a leak
from the allocator settling; the real figure comes from ``llnode bench soak`` (docs/faults.md).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from llnode.bench.soak import soak


def test_short_soak_has_no_errors_and_no_fd_growth(tiny_llama_shards: Path, tmp_path: Path) -> None:
    r = asyncio.run(
        soak(tiny_llama_shards, 0.5, nodes=3, concurrency=3, tokens=16, warmup_s=10, workdir=tmp_path)
    )
    print(r)
    assert r["errors"] == 0, r["error_samples"]
    assert r["completed"] > 0
    assert all(f > 0 for f in r["fds_end"]), r
    # A descriptor leaked per request would show as hundreds (every request opens connections); allow
    # a link or two that happens to be (re)connecting at the last sample.
    assert r["completed"] > 20 and r["fd_growth"] <= 2, (r["fds_warmup"], r["fds_end"])
