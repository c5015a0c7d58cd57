"""Peer links in-process: real sockets on loopback, real handshake, real ChaCha20-Poly1305."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from llnode.net import auth
from llnode.net.codec import MESSAGE, decode_tensor, pack_body
from llnode.net.links import Links, PeerUnavailable, RemoteError

KEY = bytes(range(32))


async def _until(pred: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Links, Links]]:
    a = Links("aaaa", KEY, host="127.0.0.1", identity=lambda: {"name": "A"})
    b = Links("bbbb", KEY, host="127.0.0.1", identity=lambda: {"name": "B"})
    await a.start()
    await b.start()
    a.add_peer("bbbb", "127.0.0.1", b.port)
    await _until(lambda: a.is_connected("bbbb") and b.is_connected("aaaa"))
    yield a, b
    await a.stop()
    await b.stop()


async def test_message_request_and_tensor_roundtrip(pair: tuple[Links, Links]) -> None:
    a, b = pair
    got: list[tuple[str, Any]] = []

    async def on_note(peer: str, payload: Any) -> None:
        got.append((peer, payload))

    async def on_echo(peer: str, payload: Any) -> Any:
        h = decode_tensor(payload["h"], dtype="float32", shape=(1, None, 576))
        return {"h": h * 2, "from": peer}

    b.on("note", on_note)
    b.on("echo", on_echo)
    await a.send("bbbb", "note", {"x": 1})
    hidden = np.random.default_rng(0).standard_normal((1, 1, 576)).astype(np.float32)
    reply = await a.request("bbbb", "echo", {"h": hidden})
    assert reply["from"] == "aaaa"
    out = decode_tensor(reply["h"])
    assert out.dtype == np.float32 and out.shape == (1, 1, 576)
    np.testing.assert_array_equal(out, hidden * 2)
    await _until(lambda: got == [("aaaa", {"x": 1})])
    assert b.peer_info("aaaa")["name"] == "A"  # type: ignore[index]


async def test_messages_keep_order_with_inline_handler(pair: tuple[Links, Links]) -> None:
    a, b = pair
    seen: list[int] = []

    async def on_seq(peer: str, payload: Any) -> None:
        seen.append(payload)

    b.on("seq", on_seq, inline=True)
    for i in range(500):
        await a.send("bbbb", "seq", i)
    await _until(lambda: len(seen) == 500)
    assert seen == list(range(500))


async def test_errors_from_handlers_and_unknown_types(pair: tuple[Links, Links]) -> None:
    a, b = pair

    async def bad(peer: str, payload: Any) -> Any:
        raise ValueError("no such session")

    b.on("bad", bad)
    with pytest.raises(RemoteError, match="no such session"):
        await a.request("bbbb", "bad", {})
    with pytest.raises(RemoteError, match="unknown message type"):
        await a.request("bbbb", "nobody.home", {})

    async def slow(peer: str, payload: Any) -> Any:
        await asyncio.sleep(5)

    b.on("slow", slow)
    with pytest.raises(TimeoutError):
        await a.request("bbbb", "slow", {}, timeout=0.2)
    assert a.is_connected("bbbb")  # an error in a handler does not cost the link
    with pytest.raises(PeerUnavailable):
        await a.send("nobody", "x", 1)


async def test_simultaneous_dials_keep_exactly_one_connection() -> None:
    a = Links("aaaa", KEY, host="127.0.0.1")
    b = Links("bbbb", KEY, host="127.0.0.1")
    await a.start()
    await b.start()
    try:
        a.add_peer("bbbb", "127.0.0.1", b.port)
        b.add_peer("aaaa", "127.0.0.1", a.port)
        await _until(lambda: a.is_connected("bbbb") and b.is_connected("aaaa"))
        await asyncio.sleep(0.5)
        # the surviving connection is the one dialed by the smaller id ("aaaa") on both sides
        assert a._conns["bbbb"].outbound and not b._conns["aaaa"].outbound
        assert a.is_connected("bbbb") and b.is_connected("aaaa")
        echo_calls: list[Any] = []

        async def echo(peer: str, p: Any) -> Any:
            echo_calls.append(p)
            return p

        a.on("echo", echo)
        assert await b.request("aaaa", "echo", 7) == 7
    finally:
        await a.stop()
        await b.stop()


async def test_a_replaced_connection_is_reported_like_a_drop(pair: tuple[Links, Links]) -> None:
    """A second connection that wins over the live one closes it: whatever was in flight on the old one
    may be lost, so the disconnect callbacks must hear of it on both sides (the pipeline fails the steps
    it was waiting for on that link instead of waiting out their timeout). Its read loop's own drop finds
    it no longer registered and was silent."""
    a, b = pair
    down: list[tuple[str, str]] = []
    a.disconnect_callbacks.append(lambda peer: down.append(("a", peer)))
    b.disconnect_callbacks.append(lambda peer: down.append(("b", peer)))
    old = a._conns["bbbb"]
    await a.connect("127.0.0.1", b.port)  # dialed by the smaller id again: it replaces the old one
    await _until(lambda: ("a", "bbbb") in down and ("b", "aaaa") in down)
    assert old.closed and a._conns["bbbb"] is not old
    got: list[Any] = []

    async def on_ping(peer: str, p: Any) -> None:
        got.append(p)

    b.on("ping", on_ping)
    await a.send("bbbb", "ping", 1)  # the new connection carries traffic
    await _until(lambda: got == [1])
    await asyncio.sleep(0.2)
    assert sorted(down) == [("a", "bbbb"), ("b", "aaaa")]  # once each: the old read loop's end is silent


async def test_reconnects_after_peer_restart() -> None:
    a = Links("aaaa", KEY, host="127.0.0.1", max_backoff=0.5)
    b = Links("bbbb", KEY, host="127.0.0.1")
    await a.start()
    await b.start()
    port = b.port
    a.add_peer("bbbb", "127.0.0.1", port)
    await _until(lambda: a.is_connected("bbbb"))
    await b.stop()
    await _until(lambda: not a.is_connected("bbbb"))
    b2 = Links("bbbb", KEY, host="127.0.0.1", port=port)
    await b2.start()
    try:
        await _until(lambda: a.is_connected("bbbb"), timeout=5)
        assert a._conns["bbbb"].peer_boot == b2.boot
    finally:
        await a.stop()
        await b2.stop()


async def test_wrong_key_is_rejected_and_gets_nothing() -> None:
    a = Links("aaaa", KEY, host="127.0.0.1")
    evil = Links("evil", os.urandom(32), host="127.0.0.1")
    got: list[Any] = []

    async def h(peer: str, p: Any) -> None:
        got.append(p)

    a.on("x", h)
    await a.start()
    await evil.start()
    try:
        with pytest.raises(PeerUnavailable, match=r"different cluster key|closed during handshake"):
            await evil.connect("127.0.0.1", a.port)
        assert a.connected_peers() == [] and evil.connected_peers() == []
        assert a.rejected >= 1
        # and a raw client that skips the proof is dropped after hello, having seen only nonces
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(auth.HELLO.pack(auth.MAGIC, auth.PROTOCOL_VERSION, os.urandom(32)))
        writer.write(os.urandom(32))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        assert len(data) == auth.HELLO.size  # server hello, then EOF: no proof, no frame
        writer.close()
        assert got == []
    finally:
        await a.stop()
        await evil.stop()


async def test_version_mismatch_is_refused() -> None:
    a = Links("aaaa", KEY, host="127.0.0.1")
    await a.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(auth.HELLO.pack(auth.MAGIC, auth.PROTOCOL_VERSION + 1, os.urandom(32)))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert any("protocol version" in e for e in a.last_errors.values())
    finally:
        await a.stop()


async def _raw_client(
    port: int, key: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, auth.Ciphers]:
    """Authenticate like a real peer, send a valid hello, and hand back the raw stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ciphers = await auth.client_handshake(reader, writer, key)
    writer.write(ciphers.seal(pack_body("link.hello", MESSAGE, 0, {"id": "raw1", "boot": "x"})))
    await writer.drain()
    header = await reader.readexactly(4)
    (n,) = auth.LENGTH.unpack(header)
    ciphers.open(header, await reader.readexactly(n))
    return reader, writer, ciphers


async def test_replayed_and_tampered_frames_close_the_link() -> None:
    a = Links("aaaa", KEY, host="127.0.0.1")
    got: list[Any] = []

    async def h(peer: str, p: Any) -> None:
        got.append(p)

    a.on("x", h, inline=True)
    await a.start()
    try:
        # replay: the same sealed frame twice -> the second fails (counter nonce), link closed
        reader, writer, ciphers = await _raw_client(a.port, KEY)
        frame = ciphers.seal(pack_body("x", MESSAGE, 0, "once"))
        writer.write(frame + frame)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert got == ["once"]
        assert any("authentication" in e for e in a.last_errors.values())
        # tamper: flip one bit of the ciphertext
        reader, writer, ciphers = await _raw_client(a.port, KEY)
        bad = bytearray(ciphers.seal(pack_body("x", MESSAGE, 0, "evil")))
        bad[10] ^= 1
        writer.write(bytes(bad))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert got == ["once"]
        # absurd declared length: closed at once, nothing allocated
        reader, writer, ciphers = await _raw_client(a.port, KEY)
        writer.write(b"\xff\xff\xff\xff")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # the node still works for honest peers
        b = Links("bbbb", KEY, host="127.0.0.1")
        await b.start()
        assert await b.connect("127.0.0.1", a.port) == "aaaa"
        await b.send("aaaa", "x", "fine")
        await _until(lambda: got == ["once", "fine"])
        await b.stop()
    finally:
        await a.stop()


async def test_ciphertext_does_not_contain_the_plaintext() -> None:
    c = auth.Ciphers(send_key=KEY, recv_key=KEY)
    hidden = np.arange(576, dtype=np.float32).reshape(1, 1, 576)
    body = pack_body("pipe.step", MESSAGE, 0, {"h": hidden})
    sealed = c.seal(body)
    assert hidden.tobytes()[:64] in body
    assert hidden.tobytes()[:16] not in sealed
    assert c.open(sealed[:4], sealed[4:]) == body
