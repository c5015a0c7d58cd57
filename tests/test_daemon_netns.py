"""Daemons in separate network namespaces joined by a bridge: discovery and links over real interfaces.

Needs root and ``ip netns`` (CI has both); skips with the reason elsewhere. Everything is created inside
namespaces this test owns (a "switch" namespace holding the bridge, one namespace per node, private
10.x addresses) and deleted afterwards, even when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_util import REPO, wait_until

pytestmark = pytest.mark.netns

SUBNET = "10.213.77"
TOKEN = "netns-test-token"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _can_netns() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"llprobe{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", probe], check=True, capture_output=True, timeout=20)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns unavailable: {exc}"
    return None


@pytest.fixture
def netns_lan() -> Iterator[list[str]]:
    reason = _can_netns()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    switch = f"llsw{tag}"
    nodes = [f"lln{i}{tag}" for i in range(3)]
    created: list[str] = []
    try:
        for ns in (switch, *nodes):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", "br0", "type", "bridge", ns=switch)
        _ip("link", "set", "br0", "up", ns=switch)
        for i, ns in enumerate(nodes):
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", switch, ns=ns)
            _ip("addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", f"p{i}", "master", "br0", ns=switch)
            _ip("link", "set", f"p{i}", "up", ns=switch)
        yield nodes
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True, timeout=20)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _status(ns: str, port: int) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "llnode", "status", "--json",
         "--node", f"http://127.0.0.1:{port}", "--api-token", TOKEN, "--timeout", "2"],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_discovery_and_links_across_namespaces(netns_lan: list[str], tmp_path: Path) -> None:
    key = secrets.token_hex(32)
    env = dict(os.environ, LLNODE_CLUSTER_KEY=key, PYTHONPATH=str(REPO), LLNODE_API_TOKEN=TOKEN)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    port = 7700
    try:
        for i, ns in enumerate(netns_lan):
            # defaults: HTTP on all interfaces (with a token), peer links on 0.0.0.0, mDNS on eth0 only
            # an empty shard root: this test is about the network, not about loading a model
            args = ["--port", str(port), "--data-dir", str(tmp_path / ns), "--name", f"ns{i}",
                    "--host", "0.0.0.0", "--gossip-interval", "0.25",
                    "--shards", str(tmp_path / "no-shards")]  # fmt: skip
            if i == 2:  # the third node hears no multicast: it only has a seed in another namespace
                args += ["--no-mdns", "--peer", f"{SUBNET}.1:{port}"]
            log = tmp_path / f"{ns}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, sys.executable, "-m", "llnode", "run", *args],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=tmp_path,
                    )
                )

        def converged() -> dict[str, Any] | None:
            docs = [_status(ns, port) for ns in netns_lan]
            for doc in docs:
                if sorted(m["name"] for m in doc["members"] if m["alive"]) != ["ns0", "ns1", "ns2"]:
                    return None
            if len({(d["leader"], d["term"]) for d in docs}) != 1 or docs[0]["leader"] is None:
                return None
            return docs[0]

        doc = wait_until(converged, 40, interval=0.5, what="netns convergence")
        hosts = {m["name"]: m["host"] for m in doc["members"]}
        assert hosts == {f"ns{i}": f"{SUBNET}.{i + 1}" for i in range(3)}  # real interface addresses
        # ns1 found ns0 by multicast across the bridge (it has no seed); links are up between all
        s1 = _status(netns_lan[1], port)
        assert len(s1["links"]) == 2 and s1["mdns"] is True

        # a node cut off (its process killed) is declared dead across namespaces
        procs[1].kill()
        procs[1].wait(10)
        t0 = time.monotonic()
        wait_until(
            lambda: all(
                any(m["name"] == "ns1" and not m["alive"] for m in _status(ns, port)["members"])
                for ns in (netns_lan[0], netns_lan[2])
            ),
            15, interval=0.5, what="ns1 dead",
        )  # fmt: skip
        print(f"ns1 declared dead after {time.monotonic() - t0:.1f}s (upper bound, includes polling)")
    except BaseException:
        for log in logs:
            sys.stderr.write(f"===== {log.name}\n{log.read_text(errors='replace')[-12000:]}\n")
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
