"""Token ids to streamed text: incremental, UTF-8 safe, and stop-string aware.

Decoding one token at a time does not work: a byte-level BPE token may hold half of a UTF-8 character
(emojis, CJK), and SentencePiece tokenizers drop the leading space of the first token they decode. So,
as vLLM and TGI do, we decode a short window of recent tokens twice (with and without the new ones) and
emit the difference, holding it back while it ends in an incomplete character (U+FFFD).

Stop strings are matched on that text. A stop string may straddle tokens, so any tail of the pending text
that could still grow into a stop string is held back until it either completes one (generation ends,
the stop string and everything after it are dropped) or cannot anymore (it is released). The client
therefore never sees any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from llnode.pipeline.engine import Tokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens decoded along with the first new ones, for tokenizers whose decode depends on context.
CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Feed token ids one by one; get back the new text each makes final (possibly empty)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character is emitted as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Releases text only once it cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def _held_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def push(self, text: str) -> str:
        """Add decoded text; return what may be shown now. After a match, :attr:`stopped` is True."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        held = self._held_length(self.pending)
        out = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(self.pending) - held :]
        return out

    def flush(self) -> str:
        """At the end of generation the held tail was not a stop string after all: release it."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TextStream:
    """Detokenizer and stop matcher together: what the API feeds each token through."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def push(self, token: int) -> str:
        return self.stop.push(self.detok.push(token))

    def finish(self) -> str:
        """Text still held when generation ended (not called after a stop string matched)."""
        tail = self.stop.push(self.detok.flush())
        return tail + self.stop.flush()
