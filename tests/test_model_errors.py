"""Bad inputs get clear errors: unknown architectures, missing or corrupted files, wrong shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llnode.cli import main
from llnode.model.arch import UnsupportedArchitecture
from llnode.model.manifest import ManifestError, load_manifest
from llnode.model.runner import ModuleRunner, RunnerError
from llnode.model.shardset import verify_files
from llnode.model.source import SourceError, check_gguf, resolve


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    from llnode.model.source import load_hf

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]})
    )
    with pytest.raises(UnsupportedArchitecture) as err:
        load_hf(tmp_path)
    msg = str(err.value)
    assert "falcon" in msg and all(a in msg for a in ("llama", "gpt2", "bloom", "qwen2", "mistral"))


def test_prepare_cli_reports_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gptj"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "not supported" in capsys.readouterr().err


def test_unresolvable_specs(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="smollm2-135m"):
        resolve("no-such-model")
    with pytest.raises(SourceError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(SourceError, match=r"no config\.json"):
        resolve(str(tmp_path))


def test_gguf_checks_size_and_sha(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(SourceError, match="size"):
        check_gguf(f, "0" * 64, 10)
    with pytest.raises(SourceError, match="sha256"):
        check_gguf(f, "0" * 64, 64)


def test_missing_and_corrupted_module_files(tiny_llama_shards: Path, tmp_path: Path) -> None:
    shard = tmp_path / "copy"
    shutil.copytree(tiny_llama_shards, shard)
    manifest = load_manifest(shard)
    assert verify_files(manifest, shard) == []
    layer = shard / manifest.modules[1].file
    data = bytearray(layer.read_bytes())
    data[-10] ^= 0xFF
    layer.write_bytes(bytes(data))
    assert any("sha256" in p for p in verify_files(manifest, shard))
    assert main(["verify", str(shard)]) == 1
    (shard / manifest.modules[2].file).unlink()
    assert any("missing" in p for p in verify_files(manifest, shard))
    with pytest.raises(ManifestError, match="missing"):
        ModuleRunner(shard)
    with pytest.raises(ManifestError, match="corrupted"):  # bytes flipped in the graph's own structure
        ModuleRunner(shard, start=1, end=2)
    with pytest.raises(ManifestError, match="llnode prepare"):
        load_manifest(tmp_path)


def test_runner_rejects_bad_steps(tiny_llama_shards: Path) -> None:
    first = ModuleRunner(tiny_llama_shards, end=2, threads=1)
    later = ModuleRunner(tiny_llama_shards, start=2, threads=1)
    with pytest.raises(RunnerError, match="token ids"):
        first.step("s", np.zeros((1, 3, 64), np.float32), np.arange(3)[None])
    with pytest.raises(RunnerError, match="hidden state"):
        later.step("s", np.zeros((1, 3), np.int64), np.arange(3)[None])
    with pytest.raises(RunnerError, match="positions"):
        first.step("s", np.zeros((1, 3), np.int64), np.arange(4)[None])
    with pytest.raises(RunnerError, match="context"):
        first.step("s", np.zeros((1, 1), np.int64), np.asarray([[10_000]]))
    first.step("s", np.zeros((2, 3), np.int64), np.tile(np.arange(3), (2, 1)))
    with pytest.raises(RunnerError, match="batch 2"):
        first.step("s", np.zeros((1, 1), np.int64), np.asarray([[3]]))
    with pytest.raises(RunnerError, match="range"):
        ModuleRunner(tiny_llama_shards, start=3, end=2)


def test_verify_passes_on_tiny_llama(tiny_llama_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tiny_llama_shards), "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ok"] and last["greedy_match"] and last["max_abs_diff"] <= 1e-4
