"""Real daemons (``python -m llnode run`` subprocesses) on loopback: discovery, gossip, failure, election."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_util import REPO, Daemon, LocalCluster, wait_until


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path)
    try:
        yield c
    except BaseException:
        sys.stderr.write(c.logs())
        raise
    finally:
        c.stop_all()


def _dead_in_view(observer: Daemon, node_id: str) -> bool:
    return any(m["id"] == node_id and not m["alive"] for m in observer.status()["members"])


def test_mdns_discovery_failover_and_rejoin(cluster: LocalCluster) -> None:
    nodes = [cluster.start(name, mdns=True, wait=False) for name in ("n1", "n2", "n3", "n4")]
    for n in nodes:
        n.wait_healthy()
    doc = cluster.wait_converged(nodes, timeout=25)
    ids = {n.name: n.node_id for n in nodes}
    assert {m["name"] for m in doc["members"]} == {"n1", "n2", "n3", "n4"}

    # views converge: every node holds the same state for every member (names, ports, role, term)
    def summary(d: Daemon) -> list[tuple[str, str, int, str, int]]:
        return sorted(
            (m["id"], m["name"], m["peer_port"], m["role"], m["term"]) for m in d.status()["members"]
        )

    wait_until(lambda: len({json.dumps(summary(n)) for n in nodes}) == 1, 10, what="identical views")
    leader_id = doc["leader"]
    assert sum(m["role"] == "leader" for m in doc["members"]) == 1

    # `llnode status --json` prints one object with the documented keys
    out = subprocess.run(
        [sys.executable, "-m", "llnode", "status", "--node", nodes[0].url, "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["leader"] == leader_id and status["term"] == doc["term"]
    assert all({"id", "name", "alive", "role"} <= m.keys() for m in status["members"])
    table = subprocess.run(
        [sys.executable, "-m", "llnode", "status", "--node", nodes[0].url],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "n4" in table and "leader" in table

    # kill a follower: detected dead by all others
    follower = next(n for n in nodes if ids[n.name] != leader_id)
    others = [n for n in nodes if n is not follower]
    t0 = time.monotonic()
    follower.kill()
    wait_until(lambda: all(_dead_in_view(o, ids[follower.name]) for o in others), 10, what="follower dead")
    print(f"follower declared dead by all after {time.monotonic() - t0:.2f}s")
    assert {o.status()["leader"] for o in others} == {leader_id}  # no needless re-election

    # kill the leader: survivors elect one new leader with a higher term
    leader = next(n for n in nodes if ids[n.name] == leader_id)
    survivors = [n for n in others if n is not leader]
    t0 = time.monotonic()
    leader.kill()
    doc2 = cluster.wait_converged(survivors, timeout=12)
    print(f"new leader agreed by all survivors after {time.monotonic() - t0:.2f}s")
    assert doc2["leader"] != leader_id and doc2["term"] > doc["term"]

    # the killed follower restarts from its data dir: same id, rejoins by itself
    follower.spawn().wait_healthy()
    assert follower.node_id == ids[follower.name]
    doc3 = cluster.wait_converged([*survivors, follower], timeout=20)
    assert doc3["leader"] == doc2["leader"] and doc3["term"] == doc2["term"]  # no flapping on rejoin


def test_seed_only_gossip_wrong_key_and_pause(cluster: LocalCluster) -> None:
    a = cluster.start("a", mdns=False)
    b = cluster.start("b", mdns=False, peers=[a])
    c = cluster.start("c", mdns=False, peers=[b])  # knows only b, must learn a through gossip
    cluster.wait_converged([a, b, c], timeout=20)
    ids = {d.name: d.node_id for d in (a, b, c)}
    assert c.alive_ids() == set(ids.values())

    # a node with another key, seeded with a, is refused and learns nothing
    evil = cluster.start("evil", mdns=False, peers=[a], key="ff" * 32)
    time.sleep(3)
    assert evil.alive_ids() == {evil.node_id}
    assert all(evil.node_id not in {m["id"] for m in d.status()["members"]} for d in (a, b, c))
    assert "another cluster" in evil.log()
    # ... even when it dials the peer port directly (what a hostile device on the LAN would do)
    evil2 = cluster.start("evil2", mdns=False, args=["--peer", f"127.0.0.1:{a.port}"], key="ee" * 32)
    time.sleep(1)
    assert evil2.alive_ids() == {evil2.node_id}

    # a paused process (SIGSTOP) is suspected, then dead, then taken back when it resumes
    c.pause()
    try:
        wait_until(
            lambda: any(m["id"] == ids["c"] and m["status"] == "suspect" for m in a.status()["members"]),
            6, interval=0.05, what="c suspect",
        )  # fmt: skip
        wait_until(lambda: _dead_in_view(a, ids["c"]) and _dead_in_view(b, ids["c"]), 8, what="c dead")
    finally:
        c.resume()
    cluster.wait_converged([a, b, c], timeout=15)


def test_api_token_required_off_loopback(tmp_path: Path) -> None:
    from llnode.config import ConfigError, NodeConfig

    with pytest.raises(ConfigError, match="api-token"):
        NodeConfig(host="0.0.0.0").validate()
    cluster = LocalCluster(tmp_path)
    try:
        cluster.base_env["LLNODE_API_TOKEN"] = "s3cret-token"
        d = cluster.start("tok", mdns=False)
        assert d.status()["id"] == d.node_id  # the helper sends the token
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(d.url + "/api/status", timeout=3)
        assert err.value.code == 401
        with urllib.request.urlopen(d.url + "/health", timeout=3) as resp:  # health stays public
            assert json.loads(resp.read())["ok"] is True
        assert d.terminate() == 0  # SIGTERM: clean shutdown, exit code 0
        assert "stopped" in d.log()
    finally:
        cluster.stop_all()
