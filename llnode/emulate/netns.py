"""A LAN on one machine: every node in its own network namespace, joined by a bridge, links shaped by ``tc``.

Why namespaces and not loopback: on loopback every byte is free and instant, so a plan that ignores
the links looks as good as one that respects them. Here each node has a real interface (``eth0``, a
veth into a "switch" namespace holding the bridge ``br0``), discovery is real multicast across the
bridge, and each node's Wi-Fi is a token bucket (``tc tbf``) on both ends of its veth: its uplink (its
own ``eth0`` egress) and its downlink (the bridge port's egress). A hop A -> B therefore crosses A's
uplink and B's downlink, like two phones talking through one access point.

What is not emulated: propagation latency. ``netem`` is not available on these kernels, and no other
qdisc adds a fixed delay; the token bucket adds queueing delay only when a link is busy. The simulator
takes RTTs from the link profiles, so the validation compares like with like (no added RTT on either
side) and says so.

The root namespace gets one more veth into the bridge (``.254``) so that benchmarks and tests talk HTTP
to the nodes at their real addresses. Everything is torn down by :meth:`Lan.close`, also on failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from llnode.cluster import LocalCluster

CMD_TIMEOUT_S = 20


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (with the command and its error)."""


def _run(*cmd: str, ns: str | None = None) -> None:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    try:
        subprocess.run(full, check=True, capture_output=True, timeout=CMD_TIMEOUT_S, text=True)
    except subprocess.CalledProcessError as exc:
        raise NetnsError(f"{' '.join(full)}: {exc.stderr.strip() or exc}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(full)}: {exc}") from exc


def unavailable_reason() -> str | None:
    """None when namespaces, veth, bridges and ``tc tbf`` work here, else why not (tests skip with it)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2 ({tool})"
    probe = f"llprobe{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "link", "add", "a0", "type", "veth", "peer", "name", "b0", ns=probe)
        _run(
            "tc",
            "qdisc",
            "add",
            "dev",
            "a0",
            "root",
            "tbf",
            "rate",
            "8mbit",
            "burst",
            "16kb",
            "latency",
            "100ms",
            ns=probe,
        )
    except NetnsError as exc:
        return f"network namespaces or tc tbf unavailable: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=CMD_TIMEOUT_S)
    return None


def tbf_args(mbit: float) -> list[str]:
    """``tc`` arguments of a token bucket at ``mbit`` Mbit/s.

    The bucket holds at least one 64 KiB GSO super-packet (veths hand TCP segments over unsplit) and
    10 ms of traffic; the queue may hold 300 ms of traffic before dropping, as a Wi-Fi driver's does.
    """
    if not mbit > 0:
        raise NetnsError(f"link rate must be > 0 Mbit/s, got {mbit}")
    rate_bytes = mbit * 1e6 / 8
    burst = max(64 * 1024 + 1514, int(rate_bytes * 0.01))
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "300ms"]


@dataclass
class Lan:
    """``nodes`` namespaces on one bridge; ``mbit[i]`` shapes node i's link (None: unshaped)."""

    nodes: int
    mbit: Sequence[float | None] = ()
    subnet: str = ""  # "10.x.y"; random by default so that parallel runs never collide
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)
    host_if: str = ""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.nodes > 200:
            raise NetnsError(f"nodes must be within 1..200, got {self.nodes}")
        if self.mbit and len(self.mbit) != self.nodes:
            raise NetnsError(f"{len(self.mbit)} link rates for {self.nodes} nodes")
        if not self.subnet:
            self.subnet = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(250) + 1}"

    @property
    def switch(self) -> str:
        return f"llsw{self.tag}"

    def ns(self, i: int) -> str:
        return f"lln{i}x{self.tag}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.254"

    def up(self) -> Lan:
        """Create everything; on any failure remove what was created and raise NetnsError."""
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def _up(self) -> None:
        for ns in (self.switch, *(self.ns(i) for i in range(self.nodes))):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "link", "set", "lo", "up", ns=ns)
        _run("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        _run("ip", "link", "set", "br0", "up", ns=self.switch)
        for i in range(self.nodes):
            ns = self.ns(i)
            _run(
                "ip",
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                self.switch,
                ns=ns,
            )
            _run("ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0", ns=ns)
            _run("ip", "link", "set", "eth0", "up", ns=ns)
            _run("ip", "link", "set", f"p{i}", "master", "br0", ns=self.switch)
            _run("ip", "link", "set", f"p{i}", "up", ns=self.switch)
            self.shape(i, self.mbit[i] if self.mbit else None)
        # the root namespace's own port on the bridge: benchmarks reach every node at its address
        self.host_if = f"llh{self.tag}"
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "ph", "netns", self.switch)
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "link", "set", "ph", "master", "br0", ns=self.switch)
        _run("ip", "link", "set", "ph", "up", ns=self.switch)

    def shape(self, i: int, mbit: float | None) -> None:
        """Set (or, with None, remove) node i's link rate, both directions; also while nodes run."""
        for ns, dev in ((self.ns(i), "eth0"), (self.switch, f"p{i}")):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                capture_output=True,
                timeout=CMD_TIMEOUT_S,
            )
            if mbit is not None:
                _run("tc", "qdisc", "add", "dev", dev, "root", *tbf_args(mbit), ns=ns)

    def close(self) -> None:
        """Delete every namespace (their veths and qdiscs go with them) and the root-side veth."""
        if self.host_if:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=CMD_TIMEOUT_S)
            self.host_if = ""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=CMD_TIMEOUT_S)
        self.created.clear()

    def __enter__(self) -> Lan:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class NetnsCluster(LocalCluster):
    """:class:`LocalCluster` with node i inside ``lan.ns(i)``, bound to its own address.

    Everything else (data dirs, cluster key, CPU quotas, environment, logs, stop) is LocalCluster's.
    The HTTP API listens on the node's LAN address, which the daemon allows only with a bearer token,
    so one random token is set on every node and sent by :meth:`status` and :attr:`headers`.
    """

    lan: Lan | None = None
    api_token: str = field(default_factory=lambda: secrets.token_hex(16))

    def url(self, i: int) -> str:
        assert self.lan is not None
        return f"http://{self.lan.ip(i)}:{self.base_port + i}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_token}"}

    def node_args(self, i: int) -> list[str]:
        assert self.lan is not None
        ip = self.lan.ip(i)
        return [
            "ip",
            "netns",
            "exec",
            self.lan.ns(i),
            *super().node_args(i),
            "--host",
            ip,
            "--peer-host",
            ip,
            "--mdns-interface",
            ip,
            "--api-token",
            self.api_token,
        ]

    async def status(self, i: int, session: aiohttp.ClientSession) -> dict[str, object] | None:
        try:
            async with session.get(
                f"{self.url(i)}/api/status", headers=self.headers, timeout=aiohttp.ClientTimeout(2)
            ) as r:
                if r.status != 200:
                    return None
                data: dict[str, object] = await r.json()
                return data
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
