"""A short soak in the suite: a 3-node tiny-Llama cluster under steady concurrent load for half a minute.

No request may fail, and once the load stops no node may hold more file descriptors or asyncio tasks
than it did during warm-up, give or take a link reconnecting (hundreds of requests run: one socket,
file or task leaked per request would show at once). RSS growth is printed, not asserted: half a minute
is too short to tell a slow leak from noise; the real figure comes from ``llnode bench soak``
(docs/faults.md). The verdict arithmetic (the robust trend) is checked on its own below.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from llnode.bench.soak import soak, theil_sen, trend_growth


def test_short_soak_has_no_errors_and_no_fd_or_task_growth(tiny_llama_shards: Path, tmp_path: Path) -> None:
    timeline = tmp_path / "timeline.jsonl"
    run = soak(
        tiny_llama_shards, 0.5, nodes=3, concurrency=3, tokens=16, warmup_s=10,
        workdir=tmp_path, timeline_file=timeline, sample_every_s=2.0,
    )  # fmt: skip
    r = asyncio.run(run)
    print(r)
    assert r["errors"] == 0, r["error_samples"]
    assert r["warmup_served_all"], "warm-up ended before every prompt was served at every entry"
    assert r["completed_after_warmup"] > 20
    assert r["samples_steady"] >= 5 and len(timeline.read_text().splitlines()) >= r["samples_steady"]
    assert all(f > 0 for f in r["fds_end"]), r
    assert all(t > 0 for t in r["tasks_end"]), "the nodes' /api/status has no process section"
    # A descriptor leaked per request would show as hundreds (every request opens connections); allow
    # a link or two that happens to be (re)connecting at the last sample.
    assert r["split_samples"] == 0, "a node lost its peers: the soak did not measure a 3-node cluster"
    assert r["fd_growth"] <= 2, (r["fds_warmup"], r["fds_end"])
    assert r["task_growth"] <= 2, (r["tasks_warmup"], r["tasks_end"])


def test_trend_ignores_a_transient_and_sees_a_slope() -> None:
    ts = [float(t) for t in range(100)]
    flat = [1000.0] * 100
    for t in range(40, 46):  # a plan switch: the new stage is built before the old one is dropped
        flat[t] = 1800.0
    assert theil_sen(ts, flat)[0] == 0.0
    assert trend_growth(ts, flat) == 0.0
    leak = [1000.0 + 1.0 * t for t in ts]  # +1 per sample: +9.9 % over the run
    assert abs(trend_growth(ts, leak) - 0.099) < 1e-9
    leak[-1] = 1000.0  # one low last sample does not hide it (an end/start ratio would say 0 %)
    assert abs(trend_growth(ts, leak) - 0.099) < 1e-9


def test_trend_within_plans_ignores_a_level_change_at_a_switch_but_not_a_leak() -> None:
    ts = [float(t) for t in range(100)]
    epochs = [1] * 50 + [2] * 50
    moved = [1000.0] * 50 + [1400.0] * 50  # the new plan gave this node more modules
    assert trend_growth(ts, moved, epochs) == 0.0
    assert trend_growth(ts, moved) > 0.3  # across plans it looks like a leak
    leak = [y + 1.0 * t for t, y in zip(ts, moved, strict=True)]
    assert abs(trend_growth(ts, leak, epochs) - 0.099) < 1e-9
