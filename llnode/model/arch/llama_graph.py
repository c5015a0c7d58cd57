"""A Llama-family decoder layer written directly as an ONNX graph (no tracing).

WHY: the traced export of ``LlamaLayer`` had ~196 nodes per layer (~100 after onnxruntime's fusions), most
of them shape arithmetic (``Shape``/``Gather``/``Unsqueeze``/``Concat`` for every dynamic reshape), the
rotary tables and the mask. With 30 layers that is ~3000 tiny kernels per token: on the 2-core test
machine they cost about as much as the weight reads of a quantized model. Here every reshape uses the
constant ``0``/``-1`` form, q/k/v and gate/up are one MatMul each (4 weight MatMuls per layer instead of 7:
fewer dispatches and, quantized, fewer activation quantizations), rotary is applied to q and k at once,
and the attention scale is folded into the q weights. The module I/O contract is exactly the traced one
(see ``common.split_attention``): same tensor names, shapes and semantics, so runner, batching, stage and
verify are unaffected; tests compare both against transformers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from llnode.model import names
from llnode.model.arch.base import ArchInfo
from llnode.model.arch.common import MASK_VALUE

OPSET = 17


class _Graph:
    """Collects nodes and initializers with unique names; ``op`` returns the output name(s)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.asarray(values, np.int64))

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs: Any) -> Any:
        self._n += 1
        if isinstance(outputs, int):
            outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        else:
            outs = outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", **attrs))
        return outs[0] if len(outs) == 1 else outs


def _t(weight: torch.Tensor) -> np.ndarray:
    """A ``nn.Linear`` weight ``[out, in]`` as the ``[in, out]`` right operand of MatMul."""
    return np.ascontiguousarray(weight.detach().float().numpy().T)


def _bias(linear: Any, out: int) -> np.ndarray:
    b = getattr(linear, "bias", None)
    return np.zeros(out, np.float32) if b is None else b.detach().float().numpy()


def _has_bias(*linears: Any) -> bool:
    return any(getattr(x, "bias", None) is not None for x in linears)


def _rms_norm(g: _Graph, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
    """RMSNorm as the primitive pattern onnxruntime fuses into ``SimplifiedLayerNormalization``."""
    sq = g.op("Pow", [x, g.const(f"{name}.two", np.asarray(2.0, np.float32))])
    mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [mean, g.const(f"{name}.eps", np.asarray(eps, np.float32))])])
    normed = g.op("Div", [x, std])
    return g.op("Mul", [normed, g.const(f"{name}.weight", weight.detach().float().numpy())])


def supports(layer: Any) -> bool:
    """Only the plain Llama layout: SiLU-gated MLP and RMSNorms with a multiplicative weight."""
    act = getattr(getattr(layer, "mlp", None), "act_fn", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return (
        type(act).__name__ in ("SiLU", "SiLUActivation")
        and all(n is not None and hasattr(n, "variance_epsilon") for n in norms)
        and hasattr(layer.self_attn, "q_proj")
    )


def build_layer(
    layer: Any, index: int, info: ArchInfo, inv_freq: torch.Tensor, rope_scaling: float
) -> onnx.ModelProto:
    """The ONNX graph of decoder layer ``index`` (module ``index + 1``)."""
    g = _Graph()
    heads, kvh, hd, d = info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size
    groups = heads // kvh
    attn, mlp = layer.self_attn, layer.mlp
    m = index + 1
    h_in, h_out = names.hidden(m), names.hidden(m + 1)
    pos, mask = names.POSITION_IDS, names.ATTENTION_MASK
    pk, pv = names.past_key(index), names.past_value(index)

    # --- per-step tables: rotary cos/sin and the additive attention bias (tiny tensors) ---------------
    posf = g.op("Cast", [pos], to=TensorProto.FLOAT)
    freqs = g.op(
        "Mul",
        [
            g.op("Unsqueeze", [posf, g.ints("axes23", [2, 3])]),
            g.const("inv_freq", inv_freq.detach().float().numpy().reshape(-1)),
        ],
    )  # [B, T, 1, hd/2]
    cos, sin = g.op("Cos", [freqs]), g.op("Sin", [freqs])
    if rope_scaling != 1.0:
        s = g.const("rope_scale", np.asarray(rope_scaling, np.float32))
        cos, sin = g.op("Mul", [cos, s]), g.op("Mul", [sin, s])
    cos_full = g.op("Concat", [cos, cos], axis=-1)
    sin_signed = g.op("Concat", [g.op("Neg", [sin]), sin], axis=-1)  # rotate_half's sign folded in

    t_len = g.op("Shape", [pos], start=1, end=2)
    # The cache length from the mask ([B, past + new]), not from ``past_key``: then the whole bias depends
    # only on inputs every layer shares, and a fused block computes it once (onnxruntime's CSE merges it).
    p_len = g.op("Sub", [g.op("Shape", [mask], start=1, end=2), t_len])
    past_mask = g.op("Slice", [mask, g.ints("zero1", [0]), p_len, g.ints("one1", [1])])
    # Key positions: cached slots count as position 0 (visible to every query unless masked out); the
    # new keys use their own positions, so causality among new tokens is pos_key <= pos_query.
    key_pos = g.op("Concat", [g.op("Sub", [past_mask, past_mask]), pos], axis=1)
    causal = g.op(
        "LessOrEqual",
        [g.op("Unsqueeze", [key_pos, g.ints("axis1", [1])]), g.op("Unsqueeze", [pos, g.ints("axis2", [2])])],
    )  # [B, T, P+T]
    real = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.BOOL), "axis1"])
    bias = g.op(
        "Where",
        [
            g.op("And", [causal, real]),
            g.const("zero_f", np.asarray(0.0, np.float32)),
            g.const("mask_value", np.asarray(MASK_VALUE, np.float32)),
        ],
    )
    if groups > 1:  # the query axis of the folded GQA scores is (group, token), group-major
        bias = g.op("Tile", [bias, g.ints("tile_groups", [1, groups, 1])])
    bias = g.op("Unsqueeze", [bias, "axis1"])  # [B, 1, G*T, P+T]

    # --- attention --------------------------------------------------------------------------------------
    x = _rms_norm(g, h_in, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, "ln1")
    scale = float(attn.scaling)
    qd, kd = heads * hd, kvh * hd
    w_qkv = np.concatenate(
        [_t(attn.q_proj.weight) * scale, _t(attn.k_proj.weight), _t(attn.v_proj.weight)], axis=1
    )
    qkv = g.op("MatMul", [x, g.const("qkv.weight", w_qkv)])
    if _has_bias(attn.q_proj, attn.k_proj, attn.v_proj):  # Qwen2
        b_qkv = np.concatenate(
            [_bias(attn.q_proj, qd) * scale, _bias(attn.k_proj, kd), _bias(attn.v_proj, kd)]
        )
        qkv = g.op("Add", [qkv, g.const("qkv.bias", b_qkv)])
    qk, v = g.op("Split", [qkv, g.ints("split_qk_v", [qd + kd, kd])], 2, axis=-1)
    qk = g.op("Reshape", [qk, g.ints("shape_qk", [0, 0, heads + kvh, hd])])  # [B, T, H+KV, hd]
    lo, hi = g.op("Split", [qk, g.ints("split_half", [hd // 2, hd // 2])], 2, axis=-1)
    rotated = g.op(
        "Add",
        [
            g.op("Mul", [qk, cos_full]),
            g.op("Mul", [g.op("Concat", [hi, lo], axis=-1), sin_signed]),
        ],
    )
    q, k = g.op("Split", [rotated, g.ints("split_q_k", [heads, kvh])], 2, axis=2)
    qg = g.op(
        "Reshape",
        [g.op("Transpose", [q], perm=[0, 2, 1, 3]), g.ints("shape_qg", [0, kvh, -1, hd])],
    )  # [B, KV, G*T, hd]: the G query heads sharing a KV head, folded into the query axis (no repeat_kv)
    g.op("Transpose", [k], [names.key(index)], perm=[0, 2, 1, 3])
    v4 = g.op("Reshape", [v, g.ints("shape_v", [0, 0, kvh, hd])])
    g.op("Transpose", [v4], [names.value(index)], perm=[0, 2, 1, 3])
    s_past = g.op("MatMul", [qg, g.op("Transpose", [pk], perm=[0, 1, 3, 2])])
    s_new = g.op("MatMul", [qg, g.op("Transpose", [names.key(index)], perm=[0, 1, 3, 2])])
    probs = g.op("Softmax", [g.op("Add", [g.op("Concat", [s_past, s_new], axis=-1), bias])], axis=-1)
    p_past, p_new = g.op("Split", [probs, g.op("Concat", [p_len, t_len], axis=0)], 2, axis=-1)
    ctx = g.op(
        "Add", [g.op("MatMul", [p_past, pv]), g.op("MatMul", [p_new, names.value(index)])]
    )  # [B, KV, G*T, hd]
    ctx = g.op("Reshape", [ctx, g.ints("shape_heads", [0, heads, -1, hd])])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.ints("shape_flat", [0, 0, qd])])
    o = g.op("MatMul", [ctx, g.const("o.weight", _t(attn.o_proj.weight))])
    if _has_bias(attn.o_proj):
        o = g.op("Add", [o, g.const("o.bias", _bias(attn.o_proj, d))])
    h = g.op("Add", [h_in, o])

    # --- MLP: down(silu(gate(x)) * up(x)), gate and up in one MatMul --------------------------------------
    inter = info.intermediate_size
    x2 = _rms_norm(
        g, h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon, "ln2"
    )
    w_gu = np.concatenate([_t(mlp.gate_proj.weight), _t(mlp.up_proj.weight)], axis=1)
    gu = g.op("MatMul", [x2, g.const("gate_up.weight", w_gu)])
    if _has_bias(mlp.gate_proj, mlp.up_proj):
        b_gu = np.concatenate([_bias(mlp.gate_proj, inter), _bias(mlp.up_proj, inter)])
        gu = g.op("Add", [gu, g.const("gate_up.bias", b_gu)])
    gate, up = g.op("Split", [gu, g.ints("split_gate_up", [inter, inter])], 2, axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    down = g.op("MatMul", [act, g.const("down.weight", _t(mlp.down_proj.weight))])
    if _has_bias(mlp.down_proj):
        down = g.op("Add", [down, g.const("down.bias", _bias(mlp.down_proj, d))])
    g.op("Add", [h, down], [h_out])

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        g.nodes,
        f"layer_{index}",
        inputs=[
            helper.make_tensor_value_info(h_in, f32, ["batch", "new_tokens", d]),
            helper.make_tensor_value_info(pos, i64, ["batch", "new_tokens"]),
            helper.make_tensor_value_info(mask, i64, ["batch", "past_and_new"]),
            helper.make_tensor_value_info(pk, f32, ["batch", kvh, "past", hd]),
            helper.make_tensor_value_info(pv, f32, ["batch", kvh, "past", hd]),
        ],
        outputs=[
            helper.make_tensor_value_info(h_out, f32, ["batch", "new_tokens", d]),
            helper.make_tensor_value_info(names.key(index), f32, ["batch", kvh, "new_tokens", hd]),
            helper.make_tensor_value_info(names.value(index), f32, ["batch", kvh, "new_tokens", hd]),
        ],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llnode")
    model.ir_version = 8  # loads in the onnxruntime 1.22 that Termux packages
    onnx.checker.check_model(model)
    return model
