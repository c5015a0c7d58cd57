"""The local inventory of shard sets under one root folder.

Layout: ``<root>/<model>/manifest.json`` plus the module files and tokenizer files the manifest names.
A file counts as present only once its sha256 equals the manifest's: a half-written or corrupted module
must never be loaded or advertised. Hashing hundreds of MB on a phone takes many seconds, so results are
cached on disk keyed by (path, size, mtime_ns): a restart re-hashes only files that changed.

Every method here does blocking file I/O (and possibly hashing): from asyncio, call them through
``asyncio.to_thread``. The store is thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from llnode.model.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest
from llnode.shards.errors import ShardError

log = logging.getLogger(__name__)

HASH_CACHE_FILE = ".hashcache.json"
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"
HASH_BLOCK = 1 << 20
# Files at least this big log their hashing progress (a phone hashes ~50-150 MB/s).
PROGRESS_MIN_BYTES = 64 << 20
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt", ".json")

HashProgress = Callable[[str, int, int], None]


def check_model_name(model: str) -> str:
    """A model name is one plain folder name: no separators, no leading dot, nothing to traverse with."""
    if not isinstance(model, str) or not _MODEL_NAME.match(model) or model in (".", ".."):
        raise ShardError(f"invalid model name {model!r}", code="unknown_model")
    return model


def check_file_name(name: str) -> str:
    """A shard file name is a relative POSIX path inside the model folder (no '..', no absolute path).

    Manifests arrive from peers, so a file name in one is untrusted input just like a request.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ShardError(f"invalid file name {name!r}", code="unknown_file")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise ShardError(f"invalid file name {name!r}", code="unknown_file")
    if name.endswith((PART_SUFFIX, SIDECAR_SUFFIX)) or path.name.startswith("."):
        raise ShardError(f"invalid file name {name!r}", code="unknown_file")
    return name


def compact_ranges(indices: Iterable[int]) -> list[list[int]]:
    """``[0,1,2,5,7,8]`` -> ``[[0,3],[5,6],[7,9]]``: half-open runs, small enough to gossip."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def expand_ranges(runs: Iterable[Iterable[int]]) -> list[int]:
    """Inverse of :func:`compact_ranges`."""
    out: list[int] = []
    for run in runs:
        start, end = run
        out.extend(range(int(start), int(end)))
    return out


def sha256_file(path: Path, on_progress: HashProgress | None = None, label: str = "") -> str:
    """Hash a file in 1 MiB blocks; big files log progress (and report it) so a long hash is visible."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    last_log = time.monotonic()
    loud = size >= PROGRESS_MIN_BYTES
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if on_progress is not None:
                on_progress(label or path.name, done, size)
            if loud and time.monotonic() - last_log > 2.0:
                last_log = time.monotonic()
                log.info("hashing %s: %d/%d MB", label or path, done >> 20, size >> 20)
    return digest.hexdigest()


def support_files(manifest: Manifest) -> list[str]:
    """The non-module files a shard set needs: the manifest, the tokenizer and a chat template file.

    ``chat_template`` may hold the template text itself or the name of a file; it is a file only if it
    looks like one (one line, no Jinja braces, a template-ish suffix). Anything with a sha in
    ``file_sha256`` is also part of the set.
    """
    names = [MANIFEST_FILE, manifest.tokenizer_file]
    tpl = manifest.chat_template
    if tpl and "\n" not in tpl and "{" not in tpl and tpl.endswith(_TEMPLATE_SUFFIXES):
        names.append(tpl)
    names.extend(sorted(manifest.file_sha256))
    out: list[str] = []
    for name in names:
        if name not in out:
            out.append(check_file_name(name))
    return out


class ShardStore:
    """Which shard sets, and which of their modules, this device holds (verified)."""

    def __init__(self, root: Path | str, on_hash_progress: HashProgress | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_hash_progress = on_hash_progress
        self._lock = threading.RLock()
        self._hash_cache: dict[str, list[Any]] | None = None
        self._manifests: dict[str, tuple[int, Manifest]] = {}
        self._warned: set[tuple[str, int, int]] = set()

    # ------------------------------------------------------------------ paths and manifests
    def model_dir(self, model: str) -> Path:
        return self.root / check_model_name(model)

    def path(self, model: str, file: str) -> Path:
        return self.model_dir(model) / check_file_name(file)

    def models(self) -> list[str]:
        """Models with a readable manifest under the root."""
        out = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and _MODEL_NAME.match(child.name) and (child / MANIFEST_FILE).is_file():
                out.append(child.name)
        return out

    def has_manifest(self, model: str) -> bool:
        return (self.model_dir(model) / MANIFEST_FILE).is_file()

    def manifest(self, model: str) -> Manifest:
        """The model's manifest (re-read when the file changes). Raises ShardError if absent or invalid."""
        path = self.model_dir(model) / MANIFEST_FILE
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise ShardError(
                f"model {model!r} is not in the shard store {self.root}", "unknown_model"
            ) from None
        with self._lock:
            cached = self._manifests.get(model)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        try:
            manifest = load_manifest(path.parent)
        except ManifestError as exc:
            raise ShardError(f"model {model!r}: {exc}", "unknown_model") from exc
        for m in manifest.modules:
            check_file_name(m.file)
        support_files(manifest)
        with self._lock:
            self._manifests[model] = (mtime, manifest)
        return manifest

    def manifest_sha256(self, model: str) -> str:
        return self.file_sha256(self.model_dir(model) / MANIFEST_FILE)

    def expected_sha256(self, model: str, file: str) -> str | None:
        """What the manifest says a file must hash to (None for files the manifest carries no sha for)."""
        manifest = self.manifest(model)
        for m in manifest.modules:
            if m.file == file:
                return m.sha256
        return manifest.file_sha256.get(file)

    def known_files(self, model: str) -> list[str]:
        """Every file name the shard set may contain: modules and support files (nothing else is served)."""
        manifest = self.manifest(model)
        return [m.file for m in manifest.modules] + support_files(manifest)

    # ------------------------------------------------------------------ hashing with a persistent cache
    def _cache(self) -> dict[str, list[Any]]:
        if self._hash_cache is None:
            try:
                data = json.loads((self.root / HASH_CACHE_FILE).read_text())
                self._hash_cache = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._hash_cache = {}
        return self._hash_cache

    def _save_cache(self) -> None:
        cache = self._cache()
        tmp = self.root / (HASH_CACHE_FILE + ".tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        tmp.replace(self.root / HASH_CACHE_FILE)

    def _cache_key(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file under the root, from the cache when size and mtime_ns are unchanged."""
        st = path.stat()
        key = self._cache_key(path)
        with self._lock:
            hit = self._cache().get(key)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return str(hit[2])
        sha = sha256_file(path, self.on_hash_progress, key)
        self.record_hash(path, sha, st.st_size, st.st_mtime_ns)
        return sha

    def record_hash(self, path: Path, sha: str, size: int | None = None, mtime_ns: int | None = None) -> None:
        """Remember a file's hash (the fetcher calls this after verifying a download, to skip a rehash)."""
        if size is None or mtime_ns is None:
            st = path.stat()
            size, mtime_ns = st.st_size, st.st_mtime_ns
        with self._lock:
            self._cache()[self._cache_key(path)] = [size, mtime_ns, sha]
            self._save_cache()

    def is_verified(self, model: str, file: str) -> bool:
        """True if the file exists and matches the manifest's sha (files without a sha: exists)."""
        path = self.path(model, file)
        if not path.is_file():
            return False
        expected = self.expected_sha256(model, file)
        if expected is None:
            return True
        try:
            size = next((m.size_bytes for m in self.manifest(model).modules if m.file == file), None)
            if size is not None and path.stat().st_size != size:
                return False
            ok = self.file_sha256(path) == expected
        except OSError:
            return False
        if not ok:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._warned:  # inventories are rebuilt often: say it once per file version
                self._warned.add(key)
                log.warning("%s/%s does not match its manifest sha256; treating it as missing", model, file)
        return ok

    # ------------------------------------------------------------------ inventory
    def verified_modules(self, model: str) -> list[int]:
        manifest = self.manifest(model)
        return [m.index for m in manifest.modules if self.is_verified(model, m.file)]

    def missing_files(self, model: str, module_range: tuple[int, int] | range | None = None) -> list[str]:
        """Files to fetch so that modules ``[start, end)`` (default all) and the support files are usable.

        A model without a manifest here is missing its manifest only (the rest is known once it arrives).
        """
        if not self.has_manifest(model):
            return [MANIFEST_FILE]
        manifest = self.manifest(model)
        indices = _range_indices(module_range, manifest.num_modules)
        missing = [
            f for f in support_files(manifest) if f != MANIFEST_FILE and not self.is_verified(model, f)
        ]
        for i in indices:
            file = manifest.modules[i].file
            if file not in missing and not self.is_verified(model, file):
                missing.append(file)
        return missing

    def inventory(self) -> dict[str, dict[str, Any]]:
        """What this device holds, for gossip: model -> precision, manifest sha, verified module runs.

        ``modules`` are half-open runs (``[[0, 12], [20, 32]]``); ``complete`` says the support files
        (tokenizer...) are present too, i.e. a peer can fetch the whole shard set's basics from here.
        """
        out: dict[str, dict[str, Any]] = {}
        for model in self.models():
            try:
                manifest = self.manifest(model)
                modules = self.verified_modules(model)
                support_ok = all(self.is_verified(model, f) for f in support_files(manifest))
                out[model] = {
                    "precision": manifest.precision,
                    "manifest_sha256": self.manifest_sha256(model),
                    "num_modules": manifest.num_modules,
                    "modules": compact_ranges(modules),
                    "complete": support_ok,
                }
            except (ShardError, OSError) as exc:
                log.warning("skipping %s in the inventory: %s", model, exc)
        return out

    # ------------------------------------------------------------------ cleanup
    def prune(self, model: str, keep: Iterable[int]) -> list[str]:
        """Delete module files (and partial downloads) whose index is not in ``keep``; returns their names.

        Used after a rebalance, once the new plan is active. Support files are always kept.
        """
        manifest = self.manifest(model)
        keep_set = set(keep)
        removed: list[str] = []
        for m in manifest.modules:
            if m.index in keep_set:
                continue
            path = self.path(model, m.file)
            for victim in (path, _part(path), _sidecar(path)):
                if victim.exists():
                    victim.unlink()
                    if victim == path:
                        removed.append(m.file)
        if removed:
            with self._lock:
                cache = self._cache()
                for name in removed:
                    cache.pop(self._cache_key(self.path(model, name)), None)
                self._save_cache()
            log.info("pruned %d module file(s) of %s: %s", len(removed), model, ", ".join(removed))
        return removed

    def remove_model(self, model: str) -> None:
        shutil.rmtree(self.model_dir(model), ignore_errors=True)
        with self._lock:
            self._manifests.pop(model, None)


def _range_indices(module_range: tuple[int, int] | range | None, num_modules: int) -> range:
    if module_range is None:
        return range(num_modules)
    if isinstance(module_range, range):
        start, end = module_range.start, module_range.stop
    else:
        start, end = module_range
    if not (0 <= start <= end <= num_modules):
        raise ShardError(f"module range [{start}, {end}) is outside [0, {num_modules})", "out_of_range")
    return range(start, end)


def _part(path: Path) -> Path:
    return path.with_name(path.name + PART_SUFFIX)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def part_path(path: Path) -> Path:
    """Where a download of ``path`` is written until it is verified."""
    return _part(path)


def sidecar_path(path: Path) -> Path:
    """The small JSON that records which chunks of the ``.part`` file are verified."""
    return _sidecar(path)


def fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some filesystems, e.g. on Android, refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
