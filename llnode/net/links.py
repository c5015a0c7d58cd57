"""Persistent, authenticated, encrypted peer links: one TCP connection per pair of nodes.

Why one long-lived connection: the pipeline sends one small hidden state per token per hop, so the
handshake must not be on the hot path, and frames must go out with no per-message setup (TCP_NODELAY,
no awaits unless the socket buffer is full).

Usage (the ``Node`` owns one ``Links``; other parts register handlers on it)::

    links.on("pipe.step", handler)                 # async handler(peer_id, payload) -> reply or None
    await links.send(peer_id, "pipe.step", {...})  # fire and forget (ordered per peer)
    reply = await links.request(peer_id, "plan.get", {...}, timeout=5)

Both nodes may dial each other at the same moment; both then keep the connection dialed by the node with
the smaller id (a rule both sides evaluate identically), unless the peer restarted (new ``boot``), in which
case the newest connection wins. Known peers are redialed with exponential backoff.

A path can die without a reset (an address removed, a phone roaming to another access point): the kernel
then keeps accepting writes that are never delivered, and the link would look alive for the ~15 minutes
of TCP's default retransmission. Every link therefore sets ``TCP_USER_TIMEOUT`` (data unacknowledged for
``dead_link_s`` drops it) and keep-alives (an idle link is probed), so the node redials or the pipeline
routes around the peer within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from llnode.net import auth
from llnode.net.codec import (
    DEFAULT_LIMITS,
    ERROR,
    MESSAGE,
    REQUEST,
    RESPONSE,
    FrameError,
    Limits,
    pack_body,
    unpack_body,
)

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Any]]
ConnectCallback = Callable[[str, dict[str, Any]], None]
DisconnectCallback = Callable[[str], None]

HELLO_TYPE = "link.hello"
MAX_ID_LEN = 64
WRITE_HIGH_WATER = 1 << 20


class PeerUnavailable(ConnectionError):
    """No live link to that peer (never connected, or the connection just dropped)."""


class RemoteError(RuntimeError):
    """The peer's handler failed a request; the message is the peer's reason."""


class CloseLink(Exception):
    """Raised by a handler to close the connection that carried a hostile or nonsensical frame."""


@dataclass
class Connection:
    peer_id: str
    peer_boot: str
    outbound: bool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ciphers: auth.Ciphers
    info: dict[str, Any]
    remote_ip: str
    closed: bool = False
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    since: float = field(default_factory=time.time)

    def write(self, body: bytes) -> int:
        data = self.ciphers.seal(body)
        self.writer.write(data)
        self.frames_out += 1
        self.bytes_out += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()


@dataclass
class _Dialer:
    host: str
    port: int
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Links:
    """All peer links of one node: a listening socket, outgoing dials, handlers and pending requests."""

    def __init__(
        self,
        node_id: str,
        key: bytes,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        identity: Callable[[], dict[str, Any]] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        encrypt: bool = True,
        handshake_timeout: float = auth.HANDSHAKE_TIMEOUT,
        send_timeout: float = 10.0,
        max_backoff: float = 5.0,
        max_pending_handshakes: int = 64,
        dead_link_s: float = 10.0,
    ) -> None:
        self.node_id = node_id
        self.boot = secrets.token_hex(8)
        self._key = key
        self.host = host
        self.port = port
        self._identity = identity or (lambda: {})
        self.limits = limits
        self.encrypt = encrypt
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.max_backoff = max_backoff
        self.max_pending_handshakes = max_pending_handshakes
        self.dead_link_s = dead_link_s
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._conns: dict[str, Connection] = {}
        self._dialers: dict[str, _Dialer] = {}
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._rids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._handshakes = 0
        self._stopping = False
        self.connect_callbacks: list[ConnectCallback] = []
        self.disconnect_callbacks: list[DisconnectCallback] = []
        self.rejected = 0  # connections that failed authentication or sent malformed frames
        self.last_errors: dict[str, str] = {}

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_accept, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("peer links listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for dialer in self._dialers.values():
            if dialer.task is not None:
                dialer.task.cancel()
        for conn in list(self._conns.values()):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable("node stopping"))
        self._pending.clear()
        pending = [d.task for d in self._dialers.values() if d.task] + list(self._tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # ---- registry ---------------------------------------------------------------------------------
    def on(self, msg_type: str, handler: Handler, *, inline: bool = False) -> None:
        """Register the handler of one message type. ``inline`` handlers run in the connection's read
        loop: strictly in arrival order and applying backpressure; others each run in their own task."""
        if msg_type == HELLO_TYPE or not msg_type or len(msg_type) > 64:
            raise ValueError(f"invalid message type {msg_type!r}")
        self._handlers[msg_type] = (handler, inline)

    # ---- membership of the link layer ------------------------------------------------------------
    def add_peer(self, peer_id: str, host: str, port: int) -> None:
        """Keep a link to this peer at this address (redialed with backoff until ``forget_peer``)."""
        if peer_id == self.node_id or self._stopping:
            return
        dialer = self._dialers.get(peer_id)
        if dialer is None:
            dialer = _Dialer(host, port)
            self._dialers[peer_id] = dialer
            dialer.task = self._spawn(self._maintain(peer_id, dialer))
        elif (dialer.host, dialer.port) != (host, port):
            dialer.host, dialer.port = host, port
            dialer.wake.set()

    def forget_peer(self, peer_id: str) -> None:
        dialer = self._dialers.pop(peer_id, None)
        if dialer is not None and dialer.task is not None:
            dialer.task.cancel()
        conn = self._conns.get(peer_id)
        if conn is not None:
            conn.close()

    def is_connected(self, peer_id: str) -> bool:
        conn = self._conns.get(peer_id)
        return conn is not None and not conn.closed

    def connected_peers(self) -> list[str]:
        return [pid for pid, c in self._conns.items() if not c.closed]

    def peer_info(self, peer_id: str) -> dict[str, Any] | None:
        conn = self._conns.get(peer_id)
        return None if conn is None else dict(conn.info, remote_ip=conn.remote_ip)

    def stats(self) -> dict[str, Any]:
        return {
            pid: {
                "outbound": c.outbound,
                "frames_in": c.frames_in,
                "frames_out": c.frames_out,
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
                "since": c.since,
            }
            for pid, c in self._conns.items()
        }

    # ---- sending ----------------------------------------------------------------------------------
    async def send(self, peer_id: str, msg_type: str, payload: Any) -> None:
        """Send one message; raises ``PeerUnavailable`` if there is no live link."""
        await self._send(peer_id, msg_type, MESSAGE, 0, payload)

    async def request(self, peer_id: str, msg_type: str, payload: Any, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        """Send a request and wait for the handler's return value (``RemoteError`` if it failed,
        ``TimeoutError`` after ``timeout``, ``PeerUnavailable`` if the link drops meanwhile)."""
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (peer_id, fut)
        try:
            await self._send(peer_id, msg_type, REQUEST, rid, payload)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def _send(self, peer_id: str, msg_type: str, kind: int, rid: int, payload: Any) -> None:
        conn = self._conns.get(peer_id)
        if conn is None or conn.closed:
            raise PeerUnavailable(f"no link to {peer_id}")
        body = pack_body(msg_type, kind, rid, payload)
        if len(body) > self.limits.max_frame_bytes:
            raise FrameError(f"{msg_type} frame of {len(body)} bytes exceeds the limit")
        conn.write(body)  # encrypt + write with no await in between: keeps counter order = wire order
        transport = conn.writer.transport
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            try:
                await asyncio.wait_for(conn.writer.drain(), self.send_timeout)
            except (TimeoutError, ConnectionError) as exc:
                self._drop(conn, f"send stalled: {type(exc).__name__}")
                raise PeerUnavailable(f"link to {peer_id} stalled") from None

    # ---- connecting -------------------------------------------------------------------------------
    async def connect(self, host: str, port: int) -> str:
        """Dial an address once, authenticate, and return the peer's id (used for seeds)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.handshake_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise PeerUnavailable(f"cannot reach {host}:{port}: {exc}") from None
        conn = await self._establish(reader, writer, outbound=True)
        if conn is None:
            reason = self.last_errors.get(f"{host}:{port}", "handshake failed")
            raise PeerUnavailable(f"{host}:{port}: {reason}")
        return conn.peer_id

    async def _maintain(self, peer_id: str, dialer: _Dialer) -> None:
        backoff = 0.2
        while not self._stopping and self._dialers.get(peer_id) is dialer:
            if self.is_connected(peer_id):
                backoff = 0.2
                await asyncio.sleep(0.5)
                continue
            try:
                got = await self.connect(dialer.host, dialer.port)
                if got != peer_id:
                    log.info("%s:%d is now node %s, not %s", dialer.host, dialer.port, got, peer_id)
                continue
            except PeerUnavailable as exc:
                log.debug("dial %s at %s:%d failed: %s", peer_id, dialer.host, dialer.port, exc)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one odd failure end the redialing of a peer
                log.exception("dial %s at %s:%d failed", peer_id, dialer.host, dialer.port)
            dialer.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dialer.wake.wait(), backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.max_backoff)

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping or self._handshakes >= self.max_pending_handshakes:
            writer.close()
            return
        await self._establish(reader, writer, outbound=False)

    async def _establish(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, outbound: bool
    ) -> Connection | None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            detect_dead_paths(sock, self.dead_link_s)
        self._handshakes += 1
        try:
            conn = await asyncio.wait_for(
                self._handshake(reader, writer, outbound, where), self.handshake_timeout
            )
        except (auth.AuthError, FrameError, TimeoutError, OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.rejected += 1
            self._note_error(where, reason)
            log.warning("rejected peer link %s %s: %s", "to" if outbound else "from", where, reason)
            writer.close()
            return None
        finally:
            self._handshakes -= 1
        if conn is None:
            writer.close()
            return None
        if not self._register(conn):
            return None
        self._spawn(self._read_loop(conn))
        for cb in list(self.connect_callbacks):
            try:
                cb(conn.peer_id, conn.info)
            except Exception:
                log.exception("connect callback failed")
        return conn

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outbound: bool, where: str
    ) -> Connection | None:
        if outbound:
            ciphers = await auth.client_handshake(reader, writer, self._key, encrypt=self.encrypt)
        else:
            ciphers = await auth.server_handshake(reader, writer, self._key, encrypt=self.encrypt)
        hello = dict(self._identity())
        hello.update(id=self.node_id, boot=self.boot)
        writer.write(ciphers.seal(pack_body(HELLO_TYPE, MESSAGE, 0, hello)))
        await writer.drain()
        header = await reader.readexactly(auth.LENGTH.size)
        (n,) = auth.LENGTH.unpack(header)
        if n > 64 * 1024:
            raise FrameError(f"hello frame of {n} bytes is too large")
        body = ciphers.open(header, await reader.readexactly(n))
        msg_type, _, _, info = unpack_body(body, self.limits)
        if msg_type != HELLO_TYPE or not isinstance(info, dict):
            raise FrameError("first frame is not a hello")
        peer_id, boot = info.get("id"), info.get("boot")
        if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_ID_LEN or not isinstance(boot, str):
            raise FrameError("hello without a valid node id")
        if peer_id == self.node_id:
            if boot != self.boot:
                log.error(
                    "node at %s uses MY node id %s (copied data dir?): delete its node_id file",
                    where,
                    peer_id,
                )
            return None
        remote_ip = where.rsplit(":", 1)[0]
        return Connection(peer_id, boot, outbound, reader, writer, ciphers, info, remote_ip)

    def _register(self, conn: Connection) -> bool:
        """Decide which of two simultaneous connections survives (same answer on both sides)."""
        existing = self._conns.get(conn.peer_id)
        if existing is not None and not existing.closed and existing.peer_boot == conn.peer_boot:
            preferred = min(self.node_id, conn.peer_id)
            new_by = self.node_id if conn.outbound else conn.peer_id
            old_by = self.node_id if existing.outbound else conn.peer_id
            if old_by == preferred and new_by != preferred:
                conn.close()
                return False
        self._conns[conn.peer_id] = conn
        if existing is not None:
            existing.close()
            # Frames written on the replaced connection may never arrive: tell the listeners, as for a
            # drop (its read loop's own _drop no longer finds it registered and stays silent).
            self._notify_down(conn.peer_id)
        if not conn.outbound and conn.peer_id not in self._dialers:
            port = conn.info.get("peer_port")
            if isinstance(port, int) and 0 < port < 65536:
                self.add_peer(conn.peer_id, conn.remote_ip, port)
        log.info(
            "link up: %s (%s, %s)", conn.peer_id, conn.info.get("name", "?"), "out" if conn.outbound else "in"
        )
        return True

    # ---- receiving --------------------------------------------------------------------------------
    async def _read_loop(self, conn: Connection) -> None:
        reader = conn.reader
        limit = self.limits.max_frame_bytes + auth.TAG_BYTES
        reason = "closed by peer"
        try:
            while True:
                header = await reader.readexactly(4)
                (n,) = auth.LENGTH.unpack(header)
                if n > limit:
                    raise FrameError(f"frame of {n} bytes exceeds the limit of {limit}")
                sealed = await reader.readexactly(n)
                conn.frames_in += 1
                conn.bytes_in += n + 4
                body = conn.ciphers.open(header, sealed)
                msg_type, kind, rid, payload = unpack_body(body, self.limits)
                await self._dispatch(conn, msg_type, kind, rid, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
                reason = f"path dead: nothing acknowledged for {self.dead_link_s:g} s"
        except FrameError as exc:
            reason = str(exc)
            self.rejected += 1
            log.warning("closing link to %s: %s", conn.peer_id, reason)
        except CloseLink as exc:
            reason = str(exc)
            log.warning("closing link to %s: %s", conn.peer_id, reason)
        except asyncio.CancelledError:
            reason = "stopping"
        except Exception as exc:  # a bug must cost this connection only, never the daemon
            reason = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("closing link to %s", conn.peer_id)
        finally:
            self._drop(conn, reason)

    def _drop(self, conn: Connection, reason: str) -> None:
        conn.close()
        if self._conns.get(conn.peer_id) is not conn:
            return
        del self._conns[conn.peer_id]
        self._note_error(conn.peer_id, reason)
        log.info("link down: %s (%s)", conn.peer_id, reason)
        for rid, (pid, fut) in list(self._pending.items()):
            if pid == conn.peer_id and not fut.done():
                fut.set_exception(PeerUnavailable(f"link to {pid} dropped: {reason}"))
                self._pending.pop(rid, None)
        self._notify_down(conn.peer_id)
        dialer = self._dialers.get(conn.peer_id)
        if dialer is not None:
            dialer.wake.set()

    def _notify_down(self, peer_id: str) -> None:
        """A connection to ``peer_id`` is gone (dropped or replaced): whatever was written on it and not
        yet read may be lost, and listeners (the pipeline) must not wait for answers to it."""
        for cb in list(self.disconnect_callbacks):
            try:
                cb(peer_id)
            except Exception:
                log.exception("disconnect callback failed")

    async def _dispatch(self, conn: Connection, msg_type: str, kind: int, rid: int, payload: Any) -> None:
        if kind in (RESPONSE, ERROR):
            entry = self._pending.get(rid)
            if entry is None or entry[0] != conn.peer_id or entry[1].done():
                return  # late reply to a request that timed out: harmless
            if kind == RESPONSE:
                entry[1].set_result(payload)
            else:
                entry[1].set_exception(RemoteError(str(payload)[:500]))
            return
        registered = self._handlers.get(msg_type)
        if registered is None:
            log.debug("no handler for %s from %s", msg_type, conn.peer_id)
            if kind == REQUEST:
                await self._reply(conn, msg_type, ERROR, rid, f"unknown message type {msg_type}")
            return
        handler, inline = registered
        if inline:
            await self._run_handler(conn, handler, msg_type, kind, rid, payload)
        else:
            self._spawn(self._run_handler(conn, handler, msg_type, kind, rid, payload))

    async def _run_handler(
        self, conn: Connection, handler: Handler, msg_type: str, kind: int, rid: int, payload: Any
    ) -> None:
        try:
            result = await handler(conn.peer_id, payload)
        except CloseLink as exc:
            log.warning("closing link to %s after %s: %s", conn.peer_id, msg_type, exc)
            self._drop(conn, str(exc))
            return
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("rejected %s from %s: %s", msg_type, conn.peer_id, exc)
            if kind == REQUEST:
                await self._reply(conn, msg_type, ERROR, rid, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("handler of %s failed", msg_type)
            if kind == REQUEST:
                await self._reply(conn, msg_type, ERROR, rid, f"{type(exc).__name__}: {exc}")
            return
        if kind == REQUEST:
            await self._reply(conn, msg_type, RESPONSE, rid, result)

    async def _reply(self, conn: Connection, msg_type: str, kind: int, rid: int, payload: Any) -> None:
        if conn.closed:
            return
        try:
            conn.write(pack_body(msg_type, kind, rid, payload))
        except FrameError as exc:
            conn.write(pack_body(msg_type, ERROR, rid, f"reply not encodable: {exc}"))

    def _note_error(self, where: str, reason: str) -> None:
        """Remember recent failures for status pages, bounded: a flood of bad connections must not grow it."""
        self.last_errors.pop(where, None)
        self.last_errors[where] = reason
        while len(self.last_errors) > 256:
            del self.last_errors[next(iter(self.last_errors))]

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def detect_dead_paths(sock: socket.socket, dead_after_s: float) -> None:
    """Make the kernel drop a connection whose path died silently: unacknowledged data for
    ``dead_after_s`` (``TCP_USER_TIMEOUT``), or an idle link whose keep-alive probes go unanswered for
    about as long. Options a platform lacks are skipped (they are Linux/Android ones)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(dead_after_s / 2))
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after_s * 1000))
