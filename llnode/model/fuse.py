"""Fuse a contiguous range of module graphs into one ONNX model, at the protobuf wire level (no ``onnx``).

WHY: every ``session.run`` has a fixed cost (feeds, output conversion, waking the thread pool), paid
once per module per token: 32 runs per token made the SmolLM2 chain x1.09 slower than one session holding
the same graphs. A runner only needs cuts between *devices*, so it runs its range as few sessions:
aligned blocks of 8 modules (``ModuleRunner`` explains why blocks and not the whole range).
Phones have onnxruntime and numpy but not the ``onnx`` package (``llnode.model.merge``, which does the
same with ``onnx``, is PC/bench-only), so this module edits the serialized ``ModelProto`` directly: it
parses only the fields it must rename and copies every other field byte for byte (weights included).

What the fused graph is (the same rules as ``merge.py``):
  * each module's internal names (node outputs, initializers, node names) get an ``m<index>/`` prefix;
    the contract names (``hidden.m``, ``key.l``, ``position_ids``, ...) stay, so the hidden states connect;
  * graph inputs shared by several modules (``position_ids``, ``attention_mask``, ``past_positions``)
    appear once; the internal hidden states are neither inputs nor outputs;
  * outputs: the range's last output (``hidden.end`` or ``logits``) first, then ``key.l``, ``value.l``
    per layer in order;
  * with the LM head in a range of several modules, the head's input passes through
    ``Slice(hidden, head_from, INT64_MAX, axis 1)``: feeding ``head_from = [-1]`` runs the head on the last
    token only (a prefill's ``last_only``), ``[0]`` on every token, in the same single run.
Graph attributes (subgraphs: ``If``/``Loop``) are refused with :class:`FuseError` (no module has them;
the runner falls back to one session per module if one ever does).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from llnode.model import names

HEAD_FROM = "head_from"
_INT64_MAX = 2**63 - 1

# Field numbers of onnx.proto3 (wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
_MODEL_IR_VERSION, _MODEL_OPSET, _MODEL_GRAPH = 1, 8, 7
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 2, 5, 11, 12, 13
_GRAPH_SPARSE_INIT = 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_ATTR_G, _ATTR_GRAPHS = 6, 11
_TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 9, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VALUE_INFO_NAME = 1
# Constants up to this size are shared between the modules of a fused block when equal (weights never are).
_SHARED_CONST_BYTES = 4096
# Tensors referenced in their module file, not copied into the fused model (``fuse_files(external=True)``).
EXTERNAL_MIN_BYTES = 4096


class FuseError(ValueError):
    """The module graphs cannot be fused (unexpected content, or not a contiguous range)."""


# -- wire format ---------------------------------------------------------------------------------------


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise FuseError("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise FuseError("malformed protobuf varint")


def _enc_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    value: int  # varint / fixed value, or the payload length for wire type 2
    raw: memoryview  # the whole field (key + payload), copied as is when untouched
    payload: memoryview  # wire type 2 only: the bytes after the length


def _fields(buf: memoryview) -> Iterator[_Field]:
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = buf[0:0]
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = 0, pos + 8
        elif wire == 5:
            value, pos = 0, pos + 4
        elif wire == 2:
            value, pos = _varint(buf, pos)
            payload = buf[pos : pos + value]
            pos += value
        else:
            raise FuseError(f"unsupported protobuf wire type {wire} (field {number})")
        if pos > len(buf):
            raise FuseError("truncated protobuf message")
        yield _Field(number, wire, value, buf[start:pos], payload)


def _len_field(number: int, payload: bytes | memoryview) -> list[bytes | memoryview]:
    return [_enc_varint(number << 3 | 2), _enc_varint(len(payload)), payload]


def _str_field(number: int, text: str) -> list[bytes | memoryview]:
    return _len_field(number, text.encode())


def _first_string(buf: memoryview, number: int) -> str:
    for f in _fields(buf):
        if f.number == number and f.wire == 2:
            return bytes(f.payload).decode()
    return ""


def _rename_fields(buf: memoryview, renames: dict[int, Callable[[str], str]]) -> list[bytes | memoryview]:
    """``buf`` with the string fields in ``renames`` (field number -> str -> str function) mapped, as
    pieces: the untouched fields (a tensor's raw data) stay views of the file bytes, copied only once,
    by the final join."""
    out: list[bytes | memoryview] = []
    for f in _fields(buf):
        fn = renames.get(f.number)
        if fn is not None and f.wire == 2:
            out += _str_field(f.number, fn(bytes(f.payload).decode()))
        else:
            out.append(f.raw)
    return out


def _without_name(tensor: memoryview) -> bytes:
    """A serialized TensorProto without its name: equal for two constants with the same type and values."""
    return b"".join(bytes(f.raw) for f in _fields(tensor) if f.number != _TENSOR_NAME)


def _address(buf: memoryview) -> int:
    """Where ``buf`` starts in memory (read-only buffers too): the offset of a view into a file mapping."""
    import numpy as np  # phones have numpy; imported here because only external references need it

    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0]) if len(buf) else 0


def _external_tensor(
    tensor: memoryview, file: str, base: int, rename: Callable[[str], str]
) -> list[bytes | memoryview]:
    """``tensor`` renamed, with its raw data replaced by a reference to where those bytes already are in
    ``file`` (the module file, mapped at address ``base``): onnxruntime then maps the file instead of
    copying the weights out of the parsed model."""
    out: list[bytes | memoryview] = []
    for f in _fields(tensor):
        if f.number == _TENSOR_NAME and f.wire == 2:
            out += _str_field(f.number, rename(bytes(f.payload).decode()))
        elif f.number == _TENSOR_RAW_DATA and f.wire == 2 and len(f.payload) >= EXTERNAL_MIN_BYTES:
            where = {
                "location": file,
                "offset": str(_address(f.payload) - base),
                "length": str(len(f.payload)),
            }
            for key, value in where.items():
                out += _len_field(_TENSOR_EXTERNAL_DATA, b"".join(_str_field(1, key) + _str_field(2, value)))
            out += [_enc_varint(_TENSOR_DATA_LOCATION << 3), _enc_varint(_EXTERNAL)]
        else:
            out.append(f.raw)
    return out


def _pieces_field(number: int, pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    return [_enc_varint(number << 3 | 2), _enc_varint(sum(len(p) for p in pieces)), *pieces]


# -- the fused model -----------------------------------------------------------------------------------


@dataclass
class _Module:
    index: int
    nodes: list[memoryview]
    inits: list[memoryview]
    sparse: list[memoryview]
    inputs: list[memoryview]
    outputs: list[memoryview]
    value_infos: list[memoryview]
    opsets: dict[str, int]
    ir_version: int


def _parse_module(index: int, data: memoryview) -> _Module:
    m = _Module(index, [], [], [], [], [], [], {}, 0)
    graph = None
    for f in _fields(data):
        if f.number == _MODEL_IR_VERSION and f.wire == 0:
            m.ir_version = f.value
        elif f.number == _MODEL_OPSET and f.wire == 2:
            domain, version = "", 0
            for g in _fields(f.payload):
                if g.number == _OPSET_DOMAIN and g.wire == 2:
                    domain = bytes(g.payload).decode()
                elif g.number == _OPSET_VERSION and g.wire == 0:
                    version = g.value
            m.opsets[domain] = max(m.opsets.get(domain, 0), version)
        elif f.number == _MODEL_GRAPH and f.wire == 2:
            graph = f.payload
    if graph is None:
        raise FuseError(f"module {index} has no graph")
    lists = {
        _GRAPH_NODE: m.nodes, _GRAPH_INIT: m.inits, _GRAPH_SPARSE_INIT: m.sparse, _GRAPH_INPUT: m.inputs,
        _GRAPH_OUTPUT: m.outputs, _GRAPH_VALUE_INFO: m.value_infos,
    }  # fmt: skip
    for f in _fields(graph):
        target = lists.get(f.number)
        if target is not None and f.wire == 2:
            target.append(f.payload)
    if m.sparse:
        raise FuseError(f"module {index}: sparse initializers are not supported by the fusion")
    return m


def _node(index: int, node: memoryview, rename: Callable[[str], str]) -> bytes:
    out: list[bytes | memoryview] = []
    for f in _fields(node):
        if f.wire == 2 and f.number in (_NODE_INPUT, _NODE_OUTPUT):
            out += _str_field(f.number, rename(bytes(f.payload).decode()))
        elif f.wire == 2 and f.number == _NODE_NAME:
            out += _str_field(f.number, f"m{index}/" + bytes(f.payload).decode())
        elif f.wire == 2 and f.number == _NODE_ATTRIBUTE:
            if any(a.number in (_ATTR_G, _ATTR_GRAPHS) for a in _fields(f.payload)):
                raise FuseError(f"module {index}: subgraphs are not supported by the fusion")
            out.append(f.raw)
        else:
            out.append(f.raw)
    return b"".join(out)


def _int64_tensor(name: str, value: int) -> bytes:
    """A TensorProto holding one int64 ``[1]``: dims=1, data_type=INT64 (7), name, raw_data."""
    header = [_enc_varint(1 << 3 | 0), _enc_varint(1), _enc_varint(2 << 3 | 0), _enc_varint(7)]
    return b"".join([*header, *_str_field(_TENSOR_NAME, name), *_len_field(9, struct.pack("<q", value))])


def _int64_input(name: str) -> bytes:
    """A ValueInfoProto: ``name``, tensor(int64) of shape ``[1]``."""
    dim = _len_field(1, _enc_varint(1 << 3 | 0) + _enc_varint(1))  # Dimension{dim_value: 1}
    shape = b"".join(dim)
    tensor = b"".join([_enc_varint(1 << 3 | 0), _enc_varint(7), *_len_field(2, shape)])  # elem_type, shape
    type_proto = b"".join(_len_field(1, tensor))  # TypeProto{tensor_type}
    return b"".join(_str_field(_VALUE_INFO_NAME, name) + _len_field(2, type_proto))


def fuse_models(models: Sequence[tuple[int, bytes | mmap.mmap]], head_index: int | None = None) -> bytes:
    """One serialized ModelProto running modules ``models`` (``(module index, file bytes)``, contiguous,
    in order) as one graph. ``head_index``: the LM head's module index, which gets the ``head_from``
    slice when it is not the only module."""
    return b"".join(_fused_pieces(models, head_index))


def _fused_pieces(
    models: Sequence[tuple[int, bytes | mmap.mmap]],
    head_index: int | None,
    files: Sequence[str] | None = None,
) -> list[bytes | memoryview]:
    """:func:`fuse_models` as the pieces of the serialized model (views of the inputs for the weights).
    ``files``: the models' file names, to reference their large tensors there instead of copying them."""
    if not models:
        raise FuseError("nothing to fuse")
    indices = [i for i, _ in models]
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise FuseError(f"modules {indices} are not a contiguous range")
    parsed = [_parse_module(i, memoryview(data)) for i, data in models]
    bases = [_address(memoryview(data)) for _, data in models] if files is not None else []
    internal = {names.hidden(i) for i in indices[1:]}
    opsets: dict[str, int] = {}
    nodes: list[bytes | memoryview] = []
    inits: list[list[bytes | memoryview]] = []
    inputs: dict[str, bytes | memoryview] = {}
    value_infos: list[bytes | memoryview] = []
    seen_infos: set[str] = set()
    final: list[bytes | memoryview] = []
    kv: list[tuple[str, bytes | memoryview]] = []
    shared: dict[bytes, str] = {}  # small constant (serialized without its name) -> its fused name
    slice_head = head_index is not None and head_index in indices and len(indices) > 1
    for n, m in enumerate(parsed):
        for domain, version in m.opsets.items():
            opsets[domain] = max(opsets.get(domain, 0), version)
        init_names = {_first_string(t, _TENSOR_NAME) for t in m.inits}
        keep = {_first_string(v, _VALUE_INFO_NAME) for v in m.inputs + m.outputs} - init_names
        prefix = f"m{m.index}/"
        head_in = names.hidden(m.index) if slice_head and m.index == head_index else None

        # Small constants equal to one an earlier module of the block holds are dropped and their uses
        # renamed to it, so that onnxruntime's common-subexpression elimination merges the per-layer
        # computations that depend only on shared inputs and such constants (rotary tables, attention bias).
        aliases: dict[str, str] = {}
        for t in m.inits:
            content = _without_name(t) if len(t) <= _SHARED_CONST_BYTES else None
            name = _first_string(t, _TENSOR_NAME)
            if content is not None and content in shared:
                aliases[name] = shared[content]
                continue
            if content is not None:
                shared[content] = prefix + name
            if files is not None:
                inits.append(_external_tensor(t, files[n], bases[n], prefix.__add__))
            else:
                inits.append(_rename_fields(t, {_TENSOR_NAME: prefix.__add__}))

        def rename(
            name: str,
            keep: set[str] = keep,
            prefix: str = prefix,
            head_in: str | None = head_in,
            aliases: dict[str, str] = aliases,
        ) -> str:
            if name == head_in:
                return prefix + "head_input"
            if name in aliases:
                return aliases[name]
            return name if not name or name in keep else prefix + name

        first_node = len(nodes)  # the head's Slice goes before the head's nodes (topological order)
        for node in m.nodes:
            nodes.append(_node(m.index, node, rename))
        for v in m.value_infos:
            renamed = b"".join(_rename_fields(v, {_VALUE_INFO_NAME: rename}))
            name = _first_string(memoryview(renamed), _VALUE_INFO_NAME)
            if name not in seen_infos and name not in internal:
                seen_infos.add(name)
                value_infos.append(renamed)
        for v in m.inputs:
            name = _first_string(v, _VALUE_INFO_NAME)
            if name not in init_names and name not in internal:
                inputs.setdefault(name, v)
        for v in m.outputs:
            name = _first_string(v, _VALUE_INFO_NAME)
            if name in internal:
                continue
            if n == len(parsed) - 1 and name in (names.LOGITS, names.hidden(m.index + 1)):
                final.append(v)
            else:
                kv.append((name, v))
        if head_in is not None:
            p = prefix
            slice_inputs = [head_in, HEAD_FROM, p + "head_to", p + "head_axis"]
            slice_node = [x for name in slice_inputs for x in _str_field(_NODE_INPUT, name)]
            slice_node += _str_field(_NODE_OUTPUT, p + "head_input")
            slice_node += _str_field(_NODE_NAME, p + "head_slice")
            slice_node += _str_field(_NODE_OP_TYPE, "Slice")
            nodes.insert(first_node, b"".join(slice_node))
            inits += [[_int64_tensor(p + "head_to", _INT64_MAX)], [_int64_tensor(p + "head_axis", 1)]]
            inputs[HEAD_FROM] = _int64_input(HEAD_FROM)
    if len(final) != 1:
        raise FuseError(f"modules {indices[0]}..{indices[-1]}: expected one final output, got {len(final)}")
    graph: list[bytes | memoryview] = []
    for piece in nodes:
        graph += _len_field(_GRAPH_NODE, piece)
    graph += _str_field(_GRAPH_NAME, f"fused-{indices[0]}-{indices[-1]}")
    for pieces in inits:
        graph += _pieces_field(_GRAPH_INIT, pieces)
    for piece in inputs.values():
        graph += _len_field(_GRAPH_INPUT, piece)
    for piece in final + [info for _, info in kv]:
        graph += _len_field(_GRAPH_OUTPUT, piece)
    for piece in value_infos:
        graph += _len_field(_GRAPH_VALUE_INFO, piece)
    ir_version = max(p.ir_version for p in parsed)
    model: list[bytes | memoryview] = [_enc_varint(_MODEL_IR_VERSION << 3), _enc_varint(ir_version)]
    for domain, version in opsets.items():
        opset = [*_str_field(_OPSET_DOMAIN, domain), _enc_varint(_OPSET_VERSION << 3), _enc_varint(version)]
        model += _len_field(_MODEL_OPSET, b"".join(opset))
    # The graph's pieces go into the one final join (no intermediate copy of the weights).
    model += _pieces_field(_MODEL_GRAPH, graph)
    return model


@contextlib.contextmanager
def _mapped(shard_dir: Path, files: Sequence[tuple[int, str]]) -> Iterator[list[tuple[int, mmap.mmap]]]:
    """The module files memory-mapped, not read: the weights are then copied once, into the output."""
    maps: list[mmap.mmap] = []
    try:
        for _, f in files:
            with open(shard_dir / f, "rb") as fh:
                maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        yield [(i, mm) for (i, _), mm in zip(files, maps, strict=True)]
    finally:
        for mm in maps:
            # A view still referenced (by an exception's traceback) keeps its map open: the GC closes it.
            with contextlib.suppress(BufferError):
                mm.close()


def fuse_files(
    shard_dir: Path, files: Sequence[tuple[int, str]], head_index: int | None = None, external: bool = False
) -> bytes:
    """:func:`fuse_models` over module files of a shard set (``(module index, file name)``).

    ``external``: tensors of ``EXTERNAL_MIN_BYTES`` or more are not copied but referenced as external data
    at their place in the module files (paths relative to ``shard_dir``; load with the session config
    ``session.model_external_initializers_file_folder_path`` = ``shard_dir``): the fused model is then only
    the graph, a few hundred KB, and onnxruntime maps the weights from the files. WHY: a tensor that is
    not prepacked (the embedding table) then stays in the page cache, resident only where it is read, and
    the parsed model never holds a copy of the weights (see ``ModuleRunner._build_fused``)."""
    with _mapped(shard_dir, files) as models:
        return b"".join(_fused_pieces(models, head_index, [f for _, f in files] if external else None))


def write_fused(
    shard_dir: Path, files: Sequence[tuple[int, str]], out: IO[bytes], head_index: int | None = None
) -> None:
    """:func:`fuse_files` written to ``out`` piece by piece: the fused model never exists in memory."""
    with _mapped(shard_dir, files) as models:
        out.writelines(_fused_pieces(models, head_index))
