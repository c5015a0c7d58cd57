"""The sampler: exact values on small rows, seeded distributions, and agreement with Hugging Face."""

from __future__ import annotations

import numpy as np
import pytest

from llnode.pipeline.sampling import (
    Sampler,
    SamplingConfig,
    apply_openai_penalties,
    apply_repetition_penalty,
    sample_batch,
    softmax,
    top_k_filter,
    top_p_filter,
)

PROBS = np.array([0.5, 0.3, 0.2])
LOGITS = np.log(PROBS).astype(np.float32)


def _frequencies(config: SamplingConfig, logits: np.ndarray, n: int = 20000) -> np.ndarray:
    sampler = Sampler(config)
    counts = np.zeros(logits.shape[-1])
    for _ in range(n):
        counts[sampler.sample(logits)] += 1
    return counts / n


def test_softmax_values() -> None:
    np.testing.assert_allclose(softmax(LOGITS), PROBS, rtol=1e-6)
    # Huge logits do not overflow.
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])


def test_plain_sampling_matches_distribution() -> None:
    freq = _frequencies(SamplingConfig(temperature=1.0, seed=1), LOGITS)
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_temperature_sharpens_and_flattens() -> None:
    sharp = Sampler(SamplingConfig(temperature=0.5)).probabilities(LOGITS)
    flat = Sampler(SamplingConfig(temperature=2.0)).probabilities(LOGITS)
    np.testing.assert_allclose(sharp, PROBS**2 / np.sum(PROBS**2), rtol=1e-5)
    np.testing.assert_allclose(flat, np.sqrt(PROBS) / np.sum(np.sqrt(PROBS)), rtol=1e-5)
    freq = _frequencies(SamplingConfig(temperature=0.5, seed=2), LOGITS)
    np.testing.assert_allclose(freq, sharp, atol=0.015)


def test_temperature_zero_is_greedy() -> None:
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingConfig(temperature=0.0, top_k=50, top_p=0.5))
    for _ in range(200):
        row = rng.normal(size=1000).astype(np.float32)
        assert sampler.sample(row) == int(np.argmax(row))


def test_tiny_top_p_and_top_k_one_are_greedy() -> None:
    rng = np.random.default_rng(1)
    tiny_p = Sampler(SamplingConfig(temperature=1.5, top_p=1e-9, seed=3))
    k_one = Sampler(SamplingConfig(temperature=1.5, top_k=1, seed=3))
    for _ in range(200):
        row = rng.normal(size=500).astype(np.float32)
        assert tiny_p.sample(row) == int(np.argmax(row))
        assert k_one.sample(row) == int(np.argmax(row))


def test_top_k_keeps_k_largest() -> None:
    out = top_k_filter(np.array([1.0, 5.0, 3.0, 4.0], dtype=np.float32), 2)
    assert np.isneginf(out[[0, 2]]).all()
    np.testing.assert_array_equal(out[[1, 3]], [5.0, 4.0])
    freq = _frequencies(SamplingConfig(top_k=2, seed=4), LOGITS)
    assert freq[2] == 0.0
    np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.015)


def test_top_p_keeps_smallest_nucleus() -> None:
    out = top_p_filter(LOGITS, 0.75)  # 0.5 + 0.3 reaches 0.75: token 2 goes
    assert np.isfinite(out[:2]).all() and np.isneginf(out[2])
    out = top_p_filter(LOGITS, 0.5)  # 0.5 alone reaches 0.5
    assert np.isfinite(out[0]) and np.isneginf(out[1:]).all()
    out = top_p_filter(LOGITS, 0.51)
    assert np.isfinite(out[:2]).all() and np.isneginf(out[2])
    freq = _frequencies(SamplingConfig(top_p=0.75, seed=5), LOGITS)
    assert freq[2] == 0.0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.015)


def test_repetition_penalty_hf_semantics() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])  # input untouched
    # Greedy with the penalty picks differently once the winner has been seen.
    sampler = Sampler(SamplingConfig(temperature=0.0, repetition_penalty=1.6), prompt_ids=[3])
    assert sampler.sample(np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)) == 0  # 3/1.6 < 2
    # Both 0 and 3 are penalised now: 1.0/1.6 = 0.625 < 1.5/1.6 = 0.9375, and 0.5 (unseen) loses too.
    assert sampler.sample(np.array([1.0, -1.0, 0.5, 1.5], dtype=np.float32)) == 3
    assert sampler.history == [3, 0, 3]


def test_openai_penalties() -> None:
    logits = np.zeros(4, dtype=np.float32)
    out = apply_openai_penalties(logits, [1, 1, 2], presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [0.0, -1.0, -0.75, 0.0])
    # Through the sampler (incremental counts): 0, then 1 (0.6 > 1-1), then 0 (0 vs -0.4), then 2.
    sampler = Sampler(SamplingConfig(temperature=0.0, frequency_penalty=1.0))
    row = np.array([1.0, 0.6, 0.0], dtype=np.float32)
    assert [sampler.sample(row) for _ in range(4)] == [0, 1, 0, 2]


def test_seed_reproducible_and_independent() -> None:
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(50, 300)).astype(np.float32)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, top_k=40, seed=1234)
    a, b = Sampler(cfg), Sampler(cfg)
    # Interleave another request's draws between a and b: per-request RNGs do not interfere.
    other = Sampler(SamplingConfig(temperature=1.0, seed=99))
    seq_a, seq_b = [], []
    for row in rows:
        seq_a.append(a.sample(row))
        other.sample(row)
        seq_b.append(b.sample(row))
    assert seq_a == seq_b
    c = Sampler(SamplingConfig(temperature=1.0, top_p=0.9, top_k=40, seed=4321))
    assert [c.sample(r) for r in rows] != seq_a


def test_resume_continues_the_same_stream() -> None:
    rows = np.random.default_rng(9).normal(size=(20, 200)).astype(np.float32)
    cfg = SamplingConfig(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3, seed=77)
    prompt = [1, 2, 3]
    full = Sampler(cfg, prompt)
    tokens = [full.sample(r) for r in rows]
    # Stop after 8 tokens, "re-prefill" elsewhere with the whole history, and continue.
    first = Sampler(cfg, prompt)
    head = [first.sample(r) for r in rows[:8]]
    resumed = Sampler.resume(cfg, prompt + head, generated=8)
    assert head + [resumed.sample(r) for r in rows[8:]] == tokens
    unseeded = Sampler(SamplingConfig(temperature=1.0))
    again = Sampler(SamplingConfig(temperature=1.0, seed=unseeded.seed))
    assert [unseeded.sample(r) for r in rows] == [again.sample(r) for r in rows]
    with pytest.raises(ValueError):
        Sampler.resume(cfg, [1, 2], generated=3)


def test_sample_batch_uses_each_requests_sampler() -> None:
    rows = np.array([[0.0, 9.0, 1.0], [5.0, 0.0, 1.0]], dtype=np.float32)
    greedy = [Sampler(SamplingConfig(temperature=0.0)) for _ in range(2)]
    assert sample_batch(rows, greedy) == [1, 0]
    assert sample_batch(rows[:, None, :], greedy) == [1, 0]
    seeded = [Sampler(SamplingConfig(seed=s)) for s in (1, 2)]
    single = [Sampler(SamplingConfig(seed=s)) for s in (1, 2)]
    big = np.random.default_rng(0).normal(size=(2, 1000)).astype(np.float32)
    assert sample_batch(big, seeded) == [single[0].sample(big[0]), single[1].sample(big[1])]


def test_masked_logits_and_bad_values() -> None:
    row = np.array([-np.inf, 0.0, -np.inf, 0.0], dtype=np.float32)
    freq = _frequencies(SamplingConfig(seed=8), row, n=2000)
    assert freq[0] == 0.0 and freq[2] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingConfig()).sample(np.array([0.0, np.nan], dtype=np.float32))
    for bad in (
        {"temperature": -1.0},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
    ):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)  # type: ignore[arg-type]


def test_matches_hugging_face_warpers() -> None:
    """The filtered distribution equals transformers' processors + warpers on random rows."""
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(11)
    for temperature, top_k, top_p, penalty in [(0.7, 20, 0.9, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 5, 1.0, 2.0)]:
        row = (rng.normal(size=256) * 3).astype(np.float32)
        history = [int(x) for x in rng.integers(0, 256, size=12)]
        procs = []
        if penalty != 1.0:
            procs.append(gen.RepetitionPenaltyLogitsProcessor(penalty))
        procs.append(gen.TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(gen.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(gen.TopPLogitsWarper(top_p))
        ids = torch.tensor([history])
        scores = torch.tensor(row[None, :])
        for p in procs:
            scores = p(ids, scores)
        expected = torch.softmax(scores.double(), dim=-1)[0].numpy()
        cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        got = Sampler(cfg, prompt_ids=history).probabilities(row)
        np.testing.assert_allclose(got, expected, atol=1e-6)
