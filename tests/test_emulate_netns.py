"""The emulated LAN: namespaces on a bridge, reachable from the host, links shaped by tc tbf for real.

Needs root, ``ip netns`` and ``tc`` (CI has them); skips with the reason elsewhere. The shaping is
checked by timing a real TCP transfer between two namespaces, unshaped and at 2 Mbit/s.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from llnode.emulate.netns import Lan, NetnsError, tbf_args, unavailable_reason

pytestmark = pytest.mark.netns

PAYLOAD = 250_000  # bytes: 1 s at 2 Mbit/s

RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9100)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while n < int(sys.argv[2]):
    b = c.recv(65536)
    if not b: break
    t0 = t0 or time.perf_counter(); n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""

SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], 9100)); s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def _transfer_s(lan: Lan) -> float:
    rx = subprocess.Popen(
        ["ip", "netns", "exec", lan.ns(1), sys.executable, "-c", RECEIVER, lan.ip(1), str(PAYLOAD)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        subprocess.run(
            ["ip", "netns", "exec", lan.ns(0), sys.executable, "-c", SENDER, lan.ip(1), str(PAYLOAD)],
            check=True,
            timeout=60,
        )
        got, seconds = rx.communicate(timeout=60)[0].split()
    finally:
        if rx.poll() is None:
            rx.kill()
    assert int(got) == PAYLOAD
    return float(seconds)


def test_lan_shapes_links_and_cleans_up() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lan = Lan(2).up()
    try:
        # the host reaches every node at its own address (benchmarks talk HTTP to them this way)
        for i in range(2):
            out = subprocess.run(["ip", "netns", "exec", lan.ns(i), "ip", "-4", "addr", "show", "eth0"],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            assert lan.ip(i) in out.stdout
        srv = subprocess.Popen(
            ["ip", "netns", "exec", lan.ns(0), sys.executable, "-c", RECEIVER, lan.ip(0), "1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        with socket.create_connection((lan.ip(0), 9100), timeout=5) as s:
            s.sendall(b"y")
        srv.communicate(timeout=10)
        fast = _transfer_s(lan)
        lan.shape(0, 2.0)
        lan.shape(1, 2.0)
        t0 = time.perf_counter()
        slow = _transfer_s(lan)
        print(f"250 kB: unshaped {fast:.3f} s, at 2 Mbit/s {slow:.3f} s ({time.perf_counter() - t0:.1f} s)")
        # from the first byte: the bucket lets its first ~66 kB through at once, the rest runs at 250 kB/s
        assert 0.6 < slow < 1.5
        assert slow > 5 * fast
        lan.shape(0, None)  # shaping can be lifted while the LAN runs
        lan.shape(1, None)
        assert _transfer_s(lan) < slow / 5
    finally:
        lan.close()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lan.tag not in names  # every namespace is gone


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(NetnsError, match="must be > 0"):
        tbf_args(0)
    with pytest.raises(NetnsError, match="2 link rates for 3 nodes"):
        Lan(3, mbit=[1.0, 2.0])
    with pytest.raises(NetnsError, match="nodes must be within"):
        Lan(0)
