"""Describe exported module files as a Manifest, reading everything from the ONNX graphs themselves.

The transmission map is derived, not declared: the tensors crossing the cut after module i are the graph
outputs of module i that are graph inputs of module i+1; their bytes per token come from their static
dimensions (the symbolic ``batch`` and ``new_tokens`` are per-request factors).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper
from tqdm import tqdm

from llnode.model.arch import ArchInfo
from llnode.model.manifest import DTYPE_BYTES, Boundary, FlopsModel, Manifest, ModuleInfo, TensorSpec

_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}
PER_TOKEN_DIMS = {"batch", "new_tokens"}


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=not progress or size < 50_000_000,
        ) as bar,
    ):
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tt = value.type.tensor_type
    shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
    dtype = _ONNX_DTYPES.get(int(tt.elem_type), str(tt.elem_type))
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_spec(v) for v in model.graph.output]


def bytes_per_token(spec: TensorSpec) -> int:
    n = DTYPE_BYTES.get(spec.dtype, 4)
    for d in spec.shape:
        if isinstance(d, int):
            n *= d
        elif d not in PER_TOKEN_DIMS:
            raise ValueError(f"tensor {spec.name} crossing a cut has a non-per-token dimension {d!r}")
    return n


def derive_boundaries(io: list[tuple[list[TensorSpec], list[TensorSpec]]]) -> list[Boundary]:
    out: list[Boundary] = []
    for i in range(len(io) - 1):
        next_inputs = {t.name for t in io[i + 1][0]}
        crossing = [t for t in io[i][1] if t.name in next_inputs]
        if not crossing:
            raise ValueError(f"no tensor flows from module {i} to module {i + 1}: the graphs do not chain")
        out.append(
            Boundary(after=i, tensors=crossing, bytes_per_token=sum(bytes_per_token(t) for t in crossing))
        )
    return out


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        total += int(arr.nbytes)
    return total


def _matmul_flops(model: onnx.ModelProto) -> float:
    """2*K*N per token for every MatMul/Gemm (or quantized equivalent) with a weight initializer."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    flops = 0.0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            flops += 2.0 * attrs.get("K", 0) * attrs.get("N", 0)
        elif node.op_type in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul"):
            for name in node.input[1:2]:
                dims = shapes.get(name)
                if dims is not None and len(dims) == 2:
                    flops += 2.0 * dims[0] * dims[1]
    return flops


def module_info(
    index: int, kind: str, layer: int | None, path: Path, arch: ArchInfo, progress: bool = False
) -> tuple[ModuleInfo, tuple[list[TensorSpec], list[TensorSpec]]]:
    model = onnx.load(str(path))
    inputs, outputs = graph_io(model)
    per_context = 4.0 * arch.num_heads * arch.head_dim if kind == "layer" else 0.0
    base = _matmul_flops(model) + (0.0 if kind == "embed" else 10.0 * arch.hidden_size)  # + norms, adds
    kv = 2 * arch.num_kv_heads * arch.head_dim * 4 if kind == "layer" else 0
    info = ModuleInfo(
        index=index,
        name=path.stem,
        kind=kind,
        file=path.name,
        sha256=sha256_file(path, progress),
        size_bytes=path.stat().st_size,
        param_bytes=_initializer_bytes(model),
        flops=FlopsModel(base=base, per_context=per_context),
        kv_bytes_per_token=kv,
        inputs=inputs,
        outputs=outputs,
        layer=layer,
    )
    return info, (inputs, outputs)


def build_manifest(
    *,
    name: str,
    arch: ArchInfo,
    precision: str,
    plan: list[tuple[str, int | None, Path]],
    bos: int | None,
    eos: list[int],
    pad: int | None,
    chat_template: str | None,
    special_tokens: dict[str, int],
    source: dict[str, Any],
    progress: bool = True,
) -> Manifest:
    modules: list[ModuleInfo] = []
    io: list[tuple[list[TensorSpec], list[TensorSpec]]] = []
    for i, (kind, layer, path) in enumerate(tqdm(plan, desc="describe modules", disable=not progress)):
        info, gio = module_info(i, kind, layer, path, arch, progress)
        modules.append(info)
        io.append(gio)
    manifest = Manifest(
        name=name,
        architecture=arch.family,
        precision=precision,
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        max_context=arch.max_context,
        bos_token_id=bos,
        eos_token_ids=eos,
        pad_token_id=pad,
        modules=modules,
        boundaries=derive_boundaries(io),
        chat_template=chat_template,
        special_tokens=special_tokens,
        source=source,
    )
    manifest.check()
    return manifest


def verify_files(manifest: Manifest, shard_dir: Path, progress: bool = False) -> list[str]:
    """Problems with the files of a shard set (missing, wrong size, wrong sha256); empty if none."""
    problems = []
    for m in manifest.modules:
        path = shard_dir / m.file
        if not path.is_file():
            problems.append(f"{m.file}: missing")
        elif path.stat().st_size != m.size_bytes:
            problems.append(f"{m.file}: size {path.stat().st_size} != {m.size_bytes} in the manifest")
        elif sha256_file(path, progress) != m.sha256:
            problems.append(f"{m.file}: sha256 does not match the manifest (corrupted or replaced)")
    return problems
