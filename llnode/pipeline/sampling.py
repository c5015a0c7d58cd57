"""Token sampling from logits: greedy, temperature, top-k, top-p, seed, repetition penalty.

numpy only, so it runs wherever the last pipeline stage runs (a phone included). The order of the steps
follows Hugging Face ``generate`` so that outputs can be compared with it: repetition penalty (a logits
processor) first, then the warpers temperature -> top-k -> top-p, then a draw. OpenAI's presence and
frequency penalties are applied together with the repetition penalty, before the warpers.

Every request owns a :class:`Sampler`; the random draw of step n is a pure function of (seed, n), so with a
``seed`` the same request gives the same tokens whatever else the node is doing (no global RNG state is
shared), and a session re-prefilled on another stage after a failure resumes the very same stream.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Below this temperature sampling is greedy: dividing by ~0 would overflow and the limit is argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """The knobs of one request's sampler (a subset of the request's generation parameters).

    ``top_k`` 0 and ``top_p`` 1.0 disable those filters; ``temperature`` 0 means greedy.
    ``repetition_penalty`` follows Hugging Face (1.0 = off, > 1 discourages any token already in the
    prompt or the output); ``presence_penalty``/``frequency_penalty`` follow OpenAI (subtracted from the
    logits of tokens already generated, once / per occurrence).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0.0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def apply_repetition_penalty(logits: np.ndarray, token_ids: Iterable[int], penalty: float) -> np.ndarray:
    """Hugging Face semantics: for every distinct id seen, positive logits are divided by ``penalty``
    and negative ones multiplied, so the token always becomes less likely (for penalty > 1)."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.fromiter(token_ids, dtype=np.int64))
    if ids.size == 0:
        return logits
    out = logits.copy()
    ids = ids[(ids >= 0) & (ids < out.shape[-1])]
    scores = out[..., ids]
    out[..., ids] = np.where(scores > 0, scores / penalty, scores * penalty)
    return out


def apply_openai_penalties(
    logits: np.ndarray, generated: Sequence[int], presence: float, frequency: float
) -> np.ndarray:
    """OpenAI semantics: ``logit -= count * frequency + (count > 0) * presence`` over generated tokens."""
    if (presence == 0.0 and frequency == 0.0) or not generated:
        return logits
    ids = np.asarray(generated, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    counts = np.bincount(ids, minlength=logits.shape[-1]).astype(logits.dtype)
    return logits - counts * frequency - (counts > 0).astype(logits.dtype) * presence


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits of a row (ties at the threshold are all kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    As in Hugging Face, the most likely token is always kept, so a tiny ``p`` degenerates to greedy.
    """
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    cumulative = np.cumsum(probs)
    # A token is kept while the mass *before* it is still below p.
    keep_sorted = (cumulative - probs) < p
    keep_sorted[0] = True
    out = np.full_like(logits, -np.inf)
    kept = order[keep_sorted]
    out[kept] = logits[kept]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a row in float64 (so that tiny probabilities still sum to 1)."""
    x = logits.astype(np.float64)
    x = x - np.max(x)
    e = np.exp(x)
    return np.asarray(e / e.sum())


class Sampler:
    """Samples the next token of one request; keeps the request's RNG and the ids seen so far.

    ``history`` starts as the prompt (for the repetition penalty); :meth:`sample` appends each chosen
    token, so a pipeline stage only has to feed it logits.
    """

    def __init__(self, config: SamplingConfig, prompt_ids: Sequence[int] = ()) -> None:
        self.config = config
        # Without a seed the request still gets one fixed key, so a resumed sampler (below) continues it.
        self.seed = (config.seed if config.seed is not None else secrets.randbits(63)) % (1 << 64)
        self.history: list[int] = list(prompt_ids)
        self.generated: list[int] = []
        # Incremental per-vocab state (sized on the first row) so a step costs O(vocab), not O(history).
        self._seen: np.ndarray | None = None
        self._counts: np.ndarray | None = None

    @classmethod
    def resume(cls, config: SamplingConfig, ids: Sequence[int], generated: int) -> Sampler:
        """The sampler of a request whose token history is ``ids``, the last ``generated`` of which the
        model produced: after a re-prefill (failover, plan switch) sampling continues exactly where it
        stopped, because the draw of step n depends only on (seed, n) and the penalties on the history."""
        if not 0 <= generated <= len(ids):
            raise ValueError(f"generated={generated} does not fit a history of {len(ids)} tokens")
        sampler = cls(config, ids[: len(ids) - generated])
        sampler.history = list(ids)
        sampler.generated = list(ids[len(ids) - generated :])
        return sampler

    def _uniform(self) -> float:
        """The uniform draw of the current step, keyed by (seed, step) rather than by a running stream."""
        # A 64-bit hash is ~50x cheaper than seeding a numpy Generator per step, and portable.
        digest = hashlib.blake2b(struct.pack("<QQ", self.seed, len(self.generated)), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    def _state(self, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        if self._seen is None or self._counts is None or self._seen.size != vocab:
            self._seen = np.zeros(vocab, dtype=bool)
            self._counts = np.zeros(vocab, dtype=np.float32)
            hist = np.asarray(self.history, dtype=np.int64)
            self._seen[hist[(hist >= 0) & (hist < vocab)]] = True
            gen = np.asarray(self.generated, dtype=np.int64)
            np.add.at(self._counts, gen[(gen >= 0) & (gen < vocab)], 1.0)
        return self._seen, self._counts

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution :meth:`sample` draws from for this row (after every processor and warper)."""
        row = self._warp(self._process(np.asarray(logits, dtype=np.float32).reshape(-1)))
        return softmax(row)

    def _process(self, row: np.ndarray) -> np.ndarray:
        # A NaN would make argmax/probabilities meaningless; -inf (masked) is fine but +inf is not.
        if not np.all(np.isfinite(row)) and (np.any(np.isnan(row)) or np.any(row == np.inf)):
            raise ValueError("logits contain NaN or +inf")
        c = self.config
        if c.repetition_penalty == 1.0 and c.presence_penalty == 0.0 and c.frequency_penalty == 0.0:
            return row
        seen, counts = self._state(row.size)
        if c.repetition_penalty != 1.0:
            scores = row[seen]
            row = row.copy()
            row[seen] = np.where(scores > 0, scores / c.repetition_penalty, scores * c.repetition_penalty)
        if c.presence_penalty != 0.0 or c.frequency_penalty != 0.0:
            row = row - counts * c.frequency_penalty - (counts > 0).astype(row.dtype) * c.presence_penalty
        return row

    def _warp(self, row: np.ndarray) -> np.ndarray:
        c = self.config
        row = row / np.float32(c.temperature) if c.temperature != 1.0 else row
        row = top_k_filter(row, c.top_k)
        return top_p_filter(row, c.top_p)

    def sample(self, logits: np.ndarray) -> int:
        """Choose the next token from one row of logits (shape ``[vocab]``, or ``[1, vocab]``...)."""
        row = self._process(np.asarray(logits, dtype=np.float32).reshape(-1))
        if self.config.greedy:
            token = int(np.argmax(row))
        else:
            probs = softmax(self._warp(row))
            # Inverse-CDF draw with one uniform: cheaper than rng.choice and exactly reproducible.
            cdf = np.cumsum(probs)
            token = int(np.searchsorted(cdf, self._uniform() * cdf[-1], side="right"))
            token = min(token, probs.size - 1)
            while probs[token] == 0.0:  # float edge: never return a filtered-out token
                token -= 1
        self.history.append(token)
        self.generated.append(token)
        if self._seen is not None and self._counts is not None and 0 <= token < self._seen.size:
            self._seen[token] = True
            self._counts[token] += 1.0
        return token


def sample_batch(logits: np.ndarray, samplers: Sequence[Sampler]) -> list[int]:
    """One token per row of a ``[batch, vocab]`` (or ``[batch, 1, vocab]``) array, each with its own
    request's sampler: a stage that batched the decode steps of several sessions samples them here."""
    rows = np.asarray(logits).reshape(len(samplers), -1)
    return [s.sample(rows[i]) for i, s in enumerate(samplers)]
