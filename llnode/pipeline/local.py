"""LocalEngine: the whole module chain in this process, behind the :class:`Engine` protocol.

It is what a single node serves when it holds every module, and the single-process reference that
multi-node runs are compared with token for token (same runner, same sampler, same prompts).

Scheduling: every onnxruntime call runs on ONE worker thread owned by the engine, off the event loop.
Concurrent requests are interleaved at step granularity: each decode step (and each prefill chunk of
:data:`PREFILL_CHUNK` tokens) is a separate job in that thread's FIFO queue, so a long prompt delays the
other sessions by one chunk at a time rather than by its whole prefill, and no two steps ever compete for
the two cores (onnxruntime already uses them all within one step). Sampling runs on the worker thread
too, right after the step that produced the logits.

Freeing: when a generation ends, is closed early (stop string) or is cancelled (client gone), a
``free`` job is queued behind whatever step of that session is still running, so the KV cache is never
dropped under a step that uses it; :meth:`LocalEngine.live_sessions` reports what the runner still holds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from llnode.config import ConfigError
from llnode.model.manifest import Manifest, load_manifest
from llnode.model.runner import ModuleRunner
from llnode.model.tokenizer import Tokenizer as ModelTokenizer
from llnode.model.tokenizer import load_tokenizer, render_chat
from llnode.pipeline.engine import ChatMessage, EngineUnavailable, GenerationRequest
from llnode.pipeline.sampling import Sampler

T = TypeVar("T")

# Prompt tokens per prefill step: long enough to keep prefill efficient, short enough that other
# sessions' decode steps get a turn between chunks. LLNODE_PREFILL_CHUNK overrides it (prefill_chunk).
PREFILL_CHUNK = 256


def prefill_chunk() -> int:
    """Tokens per prefill step on this node: ``LLNODE_PREFILL_CHUNK`` if set (0 prefills a prompt
    whole), else :data:`PREFILL_CHUNK`. A smaller chunk lowers a node's peak memory (the activations of
    one chunk) and lets other sessions' decode steps in sooner; ``llnode bench speed --variant`` and
    ``bench pipeline`` measure the trade-off side by side."""
    raw = os.environ.get("LLNODE_PREFILL_CHUNK", "").strip()
    if not raw:
        return PREFILL_CHUNK
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"LLNODE_PREFILL_CHUNK must be a whole number of tokens, not {raw!r}") from None
    if value < 0:
        raise ConfigError(f"LLNODE_PREFILL_CHUNK must be >= 0 (0: whole prompts), not {value}")
    return value or (1 << 30)

# Used when a shard set carries no chat template (base models): plain ChatML, which is what most small
# instruct models were tuned on, and unambiguous for the rest.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ShardTokenizer:
    """The shard set's tokenizer and chat template, as the API's ``Tokenizer`` protocol wants them."""

    def __init__(self, tokenizer: ModelTokenizer, manifest: Manifest) -> None:
        self.tokenizer = tokenizer
        self.template = manifest.chat_template or FALLBACK_CHAT_TEMPLATE
        by_id = {i: s for s, i in manifest.special_tokens.items()}
        # Templates refer to these by name (e.g. Llama 3 starts with {{ bos_token }}).
        self.template_vars = {
            "bos_token": by_id.get(manifest.bos_token_id, "") if manifest.bos_token_id is not None else "",
            "eos_token": next((by_id[i] for i in manifest.eos_token_ids if i in by_id), ""),
        }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return render_chat(
            self.template, [dict(m) for m in messages], add_generation_prompt=True, **self.template_vars
        )


class LocalEngine:
    """Serve a shard set from this process. See the module docstring for scheduling and freeing."""

    def __init__(
        self,
        shard_dir: Path | str,
        *,
        model_name: str | None = None,
        aliases: Sequence[str] = (),
        threads: int | None = None,
        runner: ModuleRunner | None = None,
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.manifest = runner.manifest if runner is not None else load_manifest(self.shard_dir)
        self.runner = (
            runner if runner is not None else ModuleRunner(self.shard_dir, self.manifest, threads=threads)
        )
        if not (self.runner.is_first and self.runner.is_last):
            raise ValueError("a LocalEngine needs a runner over the whole module chain")
        self._tokenizer = ShardTokenizer(
            load_tokenizer(self.shard_dir, self.manifest.tokenizer_file), self.manifest
        )
        names = [model_name or self.manifest.name, *aliases]
        self._model_ids = list(dict.fromkeys(names))
        self._eos = frozenset(self.manifest.eos_token_ids)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        self._ids = itertools.count()
        self._closed = False
        self.steps = 0  # runner calls made (prefill chunks + decode steps), for tests and status

    # ---- Engine protocol ------------------------------------------------------------------------------
    @property
    def model_ids(self) -> Sequence[str]:
        return self._model_ids

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def tokenizer(self) -> ShardTokenizer:
        return self._tokenizer

    def ready(self) -> str | None:
        return "the engine has been shut down" if self._closed else None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """Yield sampled token ids (see :mod:`llnode.pipeline.engine` for the contract)."""
        if self._closed:
            raise EngineUnavailable("the engine has been shut down")
        prompt = list(request.prompt)
        room = self.max_context - len(prompt)
        if room < 1:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens leaves no room in a context of {self.max_context}"
            )
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError("the prompt holds token ids outside the vocabulary")
        limit = min(request.params.max_tokens, room)
        session = f"{request.id}#{next(self._ids)}"
        sampler = Sampler(request.params.sampling(), prompt)
        try:
            token = -1
            step = prefill_chunk()
            for start in range(0, len(prompt), step):
                last = start + step >= len(prompt)
                chunk = prompt[start : start + step]
                token = await self._submit(self._prefill, session, chunk, start, sampler if last else None)
            for produced in range(1, limit + 1):
                if token in self._eos and not request.params.ignore_eos:
                    return
                yield token
                if produced == limit:
                    return
                token = await self._submit(self._decode, session, token, len(prompt) + produced - 1, sampler)
        finally:
            # Queued behind any step of this session still running on the worker (cancellation does not
            # stop a thread), so the cache is never freed under a step that is using it.
            if not self._closed:
                self._executor.submit(self.runner.free, session)

    # ---- worker-thread jobs ---------------------------------------------------------------------------
    def _prefill(self, session: str, chunk: list[int], start: int, sampler: Sampler | None) -> int:
        """One chunk of the prompt; the last chunk (``sampler`` given) also samples the first token."""
        ids = np.asarray([chunk], dtype=np.int64)
        positions = np.arange(start, start + len(chunk), dtype=np.int64)[None, :]
        logits = self.runner.step(session, ids, positions, last_only=True)
        self.steps += 1
        return -1 if sampler is None else sampler.sample(logits[0, -1])

    def _decode(self, session: str, token: int, position: int, sampler: Sampler) -> int:
        logits = self.runner.step(
            session, np.asarray([[token]], dtype=np.int64), np.asarray([[position]], dtype=np.int64)
        )
        self.steps += 1
        return sampler.sample(logits[0, -1])

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        fut: Future[T] = self._executor.submit(fn, *args)
        return await asyncio.wrap_future(fut)

    # ---- introspection and shutdown -------------------------------------------------------------------
    def live_sessions(self) -> list[str]:
        """Sessions whose KV cache the runner still holds."""
        return self.runner.sessions()

    async def drain(self) -> None:
        """Wait until every job queued so far (frees included) has run."""
        await self._submit(lambda: None)

    def close(self) -> None:
        """Refuse new requests and stop the worker thread once its queue is done."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=False)
