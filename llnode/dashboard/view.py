"""What the dashboard shows, computed on the node from its ``/api/status`` document and gossip view.

The browser gets one compact JSON document (``/api/dashboard``, and the same on ``/api/events`` every
second) instead of the raw status: the raw one carries every node's profile, inventory and the full plan
(tens of kB per node), too much to push to a phone each second. Everything here is a pure function of the
status document plus a small :class:`History` kept on the node, so the view is testable without a browser
and every node renders the same cluster (it is all gossip) apart from its own local events.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

HISTORY_S = 300.0  # the charts show the last five minutes
SAMPLE_S = 1.0
RATE_WINDOW_S = 6.0  # metrics are gossiped at most every 2 s: a shorter window makes a saw-tooth
MAX_EVENTS = 60


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def published_plan(status: dict[str, Any]) -> dict[str, Any] | None:
    """The leader's gossiped plan entry ``{model, epoch, leader, plan | error}``, from the gossip view."""
    pipeline = status.get("pipeline")
    if isinstance(pipeline, dict) and isinstance(pipeline.get("plan"), dict):
        return pipeline["plan"]
    leader = status.get("leader")
    for m in status.get("members", []):
        if m.get("id") == leader and isinstance(m.get("plan"), dict):
            entry: dict[str, Any] = m["plan"]
            return entry
    return None


def plan_view(status: dict[str, Any]) -> dict[str, Any] | None:
    """The plan bar: stages with ranges, predicted and measured ms/token (measured = the stage node's
    gossiped decode EWMA, only when that node runs exactly this range of this epoch)."""
    entry = published_plan(status)
    if entry is None:
        return None
    out: dict[str, Any] = {k: entry.get(k) for k in ("epoch", "model", "leader")}
    if "error" in entry:
        out["error"] = str(entry["error"])
    plan = entry.get("plan")
    if not isinstance(plan, dict):
        out["stages"] = []
        return out
    members = {m.get("id"): m for m in status.get("members", [])}
    stages = []
    for k, s in enumerate(plan.get("stages", [])):
        node = members.get(s.get("device_id"), {})
        metrics = node.get("metrics") if isinstance(node.get("metrics"), dict) else {}
        rng = [s.get("start"), s.get("end")]
        same = metrics.get("epoch") == plan.get("epoch") and metrics.get("range") == rng
        compute, link = _num(s.get("compute_s")) or 0.0, _num(s.get("link_s")) or 0.0
        measured = _num(metrics.get("decode_ms")) if same else None
        stages.append(
            {
                "index": k,
                "device_id": s.get("device_id"),
                "name": s.get("name") or node.get("name") or s.get("device_id"),
                "start": s.get("start"),
                "end": s.get("end"),
                "predicted_ms": round(1000.0 * (compute + link), 3),
                "compute_ms": round(1000.0 * compute, 3),
                "link_ms": round(1000.0 * link, 3),
                "measured_ms": None if measured is None else round(measured, 3),
                "memory_bytes": s.get("memory_bytes"),
                "alive": bool(node.get("alive", False)),
            }
        )
    out.update(
        num_modules=plan.get("num_modules"),
        solver=plan.get("solver"),
        optimal=plan.get("optimal"),
        tokens_per_s=_num(plan.get("tokens_per_s")),
        bottleneck_ms=round(1000.0 * (_num(plan.get("bottleneck_s")) or 0.0), 3),
        stages=stages,
        left_out=plan.get("left_out") or {},
    )
    return out


def node_cards(status: dict[str, Any], plan: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One card per member: who, where, role (leader / stage k / idle), liveness, resources, load."""
    stage_of = {s["device_id"]: s["index"] for s in (plan or {}).get("stages", [])}
    leader = status.get("leader")
    cards = []
    for m in status.get("members", []):
        node_id = m.get("id")
        metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
        memory = m.get("memory") if isinstance(m.get("memory"), dict) else {}
        battery = m.get("battery") if isinstance(m.get("battery"), dict) else None
        stage = stage_of.get(node_id)
        roles = (["leader"] if node_id == leader else []) + ([f"stage {stage}"] if stage is not None else [])
        host, port = m.get("host"), m.get("http_port")
        cards.append(
            {
                "id": node_id,
                "name": m.get("name") or node_id,
                "address": f"{host}:{port}" if host and port else None,
                "status": m.get("status", "alive"),
                "alive": bool(m.get("alive", True)),
                "self": bool(m.get("self")),
                "leader": node_id == leader,
                "stage": stage,
                "role": " · ".join(roles) or "idle",
                "term": m.get("term", 0),
                "silent_s": _num(m.get("silent_s")) or 0.0,
                "version": m.get("version"),
                "cores": m.get("cores"),
                "cpu_limit": _num(m.get("cpu_limit")),  # a cgroup quota, in cores (None: unreported)
                "memory_total": _num(memory.get("total")),
                "memory_free": _num(memory.get("free")),
                "battery": None
                if battery is None
                else {"level": battery.get("level"), "charging": battery.get("charging")},
                "sessions": metrics.get("sessions", 0),
                "queue": metrics.get("queue"),
                "busy": _num(metrics.get("busy")),
                "decode_ms": _num(metrics.get("decode_ms")),
                "range": metrics.get("range"),
                "stage_state": m.get("stage") if isinstance(m.get("stage"), dict) else None,
            }
        )
    return cards


@dataclass
class History:
    """Samples of gossiped counters over the last minutes, and the events the node saw happen.

    Kept on the node (not in the browser) so that a page opened now still shows the last five minutes.
    """

    horizon_s: float = HISTORY_S
    samples: deque[dict[str, Any]] = field(default_factory=deque)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    _counters: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)
    _totals: dict[str, int] = field(default_factory=dict)
    _last: dict[str, int] = field(default_factory=dict)
    _members: dict[str, str] = field(default_factory=dict)
    _leader: tuple[Any, Any] = (None, None)
    _plan_epoch: Any = None

    def event(self, kind: str, message: str, t: float | None = None, **data: Any) -> None:
        self.events.append({"t": time.time() if t is None else t, "kind": kind, "message": message, **data})

    def observe(self, status: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """Record one sample (cluster tokens/s, each stage's ms/token, queues) and derive events from
        what changed since the last call: joins, deaths, leaves, recoveries, elections, new plans."""
        now = time.time() if now is None else now
        self._derive_events(status, now)
        plan = plan_view(status)
        # Stage counters restart with every new stage worker: sum their positive steps instead.
        for m in status.get("members", []):
            metrics = m.get("metrics")
            for counter in ("tokens", "steps"):
                value = metrics.get(counter) if isinstance(metrics, dict) else None
                if not isinstance(value, int):
                    continue
                key = f"{counter}:{m['id']}"
                last = self._last.get(key)
                self._last[key] = value
                step = 0 if last is None else value if value < last else value - last
                self._totals[key] = self._totals.get(key, 0) + step
        self._counters.append((now, dict(self._totals)))
        while len(self._counters) > 1 and now - self._counters[0][0] > RATE_WINDOW_S:
            self._counters.popleft()
        rates = self._rates(now)
        stages = (plan or {}).get("stages", [])
        last_stage = next(
            (s["device_id"] for s in stages if s["end"] == (plan or {}).get("num_modules")), None
        )

        def cluster_rate(counter: str) -> float:
            """Every token passes every stage: the cluster's rate is the last stage's (else the busiest)."""
            if last_stage is not None and f"{counter}:{last_stage}" in rates:
                return rates[f"{counter}:{last_stage}"]
            return max((v for k, v in rates.items() if k.startswith(counter + ":")), default=0.0)

        tps = cluster_rate("tokens")
        # A decode step is one generated token; a prefill step is a whole prompt (one per request).
        gen = cluster_rate("steps")
        stage_ms = {s["device_id"]: s["measured_ms"] for s in stages if s["measured_ms"] is not None}
        queues = {
            m["id"]: m["metrics"].get("queue")
            for m in status.get("members", [])
            if isinstance(m.get("metrics"), dict) and isinstance(m["metrics"].get("queue"), int)
        }
        sample = {
            "t": round(now, 3),
            "tps": round(tps, 2),
            "gen": round(gen, 2),
            "stage_ms": stage_ms,
            "queue": queues,
        }
        self.samples.append(sample)
        while self.samples and now - self.samples[0]["t"] > self.horizon_s:
            self.samples.popleft()
        return sample

    def _rates(self, now: float) -> dict[str, float]:
        if len(self._counters) < 2:
            return {}
        t0, first = self._counters[0]
        span = now - t0
        if span <= 0:
            return {}
        return {n: max(0.0, (v - first.get(n, v)) / span) for n, v in self._counters[-1][1].items()}

    def _derive_events(self, status: dict[str, Any], now: float) -> None:
        names = {m.get("id"): m.get("name") or m.get("id") for m in status.get("members", [])}
        current = {m["id"]: str(m.get("status", "alive")) for m in status.get("members", []) if "id" in m}
        first = not self._members
        for node_id, st in current.items():
            old = self._members.get(node_id)
            label = names.get(node_id, node_id)
            member = next(m for m in status["members"] if m.get("id") == node_id)
            if old is None and not first and not member.get("self"):
                self.event("join", f"{label} joined ({st})", now, node=node_id)
            elif old is not None and old != st:
                if st == "dead":
                    how = "left (said goodbye)" if member.get("leaving") else "is dead (silent)"
                    self.event("leave", f"{label} {how}", now, node=node_id)
                elif st == "suspect":
                    self.event(
                        "suspect",
                        f"{label} is suspect: silent {member.get('silent_s', 0):.1f} s",
                        now,
                        node=node_id,
                    )
                elif old == "dead":
                    self.event("join", f"{label} is back", now, node=node_id)
                else:
                    self.event("alive", f"{label} answers again", now, node=node_id)
        for node_id in set(self._members) - set(current):
            self.event("leave", f"{node_id} forgotten", now, node=node_id)
        self._members = current
        leader = (status.get("leader"), status.get("term"))
        if leader != self._leader and leader[0] is not None:
            self.event(
                "election",
                f"{names.get(leader[0], leader[0])} is leader (term {leader[1]})",
                now,
                leader=leader[0],
                term=leader[1],
            )
        self._leader = leader
        entry = published_plan(status)
        epoch = entry.get("epoch") if entry else None
        if epoch is not None and epoch != self._plan_epoch:
            plan = plan_view(status) or {}
            if plan.get("error"):
                text = f"plan epoch {epoch}: infeasible: {plan['error']}"
            else:
                text = f"plan epoch {epoch}: " + ", ".join(
                    f"{s['name']}[{s['start']},{s['end']})" for s in plan.get("stages", [])
                )
                if plan.get("tokens_per_s"):
                    text += f", predicted {plan['tokens_per_s']:.1f} tok/s"
            self.event("plan", text, now, epoch=epoch)
        self._plan_epoch = epoch


def merged_events(history: History, status: dict[str, Any], limit: int = 40) -> list[dict[str, Any]]:
    """The node's own derived events and the pipeline's (profile, stage, shards, route, rebalance, ...),
    oldest first. The pipeline's "plan" events duplicate the derived ones (same epoch): keep the
    pipeline's, which carry the reason."""
    pipeline = status.get("pipeline")
    theirs = [dict(e) for e in pipeline.get("events", [])] if isinstance(pipeline, dict) else []
    their_epochs = {e.get("epoch") for e in theirs if e.get("kind") == "plan"}
    mine = [e for e in history.events if not (e["kind"] == "plan" and e.get("epoch") in their_epochs)]
    events = sorted(mine + theirs, key=lambda e: e.get("t", 0.0))
    return events[-limit:]


def transfers(status: dict[str, Any]) -> dict[str, Any]:
    """Shard transfers in flight on this node (with progress) and the recently completed ones."""
    pipeline = status.get("pipeline")
    fetch = pipeline.get("fetch") if isinstance(pipeline, dict) else None
    if not isinstance(fetch, dict):
        return {"files": [], "rate_bytes_per_s": 0.0, "completed": []}
    return {
        "files": list(fetch.get("files", [])),
        "rate_bytes_per_s": fetch.get("rate_bytes_per_s", 0.0),
        "completed": list(fetch.get("completed", []))[-5:],
    }


def dashboard_doc(status: dict[str, Any], history: History, *, with_history: bool) -> dict[str, Any]:
    """The document the page renders."""
    plan = plan_view(status)
    section = status.get("pipeline")
    pipeline: dict[str, Any] = section if isinstance(section, dict) else {}
    doc: dict[str, Any] = {
        "t": time.time(),
        "id": status.get("id"),
        "name": status.get("name"),
        "cluster_id": status.get("cluster_id"),
        "leader": status.get("leader"),
        "term": status.get("term"),
        "uptime_s": status.get("uptime_s"),
        "nodes": node_cards(status, plan),
        "plan": plan,
        "pipeline": {
            k: pipeline.get(k)
            for k in ("model", "state", "serving", "problem", "epoch", "sessions", "recoveries")
        },
        "transfers": transfers(status),
        "events": merged_events(history, status),
        "sample": history.samples[-1] if history.samples else None,
    }
    if with_history:
        doc["history"] = list(history.samples)
    return doc
