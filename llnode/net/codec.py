"""Frame bodies and tensors on the peer links.

A frame body (after decryption) is a msgpack array ``[msg_type, kind, request_id, payload]``. Tensors
inside payloads travel as ``{"dtype": str, "shape": [int], "data": bytes}`` with raw little-endian data:
no pickle (a peer must never be able to make us execute code), and decoding is ``np.frombuffer`` on the
received bytes, so a [1,1,576] float32 hidden state costs no copy beyond the socket read.

Everything arriving from the network is checked against ``Limits`` before it is trusted; every failure
is a ``FrameError`` with a reason, which the link logs before closing the connection.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# kinds of frames
MESSAGE = 0
REQUEST = 1
RESPONSE = 2
ERROR = 3
KINDS = (MESSAGE, REQUEST, RESPONSE, ERROR)

ALLOWED_DTYPES = frozenset(
    {"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)
MAX_MSG_TYPE_LEN = 64


class FrameError(ValueError):
    """A frame or tensor that does not follow the protocol; the connection that sent it is closed."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may send: they cap the memory one frame can make us allocate."""

    max_frame_bytes: int = 64 << 20
    max_tensor_bytes: int = 64 << 20
    max_tensor_dims: int = 8


DEFAULT_LIMITS = Limits()


# little-endian dtype -> wire name; a dict lookup, because ``dtype.name`` is slow on the hot path
_WIRE_NAMES = {np.dtype(n).newbyteorder("<"): n for n in ALLOWED_DTYPES}


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """``{dtype, shape, data}`` with little-endian bytes; contiguous arrays are not copied."""
    arr = np.asarray(array)
    name = _WIRE_NAMES.get(arr.dtype)
    if name is None:
        name = arr.dtype.name
        if name not in ALLOWED_DTYPES:
            raise FrameError(f"dtype {name} is not allowed on the wire (allowed: {sorted(ALLOWED_DTYPES)})")
        arr = arr.astype(arr.dtype.newbyteorder("<"))  # big-endian (or non-native) data
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return {
        "dtype": name,
        "shape": list(arr.shape),
        "data": memoryview(arr.data).cast("B") if arr.size else b"",
    }


def decode_tensor(
    obj: Any,
    limits: Limits = DEFAULT_LIMITS,
    *,
    dtype: str | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> np.ndarray:
    """Turn a wire tensor back into a (read-only, zero-copy) array, checking dtype, shape and size.

    ``dtype``/``shape`` state what the receiver expects (None in ``shape`` means any size on that axis).
    """
    if not isinstance(obj, dict):
        raise FrameError("tensor must be a map with dtype, shape and data")
    name, dims, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise FrameError(f"tensor dtype {name!r} is not allowed")
    if dtype is not None and name != dtype:
        raise FrameError(f"tensor dtype {name} where {dtype} was expected")
    if not isinstance(dims, list | tuple) or len(dims) > limits.max_tensor_dims:
        raise FrameError(f"tensor shape must be a list of at most {limits.max_tensor_dims} sizes")
    if not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= limits.max_tensor_bytes for d in dims
    ):
        raise FrameError(f"tensor shape {dims!r} has a negative or absurd size")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError("tensor data must be bytes")
    np_dtype = np.dtype(name).newbyteorder("<")
    count = math.prod(dims)
    nbytes = count * np_dtype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise FrameError(f"tensor of {nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}")
    if len(data) != nbytes:
        raise FrameError(f"tensor data has {len(data)} bytes, shape {list(dims)} of {name} needs {nbytes}")
    if shape is not None and (
        len(shape) != len(dims) or any(e is not None and e != d for e, d in zip(shape, dims, strict=True))
    ):
        raise FrameError(f"tensor shape {list(dims)} where {list(shape)} was expected")
    arr = np.frombuffer(data, dtype=np_dtype, count=count).reshape(dims)
    return arr


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode_tensor(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, memoryview):
        return obj.tobytes()
    raise TypeError(f"cannot send {type(obj).__name__} over a peer link")


_local = threading.local()


def pack_body(msg_type: str, kind: int, request_id: int, payload: Any) -> bytes:
    """msgpack the frame body; numpy arrays in the payload become wire tensors automatically."""
    packer = getattr(_local, "packer", None)
    if packer is None:  # one reusable Packer per thread (creating one per frame is measurable)
        packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)
    try:
        return packer.pack([msg_type, kind, request_id, payload])
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"cannot encode {msg_type!r} payload: {exc}") from exc


def unpack_body(body: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, int, int, Any]:
    """Parse and check one frame body. Any malformation is a ``FrameError``, never another exception."""
    if len(body) > limits.max_frame_bytes:
        raise FrameError(f"frame of {len(body)} bytes exceeds the limit of {limits.max_frame_bytes}")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=False,
        )
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError...)
        raise FrameError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 4:
        raise FrameError("frame must be [type, kind, request_id, payload]")
    msg_type, kind, request_id, payload = obj
    if not isinstance(msg_type, str) or not 0 < len(msg_type) <= MAX_MSG_TYPE_LEN:
        raise FrameError(f"bad message type {msg_type!r:.80}")
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in KINDS:
        raise FrameError(f"bad frame kind {kind!r:.40}")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id < 1 << 63:
        raise FrameError(f"bad request id {request_id!r:.40}")
    return msg_type, kind, request_id, payload
