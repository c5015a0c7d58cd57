"""A peer link whose path dies silently (no reset, packets just vanish) is dropped within seconds.

Without ``TCP_USER_TIMEOUT`` the kernel keeps accepting writes for ~15 minutes of retransmissions and the
link looks alive: a stage would go on forwarding hidden states into the void (seen in a soak when an
emulated LAN's address was deleted under a running cluster). The peer runs in its own network namespace;
a token bucket of 8 bit/s with a 1-byte queue on the bridge's port to the peer drops every packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
import time

import pytest

from llnode.emulate.netns import Lan, unavailable_reason
from llnode.net.links import Links, PeerUnavailable

pytestmark = pytest.mark.netns

PEER = """
import asyncio, sys
from llnode.net.links import Links
async def main():
    b = Links("bbbb", bytes.fromhex(sys.argv[2]), host=sys.argv[1], port=9200)
    await b.start()
    print("ready", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def blackhole(lan: Lan) -> None:
    """Every packet the switch would deliver to the peer is dropped there, silently: it leaves the host
    fine (a local qdisc drop would be seen by TCP and end the link by itself) and vanishes on the way,
    like a phone that walked out of Wi-Fi range. The peer's MAC is pinned first, so that only TCP (not a
    failing ARP lookup) can notice."""
    mac = subprocess.run(
        ["ip", "netns", "exec", lan.ns(0), "cat", "/sys/class/net/eth0/address"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    tbf = ["tc", "qdisc", "replace", "dev", "p0", "root", "tbf", "rate", "8bit", "burst", "64", "limit", "1"]
    for cmd in (
        ["ip", "neigh", "replace", lan.ip(0), "lladdr", mac, "dev", lan.host_if, "nud", "permanent"],
        ["ip", "netns", "exec", lan.switch, *tbf],
    ):
        subprocess.run(cmd, check=True, capture_output=True)


async def watch_links(lan: Lan, key: bytes) -> tuple[float | None, bool]:
    """Two links to the peer, one with a 2 s dead-path limit and one with the kernel's default; the path
    dies; both keep sending. Returns when the first was dropped and whether the second still looks up."""
    fast = Links("aaaa", key, host=lan.host_ip, dead_link_s=2.0)
    slow = Links("cccc", key, host=lan.host_ip, dead_link_s=600.0)
    try:
        for links in (fast, slow):
            await links.start()
            assert await links.connect(lan.ip(0), 9200) == "bbbb"
        await asyncio.to_thread(blackhole, lan)
        t0 = time.monotonic()
        dropped_after: float | None = None
        while time.monotonic() - t0 < 10.0:
            for links in (fast, slow):
                if links.is_connected("bbbb"):
                    with contextlib.suppress(PeerUnavailable):
                        await links.send("bbbb", "test.note", {"pad": "x" * 200})
            if dropped_after is None and not fast.is_connected("bbbb"):
                dropped_after = time.monotonic() - t0
            await asyncio.sleep(0.1)
        return dropped_after, slow.is_connected("bbbb")
    finally:
        await fast.stop()
        await slow.stop()


def test_silently_dead_path_drops_the_link() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    key = secrets.token_bytes(32)
    with Lan(1) as lan:
        peer = subprocess.Popen(
            ["ip", "netns", "exec", lan.ns(0), sys.executable, "-c", PEER, lan.ip(0), key.hex()],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            dropped_after, control_up = asyncio.run(watch_links(lan, key))
        finally:
            peer.kill()
            peer.wait(10)
    assert dropped_after is not None, "the link over a dead path was never dropped"
    assert dropped_after < 9.0  # RTO backoff checks the 2 s limit at ~0.2, 0.6, 1.4, 3, 6.2 s
    assert control_up, "without the timeout the dead link looks alive (the control)"
