"""Every supported architecture: tiny random model -> prepare -> ModuleRunner vs transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS, prepare_with_cache

from llnode.model.manifest import load_manifest
from llnode.model.reference import HfReference
from llnode.model.runner import ChainRunner, ModuleRunner, left_pad, positions_for
from llnode.model.source import load_hf

TOL = 1e-4


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chain_matches_transformers(
    arch: str, tiny_arch_shards: dict[str, Path], tiny_model_dirs: dict[str, Path]
) -> None:
    shard = tiny_arch_shards[arch]
    manifest = load_manifest(shard)
    assert manifest.num_modules == 4 and manifest.precision == "fp32"
    runner = ModuleRunner(shard, threads=1)
    ref = HfReference(load_hf(tiny_model_dirs[arch]))
    prompt = [5, 17, 42, 99, 7, 3]
    ids, pos = np.asarray([prompt]), np.arange(len(prompt))[None]
    a, b = runner.step("s", ids, pos), ref.step(ids, pos)
    assert a.shape == (1, len(prompt), manifest.vocab_size)
    assert np.abs(a - b).max() <= TOL
    ours, theirs = [], []
    for i in range(10):
        ta, tb = int(a[0, -1].argmax()), int(b[0, -1].argmax())
        ours.append(ta)
        theirs.append(tb)
        step = np.asarray([[ta]])
        p = np.asarray([[len(prompt) + i]])
        a, b = runner.step("s", step, p), ref.step(step, p)
        assert np.abs(a - b).max() <= TOL
    assert ours == theirs
    assert runner.context_length("s") == len(prompt) + 10
    # The cache crossed a growth (capacity starts at 32) in a longer run without changing results.
    assert runner.free("s") and runner.context_length("s") == 0 and not runner.free("s")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_batch(
    arch: str, tiny_arch_shards: dict[str, Path], tiny_model_dirs: dict[str, Path]
) -> None:
    runner = ModuleRunner(tiny_arch_shards[arch], threads=1)
    ref = HfReference(load_hf(tiny_model_dirs[arch]))
    ids, mask = left_pad([[11, 12, 13, 14, 15, 16, 17], [21, 22, 23]], pad_id=0)
    pos = positions_for(mask)
    a, b = runner.step("b", ids, pos, mask), ref.step(ids, pos, mask)
    real = mask.astype(bool)
    assert np.abs(a - b)[real].max() <= TOL
    lengths = mask.sum(axis=1)
    for i in range(6):
        ta, tb = a[:, -1].argmax(-1), b[:, -1].argmax(-1)
        assert (ta == tb).all()
        p = (lengths + i)[:, None]
        a, b = runner.step("b", ta[:, None], p), ref.step(ta[:, None], p)
        assert np.abs(a - b).max() <= TOL
    # Each row of the batch equals the same prompt run alone (padding leaks nothing).
    solo = ModuleRunner(tiny_arch_shards[arch], threads=1).step(
        "x", np.asarray([[21, 22, 23]]), np.arange(3)[None]
    )
    fresh = ModuleRunner(tiny_arch_shards[arch], threads=1).step("y", ids, pos, mask)
    assert np.abs(fresh[1, -1] - solo[0, -1]).max() <= TOL


def test_split_ranges_equal_whole_chain(tiny_arch_shards: dict[str, Path]) -> None:
    """Two stages [0, 2) + [2, 4) passing the hidden state give the same logits as one runner."""
    shard = tiny_arch_shards["llama"]
    whole = ModuleRunner(shard, threads=1)
    s1, s2 = ModuleRunner(shard, start=0, end=2, threads=1), ModuleRunner(shard, start=2, threads=1)
    assert s1.is_first and not s1.is_last and s2.is_last
    ids, pos = np.asarray([[4, 8, 15, 16, 23, 42]]), np.arange(6)[None]
    h = s1.step("s", ids, pos)
    assert h.shape == (1, 6, whole.manifest.hidden_size) and h.dtype == np.float32
    assert np.abs(s2.step("s", h, pos) - whole.step("s", ids, pos)).max() <= 1e-5
    for p in range(6, 10):  # decode
        tok, where = np.asarray([[p]]), np.asarray([[p]])
        got = s2.step("s", s1.step("s", tok, where), where)
        assert np.abs(got - whole.step("s", tok, where)).max() <= 1e-5
    assert s1.context_length("s") == s2.context_length("s") == 10


def test_reprefill_from_token_history(tiny_arch_shards: dict[str, Path]) -> None:
    """A session rebuilt on a new runner from its token history continues identically."""
    shard = tiny_arch_shards["gpt2"]
    chain = ChainRunner(shard, threads=1)
    tokens = chain.generate([1, 2, 3, 4], 12)
    fresh = ModuleRunner(shard, threads=1)
    history = [1, 2, 3, 4, *tokens[:6]]
    logits = fresh.step("r", np.asarray([history]), np.arange(len(history))[None])
    assert int(logits[0, -1].argmax()) == tokens[6]


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_prefill_last_only_logits(arch: str, tiny_arch_shards: dict[str, Path]) -> None:
    """A prefill that asks only for the last token's logits gets exactly that row, and leaves the same
    KV cache behind: the next decode step equals the one after a full-logits prefill."""
    full, last = (
        ModuleRunner(tiny_arch_shards[arch], threads=1),
        ModuleRunner(tiny_arch_shards[arch], threads=1),
    )
    prompt = np.asarray([[5, 9, 2, 7, 11, 3]])
    a = full.step("s", prompt, np.arange(6)[None])
    b = last.step("s", prompt, np.arange(6)[None], last_only=True)
    assert a.shape[1] == 6 and b.shape[1] == 1
    assert np.abs(a[:, -1:] - b).max() <= 1e-5
    nxt = np.asarray([[int(b[0, -1].argmax())]])
    assert np.array_equal(full.step("s", nxt, np.asarray([[6]])), last.step("s", nxt, np.asarray([[6]])))


def test_long_context_crosses_buffer_growth(
    tiny_arch_shards: dict[str, Path], tiny_model_dirs: dict[str, Path]
) -> None:
    runner = ModuleRunner(tiny_arch_shards["llama"], threads=1)
    ref = HfReference(load_hf(tiny_model_dirs["llama"]))
    prompt = np.asarray([[(i * 7) % 300 + 3 for i in range(40)]])
    a, b = runner.step("g", prompt, np.arange(40)[None]), ref.step(prompt, np.arange(40)[None])
    for p in range(40, 70):  # capacity 32 -> 64 -> 128
        t = np.asarray([[int(a[0, -1].argmax())]])
        a, b = runner.step("g", t, np.asarray([[p]])), ref.step(t, np.asarray([[p]]))
        assert np.abs(a - b).max() <= TOL
    assert runner.kv_bytes("g") == 2 * 2 * 1 * 2 * 128 * 16 * 4  # layers*(k,v)*batch*kv_heads*cap*hd*4


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_shards(
    precision: str, tiny_model_dirs: dict[str, Path], tiny_cache: Path, tmp_path: Path
) -> None:
    import onnx

    shard = prepare_with_cache(str(tiny_model_dirs["llama"]), tmp_path / precision, tiny_cache, precision)
    m = load_manifest(shard)
    assert m.precision == precision
    ops = {n.op_type for mod in m.modules for n in onnx.load(str(shard / mod.file)).graph.node}
    assert "MatMulNBits" in ops

    def bits(kinds: set[str]) -> set[int]:
        return {
            a.i
            for mod in m.modules
            if mod.kind in kinds
            for n in onnx.load(str(shard / mod.file)).graph.node
            if n.op_type == "MatMulNBits"
            for a in n.attribute
            if a.name == "bits"
        }

    assert bits({"layer"}) == {8 if precision == "int8" else 4}
    assert bits({"head"}) == {8}  # the (tied) LM head stays 8-bit, as GGUFs keep the embedding
    embed_inits = onnx.load(str(shard / m.modules[0].file)).graph.initializer
    assert any(i.data_type == onnx.TensorProto.INT8 for i in embed_inits)  # int8 embedding rows
    assert m.modules[1].param_bytes < 0.5 * m.modules[1].flops.base * 2  # weights < fp32 bytes
    logits = ModuleRunner(shard, threads=1).step("q", np.asarray([[3, 4, 5]]), np.arange(3)[None])
    assert np.isfinite(logits).all()


def test_torch_not_needed_to_run(tiny_arch_shards: dict[str, Path]) -> None:
    """The runner and tokenizer import neither torch nor transformers (phones have neither)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from llnode.model.runner import ModuleRunner\n"
        "from llnode.model.tokenizer import load_tokenizer\n"
        f"r = ModuleRunner({str(tiny_arch_shards['bloom'])!r}, threads=1)\n"
        f"t = load_tokenizer({str(tiny_arch_shards['bloom'])!r})\n"
        "ids = t.encode('hello world')\n"
        "r.step('s', np.asarray([ids]), np.arange(len(ids))[None])\n"
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_ = torch  # torch must be importable for these tests (the [export] extra)


def test_verify_against_whole_model_onnx(
    tiny_model_dirs: dict[str, Path], tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where transformers is absent, verify compares against reference.onnx written by prepare --reference."""
    from llnode.cli import main

    monkeypatch.setenv("LLNODE_CACHE", str(tiny_cache))
    out = tmp_path / "bloom"
    assert main(["prepare", str(tiny_model_dirs["bloom"]), "--out", str(out), "--reference"]) == 0
    assert (out / "reference.onnx").is_file()
    assert main(["verify", str(out), "--reference", "onnx"]) == 0
    assert main(["verify", str(out), "--reference", "transformers"]) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_whole_graph_equals_chain(
    arch: str, tiny_arch_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench modules``' single-session baseline: the module files merged into one graph compute exactly
    what the chain computes (prefill, then decode steps over the runner-owned KV buffers)."""
    from llnode.model.merge import cached_merge
    from llnode.model.reference import ChainStepper, WholeOnnx

    monkeypatch.setenv("LLNODE_CACHE", str(tmp_path))
    shard = tiny_arch_shards[arch]
    m = load_manifest(shard)
    whole = WholeOnnx(cached_merge(shard, m), m.num_layers, m.num_kv_heads, m.head_dim, threads=1)
    chain = ChainStepper(ModuleRunner(shard, m, threads=1))
    ids, pos = np.asarray([[5, 9, 2, 7]]), np.arange(4)[None]
    for step in range(4):
        a, b = chain.step(ids, pos), whole.step(ids, pos)
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-5, step
        ids, pos = np.asarray([[int(np.argmax(a[0, -1]))]]), np.asarray([[4 + step]])
