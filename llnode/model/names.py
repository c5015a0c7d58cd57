"""Tensor names of the module graphs: the one naming contract shared by exporter, runner and manifest.

The hidden state entering module ``m`` is called ``hidden.m``; module ``m`` outputs ``hidden.(m+1)``.
The transmission map is then literally "outputs of module i that are inputs of module i+1".
Decoder layer ``l`` (module ``l+1``) takes ``past_key.l``/``past_value.l`` and returns only the new
``key.l``/``value.l`` (the runner owns the cache buffers).
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
PAST_POSITIONS = "past_positions"
LOGITS = "logits"


def hidden(module_index: int) -> str:
    return f"hidden.{module_index}"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def key(layer: int) -> str:
    return f"key.{layer}"


def value(layer: int) -> str:
    return f"value.{layer}"
