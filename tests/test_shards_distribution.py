"""Shard distribution over a real transport: aiohttp servers on loopback serving real files from real stores.

The shard set is fake in content (random bytes) but real in form: a manifest built through the Manifest
dataclasses with correct sha256s and sizes, so every check the fetcher does is the one it does in
production. Misbehaving peers are real servers whose ShardServer serves wrong bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llnode.model.manifest import (
    MANIFEST_FILE,
    Boundary,
    FlopsModel,
    Manifest,
    ModuleInfo,
    TensorSpec,
    save_manifest,
)
from llnode.shards import (
    ShardError,
    ShardFetcher,
    ShardFetchError,
    ShardServeError,
    ShardServer,
    ShardStore,
    compact_ranges,
    expand_ranges,
    peers_holding,
)
from llnode.shards.http import HttpShardTransport, add_routes
from llnode.shards.rpc import RpcShardTransport, handle_shard_request
from llnode.shards.serve import MIN_CHUNK
from llnode.shards.store import part_path, sidecar_path, support_files

MODEL = "fake-135m"
CHUNK = MIN_CHUNK  # 64 KiB chunks: small files still span many chunks
# embed, 4 layers, head; odd sizes so the last chunk is short, one exact multiple of the chunk size
SIZES = [300_001, 200_000, 5 * CHUNK, 150_123, 410_000, 90_000]


# ---------------------------------------------------------------------------- building a shard set
def _hidden(n: int) -> list[TensorSpec]:
    return [TensorSpec("hidden_states", "float32", ["batch", "new_tokens", n])]


def build_shard_set(root: Path, name: str = MODEL, seed: int = 0) -> Manifest:
    """Random module files plus tokenizer and chat template, with a valid manifest describing them."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    modules = []
    for i, size in enumerate(SIZES):
        kind = "embed" if i == 0 else "head" if i == len(SIZES) - 1 else "layer"
        file = f"modules/{i:02d}_{kind}.onnx"
        data = rng.randbytes(size)
        (folder / file).parent.mkdir(exist_ok=True)
        (folder / file).write_bytes(data)
        modules.append(
            ModuleInfo(
                index=i, name=f"{kind}{i}", kind=kind, file=file, sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=size, param_bytes=size, flops=FlopsModel(1e6, 10.0), kv_bytes_per_token=0,
                inputs=_hidden(64), outputs=_hidden(64), layer=i - 1 if kind == "layer" else None,
            )
        )
    tokenizer = json.dumps({"model": {"vocab": {f"t{i}": i for i in range(5000)}}}).encode()
    template = b"{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    (folder / "tokenizer.json").write_bytes(tokenizer)
    (folder / "chat_template.jinja").write_bytes(template)
    manifest = Manifest(
        name=name, architecture="llama", precision="int8", hidden_size=64, num_layers=len(SIZES) - 2,
        num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=5000, max_context=512, bos_token_id=1,
        eos_token_ids=[2], pad_token_id=None, modules=modules,
        boundaries=[
            Boundary(after=i, tensors=_hidden(64), bytes_per_token=256) for i in range(len(SIZES) - 1)
        ],
        chat_template="chat_template.jinja",
        file_sha256={
            "tokenizer.json": hashlib.sha256(tokenizer).hexdigest(),
            "chat_template.jinja": hashlib.sha256(template).hexdigest(),
        },
    )
    save_manifest(manifest, folder)
    return manifest


# ---------------------------------------------------------------------------- real peers over loopback
class CountingServer(ShardServer):
    """A ShardServer that also counts bytes served per file (what the resume test measures)."""

    def __init__(self, store: ShardStore) -> None:
        super().__init__(store, chunk_size=CHUNK)
        self.served: Counter[str] = Counter()

    def read_chunk(self, model: str, file: str, offset: int, length: int) -> bytes:
        data = super().read_chunk(model, file, offset, length)
        self.served[file] += len(data)
        return data


class CorruptingServer(CountingServer):
    """Flips a byte in one chunk of one file, the first ``times`` times it is asked for it."""

    def __init__(self, store: ShardStore, file: str, chunk: int, times: int) -> None:
        super().__init__(store)
        self.target, self.chunk, self.times = file, chunk, times
        self.corrupted = 0

    def read_chunk(self, model: str, file: str, offset: int, length: int) -> bytes:
        data = super().read_chunk(model, file, offset, length)
        if file == self.target and offset == self.chunk * CHUNK and self.corrupted < self.times:
            self.corrupted += 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


class LyingServer(CountingServer):
    """Holds a wrong version of one file and claims the manifest's sha for it: index and data agree."""

    def __init__(self, store: ShardStore, file: str) -> None:
        super().__init__(store)
        self.target = file

    def _resolve(self, model: str, file: str) -> Path:
        if file == self.target:
            return self.store.path(model, file)
        return super()._resolve(model, file)

    def file_index(self, model: str, file: str, chunk_size: int | None = None) -> dict[str, Any]:
        if file != self.target:
            return super().file_index(model, file, chunk_size)
        path = self._resolve(model, file)
        data = path.read_bytes()
        hashes = [hashlib.sha256(data[o : o + CHUNK]).hexdigest() for o in range(0, len(data), CHUNK)]
        return {"file": file, "size": len(data), "sha256": self.store.expected_sha256(model, file),
                "chunk_size": CHUNK, "chunk_sha256": hashes}


class StallingServer(CountingServer):
    """Answers the index but no read until released (a stuck peer)."""

    def __init__(self, store: ShardStore) -> None:
        super().__init__(store)
        self.released = asyncio.Event()

    async def read_async(self, model: str, file: str, offset: int, length: int) -> bytes:
        await asyncio.wait_for(self.released.wait(), 30)
        return b""


class Cluster:
    """Peers as real aiohttp servers on 127.0.0.1, and an HTTP transport that knows their URLs."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.servers: dict[str, CountingServer] = {}
        self.runners: list[web.AppRunner] = []
        self.transport = HttpShardTransport(self.urls)

    async def add(self, peer: str, server: CountingServer) -> None:
        app = web.Application()
        add_routes(app, server)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.urls[peer] = f"http://127.0.0.1:{port}"
        self.servers[peer] = server
        self.runners.append(runner)

    def served(self, file: str | None = None) -> int:
        return sum(s.served[file] if file else sum(s.served.values()) for s in self.servers.values())

    async def close(self) -> None:
        await self.transport.close()
        for r in self.runners:
            await r.cleanup()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    yield c
    await c.close()


@pytest.fixture
def source(tmp_path: Path) -> tuple[ShardStore, Manifest]:
    manifest = build_shard_set(tmp_path / "peer-a")
    return ShardStore(tmp_path / "peer-a"), manifest


def _copy_store(src: ShardStore, dst: Path) -> ShardStore:
    for path in src.root.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            target = dst / path.relative_to(src.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return ShardStore(dst)


def _files_equal(a: ShardStore, b: ShardStore, files: list[str]) -> bool:
    return all(a.path(MODEL, f).read_bytes() == b.path(MODEL, f).read_bytes() for f in files)


# ---------------------------------------------------------------------------- store
def test_inventory_and_missing_files(source: tuple[ShardStore, Manifest], tmp_path: Path) -> None:
    store, manifest = source
    assert support_files(manifest) == [MANIFEST_FILE, "tokenizer.json", "chat_template.jinja"]
    inv = store.inventory()
    assert inv[MODEL]["modules"] == [[0, len(SIZES)]]
    assert inv[MODEL]["precision"] == "int8" and inv[MODEL]["complete"] is True
    manifest_bytes = store.path(MODEL, MANIFEST_FILE).read_bytes()
    assert inv[MODEL]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert store.missing_files(MODEL, (0, 3)) == []

    # Corrupt module 2 in place (same size): it must vanish from the inventory and become missing.
    path = store.path(MODEL, manifest.modules[2].file)
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    assert store.verified_modules(MODEL) == [0, 1, 3, 4, 5]
    assert store.inventory()[MODEL]["modules"] == [[0, 2], [3, 6]]
    assert store.missing_files(MODEL, (1, 4)) == [manifest.modules[2].file]
    assert store.missing_files(MODEL, range(3, 6)) == []
    (store.model_dir(MODEL) / "tokenizer.json").unlink()
    assert store.missing_files(MODEL, (3, 4)) == ["tokenizer.json"]
    assert store.inventory()[MODEL]["complete"] is False
    with pytest.raises(ShardError, match="outside"):
        store.missing_files(MODEL, (2, 99))
    assert ShardStore(tmp_path / "empty").missing_files("other", (0, 1)) == [MANIFEST_FILE]


def test_hash_cache_survives_restart(source: tuple[ShardStore, Manifest]) -> None:
    store, _ = source
    hashed: list[str] = []
    first = ShardStore(store.root, on_hash_progress=lambda name, done, total: hashed.append(name))
    assert first.verified_modules(MODEL) == list(range(len(SIZES)))
    assert len(set(hashed)) == len(SIZES)
    hashed.clear()
    again = ShardStore(store.root, on_hash_progress=lambda name, done, total: hashed.append(name))
    assert again.verified_modules(MODEL) == list(range(len(SIZES)))
    assert hashed == []  # nothing rehashed after a "restart"
    # Touching a file (new mtime) invalidates its entry only.
    p = again.path(MODEL, again.manifest(MODEL).modules[4].file)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 1_000_000))
    assert again.verified_modules(MODEL) == list(range(len(SIZES)))
    assert {h.rsplit("/", 1)[-1] for h in hashed} == {p.name}


def test_prune_keeps_only_the_keep_set(source: tuple[ShardStore, Manifest]) -> None:
    store, manifest = source
    removed = store.prune(MODEL, keep={1, 2})
    assert removed == [m.file for m in manifest.modules if m.index not in (1, 2)]
    assert store.verified_modules(MODEL) == [1, 2]
    assert store.path(MODEL, "tokenizer.json").is_file() and store.has_manifest(MODEL)


def test_compact_ranges_roundtrip() -> None:
    for _ in range(200):
        idx = sorted(random.sample(range(40), random.randint(0, 40)))
        assert expand_ranges(compact_ranges(idx)) == idx
    assert compact_ranges([5, 0, 1, 2, 7, 8]) == [[0, 3], [5, 6], [7, 9]]


# ---------------------------------------------------------------------------- serving
def test_server_rejects_traversal_and_bad_ranges(source: tuple[ShardStore, Manifest]) -> None:
    store, manifest = source
    (store.model_dir(MODEL) / "secret.txt").write_text("not part of the shard set")
    (store.root / "outside.bin").write_bytes(b"x" * 100)
    server = ShardServer(store, chunk_size=CHUNK)
    for bad in ["../outside.bin", "/etc/passwd", "modules/../secret.txt", "secret.txt", "modules",
                "modules/00_embed.onnx.part", "", "a\\..\\b", ".hashcache.json"]:
        with pytest.raises(ShardServeError) as err:
            server.read_chunk(MODEL, bad, 0, 10)
        assert err.value.code == "unknown_file", bad
    for bad_model in ["..", "../peer-a", "nope", "", "a/b"]:
        with pytest.raises(ShardServeError) as err:
            server.file_index(bad_model, MANIFEST_FILE)
        assert err.value.code == "unknown_model"
    file = manifest.modules[0].file
    with pytest.raises(ShardServeError, match="beyond the end") as err:
        server.read_chunk(MODEL, file, SIZES[0] - 5, 10)
    assert err.value.code == "out_of_range"
    with pytest.raises(ShardServeError, match="length"):
        server.read_chunk(MODEL, file, 0, 5 << 20)
    with pytest.raises(ShardServeError):
        server.read_chunk(MODEL, file, -1, 10)
    assert server.read_chunk(MODEL, file, 10, 20) == store.path(MODEL, file).read_bytes()[10:30]
    assert server.warm(MODEL) == len(SIZES) + 3  # every module, manifest, tokenizer and template
    index = server.file_index(MODEL, file)
    assert index["sha256"] == manifest.modules[0].sha256 and index["size"] == SIZES[0]
    assert len(index["chunk_sha256"]) == -(-SIZES[0] // CHUNK)
    # A module corrupted on disk is no longer served at all.
    p = store.path(MODEL, manifest.modules[3].file)
    p.write_bytes(b"\0" * SIZES[3])
    with pytest.raises(ShardServeError) as err:
        server.read_chunk(MODEL, manifest.modules[3].file, 0, 10)
    assert err.value.code == "not_verified"


async def test_http_errors_are_clear(source: tuple[ShardStore, Manifest], cluster: Cluster) -> None:
    store, _ = source
    await cluster.add("a", CountingServer(store))
    t = cluster.transport
    with pytest.raises(ShardServeError) as err:
        await t.read("a", MODEL, "../../../etc/passwd", 0, 10)
    assert err.value.code == "unknown_file"
    with pytest.raises(ShardServeError) as err:
        await t.index("a", "no-such-model", MANIFEST_FILE)
    assert err.value.code == "unknown_model"
    with pytest.raises(ShardServeError) as err:
        await t.read("a", MODEL, "tokenizer.json", 10**9, 10)
    assert err.value.code == "out_of_range"
    with pytest.raises(ShardServeError, match="no address"):
        await t.index("ghost", MODEL, MANIFEST_FILE)


# ---------------------------------------------------------------------------- fetching
async def test_full_fetch(source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path) -> None:
    store, manifest = source
    await cluster.add("a", CountingServer(store))
    local = ShardStore(tmp_path / "node-b")
    progress: dict[str, tuple[int, int]] = {}
    fetcher = ShardFetcher(local, cluster.transport,
                           on_progress=lambda m, f, done, total: progress.__setitem__(f, (done, total)))
    fetched = await fetcher.ensure(MODEL, None, ["a"], manifest_sha256=store.manifest_sha256(MODEL))
    all_files = [m.file for m in manifest.modules] + support_files(manifest)
    assert sorted(fetched) == sorted(all_files)
    assert _files_equal(store, local, all_files)
    assert local.inventory() == store.inventory()
    assert all(progress[m.file] == (m.size_bytes, m.size_bytes) for m in manifest.modules)
    assert cluster.served() == sum(store.path(MODEL, f).stat().st_size for f in all_files)
    assert not list(local.model_dir(MODEL).rglob("*.part*"))
    snap = fetcher.snapshot()
    assert snap["files"] == [] and snap["bytes_received"] == cluster.served() and not snap["failed"]
    assert await fetcher.ensure(MODEL, None, ["a"]) == []  # nothing left to do
    assert cluster.served() == snap["bytes_received"]


async def test_range_fetch_spreads_over_peers(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    await cluster.add("a", CountingServer(store))
    await cluster.add("b", CountingServer(_copy_store(store, tmp_path / "peer-b")))
    local = ShardStore(tmp_path / "node-c")
    fetcher = ShardFetcher(local, cluster.transport)
    await fetcher.ensure(MODEL, (1, 5), ["a", "b"])
    assert local.verified_modules(MODEL) == [1, 2, 3, 4]
    assert local.inventory()[MODEL]["modules"] == [[1, 5]] and local.inventory()[MODEL]["complete"]
    assert all(sum(s.served.values()) > 0 for s in cluster.servers.values())
    assert not local.path(MODEL, manifest.modules[0].file).exists()


async def test_resume_after_interruption(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    await cluster.add("a", CountingServer(store))
    big = manifest.modules[0]
    local = ShardStore(tmp_path / "node-b")
    await ShardFetcher(local, cluster.transport).ensure(MODEL, (1, 1), ["a"])  # manifest + tokenizer only
    task: asyncio.Task[list[str]] | None = None

    def stop_half_way(model: str, file: str, done: int, total: int) -> None:
        if file == big.file and done >= total // 2 and task is not None:
            task.cancel()

    fetcher = ShardFetcher(local, cluster.transport, window=1, on_progress=stop_half_way)
    task = asyncio.create_task(fetcher.ensure(MODEL, (0, 1), ["a"]))
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    path = local.path(MODEL, big.file)
    assert not path.exists() and part_path(path).exists()
    done_chunks = json.loads(sidecar_path(path).read_text())["done"]
    verified_bytes = sum(min(CHUNK, big.size_bytes - i * CHUNK) for i in done_chunks)
    assert 0 < verified_bytes < big.size_bytes
    before = cluster.servers["a"].served[big.file]

    # "Restart": fresh store and fetcher objects over the same folder.
    restarted = ShardStore(tmp_path / "node-b")
    assert restarted.missing_files(MODEL, (0, 1)) == [big.file]
    await ShardFetcher(restarted, cluster.transport).ensure(MODEL, (0, 1), ["a"])
    assert cluster.servers["a"].served[big.file] - before == big.size_bytes - verified_bytes
    assert restarted.verified_modules(MODEL) == [0]
    assert path.read_bytes() == store.path(MODEL, big.file).read_bytes()
    assert not part_path(path).exists() and not sidecar_path(path).exists()


async def test_corrupted_chunk_is_refetched(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    target = manifest.modules[2].file
    bad = CorruptingServer(store, target, chunk=3, times=1)
    await cluster.add("a", bad)
    faults: list[tuple[str, str]] = []
    local = ShardStore(tmp_path / "node-b")
    fetcher = ShardFetcher(local, cluster.transport, on_peer_fault=lambda p, r: faults.append((p, r)))
    await fetcher.ensure(MODEL, (2, 3), ["a"])
    assert bad.corrupted == 1 and local.verified_modules(MODEL) == [2]
    assert bad.served[target] == manifest.modules[2].size_bytes + CHUNK  # exactly one chunk fetched twice
    assert faults and faults[0][0] == "a" and "chunk 3" in faults[0][1]


async def test_persistently_corrupt_peer_is_abandoned_for_another(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    target = manifest.modules[1].file
    await cluster.add("bad", CorruptingServer(store, target, chunk=0, times=10**6))
    await cluster.add("good", CountingServer(_copy_store(store, tmp_path / "peer-good")))
    local = _copy_store(store, tmp_path / "node-c")
    local.prune(MODEL, keep=set())
    fetcher = ShardFetcher(local, cluster.transport, peer_strikes=3)
    await fetcher.ensure(MODEL, (1, 2), ["bad", "good"])
    assert local.verified_modules(MODEL) == [1]
    assert fetcher.peer_faults["bad"] >= 3 and "good" not in fetcher.peer_faults
    assert cluster.servers["good"].served[target] > 0


async def test_lying_peer_is_caught_by_the_manifest(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    target = manifest.modules[3]
    liar_store = _copy_store(store, tmp_path / "peer-liar")
    liar_store.path(MODEL, target.file).write_bytes(random.Random(9).randbytes(target.size_bytes))
    await cluster.add("liar", LyingServer(liar_store, target.file))
    await cluster.add("honest", CountingServer(store))
    local = ShardStore(tmp_path / "node-b")
    fetcher = ShardFetcher(local, cluster.transport)
    await fetcher.ensure(MODEL, (3, 4), ["liar", "honest"])
    assert cluster.servers["liar"].served[target.file] == target.size_bytes  # it did serve the whole lie
    assert local.verified_modules(MODEL) == [3]
    assert local.path(MODEL, target.file).read_bytes() == store.path(MODEL, target.file).read_bytes()
    assert fetcher.peer_faults["liar"] == 1 and "honest" not in fetcher.peer_faults

    # With only the liar available, the file is discarded and the error names it.
    only = ShardStore(tmp_path / "node-c")
    with pytest.raises(ShardFetchError) as err:
        await ShardFetcher(only, cluster.transport).ensure(MODEL, (3, 4), ["liar"])
    assert err.value.missing == [f"{MODEL}/{target.file}"]
    assert "manifest says" in str(err.value)
    path = only.path(MODEL, target.file)
    assert not path.exists() and not part_path(path).exists() and not sidecar_path(path).exists()


async def test_stuck_and_dead_peers_are_skipped(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, _ = source
    stuck = StallingServer(store)
    await cluster.add("stuck", stuck)
    await cluster.add("good", CountingServer(store))
    cluster.urls["dead"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    local = _copy_store(store, tmp_path / "node-b")
    local.prune(MODEL, keep=set())
    fetcher = ShardFetcher(local, cluster.transport, read_timeout=0.3, peer_strikes=1)
    await fetcher.ensure(MODEL, (4, 5), ["dead", "stuck", "good"])
    assert local.verified_modules(MODEL) == [4]
    assert {"dead", "stuck"} <= set(fetcher.peer_faults)
    stuck.released.set()


async def test_unknown_model_and_no_peers_give_clear_errors(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, _ = source
    await cluster.add("a", CountingServer(store))
    local = ShardStore(tmp_path / "node-b")
    fetcher = ShardFetcher(local, cluster.transport)
    with pytest.raises(ShardFetchError, match=r"not held by this node") as err:
        await fetcher.ensure("no-such-model", (0, 1), ["a"])
    assert err.value.missing == [f"no-such-model/{MANIFEST_FILE}"]
    with pytest.raises(ShardFetchError, match="no peer"):
        await fetcher.ensure(MODEL, (0, 1), [])
    with pytest.raises(ShardError, match="differs from the cluster"):
        await ShardFetcher(store, cluster.transport).ensure(MODEL, (0, 1), ["a"], manifest_sha256="0" * 64)
    with pytest.raises(ShardFetchError):
        await fetcher.ensure(MODEL, None, ["a"], manifest_sha256="1" * 64)  # peer's manifest isn't that one
    assert not local.has_manifest(MODEL)


async def test_malicious_manifest_cannot_escape_the_store(cluster: Cluster, tmp_path: Path) -> None:
    """A peer's manifest naming ``../../x`` must be refused before any file is written."""
    peer = tmp_path / "evil"
    manifest = build_shard_set(peer)
    evil = replace(manifest, modules=[replace(manifest.modules[0], file="../../escaped.onnx"),
                                      *manifest.modules[1:]])
    raw = json.dumps(evil.to_dict()).encode()

    async def index(request: web.Request) -> web.Response:
        hashes = [hashlib.sha256(raw[o : o + CHUNK]).hexdigest() for o in range(0, len(raw), CHUNK)]
        return web.json_response({"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                                  "chunk_size": CHUNK, "chunk_sha256": hashes})

    async def read(request: web.Request) -> web.Response:
        off, n = int(request.query["offset"]), int(request.query["length"])
        return web.Response(body=raw[off : off + n])

    app = web.Application()
    app.router.add_get("/shards/{model}/index", index)
    app.router.add_get("/shards/{model}/read", read)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    cluster.runners.append(runner)
    cluster.urls["evil"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    local = ShardStore(tmp_path / "node" / "store")
    with pytest.raises(ShardFetchError, match="invalid"):
        await ShardFetcher(local, cluster.transport).ensure(MODEL, None, ["evil"])
    assert not local.has_manifest(MODEL)
    assert not await asyncio.to_thread(lambda: list(tmp_path.rglob("escaped.onnx")))


async def test_concurrent_ensure_downloads_once(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    await cluster.add("a", CountingServer(store))
    local = ShardStore(tmp_path / "node-b")
    fetcher = ShardFetcher(local, cluster.transport)
    sha = store.manifest_sha256(MODEL)
    results = await asyncio.gather(
        fetcher.ensure(MODEL, (0, 4), ["a"], sha),
        fetcher.ensure(MODEL, (2, 6), ["a"], sha),
        fetcher.ensure(MODEL, (0, 6), ["a"], sha),
    )
    assert local.verified_modules(MODEL) == list(range(len(SIZES)))
    served: Callable[[str], int] = cluster.servers["a"].served.__getitem__
    for f in [m.file for m in manifest.modules] + support_files(manifest):
        assert served(f) == store.path(MODEL, f).stat().st_size, f  # each byte served exactly once
    assert all(MANIFEST_FILE in r for r in results)


async def test_holder_map_asks_only_peers_that_have_the_module(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    store, manifest = source
    partial_store = _copy_store(store, tmp_path / "peer-partial")
    partial_store.prune(MODEL, keep={0, 1})
    await cluster.add("partial", CountingServer(partial_store))
    await cluster.add("full", CountingServer(store))
    local = ShardStore(tmp_path / "node-c")
    fetcher = ShardFetcher(local, cluster.transport)
    gossip = {"partial": partial_store.inventory(), "full": store.inventory(), "empty": {},
              "junk": {MODEL: {"modules": "nonsense"}}, "other": {"another-model": {"modules": [[0, 9]]}}}
    holders = peers_holding(gossip, MODEL, store.manifest_sha256(MODEL))
    assert holders == {"full": [[0, len(SIZES)]], "partial": [[0, 2]]}
    assert peers_holding(gossip, MODEL, "f" * 64) == {}
    await fetcher.ensure(MODEL, None, holders)
    assert local.verified_modules(MODEL) == list(range(len(SIZES)))
    partial = cluster.servers["partial"].served
    assert all(partial[m.file] == 0 for m in manifest.modules[2:])
    assert partial[manifest.modules[0].file] + partial[manifest.modules[1].file] > 0  # files were spread
    # A peer that simply lacks a file is not blamed for it.
    other = ShardStore(tmp_path / "node-d")
    await ShardFetcher(other, cluster.transport).ensure(MODEL, (0, 1), ["full"])
    f2 = ShardFetcher(other, cluster.transport)
    await f2.ensure(MODEL, (3, 4), ["partial", "full"])
    assert other.verified_modules(MODEL) == [0, 3] and not f2.peer_faults


# ---------------------------------------------------------------------------- the message form (rpc.py)
async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    size = int.from_bytes(await reader.readexactly(4))
    frame: dict[str, Any] = msgpack.unpackb(await reader.readexactly(size))
    return frame


class MsgpackStreamLinks:
    """A real message transport: length-prefixed msgpack maps over asyncio TCP streams on loopback."""

    def __init__(self) -> None:
        self.addrs: dict[str, tuple[str, int]] = {}
        self.servers: list[asyncio.Server] = []

    async def serve(self, peer: str, server: ShardServer) -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    request = await _read_frame(reader)
                    reply = msgpack.packb(await handle_shard_request(server, request))
                    writer.write(len(reply).to_bytes(4) + reply)
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.servers.append(srv)
        self.addrs[peer] = srv.sockets[0].getsockname()[:2]

    async def call(self, peer: str, request: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(*self.addrs[peer])
        try:
            body = msgpack.packb(request)
            writer.write(len(body).to_bytes(4) + body)
            await writer.drain()
            return await _read_frame(reader)
        finally:
            writer.close()

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()


async def test_fetch_over_message_links(source: tuple[ShardStore, Manifest], tmp_path: Path) -> None:
    store, manifest = source
    links = MsgpackStreamLinks()
    server = CorruptingServer(store, manifest.modules[4].file, chunk=1, times=1)
    await links.serve("a", server)
    try:
        transport = RpcShardTransport(links.call)
        local = ShardStore(tmp_path / "node-b")
        await ShardFetcher(local, transport).ensure(MODEL, None, ["a"], store.manifest_sha256(MODEL))
        assert local.inventory() == store.inventory() and server.corrupted == 1
        with pytest.raises(ShardServeError) as err:
            await transport.read("a", MODEL, "../manifest.json", 0, 4)
        assert err.value.code == "unknown_file"
        bad = await links.call(
            "a", {"op": "shard_read", "model": MODEL, "file": MANIFEST_FILE, "offset": "x", "length": 4}
        )
        assert bad["ok"] is False and bad["error"]["code"] == "bad_request"
        odd = await links.call("a", {"op": "rm -rf", "model": MODEL, "file": "x"})
        assert odd["error"]["code"] == "bad_request"
    finally:
        await links.close()


class ThrottledServer(CountingServer):
    """Serves each chunk after a delay, so that a fetch is still running when the test kills it."""

    def __init__(self, store: ShardStore, delay: float) -> None:
        super().__init__(store)
        self.delay = delay

    async def read_async(self, model: str, file: str, offset: int, length: int) -> bytes:
        await asyncio.sleep(self.delay)
        return await super().read_async(model, file, offset, length)


FETCH_SCRIPT = """
import asyncio, sys
from llnode.shards import ShardFetcher, ShardStore
from llnode.shards.http import HttpShardTransport

async def main() -> None:
    transport = HttpShardTransport({"a": sys.argv[2]})
    await ShardFetcher(ShardStore(sys.argv[1]), transport, window=1).ensure(sys.argv[3], (0, 1), ["a"])

asyncio.run(main())
"""


async def test_resume_after_kill_9(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    """A fetching process killed with SIGKILL mid-file: a new process resumes without re-downloading."""
    store, manifest = source
    big = manifest.modules[0]
    server = ThrottledServer(store, delay=0.15)
    await cluster.add("a", server)
    local = ShardStore(tmp_path / "node-b")
    await ShardFetcher(local, cluster.transport).ensure(MODEL, (1, 1), ["a"])
    path = local.path(MODEL, big.file)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FETCH_SCRIPT, str(local.root), cluster.urls["a"], MODEL
    )
    try:
        for _ in range(400):
            await asyncio.sleep(0.02)
            side = sidecar_path(path)
            if side.exists() and len(json.loads(side.read_text() or "{}").get("done", [])) >= 2:
                break
        proc.kill()
    finally:
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_chunks = json.loads(sidecar_path(path).read_text())["done"]
    verified_bytes = sum(min(CHUNK, big.size_bytes - i * CHUNK) for i in done_chunks)
    assert 0 < verified_bytes < big.size_bytes and not path.exists()
    await asyncio.sleep(0.4)  # let the dead client's last request finish on the server before counting
    before = server.served[big.file]
    server.delay = 0.0
    restarted = ShardStore(tmp_path / "node-b")
    await ShardFetcher(restarted, cluster.transport).ensure(MODEL, (0, 1), ["a"])
    assert server.served[big.file] - before == big.size_bytes - verified_bytes
    assert restarted.verified_modules(MODEL) == [0]


async def test_resume_from_a_peer_with_another_chunk_size(
    source: tuple[ShardStore, Manifest], cluster: Cluster, tmp_path: Path
) -> None:
    """Chunks verified under one peer's chunking are reused under another's (re-checked locally)."""
    store, manifest = source
    big = manifest.modules[0]  # 300_001 bytes: 5 chunks of 64 KiB, 3 of 128 KiB
    await cluster.add("small", CountingServer(store))
    coarse = CountingServer(_copy_store(store, tmp_path / "peer-coarse"))
    coarse.chunk_size = 2 * CHUNK
    await cluster.add("coarse", coarse)
    local = ShardStore(tmp_path / "node-b")
    await ShardFetcher(local, cluster.transport).ensure(MODEL, (1, 1), ["small"])
    task: asyncio.Task[list[str]] | None = None

    def stop(model: str, file: str, done: int, total: int) -> None:
        if file == big.file and done >= 3 * CHUNK and task is not None:
            task.cancel()

    task = asyncio.create_task(ShardFetcher(local, cluster.transport, window=1, on_progress=stop)
                               .ensure(MODEL, (0, 1), ["small"]))
    with pytest.raises(asyncio.CancelledError):
        await task
    path = local.path(MODEL, big.file)
    done_small = set(json.loads(sidecar_path(path).read_text())["done"])
    assert done_small == {0, 1, 2}
    await ShardFetcher(local, cluster.transport).ensure(MODEL, (0, 1), ["coarse"])
    # 128 KiB chunk 0 = small chunks {0, 1}: kept; chunk 1 = {2, 3}: only half verified, refetched.
    assert coarse.served[big.file] == big.size_bytes - 2 * CHUNK
    assert local.verified_modules(MODEL) == [0]


_names = st.one_of(
    st.sampled_from([MANIFEST_FILE, "tokenizer.json", "modules/00_embed.onnx", "../manifest.json",
                     "modules/../tokenizer.json", "/etc/passwd", ".hashcache.json", "", "."]),
    st.text(max_size=300),
)
_requests = st.fixed_dictionaries(
    {
        "op": st.one_of(st.sampled_from(["shard_index", "shard_read"]), st.text(max_size=10)),
        "model": st.one_of(
            st.sampled_from([MODEL, "..", "../x", "nope"]), st.text(max_size=200), st.integers()
        ),
        "file": st.one_of(_names, st.none()),
        "offset": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=5), st.none()),
        "length": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.none()),
    }
)


def test_shard_requests_never_crash_the_server(source: tuple[ShardStore, Manifest]) -> None:
    """Any request map gets a reply map (an error with a code, or data that really is the file's)."""
    store, _ = source
    server = ShardServer(store, chunk_size=CHUNK)
    allowed = {f: store.path(MODEL, f).read_bytes() for f in store.known_files(MODEL)}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(request=_requests)
    def check(request: dict[str, Any]) -> None:
        reply = asyncio.run(handle_shard_request(server, request))
        if reply["ok"]:
            assert request["model"] == MODEL and request["file"] in allowed
            if "data" in reply:
                off = request["offset"]
                assert reply["data"] == allowed[request["file"]][off : off + request["length"]]
        else:
            assert reply["error"]["code"] in {"unknown_model", "unknown_file", "not_verified",
                                              "out_of_range", "bad_request"}

    check()
