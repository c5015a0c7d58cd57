"""Fetching missing shard files from peers: chunked, resumable, verified, spread over peers.

Trust model: the manifest is the anchor. A peer's chunk index only lets us catch a bad chunk early (and
refetch just that chunk); the whole file must hash to the manifest's sha256 before it is renamed into
place, so a peer lying consistently in both index and data is caught at the end, its file discarded and
the peer blamed. The manifest itself is checked against ``manifest_sha256`` (from gossip) when given.

Resumability: a download is written into ``<file>.part`` with a sidecar ``<file>.part.json`` listing the
chunks already verified. After a crash or restart the sidecar's chunks are re-hashed locally against the
(new) peer's index, which is cheap next to the network and makes the sidecar a hint rather than a thing to
trust; only the rest is downloaded. The same re-check runs whenever the fetcher switches to another peer,
so chunks from two peers are never mixed without both agreeing on their hashes.

Concurrent ``ensure`` calls needing the same file share one download.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llnode.model.manifest import MANIFEST_FILE
from llnode.shards.errors import ShardError, ShardFetchError
from llnode.shards.serve import MAX_READ, MIN_CHUNK
from llnode.shards.store import (
    ShardStore,
    expand_ranges,
    fsync_dir,
    part_path,
    sha256_file,
    sidecar_path,
)

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
# Error codes meaning "I don't have that file": an honest answer, not a fault to blame the peer for.
_HONEST_ABSENCE = {"unknown_model", "unknown_file", "not_verified"}
DISK_MARGIN = 64 << 20
MAX_PENDING = 8
PROGRESS_LOG_S = 5.0

ProgressCallback = Callable[[str, str, int, int], None]
PeerFaultCallback = Callable[[str, str], None]


class ShardTransport(Protocol):
    """How the fetcher talks to a peer. Errors: raise anything (it counts as that peer failing)."""

    async def index(self, peer_id: str, model: str, file: str) -> dict[str, Any]:
        """The peer's ``ShardServer.file_index(model, file)``: size, sha256, chunk_size, chunk_sha256."""
        ...

    async def read(self, peer_id: str, model: str, file: str, offset: int, length: int) -> bytes:
        """The peer's ``ShardServer.read_chunk(model, file, offset, length)``."""
        ...


@dataclass
class FetchProgress:
    """One file in flight (what ``snapshot()`` reports)."""

    model: str
    file: str
    total: int
    done: int = 0
    peer: str | None = None
    started: float = field(default_factory=time.monotonic)
    last_log: float = 0.0


class _PeerGaveUp(Exception):
    """The current peer failed too often for this file; move on to the next one."""


@dataclass
class _PartState:
    """A download in progress: the open .part file and the set of verified chunks."""

    path: Path
    fd: int
    size: int
    chunk_size: int
    sha256: str | None
    done: set[int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The whole-file sha256 advances over the contiguous verified prefix as chunks land, so finishing a
    # file costs no second pass over it (a phone hashes only ~100 MB/s). Out-of-order chunks wait in
    # ``pending`` (a few at most; beyond that they are re-read from disk when their turn comes).
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0
    pending: dict[int, bytes] = field(default_factory=dict)
    closed: bool = False

    @property
    def num_chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def advance(self) -> None:
        """Feed the in-order verified prefix into the whole-file hasher (call with ``lock`` held)."""
        while self.hashed in self.done:
            data = self.pending.pop(self.hashed, None)
            if data is None:
                data = os.pread(self.fd, self.chunk_len(self.hashed), self.hashed * self.chunk_size)
            self.hasher.update(data)
            self.hashed += 1

    @property
    def done_bytes(self) -> int:
        return sum(self.chunk_len(i) for i in self.done)


def peers_holding(
    inventories: Mapping[str, Mapping[str, Any]], model: str, manifest_sha256: str | None = None
) -> dict[str, list[list[int]]]:
    """From gossiped ``ShardStore.inventory()`` maps (peer id -> inventory), the holder map ``ensure`` takes.

    Keeps peers that hold ``model`` with the same manifest (when ``manifest_sha256`` is given), and that
    have at least one module or the complete support files; peers holding more modules come first.
    """
    out: list[tuple[int, str, list[list[int]]]] = []
    for peer, inventory in inventories.items():
        entry = inventory.get(model) if isinstance(inventory, Mapping) else None
        if not isinstance(entry, Mapping):
            continue
        if manifest_sha256 is not None and entry.get("manifest_sha256") != manifest_sha256:
            continue
        runs = entry.get("modules") or []
        try:
            held = len(expand_ranges(runs))
        except (TypeError, ValueError):
            continue
        if held or entry.get("complete"):
            out.append((held, peer, [list(r) for r in runs]))
    out.sort(key=lambda t: -t[0])
    return {peer: runs for _, peer, runs in out}


class ShardFetcher:
    """Brings a module range of a model (plus its manifest and tokenizer files) into the local store."""

    def __init__(
        self,
        store: ShardStore,
        transport: ShardTransport,
        *,
        max_files: int = 3,
        max_requests: int = 4,
        window: int = 2,
        read_timeout: float = 30.0,
        index_timeout: float = 120.0,
        peer_strikes: int = 3,
        on_progress: ProgressCallback | None = None,
        on_peer_fault: PeerFaultCallback | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.window = max(1, window)
        self.read_timeout = read_timeout
        self.index_timeout = index_timeout
        self.peer_strikes = max(1, peer_strikes)
        self.on_progress = on_progress
        self.on_peer_fault = on_peer_fault
        self._file_slots = asyncio.Semaphore(max(1, max_files))
        self._request_slots = asyncio.Semaphore(max(1, max_requests))
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._waiters: dict[tuple[str, str], int] = {}
        self._active: dict[tuple[str, str], FetchProgress] = {}
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self.peer_faults: dict[str, int] = collections.Counter()
        self.bytes_received = 0
        self.completed: list[str] = []
        self.failed: dict[str, str] = {}

    # ------------------------------------------------------------------ public API
    async def ensure(
        self,
        model: str,
        module_range: tuple[int, int] | range | None,
        peers: Sequence[str] | Mapping[str, Sequence[Sequence[int]] | None],
        manifest_sha256: str | None = None,
    ) -> list[str]:
        """Make modules ``[start, end)`` of ``model`` (None: all) usable locally; returns the files fetched.

        ``peers``: peer ids holding the model (best first), or a mapping peer id -> the module runs it
        holds (``inventory()[model]["modules"]`` from gossip; None = everything), so that each module is
        asked only of peers that have it. Files are spread over the peers. The manifest is fetched first
        if absent and checked against ``manifest_sha256`` (from gossip) when given. Raises
        ShardFetchError naming every file no peer could supply (``.missing``); ShardError if the local
        manifest differs from ``manifest_sha256``.
        """
        holders: dict[str, set[int] | None] = (
            {p: None if runs is None else set(expand_ranges(runs)) for p, runs in peers.items()}
            if isinstance(peers, Mapping)
            else dict.fromkeys(peers)
        )
        peers = list(holders)
        fetched: list[str] = []
        if not await asyncio.to_thread(self.store.has_manifest, model):
            if not peers:
                raise ShardFetchError(
                    f"model {model!r} is not here and no peer was given to fetch it from",
                    [f"{model}/{MANIFEST_FILE}"],
                )
            await self._shared(model, MANIFEST_FILE, manifest_sha256, None, peers, 0)
            fetched.append(MANIFEST_FILE)
        elif manifest_sha256 is not None:
            local = await asyncio.to_thread(self.store.manifest_sha256, model)
            if local != manifest_sha256:
                raise ShardError(
                    f"the local manifest of {model!r} ({local[:12]}) differs from the cluster's "
                    f"({manifest_sha256[:12]}): a different export; remove it or re-prepare",
                    "manifest_mismatch",
                )
        manifest = await asyncio.to_thread(self.store.manifest, model)
        missing = await asyncio.to_thread(self.store.missing_files, model, module_range)
        if not missing:
            return fetched
        if not peers:
            raise ShardFetchError(
                f"{model}: {len(missing)} file(s) missing and no peer to fetch them from: "
                f"{', '.join(missing)}",
                [f"{model}/{f}" for f in missing],
            )
        sizes = {m.file: m.size_bytes for m in manifest.modules}
        shas = {m.file: m.sha256 for m in manifest.modules} | dict(manifest.file_sha256)
        module_of = {m.file: m.index for m in manifest.modules}
        await asyncio.to_thread(self._check_space, model, sum(sizes.get(f, 0) for f in missing))
        log.info("fetching %d file(s) of %s from %d peer(s): %s", len(missing), model, len(peers),
                 ", ".join(missing))

        def candidates(file: str) -> list[str]:
            idx = module_of.get(file)
            return [p for p, held in holders.items() if held is None or idx is None or idx in held]

        results = await asyncio.gather(
            *(
                self._shared(model, f, shas.get(f), sizes.get(f), candidates(f), i)
                for i, f in enumerate(missing)
            ),
            return_exceptions=True,
        )
        failures: list[str] = []
        reasons: list[str] = []
        for f, res in zip(missing, results, strict=True):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                if not isinstance(res, ShardError):
                    raise res
                failures.append(f"{model}/{f}")
                reasons.append(str(res))
            else:
                fetched.append(f)
        if failures:
            raise ShardFetchError(
                f"could not fetch {len(failures)} file(s): {', '.join(failures)} ({'; '.join(reasons)})",
                failures,
            )
        return fetched

    def _check_space(self, model: str, needed: int) -> None:
        """Fail before downloading rather than with ENOSPC half-way (phones are often nearly full)."""
        free = shutil.disk_usage(self.store.root).free
        if needed + DISK_MARGIN > free:
            raise ShardFetchError(
                f"{model}: {needed / 1e6:.1f} MB to fetch but only {free / 1e6:.1f} MB free under "
                f"{self.store.root} (keeping {DISK_MARGIN >> 20} MiB spare)",
                [],
            )

    def snapshot(self) -> dict[str, Any]:
        """For ``/api/status``: files in flight, bytes done/total, receive rate over the last 10 s."""
        files = [
            {"model": p.model, "file": p.file, "peer": p.peer, "done": p.done, "total": p.total}
            for p in self._active.values()
        ]
        return {
            "files": files,
            "bytes_done": sum(p.done for p in self._active.values()),
            "bytes_total": sum(p.total for p in self._active.values()),
            "rate_bytes_per_s": round(self._current_rate(), 1),
            "bytes_received": self.bytes_received,
            "completed": list(self.completed[-20:]),
            "failed": dict(self.failed),
            "peer_faults": dict(self.peer_faults),
        }

    async def aclose(self) -> None:
        """Cancel every download in flight (their .part files stay, to be resumed later)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ------------------------------------------------------------------ sharing downloads
    async def _shared(
        self, model: str, file: str, sha: str | None, size: int | None, peers: list[str], start: int
    ) -> None:
        """Run (or join) the single download of ``model/file``; the last waiter leaving cancels it."""
        key = (model, file)
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_file(model, file, sha, size, peers, start))
            self._tasks[key] = task
            task.add_done_callback(lambda _t: self._tasks.pop(key, None))
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() and self._waiters.get(key, 0) <= 1:
                task.cancel()
            raise
        finally:
            self._waiters[key] -= 1
            if self._waiters[key] <= 0:
                self._waiters.pop(key, None)

    # ------------------------------------------------------------------ one file
    def _fault(self, peer: str, reason: str) -> None:
        self.peer_faults[peer] += 1
        log.warning("shard peer %s: %s", peer, reason)
        if self.on_peer_fault is not None:
            self.on_peer_fault(peer, reason)

    async def _fetch_file(
        self, model: str, file: str, sha: str | None, size: int | None, peers: list[str], start: int
    ) -> None:
        async with self._file_slots:
            path = self.store.path(model, file)
            label = f"{model}/{file}"
            start = start % len(peers) if peers else 0
            rotated = peers[start:] + peers[:start]
            order = sorted(rotated, key=lambda p: self.peer_faults.get(p, 0))
            excluded: set[str] = set()
            errors: list[str] = []
            progress = FetchProgress(model, file, size or 0)
            self._active[(model, file)] = progress
            t0 = time.monotonic()
            try:
                for peer in order:
                    if peer in excluded:
                        continue
                    progress.peer = peer
                    try:
                        index = await asyncio.wait_for(
                            self.transport.index(peer, model, file), self.index_timeout
                        )
                        _check_index(index, sha, size)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        reason = f"index of {label} unusable: {_describe(exc)}"
                        if getattr(exc, "code", None) in _HONEST_ABSENCE:
                            log.info("shard peer %s does not have %s (%s)", peer, label, exc)
                        else:
                            self._fault(peer, reason)
                        errors.append(f"{peer}: {reason}")
                        continue
                    expected = sha or str(index["sha256"])
                    state = await asyncio.to_thread(_open_part, path, index, expected)
                    contributors: set[str] = set()
                    try:
                        progress.total = state.size
                        progress.done = state.done_bytes
                        self._report(progress)
                        try:
                            await self._download(peer, model, file, index, state, progress, contributors)
                        except _PeerGaveUp as exc:
                            errors.append(f"{peer}: {exc}")
                            continue
                        got = await asyncio.to_thread(_finish_hash, state)
                    finally:
                        await asyncio.to_thread(_close_part, state)
                    if got != expected:
                        await asyncio.to_thread(_discard_part, path)
                        reason = f"{label} hashed to {got[:12]}, manifest says {expected[:12]}; discarded"
                        for p in contributors or {peer}:
                            self._fault(p, reason)
                            excluded.add(p)
                        errors.append(f"{peer}: {reason}")
                        continue
                    await asyncio.to_thread(self._commit, path, got)
                    if file == MANIFEST_FILE:
                        try:
                            await asyncio.to_thread(self.store.manifest, model)
                        except ShardError as exc:
                            await asyncio.to_thread(path.unlink)
                            self._fault(peer, f"served an invalid manifest for {model}: {exc}")
                            raise ShardFetchError(f"{label} from {peer} is invalid: {exc}", [label]) from exc
                    dt = max(time.monotonic() - t0, 1e-6)
                    log.info("fetched %s (%.1f MB) from %s in %.1f s (%.1f MB/s)", label, state.size / 1e6,
                             ", ".join(sorted(contributors)) or peer, dt, state.size / 1e6 / dt)
                    self.completed.append(label)
                    self.failed.pop(label, None)
                    return
                msg = f"no peer could supply {label}: " + ("; ".join(errors) or "no peer holds it")
                self.failed[label] = msg
                raise ShardFetchError(msg, [label])
            except OSError as exc:  # disk full, read-only storage...: say which file and why
                msg = f"writing {label} under {self.store.root} failed: {exc}"
                self.failed[label] = msg
                raise ShardFetchError(msg, [label]) from exc
            finally:
                self._active.pop((model, file), None)

    async def _download(
        self,
        peer: str,
        model: str,
        file: str,
        index: dict[str, Any],
        state: _PartState,
        progress: FetchProgress,
        contributors: set[str],
    ) -> None:
        """Fetch every chunk not yet verified from ``peer`` (``window`` requests in flight)."""
        hashes: list[str] = index["chunk_sha256"]
        todo = collections.deque(i for i in range(len(hashes)) if i not in state.done)
        strikes = 0

        async def worker() -> None:
            nonlocal strikes
            while todo:
                if strikes >= self.peer_strikes:
                    raise _PeerGaveUp(f"{strikes} failures on {model}/{file}; trying another peer")
                i = todo.popleft()
                offset, length = i * state.chunk_size, state.chunk_len(i)
                try:
                    async with self._request_slots:
                        data = await asyncio.wait_for(
                            self.transport.read(peer, model, file, offset, length), self.read_timeout
                        )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    strikes += 1
                    todo.appendleft(i)
                    self._fault(peer, f"read {model}/{file} @{offset}: {_describe(exc)}")
                    continue
                if not isinstance(data, bytes | bytearray | memoryview):
                    ok = False
                else:
                    ok = await asyncio.to_thread(_write_chunk, state, i, bytes(data), hashes[i])
                if not ok:
                    strikes += 1
                    todo.append(i)
                    self._fault(peer, f"chunk {i} of {model}/{file} failed verification; refetching")
                    continue
                contributors.add(peer)
                self.bytes_received += length
                self._rate.append((time.monotonic(), length))
                progress.done = state.done_bytes
                self._report(progress)

        workers = [asyncio.create_task(worker()) for _ in range(self.window)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _commit(self, path: Path, sha: str) -> None:
        part = part_path(path)
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        part.replace(path)
        fsync_dir(path.parent)
        sidecar_path(path).unlink(missing_ok=True)
        self.store.record_hash(path, sha)

    def _report(self, progress: FetchProgress) -> None:
        now = time.monotonic()
        if progress.total and (now - progress.last_log > PROGRESS_LOG_S or progress.done == progress.total):
            progress.last_log = now
            log.info("fetch %s/%s from %s: %.1f/%.1f MB (%d%%), %.1f MB/s overall", progress.model,
                     progress.file, progress.peer, progress.done / 1e6, progress.total / 1e6,
                     100 * progress.done // progress.total, self._current_rate() / 1e6)
        if self.on_progress is not None:
            self.on_progress(progress.model, progress.file, progress.done, progress.total)

    def _current_rate(self) -> float:
        now = time.monotonic()
        while self._rate and now - self._rate[0][0] > 10.0:
            self._rate.popleft()
        if not self._rate:
            return 0.0
        span = max(now - self._rate[0][0], 1.0)
        return sum(n for _, n in self._rate) / span


# ---------------------------------------------------------------------- helpers (run in threads)
def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _check_index(index: Any, sha: str | None, size: int | None) -> None:
    """Reject an index that is malformed or disagrees with the manifest before downloading anything."""
    if not isinstance(index, dict):
        raise ValueError("index is not a mapping")
    isize, isha, chunk, hashes = (index.get(k) for k in ("size", "sha256", "chunk_size", "chunk_sha256"))
    if not isinstance(isize, int) or isize < 0 or not isinstance(isha, str) or not _SHA.match(isha):
        raise ValueError("index has no valid size/sha256")
    if not isinstance(chunk, int) or not MIN_CHUNK <= chunk <= MAX_READ:
        raise ValueError(f"index chunk_size {chunk!r} outside [{MIN_CHUNK}, {MAX_READ}]")
    if not isinstance(hashes, list) or len(hashes) != -(-isize // chunk):
        raise ValueError("index chunk list does not match its size")
    if not all(isinstance(h, str) and _SHA.match(h) for h in hashes):
        raise ValueError("index chunk hashes are malformed")
    if size is not None and isize != size:
        raise ValueError(f"peer's file is {isize} bytes, manifest says {size}")
    if sha is not None and isha != sha:
        raise ValueError(f"peer's file hashes to {isha[:12]}, manifest says {sha[:12]} (different version)")


def _open_part(path: Path, index: dict[str, Any], expected_sha: str) -> _PartState:
    """Open (or create) the .part file and re-verify whatever the sidecar says is already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part, side = part_path(path), sidecar_path(path)
    size, chunk, hashes = int(index["size"]), int(index["chunk_size"]), index["chunk_sha256"]
    claimed: set[int] = set()
    try:
        meta = json.loads(side.read_text())
        if meta.get("sha256") == expected_sha and meta.get("size") == size and part.is_file():
            old_chunk = int(meta["chunk_size"])
            old = [int(i) for i in meta["done"]]
            if old_chunk == chunk:
                claimed = set(old)
            else:  # another peer's chunking: keep the new chunks entirely inside old verified ranges
                covered = {
                    b for i in old for b in range(i * old_chunk, min((i + 1) * old_chunk, size), MIN_CHUNK)
                }
                claimed = {
                    i for i in range(len(hashes))
                    if all(b in covered for b in range(i * chunk, min((i + 1) * chunk, size), MIN_CHUNK))
                }
    except (OSError, ValueError, KeyError, TypeError):
        claimed = set()
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    state = _PartState(path=part, fd=fd, size=size, chunk_size=chunk, sha256=expected_sha, done=set())
    for i in sorted(claimed):
        if 0 <= i < len(hashes):
            data = os.pread(fd, state.chunk_len(i), i * chunk)
            if hashlib.sha256(data).hexdigest() == hashes[i]:
                state.done.add(i)
    if claimed:
        log.info("resuming %s: %d/%d chunk(s) already verified", path.name, len(state.done), len(hashes))
    with state.lock:
        state.advance()
        _save_sidecar(state)
    return state


def _save_sidecar(state: _PartState) -> None:
    side = sidecar_path(state.path.with_name(state.path.name[: -len(".part")]))
    meta = {
        "sha256": state.sha256, "size": state.size, "chunk_size": state.chunk_size, "done": sorted(state.done)
    }
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(side)


def _write_chunk(state: _PartState, i: int, data: bytes, expected: str) -> bool:
    if len(data) != state.chunk_len(i) or hashlib.sha256(data).hexdigest() != expected:
        return False
    with state.lock:
        if state.closed:  # the download was cancelled while this chunk was in flight: drop it
            return True
        os.pwrite(state.fd, data, i * state.chunk_size)
        state.done.add(i)
        if i > state.hashed and len(state.pending) < MAX_PENDING:
            state.pending[i] = data
        state.advance()
        _save_sidecar(state)
    return True


def _finish_hash(state: _PartState) -> str:
    with state.lock:
        state.advance()
        if state.hashed == state.num_chunks:
            return str(state.hasher.hexdigest())
    return sha256_file(state.path)


def _close_part(state: _PartState) -> None:
    """Close under the lock, so a write still running in a worker thread can never hit a reused fd."""
    with state.lock:
        state.closed = True
        with contextlib.suppress(OSError):
            os.close(state.fd)


def _discard_part(path: Path) -> None:
    part_path(path).unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)
