"""The peer daemon: ``llnode run``, and the ``Node`` class it wraps.

A ``Node`` ties the parts together: peer links (auth + encryption), gossip membership with failure
detection, leader election, mDNS discovery, static seeds, and one aiohttp application for the HTTP API.
It is usable in-process (tests, benchmarks, other parts)::

    node = Node(NodeConfig(port=7701, data_dir="/tmp/n1"))
    node.app.router.add_get("/v1/models", handler)      # other parts add routes before start()
    node.status_providers["pipeline"] = lambda: {...}    # and sections of /api/status
    node.subscribe(lambda kind: ...)                     # "membership" | "view" | "leader"
    await node.start(); ...; await node.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from llnode import __version__
from llnode.config import (
    ConfigError,
    NodeConfig,
    add_config_arguments,
    ipv4_interfaces,
    is_loopback,
    load_config,
    parse_host_port,
)
from llnode.dashboard.routes import setup_dashboard
from llnode.net.auth import PROTOCOL_VERSION
from llnode.net.discovery import Discovery, Found
from llnode.net.election import Election
from llnode.net.gossip import Gossip
from llnode.net.keys import KeyError_, cluster_id, load_cluster_key
from llnode.net.links import Links, PeerUnavailable, RemoteError
from llnode.net.resources import snapshot
from llnode.process import snapshot as process_snapshot

log = logging.getLogger("llnode")

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PING = "link.ping"
PROBE_BYTES = 256 * 1024
StatusProvider = Callable[[], Any]
Listener = Callable[[str], Any]


def load_node_id(data_dir: Path) -> str:
    """The node's identity, created once and kept in ``<data-dir>/node_id`` across restarts."""
    path = data_dir / "node_id"
    if path.is_file():
        text = path.read_text().strip()
        if not NODE_ID_RE.match(text):
            raise ConfigError(f"{path} holds an invalid node id {text[:80]!r}; delete it to get a new one")
        return text
    node_id = secrets.token_hex(8)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)
    return node_id


class Node:
    """One llnode daemon. Construct, optionally extend (routes, status providers, link handlers), start."""

    def __init__(self, config: NodeConfig, *, key: bytes | None = None) -> None:
        config.validate()
        self.config = config
        self.data_dir = config.data_path
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = load_node_id(self.data_dir)
        if key is None:
            key, self.key_source = load_cluster_key(config)
        else:
            self.key_source = "given"
        self.cluster_id = cluster_id(key)
        self.name = config.effective_name
        self.advertise_host = config.effective_advertise_host()
        self.started_at = time.time()
        self.links = Links(
            self.node_id, key, host=config.peer_host, port=config.effective_peer_port, identity=self._identity
        )
        self.gossip = Gossip(
            self.node_id,
            self.links,
            interval=config.gossip_interval,
            suspect_after=config.suspect_after,
            dead_after=config.dead_after,
        )
        self.election = Election(self.gossip, grace=max(2.0, 4 * config.gossip_interval))
        self.discovery: Discovery | None = None
        # RSS, fds, asyncio tasks, threads: what the soak benchmark watches for leaks
        self.status_providers: dict[str, StatusProvider] = {"process": process_snapshot}
        self.public_paths: set[str] = {"/health", "/api/peer-info"}
        self.app = web.Application(middlewares=[self._auth_middleware], client_max_size=4 << 20)
        self.app[NODE_KEY] = self
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/api/status", self._status)
        self.app.router.add_get("/api/peer-info", self._peer_info)
        setup_dashboard(self.app, self)
        self._listeners: list[Listener] = []
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._listener_tasks: set[asyncio.Future[Any]] = set()
        self._seed_ids: dict[str, str] = {}
        self.seed_errors: dict[str, str] = {}
        self._stopped = asyncio.Event()
        self.link_metrics: dict[str, dict[str, float]] = {}
        self.links.on(PING, self._on_ping)
        self.gossip.subscribe(self._on_gossip)
        self.election.subscribe(lambda leader, term: self._notify("leader"))

    # ---- what other parts use -------------------------------------------------------------------------
    @property
    def leader_id(self) -> str | None:
        return self.election.leader_id

    @property
    def term(self) -> int:
        return self.election.term

    @property
    def is_leader(self) -> bool:
        return self.election.is_leader

    def live_members(self) -> list[str]:
        return self.gossip.live_ids()

    def subscribe(self, listener: Listener) -> None:
        """``listener(kind)`` on "membership", "view" or "leader" changes (sync, or async: scheduled)."""
        self._listeners.append(listener)

    def http_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        await self.links.start()
        self.gossip.update_local(
            {
                "name": self.name,
                "host": self.advertise_host,
                "http_port": cfg.port,
                "peer_port": self.links.port,
                "started": self.started_at,
                "version": __version__,
                "model": cfg.model,
            }
        )
        self.gossip.update_local(await snapshot(cfg.shards_path))
        await self.gossip.start()
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self.links.stop()
            await self.gossip.stop()
            raise
        if cfg.mdns:
            await self._start_discovery()
        self._tasks.append(asyncio.ensure_future(self._tick()))
        self._tasks.append(asyncio.ensure_future(self._refresh_resources()))
        self._tasks.append(asyncio.ensure_future(self._probe_links()))
        if cfg.peers:
            self._tasks.append(asyncio.ensure_future(self._seed_loop()))
        log.info(
            "node %s (%s) up: http %s, peer %s:%d, cluster %s, key from %s",
            self.node_id,
            self.name,
            self.http_url(),
            self.advertise_host,
            self.links.port,
            self.cluster_id,
            self.key_source,
        )

    async def _start_discovery(self) -> None:
        cfg = self.config
        if cfg.mdns_interfaces:
            interfaces = list(cfg.mdns_interfaces)
        elif cfg.loopback_only:
            interfaces = ["127.0.0.1"]
        else:
            interfaces = ipv4_interfaces() or ["127.0.0.1"]
        if is_loopback(self.advertise_host) or cfg.advertise_host:
            addresses = [self.advertise_host]
        else:
            addresses = [a for a in interfaces if not is_loopback(a)] or [self.advertise_host]
        self.discovery = Discovery(
            node_id=self.node_id,
            cluster_id=self.cluster_id,
            name=self.name,
            http_port=cfg.port,
            peer_port=self.links.port,
            addresses=addresses,
            interfaces=interfaces,
            on_found=self._on_found,
        )
        try:
            await self.discovery.start()
        except Exception as exc:  # no usable interface: seeds still work
            log.warning("mDNS unavailable (%s); relying on --peer seeds and gossip", exc)
            self.discovery = None

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.gossip.leave()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
        await self.gossip.stop()
        await self.links.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._stopped.set()
        log.info("node %s stopped", self.node_id)

    # ---- wiring -----------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.advertise_host,
            "peer_port": self.links.port,
            "http_port": self.config.port,
        }

    def _on_found(self, found: Found) -> None:
        self.links.add_peer(found.node_id, found.addresses[0], found.peer_port)

    def _on_gossip(self, kind: str) -> None:
        self.election.update()
        if kind in ("membership", "view"):
            for node_id, entry in self.gossip.view.items():
                host, port = entry.data.get("host"), entry.data.get("peer_port")
                if node_id != self.node_id and isinstance(host, str) and isinstance(port, int):
                    self.links.add_peer(node_id, host, port)
        self._notify(kind)

    def _notify(self, kind: str) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(kind)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._listener_tasks.add(task)
                    task.add_done_callback(self._listener_tasks.discard)
            except Exception:
                log.exception("node listener failed")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.gossip_interval / 2)
            try:
                self.election.update()
            except Exception:
                log.exception("election update failed")

    async def measure_link(self, peer_id: str, nbytes: int = 0, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        """Seconds for one round trip carrying ``nbytes`` of padding out (the answer is tiny)."""
        t0 = time.perf_counter()
        await self.links.request(peer_id, PING, {"pad": bytes(nbytes)}, timeout=timeout)
        return time.perf_counter() - t0

    async def _on_ping(self, peer_id: str, payload: Any) -> None:
        return None

    async def _probe_links(self) -> None:
        """Measure every link for the planner: RTT every 5 s (EWMA), bandwidth every 30 s (256 KiB probe),
        published in gossip under "links" as {peer: {"rtt_s", "bandwidth_bytes_per_s"}}."""
        rounds = 0
        while True:
            await asyncio.sleep(5.0 if rounds else 1.0)
            for peer in self.links.connected_peers():
                try:
                    rtt = await self.measure_link(peer, timeout=2.0)
                    old = self.link_metrics.setdefault(peer, {"rtt_s": rtt, "bandwidth_bytes_per_s": 0.0})
                    old["rtt_s"] = 0.7 * old["rtt_s"] + 0.3 * rtt
                    if rounds % 6 == 0:
                        big = await self.measure_link(peer, nbytes=PROBE_BYTES, timeout=5.0)
                        old["bandwidth_bytes_per_s"] = PROBE_BYTES / max(big - rtt, 1e-5)
                except (PeerUnavailable, TimeoutError, RemoteError):
                    continue
            for peer in [p for p in self.link_metrics if not self.gossip.is_alive(p)]:
                del self.link_metrics[peer]
            self.gossip.set_local(
                "links",
                {
                    p: {
                        "rtt_s": round(m["rtt_s"], 6),
                        "bandwidth_bytes_per_s": round(m["bandwidth_bytes_per_s"]),
                    }
                    for p, m in self.link_metrics.items()
                },
            )
            rounds += 1

    async def _refresh_resources(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            try:
                self.gossip.update_local(await snapshot(self.config.shards_path))
            except Exception:
                log.exception("resource refresh failed")

    async def _seed_loop(self) -> None:
        """Seeds are HTTP addresses (the port users know): ask each for its peer port, then link to it."""
        timeout = aiohttp.ClientTimeout(total=3.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                for seed in self.config.peers:
                    seed_id = self._seed_ids.get(seed)
                    if (
                        seed_id is not None
                        and self.gossip.is_alive(seed_id)
                        and self.links.is_connected(seed_id)
                    ):
                        continue
                    await self._contact_seed(session, seed)
                await asyncio.sleep(2.0)

    async def _contact_seed(self, session: aiohttp.ClientSession, seed: str) -> None:
        host, port = parse_host_port(seed)
        try:
            async with session.get(f"http://{host}:{port}/api/peer-info") as resp:
                info = await resp.json(content_type=None)
            peer_id, peer_port, cid = info["id"], int(info["peer_port"]), info["cluster_id"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self._seed_error(seed, f"{type(exc).__name__}: {exc}")
            return
        if cid != self.cluster_id:
            self._seed_error(seed, "belongs to another cluster (different key)")
            return
        if peer_id == self.node_id:
            return
        self._seed_ids[seed] = peer_id
        self.seed_errors.pop(seed, None)
        self.links.add_peer(peer_id, host, peer_port)

    def _seed_error(self, seed: str, reason: str) -> None:
        if self.seed_errors.get(seed) != reason:
            log.warning("seed %s: %s", seed, reason)
        self.seed_errors[seed] = reason

    # ---- HTTP -------------------------------------------------------------------------------------
    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = self.config.api_token
        if token and request.path not in self.public_paths:
            given = request.headers.get("Authorization", "")
            given = given[7:] if given.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.json_response(
                    {"error": {"message": "missing or wrong bearer token", "type": "unauthorized"}},
                    status=401,
                )
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "id": self.node_id})

    async def _peer_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "id": self.node_id,
                "peer_port": self.links.port,
                "host": self.advertise_host,
                "cluster_id": self.cluster_id,
                "protocol": PROTOCOL_VERSION,
            }
        )

    async def status(self) -> dict[str, Any]:
        """The /api/status document: membership, leader, term, links, plus every registered section."""
        doc: dict[str, Any] = {
            "id": self.node_id,
            "name": self.name,
            "cluster_id": self.cluster_id,
            "leader": self.leader_id,
            "term": self.term,
            "is_leader": self.is_leader,
            "uptime_s": round(time.time() - self.started_at, 1),
            "members": self.gossip.members(),
            "links": self.links.stats(),
            "seeds": {s: self.seed_errors.get(s, "ok") for s in self.config.peers},
            "mdns": self.discovery is not None,
        }
        for section, provider in list(self.status_providers.items()):
            try:
                value = provider()
                doc[section] = await value if inspect.isawaitable(value) else value
            except Exception as exc:
                doc[section] = {"error": f"{type(exc).__name__}: {exc}"}
        return doc

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status(), dumps=_dumps)


# ``request.app[NODE_KEY]`` gives handlers their Node.
NODE_KEY = web.AppKey("llnode.node", Node)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)


# ---- `llnode run` ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"llnode run: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return int(runner(_serve(cfg)))
    except (ConfigError, KeyError_) as exc:
        print(f"llnode run: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llnode run: cannot start: {exc}", file=sys.stderr)
        return 1


async def _serve(cfg: NodeConfig) -> int:
    from llnode.pipeline.service import PipelineService  # the pipeline needs onnxruntime: import late

    node = Node(cfg)
    pipeline = PipelineService(node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await node.start()
    await pipeline.start()
    print(f"llnode {node.node_id} ({node.name}) serving {node.http_url()}", flush=True)
    try:
        await stop.wait()
    finally:
        await pipeline.stop()
        await node.stop()
    return 0
