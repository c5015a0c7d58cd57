"""Messages of the inference pipeline, as they travel over the peer links.

One generation is a *session* owned by its entry node (the node the client called). The entry node
drives it one step at a time:

    entry --pipe.step--> stage 0 --pipe.step--> ... --pipe.step--> last stage --pipe.token--> entry

``pipe.step`` carries the new token ids (stage 0 embeds them) and, between stages, the hidden state of
those tokens: the only tensor that crosses a device boundary. The last stage samples and returns one
token id. The entry keeps the whole token history, which is what makes a session survive a stage node
dying: it simply re-prefills the history on the next plan (``reset``), and since sampling randomness
is keyed by (seed, step), the answer continues exactly as it would have.

Every payload is validated here before any stage touches it, so a malformed or hostile frame is rejected
with a reason and never reaches onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llnode.pipeline.sampling import SamplingConfig
from llnode.pipeline.trace import Trace, parse_trace

STEP = "pipe.step"
TOKEN = "pipe.token"
FREE = "pipe.free"

MAX_STEP_TOKENS = 1 << 16
MAX_SESSION_ID = 64


class ProtocolError(ValueError):
    """A pipeline frame that is malformed or does not fit the stage that received it."""


SAMPLING_FIELDS = (
    "temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
)  # fmt: skip


def sampling_to_wire(config: SamplingConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in SAMPLING_FIELDS}


def sampling_from_wire(data: Any) -> SamplingConfig:
    """The request's sampling parameters, as the last stage needs them; range-checked by the config."""
    if not isinstance(data, dict) or set(data) - set(SAMPLING_FIELDS):
        raise ProtocolError("sampling must be a map of known sampling parameters")
    for name, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ProtocolError(f"sampling parameter {name} must be a number")
    try:
        seed = data.get("seed")
        return SamplingConfig(
            **{k: v for k, v in data.items() if k != "seed"},
            seed=None if seed is None else int(seed),
        )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad sampling parameters: {exc}") from exc


@dataclass
class Step:
    """One pipeline step of one session, as received by a stage.

    ``ids`` are the new tokens of this step; ``pos0`` the position of the first of them. ``reset`` means
    "forget any KV you hold for this session and start from position 0": a prefill, or a re-prefill
    after a failover or a plan switch, whose ``ids`` are then the whole token history (so the last stage
    sees every token the repetition penalty must know) and ``generated`` says how many of them the model
    produced, so the sampler resumes its random stream exactly where it was. ``hidden`` is absent only at
    stage 0. ``trace``, on some decode steps, collects timestamps of every hand-off (``trace.py``).
    """

    session: str
    epoch: int
    seq: int
    entry: str
    pos0: int
    ids: list[int]
    reset: bool = False
    hidden: np.ndarray | None = None
    sampling: SamplingConfig | None = None
    generated: int = 0
    trace: Trace | None = None

    def to_wire(self, hidden: dict[str, Any] | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "session": self.session,
            "epoch": self.epoch,
            "seq": self.seq,
            "entry": self.entry,
            "pos0": self.pos0,
            "ids": self.ids,
            "reset": self.reset,
        }
        if hidden is not None:
            payload["hidden"] = hidden
        if self.sampling is not None:
            payload["sampling"] = sampling_to_wire(self.sampling)
        if self.generated:
            payload["generated"] = self.generated
        if self.trace is not None:
            payload["trace"] = self.trace
        return payload


def _int_list(value: Any, what: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_STEP_TOKENS:
        raise ProtocolError(f"{what} must be a list of at most {MAX_STEP_TOKENS} token ids")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
            raise ProtocolError(f"{what} holds an invalid token id {v!r}")
    return value


def parse_step(payload: Any, vocab_size: int) -> Step:
    """Validate a ``pipe.step`` payload's scalar fields (the hidden tensor is checked by the stage)."""
    if not isinstance(payload, dict):
        raise ProtocolError("step payload must be a map")
    try:
        session = payload["session"]
        epoch, seq, pos0 = payload["epoch"], payload["seq"], payload["pos0"]
        entry = payload["entry"]
    except KeyError as exc:
        raise ProtocolError(f"step payload misses {exc}") from exc
    if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_ID:
        raise ProtocolError("session id must be a short string")
    if not isinstance(entry, str) or not entry:
        raise ProtocolError("entry must be a node id")
    for name, v in (("epoch", epoch), ("seq", seq), ("pos0", pos0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ProtocolError(f"{name} must be a non-negative integer")
    ids = _int_list(payload.get("ids"), "ids", vocab_size)
    if not ids:
        raise ProtocolError("a step carries at least one token")
    reset = payload.get("reset", False)
    if not isinstance(reset, bool):
        raise ProtocolError("reset must be a boolean")
    if reset and pos0 != 0:
        raise ProtocolError("a reset step starts at position 0")
    sampling = sampling_from_wire(payload["sampling"]) if "sampling" in payload else None
    generated = payload.get("generated", 0)
    if not isinstance(generated, int) or isinstance(generated, bool) or not 0 <= generated <= len(ids):
        raise ProtocolError("generated must count tokens of this step")
    try:
        trace = parse_trace(payload["trace"]) if "trace" in payload else None
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return Step(
        session=session,
        epoch=epoch,
        seq=seq,
        entry=entry,
        pos0=pos0,
        ids=ids,
        reset=reset,
        sampling=sampling,
        generated=generated,
        trace=trace,
    )
