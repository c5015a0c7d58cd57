"""Leader election over the gossip view: sticky leases with terms.

Rule, evaluated identically by every node on its own view:

1. The *highest term* any node has published (dead ones included) is the current term.
2. A leader claim (``role = "leader"``, ``term``, ``claimed_at`` in a node's gossip state) is valid if
   the claimant is live and its term equals the current term. Among several valid claims (two partitions
   healing, or a simultaneous start) the earliest claim wins, then the smallest id.
3. With no valid claim, the live node with the smallest id claims ``current term + 1``; everybody else
   waits for that claim to arrive by gossip (one round).
4. A node whose claim lost (a higher term exists, or a better claim of the same term) steps down.

Why this is safe enough on a LAN: the leader only decides *placement* (who runs which modules); it does
not hold data that two leaders could corrupt. A split brain lasts as long as views disagree (a few gossip
rounds), during which stale plans are fenced by the term: receivers drop messages whose term is older
than theirs (``accept_term``). The leader stays the leader while it lives (no flapping when a node with a
smaller id joins); it is replaced as soon as the failure detector declares it dead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from llnode.net.gossip import Gossip

log = logging.getLogger(__name__)

LEADER = "leader"
FOLLOWER = "follower"


class Election:
    def __init__(self, gossip: Gossip, *, grace: float = 2.0) -> None:
        self.gossip = gossip
        self.node_id = gossip.node_id
        self.grace = grace
        self.leader_id: str | None = None
        self.term = 0
        self._started = time.monotonic()
        self._listeners: list[Callable[[str | None, int], None]] = []
        self._busy = False
        self._again = False
        gossip.update_local({"role": FOLLOWER, "term": 0})

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.node_id

    def subscribe(self, listener: Callable[[str | None, int], None]) -> None:
        """``listener(leader_id, term)`` after every change of leader or term."""
        self._listeners.append(listener)

    def accept_term(self, term: int) -> bool:
        """Fencing for leader messages: False for a message from an older term (drop it)."""
        return term >= self.term

    def update(self) -> None:
        """Recompute from the current view; cheap, so call it on every membership/view change.
        Re-entrant calls (our own state change notifies the listeners again) are folded into a re-run."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        try:
            for _ in range(5):
                self._again = False
                self._update_once()
                if not self._again:
                    break
        finally:
            self._busy = False

    def _update_once(self) -> None:
        g = self.gossip
        live = g.live_ids()
        terms = [e.data.get("term", 0) for e in g.view.values()]
        current = max([t for t in terms if isinstance(t, int) and not isinstance(t, bool)] + [self.term])
        claims: list[tuple[float, str]] = []
        for node_id in live:
            data = g.view[node_id].data
            if data.get("role") == LEADER and data.get("term") == current:
                at = data.get("claimed_at", 0.0)
                claims.append((at if isinstance(at, int | float) else 0.0, node_id))
        me = g.local.data
        if claims:
            _, winner = min(claims)
            if winner != self.node_id and me.get("role") == LEADER:
                log.info("stepping down: %s leads term %d", winner, current)
                g.update_local({"role": FOLLOWER, "term": current})
            elif winner != self.node_id:
                g.update_local({"term": current})
            self._set(winner, current)
            return
        if me.get("role") == LEADER:  # my claim is stale: a higher term exists
            log.info("stepping down: term %d superseded", me.get("term", 0))
            g.update_local({"role": FOLLOWER, "term": current})
        if live and live[0] == self.node_id and time.monotonic() - self._started >= self.grace:
            new_term = current + 1
            log.info("claiming leadership for term %d (live: %s)", new_term, ", ".join(live))
            g.update_local({"role": LEADER, "term": new_term, "claimed_at": time.time()})
            self._set(self.node_id, new_term)
            return
        self._set(None, current)

    def _set(self, leader: str | None, term: int) -> None:
        if leader == self.leader_id and term == self.term:
            return
        self.leader_id, self.term = leader, max(term, self.term)
        log.info("leader: %s, term %d", leader, self.term)
        for listener in list(self._listeners):
            try:
                listener(self.leader_id, self.term)
            except Exception:
                log.exception("election listener failed")
