"""GPT-2: learned absolute position embeddings (added in the first module), fused c_attn, pre-LayerNorm."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llnode.model.arch.base import Adapter, ArchInfo, NormHead
from llnode.model.arch.common import split_attention


class Gpt2Embed(nn.Module):
    def __init__(self, wte: Any, wpe: Any) -> None:
        super().__init__()
        self.wte: Any = wte
        self.wpe: Any = wpe

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(position_ids)


class Gpt2Layer(nn.Module):
    def __init__(self, block: Any, info: ArchInfo, layer_index: int) -> None:
        super().__init__()
        self.block: Any = block
        self.heads, self.head_dim, self.hidden = info.num_heads, info.head_dim, info.hidden_size
        attn = block.attn
        scale = 1.0
        if getattr(attn, "scale_attn_weights", True):
            scale /= float(self.head_dim) ** 0.5
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_index + 1)
        self.scale = scale

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
        attn = self.block.attn
        qkv = attn.c_attn(self.block.ln_1(hidden))
        q, k, v = qkv.split(self.hidden, dim=2)
        q = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        out = split_attention(q, k, v, past_key, past_value, attention_mask, position_ids, self.scale)
        hidden = hidden + attn.c_proj(out)
        hidden = hidden + self.block.mlp(self.block.ln_2(hidden))
        return hidden, k, v


class Gpt2Adapter(Adapter):
    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.model: Any = model
        self.info = ArchInfo(
            family="gpt2",
            hidden_size=cfg.n_embd,
            num_layers=cfg.n_layer,
            num_heads=cfg.n_head,
            num_kv_heads=cfg.n_head,
            head_dim=cfg.n_embd // cfg.n_head,
            vocab_size=cfg.vocab_size,
            max_context=cfg.n_positions,
            intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
            embed_uses_positions=True,
        )

    def embed(self) -> nn.Module:
        return Gpt2Embed(self.model.transformer.wte, self.model.transformer.wpe)

    def layer(self, index: int) -> nn.Module:
        return Gpt2Layer(self.model.transformer.h[index], self.info, index)

    def head(self) -> nn.Module:
        return NormHead(self.model.transformer.ln_f, self.model.lm_head)
