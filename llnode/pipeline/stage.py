"""One pipeline stage: this node's contiguous module range, for one plan epoch.

Steps arrive over the peer links (or from this node itself), are validated, and run in FIFO order on one
worker thread, so onnxruntime never blocks the event loop (gossip, HTTP and other sessions' frames keep
flowing while a stage computes). A middle stage forwards the hidden state to the next stage's node; the
last stage samples and sends the token id to the session's entry node.

Whatever goes wrong with one step (a stale epoch after a plan switch, a step for a session this stage
does not know, a tensor of the wrong shape) is answered to the entry node as an error for that session:
the entry then re-prefills the session, so nothing is lost and the stage stays healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llnode.model.batching import decode_batch
from llnode.model.manifest import Manifest
from llnode.model.runner import ModuleRunner
from llnode.net.codec import FrameError, decode_tensor, encode_tensor
from llnode.pipeline import protocol
from llnode.pipeline.arrivals import Arrivals
from llnode.pipeline.local import prefill_chunk
from llnode.pipeline.metrics import StageMetrics
from llnode.pipeline.protocol import ProtocolError, Step
from llnode.pipeline.sampling import Sampler
from llnode.pipeline.trace import mark

log = logging.getLogger(__name__)

SendFn = Callable[[str, str, dict[str, Any]], Awaitable[None]]

GATHER_MAX_S = 0.005  # longest wait for decode steps with no expected arrival (see StageWorker._gather)
EXPECT_BATCHES = 2.0  # longest wait for expected steps, in last batches' times (see _gather)
EXPECT_SLACK = 0.25  # how late an expected step may be, in last batches' times (see _gather)


@dataclass
class _Pending:
    step: Step
    received: float = field(default_factory=time.monotonic)


@dataclass
class _Prefill:
    """A multi-token step in progress, run ``StageWorker.prefill_chunk`` tokens at a time."""

    step: Step
    done: int = 0  # tokens run so far
    chunk_start: int = 0
    parts: list[np.ndarray] = field(default_factory=list)  # hidden states of the chunks (not the last stage)


def _is_decode(step: Step) -> bool:
    return not step.reset and len(step.ids) == 1


class StageWorker:
    """Runs modules ``[start, end)`` of ``manifest`` for plan ``epoch`` and passes results on."""

    def __init__(
        self,
        *,
        node_id: str,
        epoch: int,
        manifest: Manifest,
        runner: ModuleRunner,
        next_node: str | None,
        send: SendFn,
        idle_timeout_s: float = 300.0,
        stages: int = 1,
    ) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.manifest = manifest
        self.runner = runner
        self.start, self.end = runner.start, runner.end
        self.first = self.start == 0
        self.last = self.end == manifest.num_modules
        self.next_node = next_node
        self.send = send
        self.idle_timeout_s = idle_timeout_s
        self.stages = max(1, stages)  # how many stages the plan has: see batch_limit()
        self.max_batch = int(os.environ.get("LLNODE_MAX_BATCH", "0"))
        # Tokens per prefill chunk; LLNODE_PREFILL_CHUNK=0 prefills whole (the benchmark's comparison).
        self.prefill_chunk = prefill_chunk()
        # LLNODE_INLINE_DECODE=1: a lone session's decode step runs on the event loop's thread (see
        # _inline). Off by default: it did not measure faster on a loaded machine (bench pipeline
        # runs both side by side).
        self.inline_decode = os.environ.get("LLNODE_INLINE_DECODE", "0") == "1"
        self.batch_sizes: Counter[int] = Counter()  # decode calls by batch size (status and tests)
        self.prefill_chunks = 0
        self._stopping = False
        self._last_batch_s = 0.0
        self.metrics = StageMetrics()
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._samplers: dict[str, Sampler] = {}
        self._last_used: dict[str, float] = {}
        self._arrivals = Arrivals()  # when each session's next step should be here (see _gather)
        # session -> (entry, seq) of its newest step handed to the next stage's link: what to report lost
        # when that link goes down (link_down), instead of leaving the entry to its step timeout.
        self._forwarded: dict[str, tuple[str, int]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{self.start}")
        self._task: asyncio.Task[None] | None = None
        self._mark = f"s{self.start}."  # prefix of this stage's trace labels
        if not self.last and next_node is None:
            raise ValueError("a stage that is not the last needs a next node")

    # ---- lifecycle --------------------------------------------------------------------------------
    def start_worker(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stage-{self.start}-{self.end}")
        self._task.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A worker loop that died of a bug would leave the stage taking steps that nobody runs: every
        entry would wait out its step timeout again and again. Say so and start a new loop (the steps it
        held time out at their entries and re-prefill)."""
        if task.cancelled() or task.exception() is None or self._stopping:
            return
        log.error("stage %d-%d: the worker loop died, restarting it", self.start, self.end,
                  exc_info=task.exception())
        self.start_worker()

    async def close(self) -> None:
        """Stop taking steps, free every session's KV, release the thread."""
        if self._task is not None:
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 30)
        for session in self.runner.sessions():
            self.runner.free(session)
        self._executor.shutdown(wait=False)
        self._samplers.clear()

    @property
    def sessions(self) -> int:
        return len(self.runner.sessions())

    # ---- input ------------------------------------------------------------------------------------
    async def submit(self, payload: Any) -> None:
        """Validate one ``pipe.step`` payload and queue it; a bad one is answered to its entry node."""
        try:
            step = protocol.parse_step(payload, self.manifest.vocab_size)
            mark(step.trace, self._mark + "recv")
        except ProtocolError as exc:
            entry = payload.get("entry") if isinstance(payload, dict) else None
            session = payload.get("session") if isinstance(payload, dict) else None
            log.warning("stage %d-%d rejected a step: %s", self.start, self.end, exc)
            if isinstance(entry, str) and isinstance(session, str):
                await self._fail(entry, session, -1, str(exc))
            return
        try:
            self._check(step, payload)
        except (ProtocolError, FrameError) as exc:
            log.warning(
                "stage %d-%d rejected a step of session %s: %s", self.start, self.end, step.session, exc
            )
            await self._fail(step.entry, step.session, step.seq, str(exc))
            return
        mark(step.trace, self._mark + "queued")
        item = _Pending(step)
        if _is_decode(step):
            self._arrivals.arrived(step.session, item.received)
        else:
            self._arrivals.forget(step.session)
        self._queue.put_nowait(item)
        self.metrics.queue_length = self._queue.qsize()

    def _check(self, step: Step, payload: dict[str, Any]) -> None:
        if step.epoch != self.epoch:
            raise ProtocolError(f"step for plan epoch {step.epoch}, this stage runs epoch {self.epoch}")
        if self.first:
            if "hidden" in payload:
                raise ProtocolError("the first stage takes token ids, not a hidden state")
        else:
            step.hidden = decode_tensor(
                payload.get("hidden"),
                dtype="float32",
                shape=(1, len(step.ids), self.manifest.hidden_size),
            )
        if self.last and step.reset and step.sampling is None:
            raise ProtocolError("a reset step must carry the sampling parameters")
        if step.pos0 + len(step.ids) > self.manifest.max_context:
            raise ProtocolError(f"the session would exceed the context of {self.manifest.max_context}")

    def free(self, session: str) -> None:
        """Drop a session's KV (and sampler). Runs on the worker thread, after any queued step."""
        self._samplers.pop(session, None)
        self._last_used.pop(session, None)
        self._forwarded.pop(session, None)
        self._arrivals.forget(session)
        self._executor.submit(self.runner.free, session)

    async def link_down(self, peer: str) -> None:
        """The link to ``peer`` dropped (or was replaced): if it is the next stage's, the steps this stage
        forwarded on it may be lost with the connection. Report each session's newest one to its entry as
        failed, so the entry re-prefills now instead of waiting out its step timeout (30 s per chunk) with
        the client seeing nothing. An entry that already has that step's token ignores the report (its
        seq is older than the one it waits for); one whose step did arrive re-prefills once, harmlessly."""
        if peer != self.next_node:
            return
        lost, self._forwarded = self._forwarded, {}
        for session, (entry, seq) in lost.items():
            await self._fail(entry, session, seq, f"the link to the next stage ({peer}) dropped")

    # ---- the worker -------------------------------------------------------------------------------
    def batch_limit(self) -> int:
        """How many decode steps to run as one batch now.

        ``LLNODE_MAX_BATCH`` fixes it (1 turns batching off). By default the sessions this stage holds,
        split over the plan's stages: with S stages, S groups keep every stage busy at once, while one
        group of everyone would leave all but one stage idle (batches travel together and never split).
        """
        if self.max_batch > 0:
            return self.max_batch
        return max(1, math.ceil(len(self.runner.sessions()) / self.stages))

    async def _run(self) -> None:
        """Decode steps waiting here run as batches; prefills run in chunks of ``prefill_chunk`` tokens,
        taking turns with the decode batches: a long prompt delays other sessions by one chunk at a time,
        and a new session's prompt is not held back by the others' decoding either."""
        pending: deque[_Pending] = deque()
        prefill: _Prefill | None = None
        decode_turn = True
        while True:
            if not pending and prefill is None:
                if self._stopping:
                    return
                item = await self._queue.get()
                if item is None:
                    return
                pending.append(item)
            self._pull(pending)
            waiting_prefill = prefill is not None or any(not _is_decode(p.step) for p in pending)
            if decode_turn or not waiting_prefill:
                busy = None if prefill is None else prefill.step.session
                if not waiting_prefill:
                    await self._gather(pending)
                batch = self._take_decodes(pending, busy)
                decode_turn = False
                if batch:
                    await self._run_decodes(batch)
                    self._expire_idle()
                    continue
            if prefill is None:
                first = next(i for i, p in enumerate(pending) if not _is_decode(p.step))
                prefill = _Prefill(pending[first].step)
                del pending[first]
            if await self._run_chunk(prefill):
                prefill = None
            decode_turn = True

    def _pull(self, pending: deque[_Pending]) -> None:
        """Move whatever is queued into ``pending`` (a close() marker: finish what came before it)."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                self._stopping = True
            else:
                pending.append(item)
        self.metrics.queue_length = len(pending)

    async def _gather(self, pending: deque[_Pending]) -> None:
        """Give decode steps that are on their way a moment to join the batch.

        With S stages the sessions should travel as S groups of :meth:`batch_limit` (one group at each
        stage): a batch short of the limit while more sessions are coming than the other S - 1 groups
        can hold leaves a fragment, which later runs as a batch of its own for nearly a whole batch's
        cost (reading the weights is most of a decode step), and fragments keep circulating. Measured:
        8 sessions on 2 nodes ran as groups of 4 + 3 + 1 (a group's steps come back over different
        entries and links a few ms apart, a fixed wait of at most 5 ms missed them), and the two cores
        were ~40 % idle; 4 sessions settled into 2 + 1 + 1. So the batch waits for as many of the
        sessions expected here (by their own round trips, :class:`~llnode.pipeline.arrivals.Arrivals`)
        as the other groups cannot take, soonest first, for at most ``EXPECT_BATCHES`` of its last
        batch's time. A session of another group, due a batch later, is not waited for: that would
        leave this stage idle. Steps of sessions with no round trip yet wait a short moment (5 % of the
        last batch, at most ``GATHER_MAX_S``): without it two sessions fall into lockstep."""
        held = self.runner.sessions()
        limit = min(self.batch_limit(), len(held))
        began = time.monotonic()
        short = began + min(GATHER_MAX_S, 0.05 * self._last_batch_s)
        slack = EXPECT_SLACK * self._last_batch_s  # how late an expected step may be
        horizon = began + EXPECT_BATCHES * self._last_batch_s
        while not self._stopping:
            decodes = sum(_is_decode(p.step) for p in pending)
            if decodes >= limit:
                return
            now = time.monotonic()
            here = {p.step.session for p in pending}
            due = self._arrivals.due((s for s in held if s not in here), now, slack)
            need = min(limit - decodes, len(due) - (self.stages - 1) * limit)
            until = short
            if need > 0 and due[need - 1] <= horizon:
                until = max(short, min(horizon, due[need - 1] + slack))
            left = until - now
            if left <= 0:
                return
            try:
                item = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                return
            if item is None:
                self._stopping = True
            else:
                pending.append(item)
                self._pull(pending)

    def _take_decodes(self, pending: deque[_Pending], busy: str | None) -> list[Step]:
        """Up to :meth:`batch_limit` one-token steps of distinct sessions, taken out of ``pending`` in
        order; a session with an earlier multi-token step still queued (or in progress) keeps its order."""
        limit = self.batch_limit()
        taken: list[Step] = []
        blocked = {busy}
        keep: deque[_Pending] = deque()
        while pending:
            item = pending.popleft()
            step = item.step
            if len(taken) < limit and _is_decode(step) and step.session not in blocked:
                taken.append(step)
            else:
                keep.append(item)
            blocked.add(step.session)
        pending.extend(keep)
        return taken

    async def _run_decodes(self, steps: list[Step]) -> None:
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        for step in steps:
            mark(step.trace, self._mark + "take")
        try:
            if self._inline(steps):
                outs = self._compute_decodes(steps)
            else:
                outs = await loop.run_in_executor(self._executor, self._compute_decodes, steps)
        except Exception as exc:  # one batch's failure must not stop the stage
            log.warning("stage %d-%d failed a batch of %d: %s", self.start, self.end, len(steps), exc)
            outs = [exc] * len(steps)
        ended = time.monotonic()
        for step in steps:
            mark(step.trace, self._mark + "back")
            self._arrivals.left(step.session, ended)
        self._last_batch_s = ended - began
        self.metrics.record(len(steps), self._last_batch_s, prefill=False)
        self.batch_sizes[len(steps)] += 1
        for step, out in zip(steps, outs, strict=True):
            await self._finish(step, out)

    def _inline(self, steps: list[Step]) -> bool:
        """Run this decode step right here, on the event loop's thread (when ``inline_decode`` is on)?

        Only when it is the only session this stage holds and nothing else is queued: handing the step
        to the worker thread and the result back costs two thread wake-ups per stage per token (traced:
        0.1-0.4 ms each on an idle machine, 1-3 ms on average on a loaded one), and with one session
        there is nothing the event loop could do meanwhile that this step would hold up for long:
        frames for this stage wait for it anyway, gossip and HTTP wait at most one decode step.
        With several sessions the worker thread keeps the loop free to gather and forward theirs.
        Why it is off by default: on a loaded machine the wait moved to the links instead of going
        away (a loop thread that computes is no longer the light sleeper the scheduler wakes first):
        docs/pipeline.md has the side-by-side figures."""
        return self.inline_decode and len(steps) == 1 and self.sessions <= 1 and self._queue.empty()

    async def _run_chunk(self, job: _Prefill) -> bool:
        """One chunk of a multi-token step; True when the step is done (answered or failed)."""
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        try:
            out = await loop.run_in_executor(self._executor, self._compute_chunk, job)
        except Exception as exc:
            await self._finish(job.step, exc)
            return True
        self.metrics.record(job.done - job.chunk_start, time.monotonic() - began, prefill=True)
        self.prefill_chunks += 1
        if out is None:
            return False
        self._arrivals.left(job.step.session, time.monotonic())
        await self._finish(job.step, out)
        return True

    async def _finish(self, step: Step, out: np.ndarray | int | Exception) -> None:
        if isinstance(out, Exception):
            log.warning("stage %d-%d failed session %s: %s", self.start, self.end, step.session, out)
            await self._fail(step.entry, step.session, step.seq, f"{type(out).__name__}: {out}")
            return
        self._last_used[step.session] = time.monotonic()
        try:
            await self._forward(step, out)
        except Exception as exc:
            log.warning("stage %d-%d could not forward %s: %s", self.start, self.end, step.session, exc)
            await self._fail(step.entry, step.session, step.seq, f"next stage unreachable: {exc}")

    # ---- on the worker thread ---------------------------------------------------------------------
    def _check_position(self, step: Step) -> None:
        at = self.runner.context_length(step.session)
        if at != step.pos0:
            raise ProtocolError(
                f"session {step.session} is at position {at} here, the step starts at {step.pos0}"
            )

    def _input(self, step: Step, a: int, b: int) -> np.ndarray:
        if self.first:
            return np.asarray(step.ids[a:b], dtype=np.int64)[None, :]
        assert step.hidden is not None
        return step.hidden[:, a:b]

    def _compute_decodes(self, steps: list[Step]) -> list[np.ndarray | int | Exception]:
        """Validate each step, run the valid ones as one batch, sample on the last stage."""
        outs: list[np.ndarray | int | Exception] = []
        ok: list[int] = []
        for i, step in enumerate(steps):
            mark(step.trace, self._mark + "run")
            try:
                self._check_position(step)
                if self.last and step.session not in self._samplers:
                    raise ProtocolError(f"no sampler for session {step.session}")
                ok.append(i)
                outs.append(ProtocolError("not run"))
            except ProtocolError as exc:
                outs.append(exc)
        if not ok:
            return outs
        x = np.concatenate([self._input(steps[i], 0, 1) for i in ok])
        sessions = [steps[i].session for i in ok]
        positions = [steps[i].pos0 for i in ok]
        if len(ok) == 1:
            h = self.runner.step(sessions[0], x, np.asarray([positions], np.int64))
        else:
            h = decode_batch(self.runner, sessions, x, positions)
        for row, i in enumerate(ok):
            mark(steps[i].trace, self._mark + "ort")
            outs[i] = self._samplers[sessions[row]].sample(h[row, -1]) if self.last else h[row : row + 1]
            mark(steps[i].trace, self._mark + "done")
        return outs

    def _compute_chunk(self, job: _Prefill) -> np.ndarray | int | None:
        """The next chunk of a multi-token step; its result once the last chunk ran, else None."""
        step = job.step
        if job.done == 0:
            if step.reset:
                self.runner.free(step.session)
                if self.last:
                    self._samplers.pop(step.session, None)
            else:
                self._check_position(step)
        a = job.chunk_start = job.done
        b = min(len(step.ids), a + self.prefill_chunk)
        positions = np.arange(step.pos0 + a, step.pos0 + b, dtype=np.int64)[None, :]
        out = self.runner.step(step.session, self._input(step, a, b), positions, last_only=self.last)
        job.done = b
        if not self.last:
            job.parts.append(out)
        if b < len(step.ids):
            return None
        if not self.last:
            return job.parts[0] if len(job.parts) == 1 else np.concatenate(job.parts, axis=1)
        if step.reset:
            assert step.sampling is not None
            self._samplers[step.session] = Sampler.resume(step.sampling, step.ids, step.generated)
        sampler = self._samplers.get(step.session)
        if sampler is None:
            raise ProtocolError(f"no sampler for session {step.session}")
        return sampler.sample(out[0, -1])

    async def _forward(self, step: Step, out: np.ndarray | int) -> None:
        mark(step.trace, self._mark + "send")
        if self.last:
            assert isinstance(out, int)
            reply: dict[str, Any] = {"session": step.session, "seq": step.seq, "token": out}
            if step.trace is not None:
                reply["trace"] = step.trace
            await self.send(step.entry, protocol.TOKEN, reply)
            return
        assert isinstance(out, np.ndarray) and self.next_node is not None
        step.hidden = None
        self._forwarded[step.session] = (step.entry, step.seq)
        await self.send(self.next_node, protocol.STEP, step.to_wire(encode_tensor(out)))

    async def _fail(self, entry: str, session: str, seq: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.send(
                entry,
                protocol.TOKEN,
                {"session": session, "seq": seq, "error": reason, "stage": [self.start, self.end]},
            )

    def _expire_idle(self) -> None:
        """Free sessions nobody has stepped for ``idle_timeout_s`` (an entry that vanished)."""
        now = time.monotonic()
        for session, used in list(self._last_used.items()):
            if now - used > self.idle_timeout_s:
                log.info("freeing idle session %s", session)
                self.free(session)
