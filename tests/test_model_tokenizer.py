"""The pure-Python tokenizer gives exactly the ids of the `tokenizers` library; chat templates render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llnode.model.tokenizer import StreamDecoder, Tokenizer, TokenizerError, render_chat

SAMPLES = [
    "Hello, world!",
    "  leading  and   multiple   spaces\n\n\ttabs\r\n and trailing   ",
    "Numbers 1234567 3.14159 -42 1e10 ٣٤٥ ½",
    "Unicode: naïve café, 日本語のテキスト, Ελληνικά, русский, emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "I'm can't we'll they've you'd He's SHOUTING'S",
    "   ",
    "",
    "a" * 300,
    "x\u00a0y\u2003z\u200b",
    "🤖🤖🤖 mixed: abc123def,,,;;;!!!???",
]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
BLOOM_SPLIT = r" ?[^(\s|[.,!?…。，、।۔،])]+"


def _variant(base: Path, tmp: Path, kind: str) -> Path:
    """The trained tiny tokenizer with another pre-tokenizer pipeline, as real models configure them."""
    data = json.loads(base.read_text())
    if kind == "llama3":
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }
        data["model"]["ignore_merges"] = True
    elif kind == "digits":  # SmolLM2's published tokenizer
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        }
    elif kind == "bloom":
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": BLOOM_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }
    elif kind == "prefix":
        data["pre_tokenizer"] = {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        }
        data["normalizer"] = {"type": "NFKC"}
    elif kind == "bos":
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}
            },
        }
    path = tmp / f"{kind}.json"
    path.write_text(json.dumps(data))
    return path


def _check_equal(path: Path, samples: list[str]) -> None:
    from tokenizers import Tokenizer as HfTokenizer

    ours, theirs = Tokenizer.from_file(path), HfTokenizer.from_file(str(path))
    for text in samples:
        want = theirs.encode(text).ids
        got = ours.encode(text)
        assert got == want, (path.name, text)
        assert ours.decode(got) == theirs.decode(want, skip_special_tokens=False), (path.name, text)
        assert ours.decode(got, skip_special_tokens=True) == theirs.decode(want, skip_special_tokens=True)
        stream = StreamDecoder(ours, skip_special_tokens=False)
        assert "".join(stream.push(i) for i in got) + stream.flush() == ours.decode(got)


@pytest.mark.parametrize("kind", ["plain", "llama3", "digits", "bloom", "prefix", "bos"])
def test_tiny_tokenizer_variants_match_tokenizers(
    kind: str, tiny_tokenizer_json: Path, tmp_path: Path
) -> None:
    path = tiny_tokenizer_json if kind == "plain" else _variant(tiny_tokenizer_json, tmp_path, kind)
    _check_equal(path, SAMPLES)


def test_unsupported_model_is_a_clear_error() -> None:
    with pytest.raises(TokenizerError, match="WordPiece"):
        Tokenizer({"model": {"type": "WordPiece", "vocab": {}}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file("/nonexistent/tokenizer.json")


def test_stream_decoder_holds_split_utf8(tiny_tokenizer_json: Path) -> None:
    tok = Tokenizer.from_file(tiny_tokenizer_json)
    ids = tok.encode("€∑")  # not in the tiny corpus: one token per UTF-8 byte
    assert len(ids) == 6
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert pieces[:2] == ["", ""] and pieces[2] == "€" and "".join(pieces) == "€∑"


def test_chat_template_renders() -> None:
    from conftest import TINY_CHAT_TEMPLATE

    text = render_chat(TINY_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_smollm2_tokenizer_and_template_match_transformers(smollm2_shards: Path) -> None:
    from transformers import AutoTokenizer

    from llnode.model.manifest import load_manifest

    text = (Path(__file__).parent.parent / "llnode" / "model" / "tokenizer.py").read_text()
    _check_equal(smollm2_shards / "tokenizer.json", [*SAMPLES, text])
    manifest = load_manifest(smollm2_shards)
    assert manifest.chat_template and "<|im_start|>" in manifest.chat_template
    assert (smollm2_shards / "chat_template.jinja").read_text() == manifest.chat_template
    hf = AutoTokenizer.from_pretrained(manifest.source["hf_dir"])
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for m in (msgs, msgs[1:2]):
        want = hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        assert render_chat(manifest.chat_template, m) == want
