"""Reference models for ``verify`` and the benchmark, with the same stateful ``step`` API as the chain.

* ``HfReference``: the transformers model (needs the [export] extra), the ground truth.
* ``WholeOnnx``: every module in one onnxruntime session (``export.export_whole``), with the same
  runner-owned KV buffers: the single-session baseline the chained modules are measured against, and the
  reference where transformers is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from llnode.model import names
from llnode.model.runner import MIN_CAPACITY, ModuleRunner, _session_options


class Stepper(Protocol):
    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray: ...


class ChainStepper:
    """One session on a ModuleRunner holding every module."""

    def __init__(self, runner: ModuleRunner, session_id: str = "verify") -> None:
        self.runner, self.sid = runner, session_id

    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return self.runner.step(self.sid, ids, positions, mask)

    def reset(self) -> None:
        self.runner.free(self.sid)


class HfReference:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.past: Any = None
        self.mask: np.ndarray | None = None

    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        import torch

        new_mask = np.ones(ids.shape, np.int64) if mask is None else mask.astype(np.int64)
        self.mask = new_mask if self.mask is None else np.concatenate([self.mask, new_mask], axis=1)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(self.mask),
                position_ids=torch.from_numpy(positions.astype(np.int64)),
                past_key_values=self.past,
                use_cache=True,
            )
        self.past = out.past_key_values
        return np.asarray(out.logits.float().numpy())


class WholeOnnx:
    def __init__(
        self, path: Path, num_layers: int, kv_heads: int, head_dim: int, threads: int | None = None
    ) -> None:
        self.sess = ort.InferenceSession(
            str(path), _session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.wanted = {i.name for i in self.sess.get_inputs()}
        self.n, self.kvh, self.hd = num_layers, kv_heads, head_dim
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.cap = 0
        self.kv: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.pos = np.zeros((0, 0), np.int64)

    def _grow(self, b: int, needed: int) -> None:
        if needed <= self.cap:
            return
        cap = max(MIN_CAPACITY, self.cap)
        while cap < needed:
            cap *= 2
        kv = [np.zeros((b, self.kvh, cap, self.hd), np.float32) for _ in range(2 * self.n)]
        for new, old in zip(kv, self.kv, strict=False):
            new[:, :, : self.length] = old[:, :, : self.length]
        mask, pos = np.zeros((b, cap), np.int64), np.zeros((b, cap), np.int64)
        if self.length:
            mask[:, : self.length], pos[:, : self.length] = (
                self.mask[:, : self.length],
                self.pos[:, : self.length],
            )
        self.kv, self.mask, self.pos, self.cap = kv, mask, pos, cap

    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        b, t = ids.shape
        new_mask = np.ones((b, t), np.int64) if mask is None else mask.astype(np.int64)
        self._grow(b, self.length + t)
        feeds = {
            names.INPUT_IDS: ids.astype(np.int64),
            names.POSITION_IDS: positions.astype(np.int64),
            names.ATTENTION_MASK: np.concatenate([self.mask, new_mask], axis=1),
            names.PAST_POSITIONS: self.pos,
        }
        for i in range(self.n):
            feeds[names.past_key(i)], feeds[names.past_value(i)] = self.kv[2 * i], self.kv[2 * i + 1]
        outs = self.sess.run(None, {k: v for k, v in feeds.items() if k in self.wanted})
        s = slice(self.length, self.length + t)
        for j in range(2 * self.n):
            self.kv[j][:, :, s] = outs[1 + j]
        self.mask[:, s], self.pos[:, s] = new_mask, positions
        self.length += t
        return np.asarray(outs[0])


def greedy_texts(shard_dir: Path, prompts: Sequence[str], max_tokens: int) -> dict[str, str]:
    """Greedy continuation of each prompt by the single-process module chain, as text (end of sequence
    left out): the reference every multi-node run must reproduce exactly."""
    from llnode.model.runner import ChainRunner
    from llnode.model.tokenizer import load_tokenizer

    chain = ChainRunner(shard_dir)
    tok = load_tokenizer(shard_dir, chain.manifest.tokenizer_file)
    eos = chain.manifest.eos_token_ids
    out: dict[str, str] = {}
    for prompt in dict.fromkeys(prompts):
        ids = chain.generate(tok.encode(prompt), max_tokens, stop=eos)
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        out[prompt] = tok.decode(ids, skip_special_tokens=True)
    return out
