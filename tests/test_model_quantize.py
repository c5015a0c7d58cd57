"""Weight quantization: 4-bit weights that come from a Q4_1-style grid are re-encoded without loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llnode.model.quantize import quantize_matmuls
from llnode.model.runner import _session_options


def _matmul_model(path: Path, w: np.ndarray) -> None:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    # The runner's options: a plain session fails once another test made the process-wide thread pool.
    sess = ort.InferenceSession(str(path), _session_options(1), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_q4_1_grid_is_reencoded_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k, n = 128, 96
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # every block spans its full range, as Q4_1 quantization makes it
    d = rng.uniform(0.001, 0.02, (n, k // 32, 1))
    m = rng.uniform(-0.15, -0.01, (n, k // 32, 1))
    w = (q * d + m).reshape(n, k).T.astype(np.float32)  # [K, N], blocks of 32 along K
    _matmul_model(tmp_path / "fp32.onnx", w)
    quantize_matmuls(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", "int4")
    nodes = onnx.load(str(tmp_path / "int4.onnx")).graph.node
    ops = [node.op_type for node in nodes]
    # The block-minimum term stays fp32: one pooling of the input's blocks, one small MatMul, one Add.
    assert sorted(ops) == ["Add", "AveragePool", "MatMul", "MatMulNBits"]
    nbits = next(node for node in nodes if node.op_type == "MatMulNBits")
    assert len(nbits.input) == 3  # centred levels: the implicit zero point 8, no zero-point tensor

    noisy = (w + rng.normal(0, 1e-3, w.shape)).astype(np.float32)  # off the grid: plain symmetric 4-bit
    _matmul_model(tmp_path / "noisy.onnx", noisy)
    quantize_matmuls(tmp_path / "noisy.onnx", tmp_path / "noisy4.onnx", "int4")
    assert "MatMul" not in [node.op_type for node in onnx.load(str(tmp_path / "noisy4.onnx")).graph.node]

    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    exact_err = np.abs(_run(tmp_path / "int4.onnx", x) - x @ w).max()
    sym_err = np.abs(_run(tmp_path / "noisy4.onnx", x) - x @ noisy).max()
    scale = np.abs(x @ w).max()
    # What remains is the int8 quantization of the activations (accuracy_level 4), not of the weights.
    assert exact_err < 0.02 * scale
    assert exact_err < sym_err / 3


def test_block_minimum_term_is_the_block_sums_times_m_plus_8d(tmp_path: Path) -> None:
    """The fp32 correction alone (no int8 activations in it): ``sum over each block of x`` times ``m + 8d``,
    to float rounding, for a batch of several tokens (the pooling runs over K, not over tokens)."""
    rng = np.random.default_rng(1)
    k, n = 96, 40
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.02, (n, k // 32, 1))
    m = rng.uniform(-0.15, -0.01, (n, k // 32, 1))
    w = (q * d + m).reshape(n, k).T.astype(np.float32)
    _matmul_model(tmp_path / "fp32.onnx", w)
    quantize_matmuls(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", "int4")
    model = onnx.load(str(tmp_path / "int4.onnx"))
    correction = next(node.output[0] for node in model.graph.node if node.op_type == "MatMul")
    model.graph.output.append(helper.make_tensor_value_info(correction, TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "probe.onnx"))
    sess = ort.InferenceSession(
        str(tmp_path / "probe.onnx"), _session_options(1), providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    got = sess.run([correction], {"x": x})[0]
    want = x.reshape(2, 5, k // 32, 32).sum(-1) @ (m[..., 0] + 8 * d[..., 0]).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
