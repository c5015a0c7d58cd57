"""``llnode verify DIR``: the chain of all modules against the reference model.

fp32: prefill of a prompt, 16 greedy decode steps (both sides fed the same tokens) and a left-padded batch
of 2; passes when the max absolute logit difference is <= 1e-4 and every greedy token agrees.
int8/int4: greedy agreement with the fp32 reference over 16 free-running steps and perplexity on a short
English text, both printed; passes when perplexity is within 1.5x of the reference's.
The reference is transformers (from the folder recorded in the manifest) when installed, else
``reference.onnx`` in the shard folder (``llnode prepare --reference``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llnode.model.manifest import Manifest, ManifestError, load_manifest
from llnode.model.reference import ChainStepper, HfReference, Stepper, WholeOnnx
from llnode.model.runner import ModuleRunner, left_pad, positions_for
from llnode.model.tokenizer import load_tokenizer

FP32_TOLERANCE = 1e-4
PPL_RATIO_LIMIT = 1.5
PROMPT = "The capital of France is"
BATCH_PROMPTS = ("Once upon a time, in a small village by the sea,", "def fibonacci(n):")
PPL_TEXT = (
    "The sun rose slowly over the quiet town. Children walked to school while their parents went to work. "
    "In the market, farmers sold fresh vegetables, bread and cheese. By noon the streets were busy, and by "
    "evening everyone returned home to share dinner and talk about their day."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="shard-set folder (with manifest.json)")
    parser.add_argument("--steps", type=int, default=16, help="greedy decode steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference", choices=("auto", "transformers", "onnx"), default="auto")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def reference_factory(
    manifest: Manifest, shard_dir: Path, kind: str = "auto", threads: int | None = None
) -> tuple[str, object]:
    """Returns (description, factory() -> fresh stateful reference)."""
    hf_dir = manifest.source.get("hf_dir")
    if kind in ("auto", "transformers"):
        try:
            from llnode.model.source import load_hf

            if hf_dir and Path(hf_dir).is_dir():
                model = load_hf(Path(hf_dir))
                return "transformers", lambda: HfReference(model)
            if kind == "transformers":
                raise ManifestError(f"the source model folder {hf_dir!r} recorded in the manifest is gone")
        except ImportError:
            if kind == "transformers":
                raise
    ref = shard_dir / "reference.onnx"
    if not ref.is_file():
        raise ManifestError(
            "no reference: install the [export] extra (transformers) with the source model present, or write "
            f"{ref} with 'llnode prepare --reference'"
        )
    return "whole-model onnx", lambda: WholeOnnx(
        ref, manifest.num_layers, manifest.num_kv_heads, manifest.head_dim, threads
    )


def _greedy_pair(
    chain: ChainStepper, ref: Stepper, prompt: list[int], steps: int
) -> tuple[float, bool, list[int]]:
    """Both fed the chain's greedy tokens; returns (max |diff|, all argmax equal, chain tokens)."""
    ids = np.asarray([prompt], np.int64)
    pos = np.arange(len(prompt), dtype=np.int64)[None]
    a, b = chain.step(ids, pos), ref.step(ids, pos)
    diff = float(np.abs(a - b).max())
    agree = True
    toks: list[int] = []
    for i in range(steps):
        ta, tb = int(np.argmax(a[0, -1])), int(np.argmax(b[0, -1]))
        agree &= ta == tb
        toks.append(ta)
        step_ids = np.asarray([[ta]], np.int64)
        step_pos = np.asarray([[len(prompt) + i]], np.int64)
        a, b = chain.step(step_ids, step_pos), ref.step(step_ids, step_pos)
        diff = max(diff, float(np.abs(a - b).max()))
    return diff, agree, toks


def _batch_pair(
    chain: ChainStepper, ref: Stepper, prompts: list[list[int]], pad: int, steps: int = 4
) -> tuple[float, bool]:
    ids, mask = left_pad(prompts, pad)
    pos = positions_for(mask)
    a, b = chain.step(ids, pos, mask), ref.step(ids, pos, mask)
    real = mask.astype(bool)
    diff = float(np.abs(a - b)[real].max())
    agree = True
    lengths = mask.sum(axis=1)
    for i in range(steps):
        ta, tb = a[:, -1].argmax(-1), b[:, -1].argmax(-1)
        agree &= bool((ta == tb).all())
        step_pos = (lengths + i)[:, None].astype(np.int64)
        a, b = chain.step(ta[:, None], step_pos), ref.step(ta[:, None], step_pos)
        diff = max(diff, float(np.abs(a - b).max()))
    return diff, agree


def greedy(stepper: Stepper, prompt: list[int], steps: int) -> list[int]:
    logits = stepper.step(np.asarray([prompt], np.int64), np.arange(len(prompt), dtype=np.int64)[None])
    out = []
    for i in range(steps):
        tok = int(np.argmax(logits[0, -1]))
        out.append(tok)
        logits = stepper.step(np.asarray([[tok]], np.int64), np.asarray([[len(prompt) + i]], np.int64))
    return out


def perplexity(stepper: Stepper, ids: list[int]) -> float:
    logits = stepper.step(np.asarray([ids], np.int64), np.arange(len(ids), dtype=np.int64)[None])[0, :-1]
    logits = logits - logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    return float(np.exp(nll))


def verify(
    shard_dir: Path, steps: int = 16, threads: int | None = None, reference: str = "auto"
) -> dict[str, object]:
    from llnode.model.shardset import sha256_file

    manifest = load_manifest(shard_dir)
    for m in manifest.modules:
        path = shard_dir / m.file
        if not path.is_file():
            raise ManifestError(f"{path} is missing")
        if path.stat().st_size != m.size_bytes or sha256_file(path) != m.sha256:
            raise ManifestError(f"{path} does not match the manifest's size/sha256 (corrupted?)")
    tok = load_tokenizer(shard_dir, manifest.tokenizer_file)
    desc, make_ref = reference_factory(manifest, shard_dir, reference, threads)
    runner = ModuleRunner(shard_dir, manifest, threads=threads)
    chain = ChainStepper(runner)
    prompt = tok.encode(PROMPT)
    result: dict[str, object] = {"precision": manifest.precision, "reference": desc}
    if manifest.precision == "fp32":
        d1, g1, toks = _greedy_pair(chain, make_ref(), prompt, steps)  # type: ignore[operator]
        chain.reset()
        pad = manifest.pad_token_id if manifest.pad_token_id is not None else 0
        d2, g2 = _batch_pair(chain, make_ref(), [tok.encode(p) for p in BATCH_PROMPTS], pad)  # type: ignore[operator]
        chain.reset()
        diff = max(d1, d2)
        result.update(
            max_abs_diff=diff,
            greedy_match=g1 and g2,
            text=tok.decode(toks),
            ok=diff <= FP32_TOLERANCE and g1 and g2,
        )
    else:
        ref_toks = greedy(make_ref(), prompt, steps)  # type: ignore[operator]
        ours = greedy(chain, prompt, steps)
        chain.reset()
        text_ids = tok.encode(PPL_TEXT)
        ppl_ref = perplexity(make_ref(), text_ids)  # type: ignore[operator]
        ppl = perplexity(chain, text_ids)
        chain.reset()
        agree = sum(a == b for a, b in zip(ours, ref_toks, strict=True)) / max(1, steps)
        result.update(
            greedy_agreement=agree,
            greedy_match=ours == ref_toks,
            perplexity=ppl,
            perplexity_reference=ppl_ref,
            ppl_ratio=ppl / ppl_ref,
            text=tok.decode(ours),
            ok=ppl / ppl_ref <= PPL_RATIO_LIMIT,
        )
    return result


def run(args: argparse.Namespace) -> int:
    from llnode.model.tokenizer import TokenizerError

    try:
        r = verify(args.dir, args.steps, args.threads, args.reference)
    except (ManifestError, FileNotFoundError, TokenizerError) as exc:
        print(f"llnode verify: {exc}", file=sys.stderr)
        return 1
    print(f"reference: {r['reference']}; precision {r['precision']}")
    if r["precision"] == "fp32":
        print(f"max abs logit diff: {r['max_abs_diff']:.3g} (limit {FP32_TOLERANCE:g})")
        print(f"greedy tokens agree: {r['greedy_match']}")
    else:
        print(f"greedy agreement with fp32: {r['greedy_agreement']:.0%}")
        print(
            f"perplexity: {r['perplexity']:.3f} vs fp32 {r['perplexity_reference']:.3f} "
            f"(ratio {r['ppl_ratio']:.3f}, limit {PPL_RATIO_LIMIT})"
        )
    print(f"greedy text: {r['text']!r}")
    print("PASS" if r["ok"] else "FAIL")
    if args.json:
        print(json.dumps(r))
    return 0 if r["ok"] else 1
