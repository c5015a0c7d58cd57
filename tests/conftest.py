"""Shared pytest fixtures.

Model fixtures (owned by the model-preparation part):
* ``tiny_model_dirs``: ``{arch: Path}`` of tiny random Hugging Face models (llama, qwen2, mistral, gpt2,
  bloom) with a small trained byte-level BPE tokenizer; built in seconds, session-scoped.
* ``tiny_llama_shards``: a prepared fp32 shard set of the tiny Llama (4 modules: embed, 2 layers, head):
  fast, for multi-node tests.
* ``smollm2_shards``: the real SmolLM2-135M-Instruct fp32 shard set (32 modules), prepared once and kept in
  ``$LLNODE_CACHE/test-shards`` (default ``~/.cache/llnode``) across runs. Tests using it are slow.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llnode.cluster import LocalCluster

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bloom")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    return 42\n\nclass Node:\n    pass\n",
    "Numbers like 12345 and 3.14159 appear in text; so do café, naïve and 日本語.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
]


def build_tiny_tokenizer(path: Path) -> Path:
    """A byte-level BPE (GPT-2 style) with a few hundred merges and ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS * 5, trainer)
    tok.save(str(path))
    return path


def build_tiny_model(arch: str, out: Path, tokenizer_json: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer model of ``arch`` saved as a Hugging Face folder with a tokenizer."""
    import shutil

    import torch
    import transformers as tf

    vocab = json.loads(tokenizer_json.read_text())
    vocab_size = len(vocab["model"]["vocab"]) + sum(
        1 for t in vocab["added_tokens"] if t["content"] not in vocab["model"]["vocab"]
    )
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **common,
    }
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**llama_like), tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**llama_like, sliding_window=None), tf.MistralForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "bloom":
        cfg, cls = tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common), tf.BloomForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if arch == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TINY_CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private LLNODE_CACHE for tiny-model exports, so they do not pile up in the user's cache."""
    return tmp_path_factory.mktemp("llnode-cache")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_json: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-models")
    return {a: build_tiny_model(a, base / a, tiny_tokenizer_json) for a in TINY_ARCHS}


def prepare_with_cache(spec: str, out: Path, cache: Path, precision: str = "fp32") -> Path:
    """``llnode prepare`` with LLNODE_CACHE pointed at ``cache`` for the duration of the call."""
    from llnode.model.prepare import prepare

    old = os.environ.get("LLNODE_CACHE")
    os.environ["LLNODE_CACHE"] = str(cache)
    try:
        return prepare(spec, out=out, precision=precision)
    finally:
        if old is None:
            os.environ.pop("LLNODE_CACHE", None)
        else:
            os.environ["LLNODE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_llama_shards(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path], tiny_cache: Path
) -> Path:
    """A tiny random Llama shard set (4 modules), fp32."""
    return prepare_with_cache(
        str(tiny_model_dirs["llama"]), tmp_path_factory.mktemp("shards") / "tiny-llama", tiny_cache
    )


@pytest.fixture(scope="session")
def tiny_arch_shards(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path], tiny_cache: Path
) -> dict[str, Path]:
    """fp32 shard sets (4 modules) of every tiny model, by architecture; tests must not modify them."""
    base = tmp_path_factory.mktemp("arch-shards")
    return {a: prepare_with_cache(str(tiny_model_dirs[a]), base / a, tiny_cache) for a in TINY_ARCHS}


@pytest.fixture(scope="session")
def smollm2_shards() -> Iterator[Path]:
    """The real SmolLM2-135M fp32 shard set, prepared once into the on-disk cache and reused across runs."""
    from llnode.model.prepare import ensure_prepared

    out = ensure_prepared("smollm2-135m", "fp32")
    yield out


def serving(cluster: LocalCluster, within_s: float = 240.0) -> Iterator[LocalCluster]:
    """For a fixture: start the cluster, yield it once every node serves the same plan, stop it after."""
    cluster.start()
    try:
        asyncio.run(cluster.wait_ready(within_s))
        yield cluster
    finally:
        cluster.stop()
