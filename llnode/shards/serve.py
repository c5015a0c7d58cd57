"""Answering peers' chunk requests from the local shard store.

Only files the manifest names (modules, and the fixed support files: manifest, tokenizer, chat template)
are served, and only once they are verified: a peer must never receive a file this node would itself
refuse to load. Names are never joined onto a path before being checked against that list, so
``../../etc/passwd`` and friends cannot escape the model folder.

A file's chunk index (sha256 of every ``chunk_size`` block) lets the fetcher verify each chunk as it
arrives instead of discovering a bad byte only after the whole file; it is computed once per file version
(in the same pass as the whole-file hash) and kept in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

from llnode.model.manifest import MANIFEST_FILE
from llnode.shards.errors import ShardError, ShardServeError
from llnode.shards.store import ShardStore, check_file_name, check_model_name

DEFAULT_CHUNK = 1 << 20
MIN_CHUNK = 64 << 10
MAX_READ = 4 << 20


class ShardServer:
    """``file_index`` and ``read_chunk`` over a :class:`ShardStore`; blocking (use the ``*_async`` forms)."""

    def __init__(self, store: ShardStore, chunk_size: int = DEFAULT_CHUNK, max_read: int = MAX_READ) -> None:
        if not MIN_CHUNK <= chunk_size <= max_read:
            raise ValueError(f"chunk_size must be within [{MIN_CHUNK}, {max_read}]")
        self.store = store
        self.chunk_size = chunk_size
        self.max_read = max_read
        self._lock = threading.Lock()
        self._index_cache: dict[tuple[str, int, int, int], dict[str, Any]] = {}
        self.bytes_served = 0

    def _resolve(self, model: str, file: str) -> Path:
        """The path of a servable, verified file, or a ShardServeError saying why not."""
        try:
            check_model_name(model)
        except ShardError as exc:
            raise ShardServeError(str(exc), "unknown_model") from None
        if not self.store.has_manifest(model):
            raise ShardServeError(f"model {model!r} is not held by this node", "unknown_model")
        try:
            check_file_name(file)
            known = self.store.known_files(model)
        except ShardError as exc:
            raise ShardServeError(str(exc), exc.code) from None
        if file not in known:
            raise ShardServeError(f"{file!r} is not a file of model {model!r}", "unknown_file")
        path = self.store.path(model, file)
        if file == MANIFEST_FILE:
            return path
        if not self.store.is_verified(model, file):
            raise ShardServeError(
                f"{model}/{file} is not available (missing or unverified) here", "not_verified"
            )
        return path

    def file_index(self, model: str, file: str, chunk_size: int | None = None) -> dict[str, Any]:
        """``{file, size, sha256, chunk_size, chunk_sha256: [...]}`` for one verified file."""
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if not isinstance(chunk, int) or not MIN_CHUNK <= chunk <= self.max_read:
            raise ShardServeError(
                f"chunk_size must be an int within [{MIN_CHUNK}, {self.max_read}]", "bad_request"
            )
        path = self._resolve(model, file)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, chunk)
        with self._lock:
            hit = self._index_cache.get(key)
        if hit is not None:
            return dict(hit)
        whole = hashlib.sha256()
        chunks: list[str] = []
        with path.open("rb") as fh:
            while block := fh.read(chunk):
                whole.update(block)
                chunks.append(hashlib.sha256(block).hexdigest())
        index = {
            "file": file,
            "size": st.st_size,
            "sha256": whole.hexdigest(),
            "chunk_size": chunk,
            "chunk_sha256": chunks,
        }
        expected = self.store.expected_sha256(model, file)
        if expected is not None and index["sha256"] != expected:
            raise ShardServeError(f"{model}/{file} changed on disk and no longer matches", "not_verified")
        self.store.record_hash(path, str(index["sha256"]), st.st_size, st.st_mtime_ns)
        with self._lock:
            self._index_cache = {k: v for k, v in self._index_cache.items() if k[0] != str(path)}
            self._index_cache[key] = index
        return dict(index)

    def read_chunk(self, model: str, file: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (at most ``max_read``; the range must lie inside the file)."""
        if not isinstance(offset, int) or not isinstance(length, int) or isinstance(offset, bool):
            raise ShardServeError("offset and length must be integers", "bad_request")
        if length <= 0 or length > self.max_read:
            raise ShardServeError(f"length must be within [1, {self.max_read}], got {length}", "bad_request")
        if offset < 0:
            raise ShardServeError(f"negative offset {offset}", "out_of_range")
        path = self._resolve(model, file)
        size = path.stat().st_size
        if offset + length > size:
            raise ShardServeError(
                f"range [{offset}, {offset + length}) is beyond the end of {model}/{file} ({size} bytes)",
                "out_of_range",
            )
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        with self._lock:
            self.bytes_served += len(data)
        return data

    def warm(self, model: str) -> int:
        """Compute the chunk index of every file this node can serve for ``model``; returns how many.

        The first index request for a big file hashes all of it; doing that once at start-up (in the
        background) keeps a peer's first fetch from waiting on it.
        """
        count = 0
        for file in self.store.known_files(model):
            try:
                self.file_index(model, file)
                count += 1
            except ShardServeError:
                continue
        return count

    async def index_async(self, model: str, file: str, chunk_size: int | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.file_index, model, file, chunk_size)

    async def read_async(self, model: str, file: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.read_chunk, model, file, offset, length)
