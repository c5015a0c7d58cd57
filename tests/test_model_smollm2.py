"""The real SmolLM2-135M-Instruct: manifest contents and chained modules vs transformers (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llnode.model.manifest import load_manifest
from llnode.model.reference import HfReference
from llnode.model.runner import ChainRunner
from llnode.model.source import load_hf
from llnode.model.tokenizer import load_tokenizer
from llnode.model.verify import greedy

pytestmark = pytest.mark.slow


def test_manifest_and_transmission_map(smollm2_shards: Path) -> None:
    m = load_manifest(smollm2_shards)
    assert (m.name, m.architecture, m.precision) == ("smollm2-135m", "llama", "fp32")
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size) == (
        30,
        576,
        9,
        3,
        64,
        49152,
    )
    assert m.num_modules == 32 and m.modules[0].kind == "embed" and m.modules[-1].kind == "head"
    assert [x.layer for x in m.modules[1:-1]] == list(range(30))
    # Only the hidden state crosses each cut: [batch, new_tokens, 576] float32 = 2304 bytes per token.
    for i, b in enumerate(m.boundaries):
        assert b.after == i
        assert [(t.name, t.dtype, t.shape) for t in b.tensors] == [
            (f"hidden.{i + 1}", "float32", ["batch", "new_tokens", 576])
        ]
        assert b.bytes_per_token == 2304 == m.boundary_bytes(i)
    assert m.boundary_bytes(31) == m.token_bytes
    layer = m.modules[1]
    assert layer.kv_bytes_per_token == 2 * 3 * 64 * 4
    assert 14_000_000 < layer.param_bytes < 14_300_000  # 3.54M fp32 parameters
    assert layer.flops.base > 2 * 3.5e6 and layer.flops.per_context == 4 * 9 * 64
    assert {t.name for t in layer.inputs} == {
        "hidden.1",
        "position_ids",
        "attention_mask",
        "past_key.0",
        "past_value.0",
    }
    assert [t.name for t in layer.outputs] == ["hidden.2", "key.0", "value.0"]
    assert m.eos_token_ids == [2] and m.special_tokens["<|im_end|>"] == 2
    assert m.modules[-1].param_bytes == 49152 * 576 * 4 + 576 * 4


def test_greedy_32_tokens_equal_transformers(smollm2_shards: Path) -> None:
    m = load_manifest(smollm2_shards)
    tok = load_tokenizer(smollm2_shards)
    prompt = tok.encode(
        "<|im_start|>user\nWrite a sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"
    )
    ours = ChainRunner(smollm2_shards).generate(prompt, 32)
    theirs = greedy(HfReference(load_hf(Path(m.source["hf_dir"]))), prompt, 32)
    assert ours == theirs
    assert len(tok.decode(ours).split()) > 5
