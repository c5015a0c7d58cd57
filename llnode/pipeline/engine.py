"""The small interface between the HTTP API and whatever produces tokens.

The OpenAI routes (``llnode.api``) know nothing about modules, stages or peers: they validate a request,
tokenize it, hand a :class:`GenerationRequest` to an :class:`Engine` and turn the token ids it yields into
text. :class:`llnode.pipeline.local.LocalEngine` runs the whole module chain in this process; the
distributed engine (entry node driving stages over peer links) implements the same protocol, so the same
HTTP code and the same tests serve both.

Contract of :meth:`Engine.generate` (every implementation must keep it, the API relies on it):

- it is an async generator yielding sampled token ids, one per decode step, as soon as each is known;
- it never yields an end-of-sequence id: it simply ends after one, or after ``params.max_tokens``
  tokens, or when the context is full (so "fewer than max_tokens yielded" means a natural stop);
- closing it early (``aclose()``, or cancelling the task iterating it) ends the session and frees its KV
  cache everywhere; the API does this on stop strings and client disconnects;
- it raises :class:`EngineUnavailable` when the request cannot be served right now (no plan, model not
  loaded, a stage lost and not recoverable): before the first token the API answers 503 with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from llnode.pipeline.sampling import SamplingConfig


class EngineUnavailable(RuntimeError):
    """The engine cannot serve this request now; the message is the reason shown to the client."""


@dataclass(frozen=True)
class GenerationParams:
    """How to generate: limits, sampling knobs and stop strings (already validated by the API).

    ``stop`` strings are matched on the decoded text by the API layer, not by the engine (an engine only
    sees ids); they are here so that an engine that logs or forwards a request has all of it.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    # Keep generating past end-of-text up to max_tokens (vLLM's ``ignore_eos``): what a benchmark needs
    # for a stream of known length; a chat client never wants it.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.sampling()  # range checks of the sampling knobs live in SamplingConfig

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
        )


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the prompt as token ids (chat template already applied) and its parameters."""

    prompt: tuple[int, ...]
    params: GenerationParams = field(default_factory=GenerationParams)
    id: str = field(default_factory=new_request_id)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a generation needs at least one prompt token")


ChatMessage = Mapping[str, str]


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids and the model's chat template, as the API needs them."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds the model's BOS (if it uses one). A rendered
        chat template already holds its special tokens, so the API encodes it with ``False``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out. Incomplete UTF-8 at the end shows as U+FFFD."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for ``messages`` (role/content), ending where the assistant's turn starts."""
        ...


@runtime_checkable
class Engine(Protocol):
    """What the HTTP API serves from. See the module docstring for the ``generate`` contract."""

    @property
    def model_ids(self) -> Sequence[str]:
        """Names a request's ``model`` field may use; the first is the canonical one."""
        ...

    @property
    def max_context(self) -> int:
        """Prompt plus generated tokens may not exceed this."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are ``0 .. vocab_size - 1``."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def ready(self) -> str | None:
        """``None`` when a request would be served now, else the reason it would not (for a 503)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """Yield sampled token ids; see the module docstring."""
        ...
