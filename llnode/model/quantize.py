"""Weight quantization of exported modules (PC side).

* int8 / int4: ``MatMulNBits`` with 8- or 4-bit weights (block 32, symmetric, ``accuracy_level=4`` =
  int8 compute), the fastest decode on this CPU and, for int8, far better perplexity than
  ``quantize_dynamic`` (see ``quantize_matmuls``).
* The embedding table (the largest tensor of a small model, and tied to the LM head) becomes int8 rows with
  one fp32 scale per row in both modes: ``Gather`` of int8 rows, then cast and scale. The head keeps its own
  quantized copy of the tied matrix because embedding and head normally live on different devices.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PRECISIONS = ("fp32", "int8", "int4")
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute: the fastest on CPU (field facts)
QUANT_VERSION = 2  # bump when the quantization recipe changes (part of the cache key)


def quantize_embedding(src: Path, dst: Path, min_rows: int = 256) -> None:
    """Replace ``Gather(table, ids)`` on a large fp32 table by int8 rows times a per-row scale."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        arr = numpy_helper.to_array(table) if table is not None else None
        if arr is None or arr.ndim != 2 or arr.shape[0] < min_rows or arr.dtype != np.float32:
            new_nodes.append(node)
            continue
        scale = np.maximum(np.abs(arr).max(axis=1, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.round(arr / scale), -127, 127).astype(np.int8)
        base = node.input[0]
        graph.initializer.remove(table)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}.int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{base}.scale"),
            ]
        )
        out = node.output[0]
        new_nodes += [
            helper.make_node("Gather", [f"{base}.int8", node.input[1]], [f"{out}.q"], axis=0),
            helper.make_node("Gather", [f"{base}.scale", node.input[1]], [f"{out}.s"], axis=0),
            helper.make_node("Cast", [f"{out}.q"], [f"{out}.f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out]),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def quantize_matmuls(src: Path, dst: Path, precision: str) -> None:
    """Weight-only block quantization of every MatMul with a constant weight (``MatMulNBits``).

    int8 uses 8-bit blocks too: ``quantize_dynamic`` (per-tensor int8 weights *and* activations) measured
    perplexity 43.9 vs 24.7 in fp32 on SmolLM2-135M (35.4 per-channel), 8-bit MatMulNBits 25.3.
    """
    if precision not in ("int8", "int4"):
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(
        onnx.load(str(src)),
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
        bits=8 if precision == "int8" else 4,
    )
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_module(src: Path, dst: Path, kind: str, precision: str) -> None:
    """Quantize one module file; fp32 is a plain copy."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        shutil.copyfile(src, dst)
    elif kind == "embed":
        quantize_embedding(src, dst)
    else:
        quantize_matmuls(src, dst, precision)
