"""mDNS discovery: announce this node as ``_llnode._tcp.local.`` and find the others.

The TXT record holds the node id, protocol version, HTTP and peer ports, name and the *cluster id* (a
one-way hash of the key, never the key): adverts of other clusters are ignored. Discovery only yields
addresses to dial; whether a peer belongs is decided by the authenticated handshake, so a forged advert
costs a failed dial and nothing else.

zeroconf must bind real interface addresses (``0.0.0.0`` fails with ENODEV). Phones under Termux often
never hear multicast: they still announce, and join through ``--peer`` seeds plus gossip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from llnode.net.auth import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_llnode._tcp.local."


@dataclass(frozen=True)
class Found:
    node_id: str
    name: str
    addresses: list[str]
    http_port: int
    peer_port: int


def _txt(props: dict[bytes, bytes | None], key: str) -> str:
    value = props.get(key.encode())
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


class Discovery:
    def __init__(
        self,
        *,
        node_id: str,
        cluster_id: str,
        name: str,
        http_port: int,
        peer_port: int,
        addresses: list[str],
        interfaces: list[str],
        on_found: Callable[[Found], None],
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.name = name
        self.http_port = http_port
        self.peer_port = peer_port
        self.addresses = addresses
        self.interfaces = interfaces
        self.on_found = on_found
        self.found: dict[str, Found] = {}
        self.ignored_other_clusters = 0
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.peer_port,
            properties={
                "id": self.node_id,
                "v": str(PROTOCOL_VERSION),
                "cid": self.cluster_id,
                "http": str(self.http_port),
                "peer": str(self.peer_port),
                "name": self.name[:60],
            },
            server=f"llnode-{self.node_id}.local.",
        )
        self._spawn(self._register(info))
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mDNS on %s announcing %s", ", ".join(self.interfaces), ", ".join(self.addresses))

    async def _register(self, info: AsyncServiceInfo) -> None:
        assert self._zc is not None
        try:
            await (await self._zc.async_register_service(info))
        except Exception as exc:  # a name clash or an interface going away must not kill the node
            log.warning("mDNS registration failed: %s", exc)

    def _on_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            self._spawn(self._resolve(service_type, name))

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        props = info.properties or {}
        node_id = _txt(props, "id")
        if not node_id or node_id == self.node_id:
            return
        if _txt(props, "cid") != self.cluster_id:
            self.ignored_other_clusters += 1
            log.debug("ignoring %s: another cluster", name)
            return
        if _txt(props, "v") != str(PROTOCOL_VERSION):
            log.warning("ignoring %s: protocol version %s", name, _txt(props, "v"))
            return
        try:
            http_port, peer_port = int(_txt(props, "http")), int(_txt(props, "peer"))
        except ValueError:
            return
        found = Found(
            node_id, _txt(props, "name"), info.parsed_addresses(IPVersion.V4Only), http_port, peer_port
        )
        if not found.addresses:
            return
        self.found[node_id] = found
        log.debug("mDNS found %s at %s:%d", node_id, found.addresses[0], peer_port)
        self.on_found(found)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._zc.async_unregister_all_services(), 2.0)
            with contextlib.suppress(Exception):
                await self._zc.async_close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
