"""Batched decode (``llnode.model.batching``) gives exactly what stepping each session alone gives.

Sessions of different lengths (so different cache capacities: 32 and 64 slots are mixed in one batch),
on a first stage (token ids), a middle stage (hidden states) and the whole chain (logits); afterwards the
sessions keep decoding alone from the caches the batch wrote, still bit for bit equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llnode.model.batching import decode_batch
from llnode.model.manifest import load_manifest
from llnode.model.runner import ModuleRunner, RunnerError

LENGTHS = [5, 31, 40, 3]  # 31 + 1 crosses the first capacity doubling inside the batched step


def _prefill(runner: ModuleRunner, session: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if runner.is_first:
        x = rng.integers(0, runner.manifest.vocab_size, (1, n))
    else:
        x = rng.standard_normal((1, n, runner.manifest.hidden_size), dtype=np.float32)
    runner.step(session, x, np.arange(n)[None])


def _inputs(runner: ModuleRunner, b: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if runner.is_first:
        return rng.integers(0, runner.manifest.vocab_size, (b, 1))
    return rng.standard_normal((b, 1, runner.manifest.hidden_size), dtype=np.float32)


@pytest.mark.parametrize("where", ["first", "middle", "whole"])
@pytest.mark.parametrize("fuse", [None, 2, 1])  # default blocks (one here), blocks of 2, one per module
def test_batched_decode_equals_single_steps(tiny_llama_shards: Path, where: str, fuse: int | None) -> None:
    manifest = load_manifest(tiny_llama_shards)
    n = manifest.num_modules
    start, end = {"first": (0, n // 2), "middle": (1, n - 1), "whole": (0, n)}[where]
    batched = ModuleRunner(tiny_llama_shards, manifest, start, end, fuse=fuse)
    alone = ModuleRunner(tiny_llama_shards, manifest, start, end, fuse=fuse)
    sessions = [f"s{i}" for i in range(len(LENGTHS))]
    for i, (s, length) in enumerate(zip(sessions, LENGTHS, strict=True)):
        _prefill(batched, s, length, seed=i)
        _prefill(alone, s, length, seed=i)
    lengths = list(LENGTHS)
    for step in range(3):
        x = _inputs(batched, len(sessions), seed=100 + step)
        got = decode_batch(batched, sessions, x, lengths)
        rows = enumerate(zip(sessions, lengths, strict=True))
        want = np.concatenate([alone.step(s, x[i : i + 1], np.asarray([[p]])) for i, (s, p) in rows])
        assert got.shape == want.shape
        assert np.array_equal(got, want)
        lengths = [p + 1 for p in lengths]
    # The caches the batch wrote are the ones single steps would have written: decoding goes on alone.
    for i, s in enumerate(sessions):
        assert batched.context_length(s) == alone.context_length(s) == lengths[i]
        x = _inputs(batched, 1, seed=7 + i)
        pos = np.asarray([[lengths[i]]])
        assert np.array_equal(batched.step(s, x, pos), alone.step(s, x, pos))


def test_batched_decode_rejects_bad_batches(tiny_llama_shards: Path) -> None:
    runner = ModuleRunner(tiny_llama_shards)
    ids = np.ones((2, 1), np.int64)
    with pytest.raises(RunnerError, match="distinct"):
        decode_batch(runner, ["a", "a"], ids, [0, 0])
    with pytest.raises(RunnerError, match="takes"):
        decode_batch(runner, ["a", "b"], np.ones((2, 2), np.int64), [0, 0])
    with pytest.raises(RunnerError, match="context"):
        decode_batch(runner, ["a", "b"], ids, [0, runner.manifest.max_context])
    assert runner.sessions() == []  # nothing was half-done
