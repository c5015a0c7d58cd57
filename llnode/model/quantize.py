"""Weight quantization of exported modules (PC side).

* int8 / int4: ``MatMulNBits`` with 8- or 4-bit weights (block 32, symmetric, ``accuracy_level=4`` =
  int8 compute), the fastest decode on this CPU and, for int8, far better perplexity than
  ``quantize_dynamic`` (see ``quantize_matmuls``).
* int4 of weights that already lie on a 4-bit block grid (SmolLM2 comes from a Q4_1 GGUF): re-encoded
  exactly (``_exact_4bit``) instead of re-quantized; the LM head (the tied embedding, 8-bit in GGUFs) gets
  8 bits. Measured on SmolLM2: perplexity x1.014 of fp32 and 96% top-1 agreement, vs x1.07 and 84% with a
  second symmetric 4-bit rounding.
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
QUANT_VERSION = 5  # bump when the quantization recipe changes (part of the cache key)
ZERO_POINT_4BIT = 8  # MatMulNBits' implicit zero point of 4-bit weights without a zero-point input


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


def _grid_4bit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(q [N, K/32, 32] in 0..15, scale [N, K/32], min [N, K/32])`` if the MatMul weight ``w [K, N]``
    lies exactly on a per-block 16-level grid (a dequantized Q4_1/Q4_0 GGUF), else None."""
    k, n = w.shape
    if k % BLOCK_SIZE:
        return None
    b = np.ascontiguousarray(w.T).reshape(n, k // BLOCK_SIZE, BLOCK_SIZE)
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    d = (hi - lo) / 15.0
    safe = np.where(d > 0, d, 1.0)[..., None]
    q = np.clip(np.round((b - lo[..., None]) / safe), 0, 15)
    if np.abs(q * d[..., None] + lo[..., None] - b).max() > 1e-6 * max(float(np.abs(b).max()), 1e-12):
        return None
    return q.astype(np.uint8), d.astype(np.float32), lo.astype(np.float32)


def _exact_4bit(model: onnx.ModelProto) -> list[str]:
    """Re-encode every MatMul whose weight is exactly on a 4-bit block grid without losing anything.

    WHY: SmolLM2's weights come from a Q4_1 GGUF (``x = d*q + m`` per block of 32 along K). Re-quantizing
    them on MatMulNBits' symmetric grid measured perplexity x1.07 and 84% top-1 agreement with fp32 (not a
    bug, a second rounding). Here ``d*(q - 8)`` goes to ``MatMulNBits`` (no zero-point input: the default
    8) and ``m + 8d`` to a small fp32 MatMul over the per-block sums of the input (``sum_k x_k (m + 8d)_b``):
    the same numbers as the GGUF, the same bytes as Q4_1 plus ~1/8. Centred levels (-8..7) rather than
    ``d*q`` with zero point 0 (version 3): onnxruntime quantizes the activations to int8 (accuracy level 4),
    and that error is multiplied by the levels, so centring halves it (64 tokens of SmolLM2: mean |logit -
    fp32| 0.21 vs 0.30, argmax equal to fp32 94 % vs 86 %) at the same decode time, without the zero-point
    tensors.

    The per-block input sums are one ``AveragePool`` (kernel = stride = 32 along K of the ``[batch, tokens,
    K]`` input: block means) times ``32 (m + 8d)``, not ``Reshape`` + ``ReduceSum`` (version 4): one
    kernel fewer per weight MatMul, 4 per layer, 2-6 % less CPU per decoded token at 1 and 2 threads. The
    same weights and formula, but the 32 inputs are added in another order: the logits move by the size of
    the int8 activation rounding (a flipped rounding, mean 0.15), quality is unchanged (docs/model.md).
    Returns the names of the added fp32 MatMuls (not to quantize).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    added: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        w = numpy_helper.to_array(init) if init is not None else None
        grid = _grid_4bit(w) if w is not None and w.ndim == 2 and w.dtype == np.float32 else None
        if grid is None:
            new_nodes.append(node)
            continue
        assert w is not None and init is not None
        q, d, lo = grid
        k, n = w.shape
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
        base, out = node.name or node.output[0], node.output[0]
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed, f"{base}.q4"),
                numpy_helper.from_array(d.reshape(-1), f"{base}.scales"),
                # x 32: the pooled input holds block means (32 is a power of two: exact).
                numpy_helper.from_array(
                    np.ascontiguousarray((lo + ZERO_POINT_4BIT * d).T) * np.float32(BLOCK_SIZE),
                    f"{base}.mins",
                ),
            ]
        )
        a = node.input[0]
        new_nodes += [
            helper.make_node(
                "MatMulNBits",
                [a, f"{base}.q4", f"{base}.scales"],
                [f"{out}.dq"],
                name=f"{base}.nbits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=BLOCK_SIZE,
                accuracy_level=ACCURACY_LEVEL,
            ),
            helper.make_node(
                "AveragePool",
                [a],
                [f"{out}.xs"],
                name=f"{base}.blocks",
                kernel_shape=[BLOCK_SIZE],
                strides=[BLOCK_SIZE],
            ),
            helper.make_node("MatMul", [f"{out}.xs", f"{base}.mins"], [f"{out}.m"], name=f"{base}.mins"),
            helper.make_node("Add", [f"{out}.dq", f"{out}.m"], [out]),
        ]
        added.append(f"{base}.mins")
    if added:
        del graph.node[:]
        graph.node.extend(new_nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return added


def quantize_matmuls(src: Path, dst: Path, precision: str, kind: str = "layer") -> None:
    """Weight-only block quantization of every MatMul with a constant weight (``MatMulNBits``).

    int8 uses 8-bit blocks too: ``quantize_dynamic`` (per-tensor int8 weights *and* activations) measured
    perplexity 43.9 vs 24.7 in fp32 on SmolLM2-135M (35.4 per-channel), 8-bit MatMulNBits 25.3.
    """
    if precision not in ("int8", "int4"):
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    exclude = _exact_4bit(model) if precision == "int4" else []
    # The LM head of a tied model is the embedding table, which GGUFs keep at 8 bits (as llama.cpp runs it).
    bits = 8 if precision == "int8" or kind == "head" else 4
    q = MatMulNBitsQuantizer(
        model,
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
        bits=bits,
        nodes_to_exclude=exclude,
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
        quantize_matmuls(src, dst, precision, kind)
