"""Llama family: Llama, SmolLM2, TinyLlama, Mistral, Qwen2 (q/k/v biases come with the projections)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llnode.model.arch.base import Adapter, ArchInfo, NormHead
from llnode.model.arch.common import split_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaEmbed(nn.Module):
    def __init__(self, embed_tokens: Any) -> None:
        super().__init__()
        self.embed_tokens: Any = embed_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaLayer(nn.Module):
    """One decoder layer; rotary cos/sin are recomputed from the positions it is given."""

    inv_freq: torch.Tensor

    def __init__(self, layer: Any, inv_freq: torch.Tensor, rope_scaling: float, info: ArchInfo) -> None:
        super().__init__()
        self.layer: Any = layer
        self.register_buffer("inv_freq", inv_freq.detach().clone().float(), persistent=False)
        self.rope_scaling = float(rope_scaling)
        self.heads, self.kv_heads, self.head_dim = info.num_heads, info.num_kv_heads, info.head_dim

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
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(hidden)
        q = attn.q_proj(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scaling).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = split_attention(
            q, k, v, past_key, past_value, attention_mask, position_ids, float(attn.scaling)
        )
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + self.layer.mlp(self.layer.post_attention_layernorm(hidden))
        return hidden, k, v


class LlamaAdapter(Adapter):
    def __init__(self, model: Any) -> None:
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.model: Any = model
        self.info = ArchInfo(
            family="llama",
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            # Mistral-style sliding windows are not implemented: cap the context to the window instead.
            max_context=min(cfg.max_position_embeddings, getattr(cfg, "sliding_window", None) or 1 << 62),
            intermediate_size=cfg.intermediate_size,
        )
        rotary = model.model.rotary_emb
        self._inv_freq = rotary.inv_freq
        self._rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def embed(self) -> nn.Module:
        return LlamaEmbed(self.model.model.embed_tokens)

    def layer(self, index: int) -> nn.Module:
        return LlamaLayer(self.model.model.layers[index], self._inv_freq, self._rope_scaling, self.info)

    def layer_onnx(self, index: int) -> Any | None:
        from llnode.model.arch import llama_graph

        layer = self.model.model.layers[index]
        if not llama_graph.supports(layer):
            return None
        return llama_graph.build_layer(layer, index, self.info, self._inv_freq, self._rope_scaling)

    def head(self) -> nn.Module:
        return NormHead(self.model.model.norm, self.model.lm_head)
