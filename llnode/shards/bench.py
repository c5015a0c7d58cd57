"""Shard-fetch throughput on loopback: real HTTP peers, real files, the real fetcher.

Prints MB/s for one and two source peers, the local hashing speed (which bounds verification and resume),
and with ``--json`` ends with one JSON line. Follows the CLI's command-module convention
(``add_arguments``/``run``) so it can be registered as ``llnode bench shards``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from llnode.model.manifest import Boundary, FlopsModel, Manifest, ModuleInfo, TensorSpec, save_manifest
from llnode.shards.fetch import ShardFetcher
from llnode.shards.http import HttpShardTransport, add_routes
from llnode.shards.serve import DEFAULT_CHUNK, ShardServer
from llnode.shards.store import ShardStore, sha256_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=int, default=160, help="total shard-set size in MB (default 160)")
    parser.add_argument("--modules", type=int, default=8, help="number of module files (default 8)")
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK >> 10, help="chunk size in KiB")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of figures")


def build_random_shard_set(folder: Path, total_bytes: int, n_modules: int, name: str = "bench") -> Manifest:
    """A shard set whose modules are random bytes: distribution does not care what a module computes."""
    if n_modules < 2:
        raise ValueError("a shard set needs at least an embedding and a head module")
    folder.mkdir(parents=True, exist_ok=True)
    spec = [TensorSpec("hidden_states", "float32", ["batch", "new_tokens", 8])]
    modules = []
    for i in range(n_modules):
        kind = "embed" if i == 0 else "head" if i == n_modules - 1 else "layer"
        data = os.urandom(total_bytes // n_modules)
        file = f"module_{i:03d}.onnx"
        (folder / file).write_bytes(data)
        modules.append(ModuleInfo(
            index=i, name=f"{kind}{i}", kind=kind, file=file, sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data), param_bytes=len(data), flops=FlopsModel(1.0), kv_bytes_per_token=0,
            inputs=spec, outputs=spec, layer=i - 1 if kind == "layer" else None,
        ))
    tok = b'{"model": {}}'
    (folder / "tokenizer.json").write_bytes(tok)
    manifest = Manifest(
        name=name, architecture="llama", precision="fp32", hidden_size=8, num_layers=n_modules - 2,
        num_heads=1, num_kv_heads=1, head_dim=8, vocab_size=8, max_context=64, bos_token_id=None,
        eos_token_ids=[0], pad_token_id=None, modules=modules,
        boundaries=[Boundary(i, spec, 32) for i in range(n_modules - 1)],
        file_sha256={"tokenizer.json": hashlib.sha256(tok).hexdigest()},
    )
    save_manifest(manifest, folder)
    return manifest


async def _serve(server: ShardServer) -> tuple[web.AppRunner, str]:
    app = web.Application()
    add_routes(app, server)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _measure(root: Path, total: int, n_modules: int, chunk: int) -> dict[str, Any]:
    build_random_shard_set(root / "src" / "bench", total, n_modules)
    src = ShardStore(root / "src")
    # Two peers holding the same files (the second a copy) so that spreading can be measured.
    (root / "src2").mkdir()
    os.symlink(root / "src" / "bench", root / "src2" / "bench")
    peers = [ShardServer(src, chunk), ShardServer(ShardStore(root / "src2"), chunk)]
    runners, urls = [], {}
    for i, server in enumerate(peers):
        runner, url = await _serve(server)
        runners.append(runner)
        urls[f"p{i}"] = url
    transport = HttpShardTransport(urls)
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        sha256_file(src.path("bench", "module_000.onnx"))
        out["hash_mb_s"] = round(total / n_modules / 1e6 / (time.perf_counter() - t0), 1)
        runs = (("cold_1peer", ["p0"]), ("warm_1peer", ["p0"]), ("warm_2peers", ["p0", "p1"]))
        for label, peer_ids in runs:
            if label.startswith("warm"):  # "warm": the peers' chunk indexes are already computed
                for server in peers:
                    for m in src.manifest("bench").modules:
                        await server.index_async("bench", m.file)
            dest = ShardStore(root / f"dst-{label}")
            fetcher = ShardFetcher(dest, transport)
            t0 = time.perf_counter()
            await fetcher.ensure("bench", None, peer_ids)
            dt = time.perf_counter() - t0
            out[f"fetch_mb_s_{label}"] = round(fetcher.bytes_received / 1e6 / dt, 1)
            print(f"{label:>12}: {fetcher.bytes_received / 1e6:7.1f} MB in {dt:6.2f} s = "
                  f"{fetcher.bytes_received / 1e6 / dt:7.1f} MB/s")
        print(f"{'hash':>12}: {out['hash_mb_s']:7.1f} MB/s (sha256, one core)")
    finally:
        await transport.close()
        for r in runners:
            await r.cleanup()
    return out


def run(args: argparse.Namespace) -> int:
    if args.mb <= 0 or args.modules < 2 or not 64 <= args.chunk_kib <= 4096:
        print("error: --mb must be > 0, --modules >= 2, --chunk-kib within [64, 4096]")
        return 2
    with tempfile.TemporaryDirectory(prefix="llnode-shards-bench-") as tmp:
        figures = asyncio.run(_measure(Path(tmp), args.mb * 1_000_000, args.modules, args.chunk_kib << 10))
    figures.update({"mb": args.mb, "modules": args.modules, "chunk_kib": args.chunk_kib})
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
