"""Gossip membership: every node's state, versioned, spread epidemically over the peer links.

Each entry is ``(id, incarnation, version, heartbeat, data)``. ``incarnation`` is the node's start time
(ns), so a restarted node's state supersedes its previous life; ``version`` grows with every change of
``data`` by its owner; ``heartbeat`` grows every round. Entries merge newest-wins on that triple, so any
order of delivery converges to the same view, in O(log n) rounds (each round pushes the full view to
``fanout`` random linked peers, who answer with whatever they know better: push-pull).

``data`` is open: any part of llnode publishes its own keys with ``gossip.set_local("metrics", {...})``
and reads other nodes' with ``gossip.view[node_id].data.get("metrics")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llnode.net.codec import FrameError, pack_body
from llnode.net.failure import ALIVE, DEAD, FailureDetector
from llnode.net.links import Links, PeerUnavailable

log = logging.getLogger(__name__)

PUSH = "gossip.push"
MAX_ENTRIES = 1024

Listener = Callable[[str], None]


@dataclass
class Entry:
    id: str
    inc: int
    ver: int
    hb: int
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.inc, self.ver, self.hb)

    def to_wire(self, alive: bool) -> list[Any]:
        return [self.id, self.inc, self.ver, self.hb, self.data, alive]

    @staticmethod
    def from_wire(item: Any) -> tuple[Entry, bool]:
        if not isinstance(item, list) or len(item) != 6:
            raise ValueError("gossip entry must be [id, inc, ver, hb, data, alive]")
        node_id, inc, ver, hb, data, alive = item
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
            raise ValueError("gossip entry with a bad node id")
        for v in (inc, ver, hb):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
                raise ValueError("gossip entry with a bad counter")
        if not isinstance(data, dict) or not isinstance(alive, bool):
            raise ValueError("gossip entry with bad data")
        return Entry(node_id, inc, ver, hb, data), alive


class Gossip:
    """The node's view of the cluster, and the loop that keeps it in sync with the others."""

    def __init__(
        self,
        node_id: str,
        links: Links,
        *,
        interval: float = 0.5,
        fanout: int = 3,
        suspect_after: float = 2.0,
        dead_after: float = 3.5,
        forget_after: float = 600.0,
    ) -> None:
        self.node_id = node_id
        self.links = links
        self.interval = interval
        self.fanout = fanout
        self.forget_after = forget_after
        self.detector = FailureDetector(suspect_after, dead_after)
        self.local = Entry(node_id, time.time_ns(), 1, 0, {})
        self.view: dict[str, Entry] = {node_id: self.local}
        self._status: dict[str, str] = {node_id: ALIVE}
        self._dead_since: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self.rejected = 0

    # ---- local state ------------------------------------------------------------------------------
    def set_local(self, key: str, value: Any) -> None:
        """Publish ``key`` in this node's state (gossiped to all); no-op if unchanged.
        Raises ``FrameError`` at once if the value cannot travel (msgpack types and numpy arrays only)."""
        if self.local.data.get(key) == value:
            return
        pack_body(PUSH, 0, 0, value)
        self.local.data[key] = value
        self.local.ver += 1
        self._emit("view")

    def update_local(self, values: dict[str, Any]) -> None:
        changed = {k: v for k, v in values.items() if self.local.data.get(k) != v}
        if changed:
            pack_body(PUSH, 0, 0, changed)
            self.local.data.update(changed)
            self.local.ver += 1
            self._emit("view")

    def get(self, node_id: str, key: str, default: Any = None) -> Any:
        entry = self.view.get(node_id)
        return default if entry is None else entry.data.get(key, default)

    # ---- membership -------------------------------------------------------------------------------
    def status(self, node_id: str) -> str:
        return ALIVE if node_id == self.node_id else self.detector.status(node_id)

    def is_alive(self, node_id: str) -> bool:
        """Alive or only suspected: a suspect stays a member until it is declared dead."""
        return node_id in self.view and self.status(node_id) != DEAD

    def live_ids(self) -> list[str]:
        return sorted(i for i in self.view if self.is_alive(i))

    def subscribe(self, listener: Listener) -> None:
        """``listener(kind)`` with kind "membership" (a node joined, left, died or came back) or
        "view" (some node's data changed). Called synchronously; keep it quick."""
        self._listeners.append(listener)

    def _emit(self, kind: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind)
            except Exception:
                log.exception("gossip listener failed")

    # ---- loop -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.links.on(PUSH, self._on_push, inline=True)
        self.links.connect_callbacks.append(self._on_link_up)
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def leave(self, wait: float = 1.0) -> None:
        """Tell every linked peer we are leaving (a clean stop), so they mark us dead at once instead of
        after ``dead_after`` seconds of silence. A restart is a new incarnation and clears it."""
        self.local.data["leaving"] = True
        self.local.ver += 1
        payload = {"entries": self._wire_entries([self.local]), "reply": True}
        sends = [self._send_quietly(p, payload) for p in self.links.connected_peers()]
        if sends:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*sends), wait)

    async def _loop(self) -> None:
        next_round = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                if now >= next_round:
                    self.local.hb += 1
                    self.rounds += 1
                    await self._round()
                    next_round = now + self.interval
                self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the heartbeat must never stop while the process lives
                log.exception("gossip round failed")
                next_round = now + self.interval
            await asyncio.sleep(min(self.interval / 2, max(0.01, next_round - time.monotonic())))

    async def _round(self) -> None:
        peers = self.links.connected_peers()
        random.shuffle(peers)
        targets = peers[: self.fanout]
        if not targets:
            return
        payload = {"entries": self._wire_entries(), "reply": False}
        for peer in targets:
            with contextlib.suppress(PeerUnavailable, TimeoutError, ConnectionError, FrameError):
                await self.links.send(peer, PUSH, payload)

    def _wire_entries(self, only: list[Entry] | None = None) -> list[list[Any]]:
        entries = self.view.values() if only is None else only
        return [e.to_wire(self.status(e.id) != DEAD) for e in entries]

    def _on_link_up(self, peer_id: str, info: dict[str, Any]) -> None:
        """A fresh link: exchange views at once instead of waiting for a random round to pick it."""
        payload = {"entries": self._wire_entries(), "reply": False}
        task = asyncio.ensure_future(self._send_quietly(peer_id, payload))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _send_quietly(self, peer_id: str, payload: dict[str, Any]) -> None:
        with contextlib.suppress(PeerUnavailable, ConnectionError):
            await self.links.send(peer_id, PUSH, payload)

    async def _on_push(self, peer_id: str, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("entries"), list):
            raise ValueError("gossip push without entries")
        items = payload["entries"]
        if len(items) > MAX_ENTRIES:
            raise ValueError(f"gossip push with {len(items)} entries")
        theirs: dict[str, tuple[int, int, int]] = {}
        for item in items:
            try:
                entry, alive = Entry.from_wire(item)
            except ValueError as exc:
                self.rejected += 1
                log.warning("ignored a gossip entry from %s: %s", peer_id, exc)
                continue
            theirs[entry.id] = entry.key
            self._merge(entry, alive)
        self.check()
        if payload.get("reply") is False:
            better = [e for i, e in self.view.items() if i not in theirs or e.key > theirs[i]]
            if better:
                await self.links.send(peer_id, PUSH, {"entries": self._wire_entries(better), "reply": True})

    def _merge(self, entry: Entry, alive: bool) -> None:
        if entry.id == self.node_id:
            return
        current = self.view.get(entry.id)
        if current is not None and entry.key <= current.key:
            return
        self.view[entry.id] = entry
        if entry.data.get("leaving"):
            self.detector.heard(entry.id, fresh=False)  # said goodbye: dead now, not after a timeout
            self.check()
            return
        if current is None:
            self.detector.heard(entry.id, fresh=alive)
            log.info("new member %s (%s)", entry.id, entry.data.get("name", "?"))
            self._emit("membership")
        else:
            # Progress of the counters is evidence of life; a new incarnation is a restart.
            if entry.inc != current.inc or entry.hb > current.hb:
                self.detector.heard(entry.id)
            if entry.ver != current.ver or entry.inc != current.inc:
                self._emit("view")

    def check(self) -> None:
        """Re-evaluate every member's status; emit "membership" when any changes."""
        changed = False
        now = time.monotonic()
        for node_id in list(self.view):
            status = self.status(node_id)
            if self._status.get(node_id) != status:
                old = self._status.get(node_id)
                self._status[node_id] = status
                if old is not None:
                    log.info("member %s: %s -> %s", node_id, old, status)
                changed = True
            if status == DEAD:
                since = self._dead_since.setdefault(node_id, now)
                if now - since > self.forget_after:
                    self.view.pop(node_id, None)
                    self._status.pop(node_id, None)
                    self._dead_since.pop(node_id, None)
                    self.detector.forget(node_id)
                    self.links.forget_peer(node_id)
                    changed = True
            else:
                self._dead_since.pop(node_id, None)
        if changed:
            self._emit("membership")

    def members(self) -> list[dict[str, Any]]:
        """One dict per known node, for status pages: id, name, alive, status, role, term, and data."""
        out = []
        for node_id in sorted(self.view):
            e = self.view[node_id]
            status = self.status(node_id)
            out.append(
                {
                    "id": node_id,
                    "name": e.data.get("name", ""),
                    "alive": status != DEAD,
                    "status": status,
                    "role": e.data.get("role", "follower"),
                    "term": e.data.get("term", 0),
                    "silent_s": 0.0
                    if node_id == self.node_id
                    else round(self.detector.silent_for(node_id), 2),
                    "self": node_id == self.node_id,
                    **{k: v for k, v in e.data.items() if k not in ("name", "role", "term")},
                }
            )
        return out
