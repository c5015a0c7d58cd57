"""BLOOM: ALiBi instead of position embeddings, fused query_key_value laid out [heads, 3, head_dim].

ALiBi adds ``slope_h * key_position`` to every score (softmax is shift-invariant per query row, so the
absolute key position is enough). The key positions of cached tokens are an input (``past_positions``)
kept by the runner next to the K/V; they never cross a device boundary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llnode.model.arch.base import Adapter, ArchInfo, NormHead
from llnode.model.arch.common import split_attention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The slopes of the ALiBi paper / transformers' ``build_alibi_tensor``."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(closest, num_heads - closest))]
    return torch.tensor(slopes, dtype=torch.float32)


class BloomEmbed(nn.Module):
    def __init__(self, word_embeddings: Any, layernorm: Any) -> None:
        super().__init__()
        self.word_embeddings: Any = word_embeddings
        self.layernorm: Any = layernorm

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.word_embeddings(input_ids))


class BloomLayer(nn.Module):
    slopes: torch.Tensor

    def __init__(self, block: Any, info: ArchInfo) -> None:
        super().__init__()
        self.block: Any = block
        self.heads, self.head_dim = info.num_heads, info.head_dim
        self.register_buffer("slopes", alibi_slopes(info.num_heads).reshape(1, info.num_heads, 1, 1, 1))
        self.post_ln_residual = bool(getattr(block, "apply_residual_connection_post_layernorm", False))

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = hidden.shape[0], hidden.shape[1]
        blk = self.block
        x = blk.input_layernorm(hidden)
        residual = x if self.post_ln_residual else hidden
        qkv = blk.self_attention.query_key_value(x).reshape(b, t, self.heads, 3, self.head_dim)
        q = qkv[:, :, :, 0].transpose(1, 2)
        k = qkv[:, :, :, 1].transpose(1, 2)
        v = qkv[:, :, :, 2].transpose(1, 2)
        key_pos = torch.cat([past_positions, position_ids], dim=1).float()  # [B, P+T]
        bias = self.slopes * key_pos.reshape(b, 1, 1, 1, -1)  # [B, H, 1, 1, P+T] (KV heads == heads)
        out = split_attention(
            q,
            k,
            v,
            past_key,
            past_value,
            attention_mask,
            position_ids,
            float(blk.self_attention.inv_norm_factor),
            bias=bias.reshape(b, self.heads, 1, 1, -1),
        )
        attn_out = blk.self_attention.dense(out) + residual
        x = blk.post_attention_layernorm(attn_out)
        residual = x if self.post_ln_residual else attn_out
        hidden = blk.mlp(x, residual)
        return hidden, k, v


class BloomAdapter(Adapter):
    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.model: Any = model
        self.info = ArchInfo(
            family="bloom",
            hidden_size=cfg.hidden_size,
            num_layers=cfg.n_layer,
            num_heads=cfg.n_head,
            num_kv_heads=cfg.n_head,
            head_dim=cfg.hidden_size // cfg.n_head,
            vocab_size=cfg.vocab_size,
            # ALiBi has no trained maximum; 2048 is BLOOM's training length.
            max_context=int(getattr(cfg, "seq_length", 0) or 2048),
            intermediate_size=4 * cfg.hidden_size,
            layer_uses_past_positions=True,
        )

    def embed(self) -> nn.Module:
        tr = self.model.transformer
        return BloomEmbed(tr.word_embeddings, tr.word_embeddings_layernorm)

    def layer(self, index: int) -> nn.Module:
        return BloomLayer(self.model.transformer.h[index], self.info)

    def head(self) -> nn.Module:
        return NormHead(self.model.transformer.ln_f, self.model.lm_head)
