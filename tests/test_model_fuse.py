"""Fused sessions (``llnode.model.fuse``): the wire-level concatenation equals ``merge.py``'s onnx-based
merge, and a runner running fused blocks gives what one session per module gives, for every architecture.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_ARCHS
from onnx import numpy_helper

from llnode.model import names
from llnode.model.fuse import (
    _SHARED_CONST_BYTES,
    EXTERNAL_MIN_BYTES,
    HEAD_FROM,
    FuseError,
    fuse_files,
    fuse_models,
)
from llnode.model.manifest import ManifestError, load_manifest
from llnode.model.merge import merge_modules
from llnode.model.runner import FUSE_BLOCK, ModuleRunner, RunnerError, _session_options, fuse_block

TOL = 1e-6


def _feeds(
    sess: ort.InferenceSession, manifest_dir: Path, t: int = 3, past: int = 4
) -> dict[str, np.ndarray]:
    m = load_manifest(manifest_dir)
    rng = np.random.default_rng(1)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == names.INPUT_IDS:
            feeds[i.name] = rng.integers(0, m.vocab_size, (1, t))
        elif i.name == names.POSITION_IDS:
            feeds[i.name] = np.arange(past, past + t)[None]
        elif i.name == names.ATTENTION_MASK:
            feeds[i.name] = np.ones((1, past + t), np.int64)
        elif i.name == names.PAST_POSITIONS:
            feeds[i.name] = np.arange(past)[None]
        elif i.name == HEAD_FROM:
            feeds[i.name] = np.zeros(1, np.int64)
        else:  # past K/V
            feeds[i.name] = rng.standard_normal((1, m.num_kv_heads, past, m.head_dim), dtype=np.float32)
    return feeds


Content = tuple[str, tuple[int, ...], bytes]


def _content(a: np.ndarray) -> Content:
    return (str(a.dtype), a.shape, a.tobytes())


def _constants(model: onnx.ModelProto) -> tuple[list[Content], list[Content]]:
    """Sorted contents of the initializers the fusion never shares (the weights: above its size limit)
    and of those it shares when equal (well below the limit, whatever their names' lengths)."""
    contents = [_content(numpy_helper.to_array(t)) for t in model.graph.initializer]
    big = sorted(c for c in contents if len(c[2]) > _SHARED_CONST_BYTES)
    return big, sorted(c for c in contents if len(c[2]) <= _SHARED_CONST_BYTES // 2)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_wire_fusion_equals_the_onnx_merge(arch: str, tiny_arch_shards: dict[str, Path]) -> None:
    shard = tiny_arch_shards[arch]
    m = load_manifest(shard)
    fused_bytes = fuse_files(shard, [(x.index, x.file) for x in m.modules], head_index=m.num_modules - 1)
    merged = merge_modules(shard, m)
    fused = onnx.load_from_string(fused_bytes)
    onnx.checker.check_model(fused)
    # The same operators and weights; the fusion adds the head's Slice and its two constants, and holds
    # each small constant once (equal ones of different modules are shared, so that onnxruntime's CSE can
    # merge the per-layer rotary/mask computations).
    assert sorted(n.op_type for n in fused.graph.node) == sorted(
        [*(n.op_type for n in merged.graph.node), "Slice"]
    )
    fused_big, fused_small = _constants(fused)
    merged_big, merged_small = _constants(merged)
    assert fused_big == merged_big
    slice_consts = {_content(np.asarray([2**63 - 1])), _content(np.asarray([1]))}
    assert set(fused_small) == set(merged_small) | slice_consts
    if m.num_layers > 1:
        assert len(fused_small) < len(merged_small)
    assert {o.name for o in fused.graph.output} == {o.name for o in merged.graph.output}
    assert {i.name for i in fused.graph.input} == {i.name for i in merged.graph.input} | {HEAD_FROM}
    so = _session_options(1)
    a = ort.InferenceSession(fused_bytes, so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(merged.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = _feeds(a, shard)
    out_a = dict(zip([o.name for o in a.get_outputs()], a.run(None, feeds), strict=True))
    out_b = dict(
        zip(
            [o.name for o in b.get_outputs()],
            b.run(None, {k: v for k, v in feeds.items() if k != HEAD_FROM}),
            strict=True,
        )
    )
    assert out_a.keys() == out_b.keys()
    for k in out_a:
        assert np.abs(out_a[k] - out_b[k]).max() <= TOL, k
    # head_from = [-1]: the head on the last token only, the K/V unchanged.
    last = a.run(None, {**feeds, HEAD_FROM: np.full(1, -1, np.int64)})
    np.testing.assert_allclose(last[0], out_a[names.LOGITS][:, -1:], atol=TOL, rtol=0)


def _greedy(runner: ModuleRunner, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    logits = runner.step("g", np.asarray([prompt]), np.arange(len(prompt))[None])
    seen, toks = [logits], []
    for i in range(steps):
        tok = int(logits[0, -1].argmax())
        toks.append(tok)
        logits = runner.step("g", np.asarray([[tok]]), np.asarray([[len(prompt) + i]]))
        seen.append(logits)
    runner.free("g")
    return toks, seen


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("block", [2, FUSE_BLOCK])
def test_fused_runner_equals_one_session_per_module(
    arch: str, block: int, tiny_arch_shards: dict[str, Path]
) -> None:
    shard = tiny_arch_shards[arch]
    per_module = ModuleRunner(shard, threads=1, fuse=1)
    fused = ModuleRunner(shard, threads=1, fuse=block)
    n = per_module.manifest.num_modules
    assert len(per_module.units()) == n
    assert len(fused.units()) == -(-n // block)
    prompt = [5, 17, 42, 99, 7, 3]  # crosses no growth; 40 decode steps below cross the first doubling
    toks_a, seen_a = _greedy(per_module, prompt, 40)
    toks_b, seen_b = _greedy(fused, prompt, 40)
    assert toks_a == toks_b
    assert max(float(np.abs(x - y).max()) for x, y in zip(seen_a, seen_b, strict=True)) <= TOL
    # last_only inside a fused block (the head's Slice) = the last row of the full logits.
    ids, pos = np.asarray([prompt]), np.arange(len(prompt))[None]
    full = per_module.step("a", ids, pos)
    last = fused.step("b", ids, pos, last_only=True)
    assert last.shape == (1, 1, per_module.manifest.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=TOL, rtol=0)
    # A stage cut inside a block (hidden state in, hidden state out) fuses too.
    mid = ModuleRunner(shard, start=1, end=n - 1, threads=1, fuse=block)
    mid_ref = ModuleRunner(shard, start=1, end=n - 1, threads=1, fuse=1)
    x = np.random.default_rng(0).standard_normal((2, 3, mid.manifest.hidden_size), dtype=np.float32)
    p = np.tile(np.arange(3), (2, 1))
    np.testing.assert_allclose(mid.step("m", x, p), mid_ref.step("m", x, p), atol=TOL, rtol=0)


def test_blocks_are_aligned_and_shared_across_plan_switches(tiny_llama_shards: Path) -> None:
    old = ModuleRunner(tiny_llama_shards, start=0, end=4, fuse=2)
    assert [(u.start, u.end) for u in old.units()] == [(0, 2), (2, 4)] and old.built == 4
    sub = ModuleRunner(tiny_llama_shards, start=2, end=4, fuse=2, reuse=old)
    assert sub.built == 0 and sub.units()[0].session is old.units()[1].session
    shifted = ModuleRunner(tiny_llama_shards, start=1, end=4, fuse=2, reuse=old)
    assert [(u.start, u.end) for u in shifted.units()] == [(1, 2), (2, 4)] and shifted.built == 1
    fresh = ModuleRunner(tiny_llama_shards, start=1, end=4, fuse=2)
    x = np.random.default_rng(0).standard_normal((1, 5, old.manifest.hidden_size), dtype=np.float32)
    pos = np.arange(5)[None]
    np.testing.assert_array_equal(shifted.step("s", x, pos), fresh.step("s", x, pos))


def _without_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runners built after this copy the weights into their fused blocks, as with an onnxruntime that
    cannot resolve external data loaded from bytes (older than the folder-path option)."""
    copying = fuse_files

    def refuse(*args: Any, external: bool = False, **kwargs: Any) -> bytes:
        if external:
            raise RuntimeError("External data path validation failed")
        return copying(*args, **kwargs)

    monkeypatch.setattr("llnode.model.runner.fuse.fuse_files", refuse)


def test_fused_blocks_map_their_weights_from_the_module_files(
    tiny_llama_shards: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shard = tiny_llama_shards
    m = load_manifest(shard)
    files = [(x.index, x.file) for x in m.modules]
    copied = onnx.load_from_string(fuse_files(shard, files, head_index=m.num_modules - 1))
    graph = fuse_files(shard, files, head_index=m.num_modules - 1, external=True)
    mapped = onnx.load_from_string(graph)
    # Every large tensor is a reference to the very bytes of a module file; the small ones stay inline.
    big = {t.name: numpy_helper.to_array(t) for t in copied.graph.initializer if t.raw_data}
    refs = [t for t in mapped.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert refs and len(graph) * 2 < copied.ByteSize()
    for t in refs:
        where = {e.key: e.value for e in t.external_data}
        assert where["location"] in {f for _, f in files}
        offset, length = int(where["offset"]), int(where["length"])
        assert length >= EXTERNAL_MIN_BYTES
        data = (shard / where["location"]).read_bytes()[offset : offset + length]
        assert data == big[t.name].tobytes()
    with caplog.at_level(logging.INFO, logger="llnode.model.runner"):
        runner = ModuleRunner(shard, threads=1)
    assert "not mapped" not in caplog.text
    _without_mapping(monkeypatch)
    with caplog.at_level(logging.INFO, logger="llnode.model.runner"):
        copying = ModuleRunner(shard, threads=1)
    assert "not mapped" in caplog.text  # the fallback: weights copied through a temporary file
    toks, seen = _greedy(runner, [3, 1, 4, 1, 5], 6)
    toks_c, seen_c = _greedy(copying, [3, 1, 4, 1, 5], 6)
    assert toks == toks_c
    for a, b in zip(seen, seen_c, strict=True):
        np.testing.assert_array_equal(a, b)


_MAPPED_FILES = """
import sys
from pathlib import Path
from llnode.model.runner import ModuleRunner
runner = ModuleRunner(sys.argv[1], threads=1)
maps = Path("/proc/self/maps").read_text()
print(sorted({line.split()[-1] for line in maps.splitlines() if sys.argv[1] in line}))
"""


def _mapped_module_files(shard: Path, env: dict[str, str]) -> list[str]:
    """The module files a fresh process that built a runner over ``shard`` keeps mapped (its own process:
    pytest's holds mappings of other tests' runners)."""
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MAPPED_FILES, str(shard)],
        env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return [Path(f).name for f in json.loads(out.strip().replace("'", '"'))]


def test_map_weights_switch_copies_the_weights_and_keeps_the_numbers(
    tiny_llama_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embed = load_manifest(tiny_llama_shards).modules[0].file
    # Mapped (the default): the embedding table, which onnxruntime does not prepack, stays a mapping of
    # its module file; LLNODE_MAP_WEIGHTS=0: no module file is mapped, the weights were copied.
    assert embed in _mapped_module_files(tiny_llama_shards, {})
    assert _mapped_module_files(tiny_llama_shards, {"LLNODE_MAP_WEIGHTS": "0"}) == []
    mapped = ModuleRunner(tiny_llama_shards, threads=1)
    calls: list[bool] = []
    spied = fuse_files

    def spy(*args: Any, external: bool = False, **kwargs: Any) -> bytes:
        calls.append(external)
        return spied(*args, external=external, **kwargs)

    monkeypatch.setattr("llnode.model.runner.fuse.fuse_files", spy)
    monkeypatch.setenv("LLNODE_MAP_WEIGHTS", "0")
    copied = ModuleRunner(tiny_llama_shards, threads=1)
    assert calls == []  # not even tried: the block went through the temporary file
    toks, seen = _greedy(mapped, [3, 1, 4, 1, 5], 6)
    toks_c, seen_c = _greedy(copied, [3, 1, 4, 1, 5], 6)
    assert toks == toks_c
    for a, b in zip(seen, seen_c, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_block_fuses_in_memory_without_a_temporary_directory(
    tiny_llama_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_mapping(monkeypatch)
    on_file = ModuleRunner(tiny_llama_shards, threads=1)

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llnode.model.runner.tempfile.NamedTemporaryFile", no_room)
    in_memory = ModuleRunner(tiny_llama_shards, threads=1)
    assert len(in_memory.units()) == 1
    # The Python wrapper would otherwise keep the fused model bytes (the block's weights) for good.
    assert getattr(in_memory.units()[0].session, "_model_bytes", None) is None
    ids, pos = np.asarray([[3, 1, 4, 1, 5]]), np.arange(5)[None]
    np.testing.assert_array_equal(in_memory.step("s", ids, pos), on_file.step("s", ids, pos))


def test_fuse_setting_and_bad_input(
    tiny_llama_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLNODE_FUSE", "0")
    assert fuse_block() == 1 and len(ModuleRunner(tiny_llama_shards).units()) == 4
    monkeypatch.setenv("LLNODE_FUSE", "lots")
    with pytest.raises(RunnerError, match="LLNODE_FUSE"):
        fuse_block()
    monkeypatch.delenv("LLNODE_FUSE")
    assert fuse_block() == FUSE_BLOCK
    m = load_manifest(tiny_llama_shards)
    with pytest.raises(FuseError, match="contiguous"):
        fuse_files(tiny_llama_shards, [(0, m.modules[0].file), (2, m.modules[2].file)])
    with pytest.raises(FuseError):
        fuse_models([(0, b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")])
    # A corrupted file inside a fused block: the runner's error names that file, as without fusion.
    shard = tmp_path / "shard"
    shard.mkdir()
    for f in tiny_llama_shards.iterdir():
        (shard / f.name).write_bytes(f.read_bytes())
    bad = shard / m.modules[1].file
    data = bytearray(bad.read_bytes())
    data[5:40] = b"\xff" * 35
    bad.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"{m.modules[1].file}.*corrupted"):
        ModuleRunner(shard, start=0, end=3)
