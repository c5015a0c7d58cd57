"""``llnode bench links``: what a peer link carries between two processes on loopback.

A responder process runs a ``Links`` endpoint (the same code the daemon uses, key from a fresh random
cluster key); this process dials it and measures, with encryption on and off (off exists only for this
measurement: the cost of ChaCha20-Poly1305):

- frames/s and MB/s streaming pipeline-sized frames ([1,1,576] float32 hidden state per token),
- MB/s streaming large frames (1 MiB tensors: a prefill of ~450 tokens),
- round-trip ms of one hidden state sent and echoed back (request/response).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from llnode.net.codec import decode_tensor
from llnode.net.links import Links


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--frames", type=int, default=20000, help="small frames per streaming run")
    parser.add_argument("--round-trips", type=int, default=2000, help="request/response round trips")
    parser.add_argument("--large", type=int, default=200, help="1 MiB frames per large-frame run")


class _Responder:
    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0

    async def on_stream(self, peer: str, payload: Any) -> None:
        h = decode_tensor(payload["h"])
        self.count += 1
        self.bytes += h.nbytes

    async def on_count(self, peer: str, payload: Any) -> Any:
        return {"count": self.count, "bytes": self.bytes}

    async def on_echo(self, peer: str, payload: Any) -> Any:
        return payload


async def _serve(key: bytes, encrypt: bool) -> None:
    links = Links("responder", key, host="127.0.0.1", port=0, encrypt=encrypt)
    r = _Responder()
    links.on("bench.stream", r.on_stream, inline=True)
    links.on("bench.count", r.on_count, inline=True)
    links.on("bench.echo", r.on_echo, inline=True)
    await links.start()
    print(links.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await links.stop()


async def _measure(port: int, key: bytes, encrypt: bool, args: argparse.Namespace) -> dict[str, float]:
    links = Links("bencher", key, host="127.0.0.1", port=0, encrypt=encrypt)
    await links.start()
    peer = await links.connect("127.0.0.1", port)
    hidden = np.random.default_rng(0).standard_normal((1, 1, 576)).astype(np.float32)

    async def stream(payload_array: np.ndarray, n: int) -> tuple[float, int]:
        base = (await links.request(peer, "bench.count", None))["count"]
        before = links.stats()[peer]["bytes_out"]
        t0 = time.perf_counter()
        for i in range(n):
            await links.send(peer, "bench.stream", {"h": payload_array, "i": i})
        # inline handlers run in arrival order: this reply comes after every streamed frame was decoded
        done = (await links.request(peer, "bench.count", None, timeout=120))["count"]
        if done != base + n:
            raise RuntimeError(f"responder decoded {done - base} of {n} frames")
        elapsed = time.perf_counter() - t0
        return elapsed, links.stats()[peer]["bytes_out"] - before

    await stream(hidden, 1000)  # warm-up
    elapsed, wire = await stream(hidden, args.frames)
    large = np.random.default_rng(1).standard_normal((1, 455, 576)).astype(np.float32)  # ~1 MiB
    l_elapsed, l_wire = await stream(large, args.large)
    for _ in range(200):
        await links.request(peer, "bench.echo", {"h": hidden})
    rtts = []
    for _ in range(args.round_trips):
        t0 = time.perf_counter()
        await links.request(peer, "bench.echo", {"h": hidden})
        rtts.append(time.perf_counter() - t0)
    await links.stop()
    return {
        "frames_per_s": args.frames / elapsed,
        "small_mb_per_s": wire / elapsed / 1e6,
        "large_mb_per_s": l_wire / l_elapsed / 1e6,
        "rtt_ms_mean": float(np.mean(rtts) * 1e3),
        "rtt_ms_p50": float(np.percentile(rtts, 50) * 1e3),
        "rtt_ms_p99": float(np.percentile(rtts, 99) * 1e3),
        "frame_bytes": wire / args.frames,
    }


def _run_mode(encrypt: bool, args: argparse.Namespace) -> dict[str, float]:
    key = os.urandom(32)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llnode.bench.links", "--serve", key.hex(), "1" if encrypt else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        return asyncio.run(_measure(port, key, encrypt, args))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    for mode, encrypt in (("encrypted", True), ("plain", False)):
        r = _run_mode(encrypt, args)
        results[mode] = {k: round(v, 4) for k, v in r.items()}
        print(
            f"{mode:9s}: {r['frames_per_s']:9.0f} frames/s ({r['frame_bytes']:.0f} B, "
            f"{r['small_mb_per_s']:6.1f} MB/s)  large frames {r['large_mb_per_s']:7.1f} MB/s  "
            f"round trip {r['rtt_ms_mean']:.3f} ms (p50 {r['rtt_ms_p50']:.3f}, p99 {r['rtt_ms_p99']:.3f})"
        )
    enc, plain = results["encrypted"], results["plain"]
    results["encryption_cost"] = {
        "frames_per_s_ratio": round(enc["frames_per_s"] / plain["frames_per_s"], 3),
        "large_mb_per_s_ratio": round(enc["large_mb_per_s"] / plain["large_mb_per_s"], 3),
        "rtt_extra_ms": round(enc["rtt_ms_mean"] - plain["rtt_ms_mean"], 4),
    }
    c = results["encryption_cost"]
    print(
        f"encryption keeps {c['frames_per_s_ratio']:.0%} of the small-frame rate and "
        f"{c['large_mb_per_s_ratio']:.0%} of large-frame MB/s; "
        f"+{c['rtt_extra_ms'] * 1000:.0f} us per round trip"
    )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        asyncio.run(_serve(bytes.fromhex(sys.argv[2]), sys.argv[3] == "1"))
    else:
        raise SystemExit("usage: llnode bench links [--json]")
