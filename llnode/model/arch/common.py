"""Attention math shared by every architecture wrapper.

WHY a hand-written attention instead of calling the transformers module: the exported module must take the
past K/V as plain tensors owned by the runner, return only the *new* K/V, and recompute the mask from the
attention mask and positions it is given. Doing the attention here keeps that contract identical across
architectures and independent of transformers' cache classes, which change between releases.

Split attention: scores against the past keys and against the new keys are computed separately and only
the (small) score tensors are concatenated, so the graph never copies the past K/V (a ``Concat`` of past and
new K/V would copy the whole cache on every decode step). The runner appends the new K/V into buffers it
preallocates, so no step copies the past.
"""

from __future__ import annotations

import torch

# Masked scores get the most negative finite float rather than -inf: a fully masked row (a left-pad
# query) then gives a uniform softmax instead of NaN, and its output is ignored anyway.
MASK_VALUE = torch.finfo(torch.float32).min


def split_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the new tokens over past slots + new tokens; returns ``[B, T, H*hd]``.

    q: [B, H, T, hd]; k, v: [B, KV, T, hd]; past_k, past_v: [B, KV, P, hd];
    attention_mask: [B, P+T] (1 = a real token; unused cache slots and left pads are 0);
    position_ids: [B, T]: causality among the new tokens is ``pos_key <= pos_query``, so a chunk may be
    any run of positions; bias (ALiBi): broadcastable to [B, KV, G, 1, P+T].
    Grouped-query attention is done by folding the G query heads that share a KV head into the query
    axis, which avoids repeating (copying) the K/V heads.
    """
    b, h, t, hd = q.shape
    kv = k.shape[1]
    g = h // kv
    p = past_k.shape[2]
    qg = q.reshape(b, kv, g * t, hd)
    s_past = torch.matmul(qg, past_k.transpose(2, 3)).reshape(b, kv, g, t, p)
    s_new = torch.matmul(qg, k.transpose(2, 3)).reshape(b, kv, g, t, t)
    scores = torch.cat([s_past, s_new], dim=-1) * scale
    if bias is not None:
        scores = scores + bias
    mask = attention_mask > 0
    past_ok = mask[:, :p].reshape(b, 1, 1, 1, p).expand(b, 1, 1, t, p)
    causal = position_ids.unsqueeze(1) <= position_ids.unsqueeze(2)  # [B, Tq, Tk]
    new_ok = (mask[:, p:].unsqueeze(1) & causal).reshape(b, 1, 1, t, t)
    ok = torch.cat([past_ok, new_ok], dim=-1)
    scores = scores.masked_fill(~ok, MASK_VALUE)
    probs = torch.softmax(scores, dim=-1)
    p_past = probs[..., :p].reshape(b, kv, g * t, p)
    p_new = probs[..., p:].reshape(b, kv, g * t, t)
    out = torch.matmul(p_past, past_v) + torch.matmul(p_new, v)
    return out.reshape(b, h, t, hd).transpose(1, 2).reshape(b, t, h * hd)
