"""Batched decode: one new token for each of several sessions, in one onnxruntime call per runner unit
(normally one for the runner's whole range, fused; see ``ModuleRunner``).

WHY: decode is memory-bound. A decode step of one session reads every weight of the modules to multiply
them by one vector; a step of B sessions reads them once for all B rows. Measured on the SmolLM2 chain,
1 thread: 8 sessions batched cost ~1.5x one session's step, not 8x (``llnode bench pipeline`` shows
the tokens/s it buys at a stage).

How: every session keeps its own runner-owned cache (``[1, kv_heads, capacity, head_dim]`` per layer, of
its own capacity and length). For a batched step the past K/V of the rows are gathered into one
``[B, kv_heads, C, head_dim]`` buffer per layer (C the largest capacity), each row's unused slots
masked out by its attention-mask row, exactly as a session's own unused capacity is masked in a single
step. The rows' new K/V are then written back into each session's cache, so a session can be stepped
alone, batched with others, or re-prefilled elsewhere at any time. The gather copies the used part of
the caches (SmolLM2: 23 KB per token of context per 15 layers), small next to the weights read.

Results are identical to stepping each session alone: masked slots get exactly zero attention weight,
and each row's arithmetic does not depend on the other rows (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llnode.model.runner import ModuleRunner, RunnerError


def decode_batch(
    runner: ModuleRunner, session_ids: Sequence[str], x: np.ndarray, positions: Sequence[int]
) -> np.ndarray:
    """Step each of ``session_ids`` (distinct sessions of batch 1) by one token, as one batch.

    ``x``: int64 token ids ``[B, 1]`` on a first stage, else the float32 hidden state ``[B, 1, hidden]``
    (row i for session i); ``positions``: the absolute position of each row's token. Returns what
    :meth:`ModuleRunner.step` returns, row i for session i. A session not seen before starts empty.
    """
    b = len(session_ids)
    if b == 0 or len(set(session_ids)) != b:
        raise RunnerError("a batched decode needs distinct sessions")
    if len(positions) != b or x.shape[:2] != (b, 1):
        raise RunnerError(f"a batched decode of {b} sessions takes [{b}, 1, ...] inputs, got {x.shape}")
    m = runner.manifest
    if not runner.is_first and (x.ndim != 3 or x.shape[2] != m.hidden_size):
        raise RunnerError(f"module {runner.start} takes a hidden state [B, 1, {m.hidden_size}]: {x.shape}")
    pos = np.asarray(positions, np.int64).reshape(b, 1)
    if m.max_context and int(pos.max()) >= m.max_context:
        raise RunnerError(f"position {int(pos.max())} exceeds the model's context {m.max_context}")
    h = x.astype(np.int64, copy=False) if runner.is_first else np.ascontiguousarray(x, np.float32)
    caches = [runner.cache(s, 1) for s in session_ids]
    # Fixed lock order, so two batches that share sessions cannot deadlock (a stage runs one at a time).
    locked = sorted(range(b), key=lambda i: session_ids[i])
    for i in locked:
        caches[i].lock.acquire()
    try:
        layers = runner.layers
        if layers:
            for c in caches:
                runner.grow(c, c.length + 1)
        cap = max(c.capacity for c in caches)
        mask = np.zeros((b, cap + 1), np.int64)
        past_pos = np.zeros((b, cap), np.int64)
        for i, c in enumerate(caches):
            mask[i, : c.length] = c.mask[0, : c.length]
            past_pos[i, : c.length] = c.positions[0, : c.length]
        mask[:, cap] = 1
        for unit in runner.units():
            # Gather the rows' past K/V per layer of the unit: with a fused unit, all of its layers' at
            # once (transiently about the batch's own KV bytes again).
            past_k: dict[int, np.ndarray] = {}
            past_v: dict[int, np.ndarray] = {}
            for layer, _, _ in unit.kv_outputs:
                past_k[layer] = np.zeros((b, m.num_kv_heads, cap, m.head_dim), np.float32)
                past_v[layer] = np.zeros_like(past_k[layer])
                for i, c in enumerate(caches):
                    past_k[layer][i, :, : c.length] = c.keys[layer][0, :, : c.length]
                    past_v[layer][i, :, : c.length] = c.values[layer][0, :, : c.length]
            outs = unit.session.run(None, unit.feeds(h, pos, mask, past_k, past_v, past_pos))
            h = outs[0]
            for layer, k, v in unit.kv_outputs:
                for i, c in enumerate(caches):
                    c.keys[layer][0, :, c.length] = outs[k][i, :, 0]
                    c.values[layer][0, :, c.length] = outs[v][i, :, 0]
        for i, c in enumerate(caches):
            if layers:
                c.mask[0, c.length] = 1
                c.positions[0, c.length] = pos[i, 0]
            c.length += 1
    finally:
        for i in locked:
            caches[i].lock.release()
    return np.asarray(h)
