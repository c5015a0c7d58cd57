"""The dashboard's view model: what the page is given, computed from a status document and gossip."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llnode.dashboard.view import History, dashboard_doc, merged_events, node_cards, plan_view


def _member(node_id: str, name: str, **extra: Any) -> dict[str, Any]:
    base = {
        "id": node_id, "name": name, "alive": True, "status": "alive", "role": "follower", "term": 3,
        "silent_s": 0.3, "self": False, "host": "10.0.0.1", "http_port": 7700,
        "memory": {"total": 4 << 30, "free": 1 << 30},
    }  # fmt: skip
    base.update(extra)
    return base


def _status(tokens: tuple[int, int] = (0, 0), epoch: int = 2) -> dict[str, Any]:
    plan = {
        "epoch": epoch, "num_modules": 32, "solver": "cbc", "optimal": True, "tokens_per_s": 20.0,
        "bottleneck_s": 0.03,
        "stages": [
            {"device_id": "a", "start": 0, "end": 20, "compute_s": 0.025, "link_s": 0.002, "name": "phone"},
            {"device_id": "c", "start": 20, "end": 32, "compute_s": 0.018, "link_s": 0.001, "name": "laptop"},
        ],
    }  # fmt: skip
    return {
        "id": "b",
        "name": "pi",
        "cluster_id": "cafe",
        "leader": "c",
        "term": 3,
        "members": [
            _member("a", "phone", battery={"level": 41, "charging": False, "source": "termux"},
                    metrics={"decode_ms": 31.5, "queue": 2, "tokens": tokens[0], "epoch": epoch,
                             "range": [0, 20], "sessions": 1, "busy": 0.8}),
            _member("b", "pi", self=True, silent_s=0.0, metrics={"sessions": 0}),
            _member("c", "laptop", role="leader",
                    metrics={"decode_ms": 12.0, "queue": 0, "tokens": tokens[1], "steps": tokens[1] // 4,
                             "epoch": epoch - 1,
                             "range": [20, 32]},
                    plan={"model": "m", "epoch": epoch, "leader": "c", "plan": plan}),
        ],
        "pipeline": {"model": "m", "state": "serving", "serving": True, "problem": None, "events": []},
    }  # fmt: skip


def test_plan_view_covers_modules_predicted_and_measured() -> None:
    plan = plan_view(_status())
    assert plan is not None and plan["epoch"] == 2 and plan["num_modules"] == 32
    a, c = plan["stages"]
    assert (a["start"], a["end"], c["start"], c["end"]) == (0, 20, 20, 32)
    assert a["predicted_ms"] == pytest.approx(27.0) and c["predicted_ms"] == pytest.approx(19.0)
    assert a["measured_ms"] == pytest.approx(31.5)
    # c's metrics are from the previous epoch: not this stage's measurement
    assert c["measured_ms"] is None


def test_plan_view_error_and_absent() -> None:
    status = _status()
    del status["pipeline"]
    status["members"][2]["plan"] = {"model": "m", "epoch": 5, "leader": "c", "error": "needs 3 GiB more"}
    plan = plan_view(status)
    assert plan == {"epoch": 5, "model": "m", "leader": "c", "error": "needs 3 GiB more", "stages": []}
    status["members"][2].pop("plan")
    assert plan_view(status) is None


def test_cards_roles_resources() -> None:
    status = _status()
    cards = {c["id"]: c for c in node_cards(status, plan_view(status))}
    assert cards["a"]["role"] == "stage 0" and cards["a"]["battery"] == {"level": 41, "charging": False}
    assert cards["c"]["role"] == "leader · stage 1" and cards["c"]["leader"]
    assert cards["b"]["role"] == "idle" and cards["b"]["self"] and cards["b"]["battery"] is None
    assert cards["a"]["queue"] == 2 and cards["a"]["memory_total"] == 4 << 30
    assert cards["a"]["address"] == "10.0.0.1:7700"


def test_history_rates_survive_counter_resets() -> None:
    history = History()
    t = 1000.0
    counts = [(0, 0), (0, 0), (40, 40), (40, 40), (80, 80), (5, 80), (45, 120)]
    samples = []
    for i, (a, c) in enumerate(counts):
        samples.append(history.observe(_status((a, c)), now=t + 2.0 * i))
    # 40 tokens every 2 s through the last stage (c): 20 tokens/s over the window
    assert samples[4]["tps"] == pytest.approx(80 / 6, rel=0.01)
    assert samples[4]["gen"] == pytest.approx(20 / 6, rel=0.01)  # steps: generated tokens
    assert samples[-1]["tps"] == pytest.approx(80 / 6, rel=0.01)
    # a's counter restarted (new stage worker): its total keeps growing, never negative
    assert history._totals["tokens:a"] == 125
    assert samples[-1]["stage_ms"] == {"a": 31.5} and samples[-1]["queue"] == {"a": 2, "c": 0}
    assert len(history.samples) == len(counts)


def test_history_horizon() -> None:
    history = History(horizon_s=10.0)
    for i in range(30):
        history.observe(_status(), now=1000.0 + i)
    assert len(history.samples) == 11 and history.samples[0]["t"] == 1019.0


def test_events_from_membership_leader_and_plan() -> None:
    history = History()
    status = _status()
    history.observe(status, now=1.0)
    kinds = [e["kind"] for e in history.events]
    assert kinds == ["election", "plan"]  # first sight: no joins for members already there
    dead = copy.deepcopy(status)
    dead["members"][0].update(status="dead", alive=False)
    history.observe(dead, now=2.0)
    assert history.events[-1]["kind"] == "leave" and "phone is dead" in history.events[-1]["message"]
    new = copy.deepcopy(dead)
    new["members"].append(_member("d", "tablet"))
    new["leader"], new["term"] = "a", 4
    history.observe(new, now=3.0)
    assert [e["kind"] for e in list(history.events)[-2:]] == ["join", "election"]
    assert "tablet joined" in history.events[-2]["message"]
    # a goodbye is told apart from a crash
    gone = copy.deepcopy(new)
    gone["members"][3].update(status="dead", alive=False, leaving=True)
    history.observe(gone, now=4.0)
    assert "said goodbye" in history.events[-1]["message"]
    replanned = _status(epoch=3)
    history.observe(replanned, now=5.0)
    plan_events = [e for e in history.events if e["kind"] == "plan"]
    assert [e["epoch"] for e in plan_events] == [2, 3]
    assert "phone[0,20)" in plan_events[-1]["message"]


def test_merged_events_prefer_pipeline_plan_events() -> None:
    history = History()
    status = _status()
    history.observe(status, now=1.0)
    status["pipeline"]["events"] = [
        {"t": 0.5, "kind": "profile", "message": "profiled"},
        {"t": 1.5, "kind": "plan", "message": "epoch 2: why", "epoch": 2},
        {"t": 2.0, "kind": "rebalance", "message": "stage 0 drifted", "gain": 1.3},
    ]
    events = merged_events(history, status)
    assert [e["kind"] for e in events] == ["profile", "election", "plan", "rebalance"]
    assert events[2]["message"] == "epoch 2: why" and events[3]["gain"] == 1.3


def test_dashboard_doc_shape() -> None:
    history = History()
    status = _status()
    status["pipeline"]["fetch"] = {
        "files": [{"model": "m", "file": "003-layer.onnx", "peer": "a", "done": 10, "total": 40}],
        "rate_bytes_per_s": 5.0, "completed": [],
    }  # fmt: skip
    history.observe(status, now=1.0)
    doc = dashboard_doc(status, history, with_history=True)
    assert [n["name"] for n in doc["nodes"]] == ["phone", "pi", "laptop"]
    assert doc["transfers"]["files"][0]["done"] == 10 and len(doc["history"]) == 1
    assert doc["pipeline"]["serving"] is True and doc["sample"] == history.samples[-1]
    assert "history" not in dashboard_doc(status, history, with_history=False)
