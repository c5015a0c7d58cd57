"""``llnode bench modules``: what cutting the model into per-layer modules costs, measured side by side.

On SmolLM2-135M (32 modules) in one process, greedy decode ms/token of, against one whole-model
onnxruntime session holding the very same module graphs merged (``model.merge``):
  * ``chained``: a ModuleRunner over all 32 modules as daemons run it (fused blocks; target <= 1.05);
  * ``per_module``: one session per module (``LLNODE_FUSE=0``, what runners did before fusion);
  * ``cut2`` / ``cut3``: the 32 modules as 2 / 3 runners one after the other in one process, i.e. what
    the sessions of a 2- / 3-stage pipeline cost without the network;
the int8 and int4 shard sets vs fp32, decode cost at growing context (the KV format never copies the
past), and in fresh processes the build time and RSS of a runner loading all modules, fused vs not, and
of a plan switch reusing a runner's sessions.
Rounds alternate between the contenders and the median is reported. Needs the [export] extra the first
time (to build the shard sets and the whole-model graph; all cached afterwards).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from llnode.model.manifest import Manifest
from llnode.model.reference import ChainStepper, Stepper, WholeOnnx
from llnode.model.runner import ModuleRunner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-quant", action="store_true", help="skip the int8/int4 shard sets")
    parser.add_argument("--no-load", action="store_true", help="skip the build time / RSS figures")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")


def _shards(spec: str, precision: str) -> Path:
    from llnode.model.prepare import ensure_prepared

    return ensure_prepared(spec, precision)


class RangesStepper:
    """The model as consecutive runners (what the stages of a pipeline hold), stepped one after another."""

    def __init__(self, runners: list[ModuleRunner], session_id: str = "bench") -> None:
        self.runners, self.sid = runners, session_id

    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        x = ids
        for r in self.runners:
            x = r.step(self.sid, x, positions, mask)
        return x

    def reset(self) -> None:
        for r in self.runners:
            r.free(self.sid)


def _cut(shard_dir: Path, manifest: Manifest, parts: int, threads: int | None) -> RangesStepper:
    n = manifest.num_modules
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return RangesStepper(
        [ModuleRunner(shard_dir, manifest, a, z, threads=threads) for a, z in pairwise(bounds)]
    )


_LOAD_SCRIPT = """
import json, sys, time
from llnode.model.runner import ModuleRunner
from llnode.process import rss_bytes
shards, fuse, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
t = time.perf_counter(); c = time.process_time()
r = ModuleRunner(shards, fuse=fuse or None, threads=threads)
out = {"build_s": time.perf_counter() - t, "build_cpu_s": time.process_time() - c,
       "rss_mib": rss_bytes() / 2**20, "peak_rss_mib": rss_bytes(peak=True) / 2**20, "units": len(r.units())}
n = r.manifest.num_modules
half = ModuleRunner(shards, start=0, end=n // 2, fuse=fuse or None, threads=threads)
for name, a, z in (("switch_aligned", 8, n // 2 + 8), ("switch_unaligned", 4, n // 2 + 4)):
    c = time.process_time()
    new = ModuleRunner(shards, start=a, end=z, fuse=fuse or None, threads=threads, reuse=half)
    out[name] = {"range": [a, z], "built": new.built, "cpu_s": time.process_time() - c}
print(json.dumps(out))
"""


def load_figures(shard_dir: Path, fuse: int, threads: int | None) -> dict[str, Any]:
    """Build time and RSS of a runner over every module in a fresh process (RSS means nothing in a
    process holding the other contenders), and the cost of switching from modules [0, n/2) to a range
    shifted by one block (8) and by half a block (4), reusing the first runner's sessions."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _LOAD_SCRIPT, str(shard_dir), str(fuse), str(threads or 0)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def decode_run(
    stepper: Stepper, prompt: list[int], steps: int, reset: object
) -> tuple[float, float, list[int], list[np.ndarray]]:
    """Prefill then ``steps`` greedy decode steps; returns (ms/token, process CPU ms/token, tokens, logits
    of each step). CPU time is what a loaded machine cannot blur at 1 thread (no pool threads spin)."""
    logits = stepper.step(np.asarray([prompt], np.int64), np.arange(len(prompt), dtype=np.int64)[None])
    toks: list[int] = []
    seen = [logits[0, -1].copy()]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        tok = int(np.argmax(logits[0, -1]))
        toks.append(tok)
        logits = stepper.step(np.asarray([[tok]], np.int64), np.asarray([[len(prompt) + i]], np.int64))
        seen.append(logits[0, -1].copy())
    ms = (time.perf_counter() - t0) * 1000 / steps
    cpu_ms = (time.process_time() - c0) * 1000 / steps
    reset()  # type: ignore[operator]
    return ms, cpu_ms, toks, seen


def run(args: argparse.Namespace) -> int:
    from llnode.model.manifest import load_manifest
    from llnode.model.merge import cached_merge

    fp32 = _shards(args.model, "fp32")
    manifest = load_manifest(fp32)
    whole_path = cached_merge(fp32, manifest)  # the same module graphs in one session: only the cuts differ
    chain = ChainStepper(ModuleRunner(fp32, manifest, threads=args.threads))
    whole = WholeOnnx(whole_path, manifest.num_layers, manifest.num_kv_heads, manifest.head_dim, args.threads)
    per_module = ChainStepper(ModuleRunner(fp32, manifest, threads=args.threads, fuse=1))
    cut2, cut3 = _cut(fp32, manifest, 2, args.threads), _cut(fp32, manifest, 3, args.threads)
    contenders: dict[str, tuple[Stepper, object]] = {
        "chained_fp32": (chain, chain.reset),
        "whole_fp32": (whole, whole.reset),
        "per_module_fp32": (per_module, per_module.reset),
        "cut2_fp32": (cut2, cut2.reset),
        "cut3_fp32": (cut3, cut3.reset),
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
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    tokens: dict[str, list[int]] = {}
    logits: dict[str, list[np.ndarray]] = {}
    for s, reset in contenders.values():  # warm-up
        decode_run(s, prompt, 4, reset)
    for _ in range(args.rounds):
        for k, (s, reset) in contenders.items():
            ms, cpu_ms, toks, seen = decode_run(s, prompt, args.steps, reset)
            times[k].append(ms)
            cpu[k].append(cpu_ms)
            tokens[k], logits[k] = toks, seen
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    fp32_keys = ("chained_fp32", "per_module_fp32", "cut2_fp32", "cut3_fp32")
    diffs = {
        k: max(float(np.abs(a - b).max()) for a, b in zip(logits[k], logits["whole_fp32"], strict=True))
        for k in fp32_keys
    }
    diff = max(diffs.values())
    greedy = all(tokens[k] == tokens["whole_fp32"] for k in fp32_keys)
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
        rounds = ", ".join(f"{x:.2f}" for x in times[k])
        print(f"  {k:15s} {v:7.2f} ms/token, CPU {med_cpu[k]:7.2f} ms/token   (rounds: {rounds})")
    ratios = {k.removesuffix("_fp32"): med[k] / med["whole_fp32"] for k in fp32_keys}
    ratio = ratios["chained"]
    print(
        f"over the whole session: chained (runner over all modules, fused blocks of {chain.runner.block}, "
        f"{len(chain.runner.units())} sessions) {ratio:.3f} (target <= 1.05); one session per module "
        f"{ratios['per_module']:.3f}; cut in 2 runners {ratios['cut2']:.3f}; in 3 {ratios['cut3']:.3f}"
    )
    cpu_ratios = {k.removesuffix("_fp32"): med_cpu[k] / med_cpu["whole_fp32"] for k in fp32_keys}
    print("the same in process CPU time: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu_ratios.items()))
    print(
        f"max |logit diff| vs whole over {args.steps + 1} steps: "
        + ", ".join(f"{k.removesuffix('_fp32')} {v:.3g}" for k, v in diffs.items())
        + f"; greedy match: {greedy}"
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
    loads: dict[str, dict[str, Any]] = {}
    if not args.no_load:
        sets = {"fp32": fp32} if args.no_quant else {"fp32": fp32, "int4": _shards(args.model, "int4")}
        for prec, path in sets.items():
            for label, fuse in (("per_module", 1), ("fused", 0)):
                loads[f"{label}_{prec}"] = fig = load_figures(path, fuse, args.threads)
                sw = ", ".join(
                    f"{fig[k]['range']}: {fig[k]['built']} built, {fig[k]['cpu_s']:.2f} s CPU"
                    for k in ("switch_aligned", "switch_unaligned")
                )
                print(
                    f"load {label:10s} {prec}: build {fig['build_s']:.2f} s "
                    f"({fig['build_cpu_s']:.2f} s CPU), {fig['units']} sessions, RSS {fig['rss_mib']:.0f} "
                    f"MiB (peak {fig['peak_rss_mib']:.0f}); switch [0,{manifest.num_modules // 2}) -> {sw}"
                )
    if args.json:
        print(
            json.dumps(
                {
                    "chained_over_whole": round(ratio, 4),
                    "per_module_over_whole": round(ratios["per_module"], 4),
                    "cut2_over_whole": round(ratios["cut2"], 4),
                    "cut3_over_whole": round(ratios["cut3"], 4),
                    "cpu_over_whole": {k: round(v, 4) for k, v in cpu_ratios.items()},
                    "decode_cpu_ms": {k: round(v, 3) for k, v in med_cpu.items()},
                    "max_abs_diff_by_contender": diffs,
                    "fuse_block": chain.runner.block,
                    "load": loads,
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
