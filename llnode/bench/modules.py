"""``llnode bench modules``: what cutting the model into per-layer modules costs, measured side by side.

On SmolLM2-135M (32 modules) in one process: greedy decode ms/token of the chained modules vs one
whole-model onnxruntime session holding the very same module graphs merged (``model.merge``) (target
ratio <= 1.05), the int8 and int4 shard sets vs fp32, and decode cost at growing context (the KV format
never copies the past).
Rounds alternate between the contenders and the median is reported. Needs the [export] extra the first
time (to build the shard sets and the whole-model graph; all cached afterwards).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from llnode.model.reference import ChainStepper, Stepper, WholeOnnx
from llnode.model.runner import ModuleRunner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-quant", action="store_true", help="skip the int8/int4 shard sets")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")


def _shards(spec: str, precision: str) -> Path:
    from llnode.model.prepare import ensure_prepared

    return ensure_prepared(spec, precision)


def decode_run(
    stepper: Stepper, prompt: list[int], steps: int, reset: object
) -> tuple[float, list[int], list[np.ndarray]]:
    """Prefill then ``steps`` greedy decode steps; returns (ms/token, tokens, logits of each step)."""
    logits = stepper.step(np.asarray([prompt], np.int64), np.arange(len(prompt), dtype=np.int64)[None])
    toks: list[int] = []
    seen = [logits[0, -1].copy()]
    t0 = time.perf_counter()
    for i in range(steps):
        tok = int(np.argmax(logits[0, -1]))
        toks.append(tok)
        logits = stepper.step(np.asarray([[tok]], np.int64), np.asarray([[len(prompt) + i]], np.int64))
        seen.append(logits[0, -1].copy())
    ms = (time.perf_counter() - t0) * 1000 / steps
    reset()  # type: ignore[operator]
    return ms, toks, seen


def run(args: argparse.Namespace) -> int:
    from llnode.model.manifest import load_manifest
    from llnode.model.merge import cached_merge

    fp32 = _shards(args.model, "fp32")
    manifest = load_manifest(fp32)
    whole_path = cached_merge(fp32, manifest)  # the same module graphs in one session: only the cuts differ
    chain = ChainStepper(ModuleRunner(fp32, manifest, threads=args.threads))
    whole = WholeOnnx(whole_path, manifest.num_layers, manifest.num_kv_heads, manifest.head_dim, args.threads)
    contenders: dict[str, tuple[Stepper, object]] = {
        "chained_fp32": (chain, chain.reset),
        "whole_fp32": (whole, whole.reset),
    }
    if not args.no_quant:
        for prec in ("int8", "int4"):
            c = ChainStepper(ModuleRunner(_shards(args.model, prec), threads=args.threads))
            contenders[f"chained_{prec}"] = (c, c.reset)
    from llnode.model.tokenizer import load_tokenizer
    from llnode.model.verify import PPL_TEXT

    rng = np.random.default_rng(0)
    text_ids = load_tokenizer(fp32).encode(PPL_TEXT)
    prompt = (text_ids * (1 + args.prompt // max(1, len(text_ids))))[: args.prompt]
    times: dict[str, list[float]] = {k: [] for k in contenders}
    tokens: dict[str, list[int]] = {}
    logits: dict[str, list[np.ndarray]] = {}
    for s, reset in contenders.values():  # warm-up
        decode_run(s, prompt, 4, reset)
    for _ in range(args.rounds):
        for k, (s, reset) in contenders.items():
            ms, toks, seen = decode_run(s, prompt, args.steps, reset)
            times[k].append(ms)
            tokens[k], logits[k] = toks, seen
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(
        float(np.abs(a - b).max()) for a, b in zip(logits["chained_fp32"], logits["whole_fp32"], strict=True)
    )
    greedy = tokens["chained_fp32"] == tokens["whole_fp32"]
    # Decode cost against context: one step at growing past lengths (chained fp32).
    ctx_ms: dict[int, float] = {}
    for ctx in (32, 256, 1024):
        if ctx + 8 > manifest.max_context:
            continue
        ids = np.asarray([[int(x) for x in rng.integers(100, 1000, ctx)]], np.int64)
        chain.step(ids, np.arange(ctx, dtype=np.int64)[None])
        t0 = time.perf_counter()
        for i in range(16):
            chain.step(np.asarray([[100 + i]], np.int64), np.asarray([[ctx + i]], np.int64))
        ctx_ms[ctx] = (time.perf_counter() - t0) * 1000 / 16
        chain.reset()
    from llnode.model.runner import pool_info

    mode, threads = pool_info()
    print(
        f"model {manifest.name}: {manifest.num_modules} modules, prompt {args.prompt}, "
        f"{args.steps} decode steps, median of {args.rounds}, onnxruntime thread pool {mode} x{threads}"
    )
    for k, v in med.items():
        print(f"  {k:14s} {v:7.2f} ms/token   (rounds: {', '.join(f'{x:.2f}' for x in times[k])})")
    ratio = med["chained_fp32"] / med["whole_fp32"]
    print(f"chained / whole: {ratio:.3f} (target <= 1.05)")
    print(
        f"max |logit diff| chained vs whole over {args.steps + 1} steps: {diff:.3g}; greedy match: {greedy}"
    )
    for prec in ("int8", "int4"):
        k = f"chained_{prec}"
        if k in med:
            agree = sum(a == b for a, b in zip(tokens[k], tokens["chained_fp32"], strict=True)) / args.steps
            print(
                f"{prec}: {med['chained_fp32'] / med[k]:.2f}x faster than fp32, greedy agreement {agree:.0%}"
            )
    print(
        "decode ms/token vs context (chained fp32): " + ", ".join(f"{c}: {m:.2f}" for c, m in ctx_ms.items())
    )
    if args.json:
        print(
            json.dumps(
                {
                    "chained_over_whole": round(ratio, 4),
                    "max_abs_diff": diff,
                    "greedy_match": greedy,
                    "decode_ms": {k: round(v, 3) for k, v in med.items()},
                    "decode_ms_by_context": ctx_ms,
                    "threads": threads,
                    "thread_pool": mode,
                    "modules": manifest.num_modules,
                }
            )
        )
    return 0
