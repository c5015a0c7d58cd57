"""What the exporter needs from one architecture: three kinds of module wrapper and a few numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ArchInfo:
    """Shapes the manifest and the runner need; read from the transformers config."""

    family: str  # "llama" | "gpt2" | "bloom"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    intermediate_size: int
    embed_uses_positions: bool = False  # GPT-2 adds learned position embeddings in the first module
    layer_uses_past_positions: bool = False  # BLOOM's ALiBi needs the positions of the cached keys


class NormHead(nn.Module):
    """The last module of every supported family: final norm, then the LM head."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.norm(hidden))
        return out


class Adapter:
    """Builds the per-module torch wrappers for one loaded transformers model.

    Every wrapper has a fixed signature so the exporter and runner are architecture-blind:
    embed(input_ids, position_ids) -> hidden;
    layer(hidden, position_ids, attention_mask, past_key, past_value, past_positions) -> (hidden, key, value);
    head(hidden) -> logits. Inputs a wrapper ignores disappear from its ONNX graph.
    """

    info: ArchInfo

    def embed(self) -> nn.Module:
        raise NotImplementedError

    def layer(self, index: int) -> nn.Module:
        raise NotImplementedError

    def layer_onnx(self, index: int) -> Any | None:
        """A hand-built ONNX graph (``onnx.ModelProto``) for layer ``index`` with the same I/O contract,
        or None to trace ``layer(index)``. Families whose traced graph is too op-heavy provide one."""
        return None

    def head(self) -> nn.Module:
        raise NotImplementedError
