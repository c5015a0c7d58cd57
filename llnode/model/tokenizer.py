"""A tokenizer that runs on a phone: pure Python over ``tokenizer.json`` (no torch/transformers/tokenizers).

Implements the subset of Hugging Face ``tokenizers`` used by the supported models: byte-level BPE
(GPT-2, SmolLM2, Llama-3 style, BLOOM) with ``ByteLevel``/``Split``/``Digits`` pre-tokenizers, and
SentencePiece-style BPE with ``Metaspace``/``Prepend``+``Replace`` and byte fallback (Llama-2, TinyLlama).
Added/special tokens are matched before pre-tokenization, as ``tokenizers`` does. The Unicode classes in
the pre-tokenizer regexes (``\\p{L}``, ``\\p{N}``) need the ``regex`` package; the test suite checks token
for token equality with ``tokenizers`` on varied text.

Chat templates are rendered with jinja2 (sandboxed), as transformers does.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(ValueError):
    """tokenizer.json uses a feature this tokenizer does not implement."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _split(text: str, pattern: regex.Pattern[str], behavior: str, invert: bool) -> list[str]:
    """``tokenizers``' Split semantics for one piece of text."""
    spans: list[tuple[int, int, bool]] = []  # (start, end, is_match)
    pos = 0
    for m in pattern.finditer(text):
        if m.start() == m.end():
            continue
        if m.start() > pos:
            spans.append((pos, m.start(), False))
        spans.append((m.start(), m.end(), True))
        pos = m.end()
    if pos < len(text):
        spans.append((pos, len(text), False))
    if invert:
        spans = [(s, e, not k) for s, e, k in spans]
    out: list[str] = []
    if behavior == "Isolated":
        out = [text[s:e] for s, e, _ in spans]
    elif behavior == "Removed":
        out = [text[s:e] for s, e, k in spans if not k]
    elif behavior == "MergedWithPrevious":
        for s, e, k in spans:
            if k and out:
                out[-1] += text[s:e]
            else:
                out.append(text[s:e])
    elif behavior == "MergedWithNext":
        pending = ""
        for s, e, k in spans:
            if k:
                if pending:
                    out.append(pending)
                pending = text[s:e]
            else:
                out.append(pending + text[s:e])
                pending = ""
        if pending:
            out.append(pending)
    elif behavior == "Contiguous":
        prev_match = False
        for s, e, k in spans:
            if out and k and prev_match:
                out[-1] += text[s:e]
            else:
                out.append(text[s:e])
            prev_match = k
    else:
        raise TokenizerError(f"Split behavior {behavior!r} is not supported")
    return [p for p in out if p]


PreTok = Callable[[list[str]], list[str]]


def _pattern(spec: dict[str, Any]) -> regex.Pattern[str]:
    if "Regex" in spec:
        try:
            return regex.compile(spec["Regex"])
        except regex.error:
            # Oniguruma (used by ``tokenizers``) allows nested character classes, e.g. BLOOM's
            # ``[^(\s|[.,!?])]``; the regex package parses them in its VERSION1 mode.
            return regex.compile(spec["Regex"], flags=regex.V1)
    return regex.compile(regex.escape(spec["String"]))


def _build_pre(spec: dict[str, Any] | None) -> tuple[PreTok, bool]:
    """A pre-tokenizer over a list of pieces; also says whether the byte-level mapping applies."""
    if spec is None:
        return (lambda pieces: pieces), False
    kind = spec["type"]
    if kind == "Sequence":
        parts = [_build_pre(p) for p in spec["pretokenizers"]]

        def seq(pieces: list[str]) -> list[str]:
            for fn, _ in parts:
                pieces = fn(pieces)
            return pieces

        return seq, any(b for _, b in parts)
    if kind == "ByteLevel":
        prefix = bool(spec.get("add_prefix_space", False))
        use_regex = bool(spec.get("use_regex", True))
        pat = regex.compile(GPT2_PATTERN)

        def byte_level(pieces: list[str]) -> list[str]:
            out: list[str] = []
            for i, p in enumerate(pieces):
                if prefix and i == 0 and not p.startswith(" "):
                    p = " " + p
                out += pat.findall(p) if use_regex else [p]
            return out

        return byte_level, True
    if kind == "Split":
        pat = _pattern(spec["pattern"])
        behavior, invert = spec.get("behavior", "Isolated"), bool(spec.get("invert", False))
        return (lambda pieces: [q for p in pieces for q in _split(p, pat, behavior, invert)]), False
    if kind == "Digits":
        pat = regex.compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")
        return (lambda pieces: [q for p in pieces for q in _split(p, pat, "Isolated", False)]), False
    if kind == "Metaspace":
        rep = spec.get("replacement", "▁")
        scheme = spec.get("prepend_scheme", "always")

        def metaspace(pieces: list[str]) -> list[str]:
            out = []
            for i, p in enumerate(pieces):
                p = p.replace(" ", rep)
                if (scheme == "always" or (scheme == "first" and i == 0)) and not p.startswith(rep):
                    p = rep + p
                out.append(p)
            if spec.get("split", True):
                return [
                    q
                    for p in out
                    for q in _split(p, regex.compile(regex.escape(rep)), "MergedWithNext", False)
                ]
            return out

        return metaspace, False
    raise TokenizerError(f"pre-tokenizer {kind!r} is not supported")


def _build_norm(spec: dict[str, Any] | None) -> Callable[[str], str]:
    if spec is None:
        return lambda s: s
    kind = spec["type"]
    if kind == "Sequence":
        fns = [_build_norm(n) for n in spec["normalizers"]]

        def seq(s: str) -> str:
            for fn in fns:
                s = fn(s)
            return s

        return seq
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Lowercase":
        return str.lower
    if kind == "Prepend":
        pre = spec["prepend"]
        return lambda s: pre + s if s else s
    if kind == "Replace":
        pat = _pattern(spec["pattern"])
        content = spec["content"]
        return lambda s: pat.sub(lambda _m: content, s)
    raise TokenizerError(f"normalizer {kind!r} is not supported")


class Tokenizer:
    """Encode/decode exactly like the ``tokenizers`` library for the supported ``tokenizer.json`` files."""

    def __init__(self, data: dict[str, Any]) -> None:
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise TokenizerError(f"tokenizer model {model.get('type')!r} is not supported (only BPE)")
        self.vocab: dict[str, int] = dict(model["vocab"])
        merges = model.get("merges", [])
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        self.ranks: dict[tuple[str, str], int] = {(a, b): i for i, (a, b) in enumerate(pairs)}
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.unk_token: str | None = model.get("unk_token")
        self.added: dict[str, int] = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        self.special_ids = {int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}
        for content, i in self.added.items():
            self.vocab.setdefault(content, i)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self._normalize = _build_norm(data.get("normalizer"))
        self._pre, self.byte_level = _build_pre(data.get("pre_tokenizer"))
        if data.get("decoder") and "ByteLevel" in json.dumps(data["decoder"]):
            self.byte_level = True
        self._b2u = bytes_to_unicode()
        self._u2b = {c: b for b, c in self._b2u.items()}
        self._post = data.get("post_processor")
        self._decoder = data.get("decoder")
        if self.added:
            alts = sorted(self.added, key=len, reverse=True)
            self._added_re: regex.Pattern[str] | None = regex.compile("|".join(regex.escape(a) for a in alts))
        else:
            self._added_re = None
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path: Path | str) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(json.loads(path.read_text(encoding="utf-8")))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- encoding ------------------------------------------------------------------------------------

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if self.ignore_merges and word in self.vocab:
            ids = [self.vocab[word]]
        else:
            parts = list(word)
            ranks = self.ranks
            while len(parts) > 1:
                best, best_rank = -1, None
                for i in range(len(parts) - 1):
                    r = ranks.get((parts[i], parts[i + 1]))
                    if r is not None and (best_rank is None or r < best_rank):
                        best, best_rank = i, r
                if best < 0:
                    break
                a, b = parts[best], parts[best + 1]
                merged: list[str] = []
                i = 0
                while i < len(parts):
                    if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                        merged.append(a + b)
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            ids = []
            for p in parts:
                if p in self.vocab:
                    ids.append(self.vocab[p])
                elif self.byte_fallback:
                    ids += [self.vocab[f"<0x{b:02X}>"] for b in p.encode("utf-8")]
                elif self.unk_token is not None and self.unk_token in self.vocab:
                    ids.append(self.vocab[self.unk_token])
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        pieces = self._pre([self._normalize(text)])
        ids: list[int] = []
        for p in pieces:
            if self.byte_level:
                p = "".join(self._b2u[b] for b in p.encode("utf-8"))
            ids += self._bpe(p)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; added tokens (e.g. ``<|im_start|>``) in the text map to their ids."""
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                ids += self._encode_plain(text[pos : m.start()])
                ids.append(self.added[m.group(0)])
                pos = m.end()
        ids += self._encode_plain(text[pos:])
        if add_special_tokens:
            ids = self._post_process(ids)
        return ids

    def _post_process(self, ids: list[int]) -> list[int]:
        post = self._post
        if not post:
            return ids
        procs = post["processors"] if post.get("type") == "Sequence" else [post]
        for proc in procs:
            if proc.get("type") == "TemplateProcessing":
                out: list[int] = []
                for item in proc["single"]:
                    if "Sequence" in item:
                        out += ids
                    else:
                        tok = item["SpecialToken"]["id"]
                        out += proc["special_tokens"][tok]["ids"]
                ids = out
            elif proc.get("type") not in ("ByteLevel", None):
                raise TokenizerError(f"post-processor {proc.get('type')!r} is not supported")
        return ids

    # -- decoding ------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        out = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            tok = self.id_to_token.get(int(i))
            if tok is None:
                continue
            if int(i) in self.added.values() and tok in self.added:
                out += tok.encode("utf-8")
            elif self.byte_level:
                out += (
                    bytes(self._u2b.get(c, 0) for c in tok)
                    if all(c in self._u2b for c in tok)
                    else tok.encode("utf-8")
                )
            elif self.byte_fallback and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(int(tok[3:5], 16))
            else:
                out += tok.replace("▁", " ").encode("utf-8")
        return bytes(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")
        if (
            not self.byte_level
            and self._decoder
            and "Strip" in json.dumps(self._decoder)
            and text.startswith(" ")
        ):
            text = text[1:]
        return text


class StreamDecoder:
    """Incremental detokenization for streaming: ``push(id)`` returns the newly complete text, holding
    back bytes of a UTF-8 character that is split across tokens."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self._pending = b""

    def push(self, token_id: int) -> str:
        self._pending += self.tokenizer.decode_bytes([token_id], self.skip)
        try:
            text = self._pending.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                text = self._pending[: exc.start].decode("utf-8", errors="replace")
                self._pending = self._pending[exc.start :]
                return text
            text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text


def render_chat(
    template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
) -> str:
    """Render a Hugging Face chat template (jinja2, sandboxed, same options as transformers)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **extra
    )


def load_tokenizer(shard_dir: Path | str, tokenizer_file: str = "tokenizer.json") -> Tokenizer:
    return Tokenizer.from_file(Path(shard_dir) / tokenizer_file)
