"""Stop strings and incremental detokenization, property-tested, plus the real tiny tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from llnode.pipeline.detok import IncrementalDetokenizer, StopMatcher, TextStream

ALPHABET = "ab c\u00e9\U0001f30d"


@st.composite
def _chunked_text(draw: st.DrawFn) -> tuple[str, list[str], list[str]]:
    text = draw(st.text(alphabet=ALPHABET, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    stops = draw(st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=4))
    return text, pieces, stops


@settings(max_examples=300, deadline=None)
@given(_chunked_text())
def test_stop_matcher_cuts_at_the_first_stop_and_never_leaks(case: tuple[str, list[str], list[str]]) -> None:
    text, pieces, stops = case
    matcher = StopMatcher(stops)
    shown = ""
    for piece in pieces:
        shown += matcher.push(piece)
        # Whatever has been shown so far never holds a whole stop string.
        assert not any(s in shown for s in stops)
        if matcher.stopped:
            break
    if not matcher.stopped:
        shown += matcher.flush()
    # Reference: generation stops after the first piece that completes a stop string; the answer is cut
    # at the earliest stop string present in the text up to that piece (later text never exists).
    seen, expected, hit = "", text, False
    for piece in pieces:
        seen += piece
        starts = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if starts:
            expected, hit = seen[: min(starts)], True
            break
    assert shown == expected
    assert matcher.stopped == hit


class ByteTok:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return ""


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=30))
def test_incremental_detok_rebuilds_any_text_without_replacement_chars(text: str) -> None:
    """Byte tokens split every multi-byte character; each piece shown is still whole text."""
    detok = IncrementalDetokenizer(ByteTok(), [65])
    pieces = [detok.push(b) for b in text.encode("utf-8")]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_real_tokenizer_stream_equals_full_decode(tiny_llama_shards: Path) -> None:
    from llnode.model.manifest import load_manifest
    from llnode.model.tokenizer import load_tokenizer
    from llnode.pipeline.local import ShardTokenizer

    tok = ShardTokenizer(load_tokenizer(tiny_llama_shards), load_manifest(tiny_llama_shards))
    text = "Once upon a time, café naïve 日本語 and 12345. The quick brown fox."
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, [], ["brown"])
    shown = "".join(stream.push(t) for t in ids if not stream.stopped)
    assert stream.stopped
    assert shown == text[: text.index("brown")]
    stream = TextStream(tok, tok.encode("Prompt:", add_special_tokens=False), [])
    shown = "".join(stream.push(t) for t in ids) + stream.finish()
    assert shown == tok.decode(ids) == text
