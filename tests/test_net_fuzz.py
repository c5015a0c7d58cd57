"""Property-based fuzzing of everything that parses bytes from the network.

Random and mutated frame bodies, wire tensors, handshakes and post-handshake frames: the only outcome
allowed is a clean rejection (``FrameError`` / closed connection), never another exception, a hang, or
an allocation driven by a declared size.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llnode.net import auth
from llnode.net.codec import MESSAGE, FrameError, Limits, decode_tensor, pack_body, unpack_body
from llnode.net.links import Links

KEY = bytes(range(32))
SMALL = Limits(max_frame_bytes=1 << 16, max_tensor_bytes=1 << 14, max_tensor_dims=4)

_valid = pack_body("pipe.step", MESSAGE, 3, {"h": np.ones((1, 2, 8), np.float32), "ids": [1, 2]})


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_valid)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=2048), mutated()))
def test_frame_decoder_rejects_garbage_cleanly(body: bytes) -> None:
    try:
        msg_type, kind, rid, payload = unpack_body(body, SMALL)
    except FrameError:
        return
    assert isinstance(msg_type, str) and kind in (0, 1, 2, 3) and rid >= 0
    if isinstance(payload, dict) and "h" in payload:
        with contextlib.suppress(FrameError):
            decode_tensor(payload["h"], SMALL)


tensor_like = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["float32", "int64", "object", "V8", "<f4", "bool"]), st.text()),
        "shape": st.one_of(
            st.lists(st.integers(-5, 1 << 40), max_size=10), st.text(), st.none(), st.lists(st.booleans())
        ),
        "data": st.one_of(st.binary(max_size=512), st.text(), st.integers()),
    }
)


@settings(max_examples=200, deadline=None)
@given(tensor_like)
def test_tensor_decoder_checks_everything(obj: dict) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        arr = decode_tensor(obj, SMALL)
    except FrameError:
        return
    finally:  # a declared shape of 2**40 elements must not allocate anything
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024
    assert arr.nbytes == len(obj["data"]) and arr.dtype.name == obj["dtype"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), max_size=64), st.integers(0, 3))
def test_tensor_roundtrip(values: list[float], extra_dims: int) -> None:
    arr = np.asarray(values, dtype=np.float32).reshape((1,) * extra_dims + (len(values),))
    body = pack_body("t", MESSAGE, 0, {"t": arr, "be": arr.astype(">f4")})
    _, _, _, payload = unpack_body(body)
    np.testing.assert_array_equal(decode_tensor(payload["t"], shape=arr.shape), arr)
    np.testing.assert_array_equal(decode_tensor(payload["be"]), arr)  # big-endian travels little-endian


async def _probe(port: int, data: bytes) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except OSError:
        raise AssertionError("listener died") from None
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        # the server must answer at most its hello and then close: never hang beyond its timeout
        await asyncio.wait_for(reader.read(), 3)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


hello_mutants = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda magic, ver, nonce, tail: auth.HELLO.pack(magic, ver, nonce) + tail,
        st.one_of(st.just(auth.MAGIC), st.binary(min_size=4, max_size=4)),
        st.integers(0, 65535),
        st.binary(min_size=32, max_size=32),
        st.binary(max_size=100),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(hello_mutants, min_size=1, max_size=5))
def test_handshake_fuzz_never_admits_or_crashes(attempts: list[bytes]) -> None:
    async def main() -> None:
        a = Links("aaaa", KEY, host="127.0.0.1", handshake_timeout=1.0)
        await a.start()
        try:
            await asyncio.gather(*(_probe(a.port, data) for data in attempts))
            assert a.connected_peers() == []
            b = Links("bbbb", KEY, host="127.0.0.1")
            await b.start()
            assert await b.connect("127.0.0.1", a.port) == "aaaa"  # still serving honest peers
            await b.stop()
        finally:
            await a.stop()

    asyncio.run(main())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), mutated()), min_size=1, max_size=4))
def test_authenticated_garbage_closes_only_that_link(bodies: list[bytes]) -> None:
    """Even a peer holding the key cannot crash a node with malformed (but authentic) frames."""

    async def main() -> None:
        a = Links("aaaa", KEY, host="127.0.0.1")
        await a.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            ciphers = await auth.client_handshake(reader, writer, KEY)
            writer.write(ciphers.seal(pack_body("link.hello", MESSAGE, 0, {"id": "raw1", "boot": "x"})))
            for body in bodies:
                writer.write(ciphers.seal(body))
            writer.write(ciphers.seal(msgpack.packb(["x"])))  # certainly malformed: forces a close
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await asyncio.sleep(0.05)
            assert a.connected_peers() == []
            b = Links("bbbb", KEY, host="127.0.0.1")
            await b.start()
            assert await b.connect("127.0.0.1", a.port) == "aaaa"
            await b.stop()
        finally:
            await a.stop()

    asyncio.run(main())
