"""Run a contiguous range of modules of a shard set in onnxruntime, keeping each session's KV cache.

KV-cache format (see docs/model.md for the measurements): every layer module takes its past K/V as
``[batch, kv_heads, capacity, head_dim]`` buffers that this runner owns, plus an attention mask covering
``capacity + new_tokens`` slots, and returns only the K/V of the new tokens. The runner writes those into
the next free slots. Buffers grow geometrically (x2), so a decode step never copies the past: the numpy
buffer is handed to onnxruntime as is (zero copy), unused slots are masked out.

Threading: one onnxruntime *global* thread pool per process (``use_per_session_threads=False``), so that
many small sessions do not fight over the cores with their own spinning pools. ``step`` is meant to be
called from a worker thread. Different sessions may be stepped concurrently from different threads;
steps of the *same* session are serialised by a per-session lock (a pipeline never overlaps them anyway).

Fusion: a runner runs its range as blocks of up to 8 modules, each ONE onnxruntime session (the module
graphs concatenated by ``llnode.model.fuse``, which needs no ``onnx`` package), not one session per
module: a ``session.run`` has a fixed cost paid per session per token. ``LLNODE_FUSE=0`` restores one
session per module.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llnode.config import OFF_WORDS
from llnode.model import fuse, names
from llnode.model.manifest import Manifest, ManifestError, ModuleInfo, load_manifest
from llnode.process import release_memory

MIN_CAPACITY = 32
# Modules fused into one session. WHY not the whole range: onnxruntime's session build grows faster than
# linearly with the graph (int4 SmolLM2, CPU s: 4 layers 0.18, 8: 0.36, 16: 1.02, 30: 3.07; as 30 files
# 1.44), and a plan switch can share only whole sessions; 4 runs per token instead of 1 cost ~0.4 ms of
# ~23 (measured side by side; 32 runs cost ~3 ms). See docs/model.md.
FUSE_BLOCK = 8

log = logging.getLogger(__name__)

_pool_lock = threading.Lock()
_pool_mode: str | None = None  # "global" | "per-session"
_pool_threads = 0


class RunnerError(ValueError):
    """A step was called with inputs that do not fit the modules or the session."""


def _missing_file(path: Path) -> ManifestError:
    """The one wording for a module file that is not on disk, with what fixes it."""
    return ManifestError(f"module file {path} is missing (re-run 'llnode prepare' or copy the shard)")


def disable_spinning() -> None:
    """Use per-session pools whose idle threads sleep instead of the (spinning) global pool.

    A pipeline stage is idle most of the time, waiting for the previous stage: spinning pool threads
    would burn a phone's battery, and on a machine running several stages they steal the cores of the
    stage that is working (measured: 2 daemons on 2 cores, 1.9x the single-process latency with the
    spinning global pool). Call before the first runner is created; the daemon does.
    """
    global _pool_mode
    with _pool_lock:
        if _pool_mode is None:
            _pool_mode = "per-session"


def spin_during_runs() -> bool:
    """Do the per-session pools' threads spin while a run is in flight (``LLNODE_SPIN=run``)?

    Sleeping pools wake a thread for every operator's parallel section: on an idle machine that cost
    ~1.6 ms of a 32 ms SmolLM2 token (the chain with the spinning global pool vs the same chain with
    sleeping per-session pools). ``session.force_spinning_stop`` lets the threads spin only until the
    run returns, so a stage waiting for its neighbours still sleeps and does not take the core of the
    stage that works. Off by default: on a loaded machine (other processes wanting the cores) any
    spinning measured 2-4x slower than sleeping (the spinning thread holds a core the run's other
    thread is waiting for); ``bench pipeline`` measures both side by side.
    """
    return os.environ.get("LLNODE_SPIN", "0") == "run"


def _session_options(threads: int | None) -> ort.SessionOptions:
    """Use the process-wide thread pool, created on first use; fall back to per-session pools without
    spinning if onnxruntime's environment already exists (someone created a session before us), or if
    :func:`disable_spinning` asked for them."""
    global _pool_mode, _pool_threads
    n = threads or int(os.environ.get("LLNODE_THREADS", 0)) or (os.cpu_count() or 1)
    with _pool_lock:
        _pool_threads = n
        if _pool_mode is None:
            try:
                ort.set_global_thread_pool_sizes(n, 1)
                _pool_mode, _pool_threads = "global", n
            except Exception:  # the environment exists already: the call is refused
                _pool_mode, _pool_threads = "per-session", n
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No CPU arena: every session has its own, and a 512-token prefill left SmolLM2's 32 sessions holding
    # 2.4 GB of arena chunks (the attention scores of each layer) for good; without it the peak was
    # 0.43-0.50 GB and RSS settled at 0.33-0.41 GB, at the same decode CPU time (measured side by side).
    so.enable_cpu_mem_arena = False
    if _pool_mode == "global":
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = n
        so.inter_op_num_threads = 1
        spin = spin_during_runs()
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:  # the pool's threads spin between the operators of a run, and sleep once it returns
            so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def pool_info() -> tuple[str | None, int]:
    """(mode, threads) of the process thread pool: ``("global", n)`` normally."""
    return _pool_mode, _pool_threads


@dataclass
class SessionCache:
    """One session's KV buffers (per layer), attention mask and positions; ``length`` slots are used."""

    batch: int
    length: int = 0
    capacity: int = 0
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    keys: dict[int, np.ndarray] = field(default_factory=dict)
    values: dict[int, np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_HEAD_ALL = np.zeros(1, np.int64)  # ``head_from`` of a fused graph: the head runs on every token
_HEAD_LAST = np.full(1, -1, np.int64)  # ... or on the last one only (``last_only``)


@dataclass(frozen=True)
class Unit:
    """One onnxruntime session running consecutive modules of a runner's range (one ``session.run`` per
    step): a single module file, or several fused into one graph (``llnode.model.fuse``)."""

    modules: tuple[ModuleInfo, ...]
    session: ort.InferenceSession
    inputs: frozenset[str]
    kv_outputs: tuple[tuple[int, int, int], ...]  # (layer, output index of key.l, output index of value.l)

    @classmethod
    def of(cls, modules: Sequence[ModuleInfo], session: ort.InferenceSession) -> Unit:
        outs = [o.name for o in session.get_outputs()]
        layers = [m.layer for m in modules if m.kind == "layer" and m.layer is not None]
        kv = tuple((layer, outs.index(names.key(layer)), outs.index(names.value(layer))) for layer in layers)
        return cls(tuple(modules), session, frozenset(i.name for i in session.get_inputs()), kv)

    @property
    def start(self) -> int:
        return self.modules[0].index

    @property
    def end(self) -> int:
        return self.modules[-1].index + 1

    @property
    def has_head(self) -> bool:
        return self.modules[-1].kind == "head"

    @property
    def slices_head(self) -> bool:
        """The head sits behind a ``head_from`` slice inside the graph (fused with other modules)."""
        return fuse.HEAD_FROM in self.inputs

    def feeds(
        self,
        h: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray | None,
        keys: Mapping[int, np.ndarray],
        values: Mapping[int, np.ndarray],
        past_positions: np.ndarray,
        last_only: bool = False,
    ) -> dict[str, np.ndarray]:
        """The inputs its graph declares: ids or hidden state, positions, and for decoder layers the
        attention mask over past + new slots, each layer's past K/V and the past slots' positions."""
        first = self.modules[0]
        feeds = {names.INPUT_IDS if first.kind == "embed" else names.hidden(first.index): h}
        feeds[names.POSITION_IDS] = positions
        if self.kv_outputs:
            assert mask is not None
            feeds[names.ATTENTION_MASK] = mask
            feeds[names.PAST_POSITIONS] = past_positions
            for layer, _, _ in self.kv_outputs:
                feeds[names.past_key(layer)] = keys[layer]
                feeds[names.past_value(layer)] = values[layer]
        feeds[fuse.HEAD_FROM] = _HEAD_LAST if last_only else _HEAD_ALL
        return {k: v for k, v in feeds.items() if k in self.inputs}


def map_weights() -> bool:
    """Do fused blocks map their weights from the module files (``$LLNODE_MAP_WEIGHTS``, default on)?

    ``0``/``off``: each block is written with its weights to a temporary file and onnxruntime copies them
    into its own (anonymous) memory, as before session 4. The switch exists to measure the two side by
    side (see docs/model.md, "Weights mapped from the module files"); the outputs are the same."""
    return os.environ.get("LLNODE_MAP_WEIGHTS", "1").strip().lower() not in OFF_WORDS


def fuse_block() -> int:
    """Modules per fused session: ``$LLNODE_FUSE`` (0 or 1: one session per module), default
    :data:`FUSE_BLOCK`."""
    raw = os.environ.get("LLNODE_FUSE", "").strip()
    try:
        return max(1, int(raw)) if raw else FUSE_BLOCK
    except ValueError:
        msg = f"LLNODE_FUSE must be a number of modules per session (0: off), got {raw!r}"
        raise RunnerError(msg) from None


class ModuleRunner:
    """Modules ``[start, end)`` of a shard set, stepped per session.

    ``step(session_id, x, positions, attention_mask=None)``:
      * ``x``: int64 token ids ``[B, T]`` if ``start == 0``, else float32 hidden state ``[B, T, hidden]``;
      * ``positions``: int64 ``[B, T]``, the absolute positions of these tokens (the caller owns them, so
        a session can be re-prefilled on other stages from its token history);
      * ``attention_mask``: int64/bool ``[B, T]`` for these tokens, 0 on left pads (default all ones).
        The runner remembers it for later steps of the session.
    Returns the hidden state ``[B, T, hidden]``, or the logits ``[B, T, vocab]`` if ``end`` is the last
    module. The batch size of a session is fixed by its first step.

    The range runs as a few :class:`Unit` s: blocks of up to ``fuse`` modules (default
    :data:`FUSE_BLOCK`, or ``$LLNODE_FUSE``; 0 or 1: one session per module), each block's graphs fused
    into one onnxruntime session. WHY: each ``session.run`` has a fixed cost (~0.1 ms of CPU on the build
    machine), paid per session per token; the KV contract and the numbers are the same either way.
    """

    def __init__(
        self,
        shard_dir: Path | str,
        manifest: Manifest | None = None,
        start: int = 0,
        end: int | None = None,
        threads: int | None = None,
        reuse: ModuleRunner | None = None,
        fuse: int | None = None,
    ) -> None:
        """``reuse``: a runner of the same shard set whose sessions are shared for the blocks both run
        (a plan switch then builds only the blocks that changed: building is the slow part, and on a
        throttled device it took seconds; a fused session cannot be cut, hence blocks aligned to module
        indices). Sessions are thread-safe and hold no KV, which is per runner.
        """
        self.shard_dir = Path(shard_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.shard_dir)
        n = self.manifest.num_modules
        self.start, self.end = start, n if end is None else end
        if not 0 <= self.start < self.end <= n:
            raise RunnerError(f"module range [{start}, {end}) is not inside [0, {n})")
        self.block = max(1, fuse_block() if fuse is None else fuse)
        self._so = _session_options(threads)
        # Fused blocks reference the weights in the module files (``fuse_files(external=True)``), relative
        # to the shard directory; loading from bytes needs that folder named.
        self._so_mapped = _session_options(threads)
        self._so_mapped.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(self.shard_dir)
        )
        self._modules = self.manifest.modules[self.start : self.end]
        missing = [self.shard_dir / m.file for m in self._modules if not (self.shard_dir / m.file).is_file()]
        if missing and reuse is None:  # say "missing" before any other file fails to parse
            raise _missing_file(missing[0])
        plan = self._plan_units(reuse)
        self._built = 0
        self._units: list[Unit] = []
        for item in plan:
            if isinstance(item, Unit):
                self._units.append(item)
            else:
                self._units += self._build(item)
                self._built += len(item)
        self._layers = [m.layer for m in self._modules if m.kind == "layer" and m.layer is not None]
        if self._built:
            # Loading parses each file, copies and prepacks its weights: glibc keeps the freed copies
            # (int4 SmolLM2, 135 MiB of shards: 295 -> 236 MiB RSS once trimmed).
            release_memory()
        self._states: dict[str, SessionCache] = {}
        self._states_lock = threading.Lock()

    def _plan_units(self, reuse: ModuleRunner | None) -> list[Unit | list[ModuleInfo]]:
        """The range cut into its blocks (``self.block`` modules, aligned to absolute module indices, so
        that two runners over overlapping ranges cut them alike); a block the ``reuse`` runner already
        runs as one unit is shared, the others are to be built."""
        same = reuse is not None and reuse.shard_dir == self.shard_dir
        reusable = {(u.start, u.end): u for u in reuse._units} if reuse is not None and same else {}
        plan: list[Unit | list[ModuleInfo]] = []
        a = self.start
        while a < self.end:
            z = min(self.end, (a // self.block + 1) * self.block)
            u = reusable.get((a, z))
            plan.append(u if u is not None else list(self.manifest.modules[a:z]))
            a = z
        return plan

    def _build(self, modules: list[ModuleInfo]) -> list[Unit]:
        """Sessions for a block: one fused unit, or one unit per module (a single module, or a fusion
        that failed: the per-file loading then names the file that is bad)."""
        if len(modules) > 1:
            try:
                return [self._build_fused(modules)]
            except Exception as exc:
                log.warning("modules [%d, %d): fusing failed, one session per module: %s",
                            modules[0].index, modules[-1].index + 1, exc)  # fmt: skip
        return [self._build_one(m) for m in modules]

    def _build_fused(self, modules: list[ModuleInfo]) -> Unit:
        """The block fused, its weights left in the module files: onnxruntime maps them from there (a
        tensor it does not prepack, the embedding table, then stays in the page cache, resident only
        where it is read: int4 SmolLM2 -27 MiB) and the parsed model holds no copy of them. The files must
        then not be rewritten in place while loaded (the shard store replaces files by renaming).

        Where that fails (an onnxruntime older than the folder-path option), the block is written with
        its weights to a temporary file piece by piece and loaded from there. WHY a file: the fused model
        as Python bytes lives while onnxruntime parses it, a third copy of the block's weights at the load
        peak (fp32 SmolLM2 block [24,32): peak 665 MiB from bytes, 375 from a file, 375 as separate
        sessions); the file is in the page cache and deleted once loaded."""
        head = self.manifest.num_modules - 1
        files = [(m.index, m.file) for m in modules]
        if map_weights():
            try:
                graph = fuse.fuse_files(self.shard_dir, files, head_index=head, external=True)
                sess = ort.InferenceSession(graph, self._so_mapped, providers=["CPUExecutionProvider"])
                sess._model_bytes = None  # see below
                return Unit.of(modules, sess)
            except Exception as exc:  # onnxruntime raises its own classes
                log.info("modules [%d, %d): weights not mapped from the module files (%s)",
                         modules[0].index, modules[-1].index + 1, exc)  # fmt: skip
        try:
            with tempfile.NamedTemporaryFile(prefix="llnode-fused-", suffix=".onnx") as f:
                fuse.write_fused(self.shard_dir, files, f, head_index=head)
                f.flush()
                sess = ort.InferenceSession(f.name, self._so, providers=["CPUExecutionProvider"])
        except OSError as exc:  # no room or no temporary directory: from memory then
            log.info("modules [%d, %d): fused in memory (%s)", modules[0].index, modules[-1].index + 1, exc)
            model = fuse.fuse_files(self.shard_dir, files, head_index=head)
            sess = ort.InferenceSession(model, self._so, providers=["CPUExecutionProvider"])
            # onnxruntime's Python wrapper keeps the model bytes for good (its own TODO says so), i.e.
            # the block's weights a second time (fp32 SmolLM2: 1326 instead of 705 MiB RSS). They only
            # serve to re-create the session on a provider change, which a runner never asks for.
            sess._model_bytes = None
            del model
        return Unit.of(modules, sess)

    def _build_one(self, info: ModuleInfo) -> Unit:
        path = self.shard_dir / info.file
        if not path.is_file():
            raise _missing_file(path)
        try:
            sess = ort.InferenceSession(str(path), self._so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            raise ManifestError(
                f"module file {path} cannot be loaded, corrupted? (re-run 'llnode prepare' or copy "
                f"the shard again): {exc}"
            ) from exc
        return Unit.of([info], sess)

    @property
    def built(self) -> int:
        """How many of this runner's modules were loaded by it (the rest are in reused sessions)."""
        return self._built

    def units(self) -> list[Unit]:
        """The sessions that run the range, in order: for callers that run them on caches from
        :meth:`cache` (``llnode.model.batching``)."""
        return list(self._units)

    # -- session bookkeeping -------------------------------------------------------------------------

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.manifest.num_modules

    def sessions(self) -> list[str]:
        with self._states_lock:
            return list(self._states)

    def context_length(self, session_id: str) -> int:
        """Cache slots used by the session (prompt + generated tokens, including left pads); 0 if unknown."""
        with self._states_lock:
            st = self._states.get(session_id)
        return 0 if st is None else st.length

    def kv_bytes(self, session_id: str) -> int:
        """Bytes of K/V buffers held for the session (allocated capacity, not just used slots)."""
        with self._states_lock:
            st = self._states.get(session_id)
        if st is None:
            return 0
        return sum(a.nbytes for a in st.keys.values()) + sum(a.nbytes for a in st.values.values())

    def free(self, session_id: str) -> bool:
        """Drop a session's cache; True if it existed."""
        with self._states_lock:
            return self._states.pop(session_id, None) is not None

    @property
    def layers(self) -> list[int]:
        """The decoder layers among this runner's modules (whose K/V it keeps)."""
        return self._layers

    def cache(self, session_id: str, batch: int) -> SessionCache:
        """The session's cache, created empty if new; hold its ``lock`` while using it."""
        with self._states_lock:
            st = self._states.get(session_id)
            if st is None:
                st = SessionCache(batch=batch)
                self._states[session_id] = st
        if st.batch != batch:
            raise RunnerError(f"session {session_id!r} has batch {st.batch}, got a step with batch {batch}")
        return st

    def grow(self, st: SessionCache, needed: int) -> None:
        """Make room for ``needed`` slots (x2 steps, copying the used part once per doubling)."""
        if needed <= st.capacity:
            return
        cap = max(MIN_CAPACITY, st.capacity)
        while cap < needed:
            cap *= 2
        m = self.manifest
        b, kvh, hd = st.batch, m.num_kv_heads, m.head_dim
        mask = np.zeros((b, cap), np.int64)
        pos = np.zeros((b, cap), np.int64)
        if st.length:
            mask[:, : st.length] = st.mask[:, : st.length]
            pos[:, : st.length] = st.positions[:, : st.length]
        st.mask, st.positions = mask, pos
        for layer in self._layers:
            for store in (st.keys, st.values):
                buf = np.zeros((b, kvh, cap, hd), np.float32)
                old = store.get(layer)
                if old is not None:
                    buf[:, :, : st.length] = old[:, :, : st.length]
                store[layer] = buf
        st.capacity = cap

    # -- the step ------------------------------------------------------------------------------------

    def step(
        self,
        session_id: str,
        x: np.ndarray,
        positions: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        last_only: bool = False,
    ) -> np.ndarray:
        """Run the range over ``x`` for one session and append the new tokens to its KV cache.

        ``last_only``: the head runs on the last token only, so a prefill returns logits ``[B, 1, vocab]``
        instead of ``[B, T, vocab]``: sampling needs nothing else, and a 256-token chunk's full logits are
        50 MB and a quarter of the chunk's time spent in the LM head. Perplexity needs them all (default).
        """
        x = np.asarray(x)
        if self.is_first:
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
                raise RunnerError(
                    f"the first module takes int token ids [batch, tokens], got {x.dtype}{x.shape}"
                )
            x = x.astype(np.int64, copy=False)
        else:
            if x.ndim != 3 or x.shape[2] != self.manifest.hidden_size:
                raise RunnerError(
                    f"module {self.start} takes a hidden state [batch, tokens, {self.manifest.hidden_size}], "
                    f"got {x.shape}"
                )
            x = np.ascontiguousarray(x, dtype=np.float32)
        b, t = x.shape[0], x.shape[1]
        if t == 0 or b == 0:
            raise RunnerError("a step needs at least one token and one sequence")
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        if pos.shape != (b, t):
            raise RunnerError(f"positions must have shape {(b, t)}, got {pos.shape}")
        new_mask = (
            np.ones((b, t), np.int64)
            if attention_mask is None
            else np.asarray(attention_mask).astype(np.int64)
        )
        if new_mask.shape != (b, t):
            raise RunnerError(f"attention_mask must have shape {(b, t)}, got {new_mask.shape}")
        if self.manifest.max_context and int(pos.max()) >= self.manifest.max_context:
            raise RunnerError(
                f"position {int(pos.max())} exceeds the model's context {self.manifest.max_context}"
            )

        st = self.cache(session_id, b)
        with st.lock:
            full_mask = None
            if self._layers:
                self.grow(st, st.length + t)
                full_mask = np.concatenate([st.mask, new_mask], axis=1)
            h, unit_pos = x, pos
            cut = last_only and t > 1
            for unit in self._units:
                if cut and unit.has_head and not unit.slices_head:
                    h, unit_pos = h[:, -1:], pos[:, -1:]
                feeds = unit.feeds(h, unit_pos, full_mask, st.keys, st.values, st.positions, last_only=cut)
                outs = unit.session.run(None, feeds)
                h = outs[0]
                for layer, k, v in unit.kv_outputs:
                    st.keys[layer][:, :, st.length : st.length + t] = outs[k]
                    st.values[layer][:, :, st.length : st.length + t] = outs[v]
            if self._layers:
                st.mask[:, st.length : st.length + t] = new_mask
                st.positions[:, st.length : st.length + t] = pos
            st.length += t
        return np.asarray(h)


def positions_for(attention_mask: np.ndarray, past_tokens: np.ndarray | None = None) -> np.ndarray:
    """Positions of a left-padded batch, as transformers computes them: real tokens count from 0, pads get 1.

    ``past_tokens``: real (non-pad) tokens each row already has in its cache (for a decode step)."""
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(mask, axis=1) - 1
    if past_tokens is not None:
        pos = pos + np.asarray(past_tokens, np.int64).reshape(-1, 1)
    return np.where(mask > 0, pos, 1).astype(np.int64)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ``(ids, attention_mask)``."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int64)
    mask = np.zeros((len(sequences), width), np.int64)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
    return ids, mask


class ChainRunner:
    """The whole chain in one process: the single-process reference later tests compare a pipeline to."""

    def __init__(self, shard_dir: Path | str, threads: int | None = None) -> None:
        self.runner = ModuleRunner(shard_dir, threads=threads)
        self.manifest = self.runner.manifest

    def logits(
        self,
        session_id: str,
        ids: np.ndarray,
        positions: np.ndarray,
        attention_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        return self.runner.step(session_id, ids, positions, attention_mask)

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        session_id: str = "generate",
        stop: Sequence[int] = (),
    ) -> list[int]:
        """Greedy decoding of one prompt; frees the session afterwards."""
        if not prompt:
            raise RunnerError("the prompt is empty")
        out: list[int] = []
        try:
            ids = np.asarray([list(prompt)], np.int64)
            logits = self.runner.step(
                session_id, ids, np.arange(len(prompt), dtype=np.int64)[None], last_only=True
            )
            pos = len(prompt)
            for _ in range(max_new_tokens):
                tok = int(np.argmax(logits[0, -1]))
                out.append(tok)
                if tok in stop:
                    break
                logits = self.logits(session_id, np.asarray([[tok]], np.int64), np.asarray([[pos]], np.int64))
                pos += 1
        finally:
            self.runner.free(session_id)
        return out
