"""Mutual authentication and per-frame encryption of one peer link.

Handshake (plain TCP, fixed-size messages, every read under a timeout):

    client -> server   HELLO  = magic "LLN" + 0x01 | version u16 | client nonce (32 B)
    server -> client   HELLO  = magic | version | server nonce (32 B)
    client -> server   PROOF  = HMAC(K, "client" | cn | sn)      (32 B)
    server -> client   PROOF  = HMAC(K, "server" | cn | sn)      (32 B)

The client proves first, so a stranger dialing a node gets nothing that depends on the key (no oracle
for guessing it). Role labels stop a proof from being reflected back; fresh nonces stop replays.
Then ``HKDF-SHA256(K, salt = cn | sn)`` gives one ChaCha20-Poly1305 key per direction. Every frame is

    length u32 (big endian) | ciphertext + 16-byte tag

with the length as associated data and an implicit 64-bit counter nonce per direction: a replayed,
dropped, reordered or altered frame fails authentication and closes the link. A peer without the key
learns the protocol version and nothing else, and gets disconnected.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llnode.net.codec import FrameError

MAGIC = b"LLN\x01"
PROTOCOL_VERSION = 1
NONCE_BYTES = 32
TAG_BYTES = 16
HELLO = struct.Struct(">4sH32s")
LENGTH = struct.Struct(">I")
HANDSHAKE_TIMEOUT = 5.0


class AuthError(ConnectionError):
    """The other side failed the handshake: wrong key, wrong protocol, or not an llnode peer at all."""


@dataclass
class Ciphers:
    """The two directions of one authenticated connection. ``encrypt=False`` keeps authentication of the
    handshake but sends frames in clear: only for measuring what encryption costs (``bench links``)."""

    send_key: bytes
    recv_key: bytes
    encrypt: bool = True
    send_counter: int = 0
    recv_counter: int = 0

    def __post_init__(self) -> None:
        self._send = ChaCha20Poly1305(self.send_key)
        self._recv = ChaCha20Poly1305(self.recv_key)

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")

    def seal(self, body: bytes) -> bytes:
        """Frame one body: header + ciphertext. Must be called in send order (the counter is the nonce)."""
        if not self.encrypt:
            return LENGTH.pack(len(body)) + body
        header = LENGTH.pack(len(body) + TAG_BYTES)
        sealed = self._send.encrypt(self._nonce(self.send_counter), body, header)
        self.send_counter += 1
        return header + sealed

    def open(self, header: bytes, sealed: bytes) -> bytes:
        if not self.encrypt:
            return sealed
        if len(sealed) < TAG_BYTES:
            raise FrameError("frame shorter than its authentication tag")
        try:
            body = self._recv.decrypt(self._nonce(self.recv_counter), sealed, header)
        except InvalidTag:
            raise FrameError("frame failed authentication (forged, replayed or reordered)") from None
        self.recv_counter += 1
        return body


def _proof(key: bytes, role: bytes, cn: bytes, sn: bytes) -> bytes:
    return hmac.new(key, b"llnode proof v1|" + role + b"|" + cn + sn, hashlib.sha256).digest()


def _derive(key: bytes, cn: bytes, sn: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=cn + sn, info=b"llnode link keys v1").derive(key)
    return okm[:32], okm[32:]  # client->server, server->client


def _check_hello(data: bytes) -> bytes:
    magic, version, nonce = HELLO.unpack(data)
    if magic != MAGIC:
        raise AuthError("not an llnode peer (bad magic)")
    if version != PROTOCOL_VERSION:
        raise AuthError(f"protocol version {version} is not supported (this node speaks {PROTOCOL_VERSION})")
    return bytes(nonce)


async def _read(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise AuthError(f"connection closed during handshake ({what})") from None


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, *, encrypt: bool = True
) -> Ciphers:
    cn = os.urandom(NONCE_BYTES)
    writer.write(HELLO.pack(MAGIC, PROTOCOL_VERSION, cn))
    await writer.drain()
    sn = _check_hello(await _read(reader, HELLO.size, "hello"))
    writer.write(_proof(key, b"client", cn, sn))
    await writer.drain()
    theirs = await _read(reader, 32, "proof")
    if not hmac.compare_digest(theirs, _proof(key, b"server", cn, sn)):
        raise AuthError("server failed the challenge (different cluster key)")
    c2s, s2c = _derive(key, cn, sn)
    return Ciphers(send_key=c2s, recv_key=s2c, encrypt=encrypt)


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, *, encrypt: bool = True
) -> Ciphers:
    cn = _check_hello(await _read(reader, HELLO.size, "hello"))
    sn = os.urandom(NONCE_BYTES)
    writer.write(HELLO.pack(MAGIC, PROTOCOL_VERSION, sn))
    await writer.drain()
    theirs = await _read(reader, 32, "proof")
    if not hmac.compare_digest(theirs, _proof(key, b"client", cn, sn)):
        raise AuthError("client failed the challenge (different cluster key)")
    writer.write(_proof(key, b"server", cn, sn))
    await writer.drain()
    c2s, s2c = _derive(key, cn, sn)
    return Ciphers(send_key=s2c, recv_key=c2s, encrypt=encrypt)
