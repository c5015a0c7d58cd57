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
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llnode.model.manifest import Manifest
from llnode.model.runner import ModuleRunner
from llnode.net.codec import FrameError, decode_tensor, encode_tensor
from llnode.pipeline import protocol
from llnode.pipeline.metrics import StageMetrics
from llnode.pipeline.protocol import ProtocolError, Step
from llnode.pipeline.sampling import Sampler

log = logging.getLogger(__name__)

SendFn = Callable[[str, str, dict[str, Any]], Awaitable[None]]


@dataclass
class _Pending:
    step: Step
    received: float = field(default_factory=time.monotonic)


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
        self.metrics = StageMetrics()
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._samplers: dict[str, Sampler] = {}
        self._last_used: dict[str, float] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{self.start}")
        self._task: asyncio.Task[None] | None = None
        if not self.last and next_node is None:
            raise ValueError("a stage that is not the last needs a next node")

    # ---- lifecycle --------------------------------------------------------------------------------
    def start_worker(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stage-{self.start}-{self.end}")

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
        self._queue.put_nowait(_Pending(step))
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
        self._executor.submit(self.runner.free, session)

    # ---- the worker -------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            self.metrics.queue_length = self._queue.qsize()
            if item is None:
                return
            step = item.step
            began = time.monotonic()
            try:
                out = await loop.run_in_executor(self._executor, self._compute, step)
            except Exception as exc:  # one step's failure must not stop the stage
                log.warning("stage %d-%d failed session %s: %s", self.start, self.end, step.session, exc)
                await self._fail(step.entry, step.session, step.seq, f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.monotonic() - began
            self.metrics.record(len(step.ids), elapsed, prefill=step.reset or len(step.ids) > 1)
            self._last_used[step.session] = time.monotonic()
            try:
                await self._forward(step, out)
            except Exception as exc:
                log.warning("stage %d-%d could not forward %s: %s", self.start, self.end, step.session, exc)
                await self._fail(step.entry, step.session, step.seq, f"next stage unreachable: {exc}")
            self._expire_idle()

    def _compute(self, step: Step) -> np.ndarray | int:
        """Runs on the worker thread: the modules, and on the last stage the sampler."""
        if step.reset:
            self.runner.free(step.session)
        elif self.runner.context_length(step.session) != step.pos0:
            raise ProtocolError(
                f"session {step.session} is at position {self.runner.context_length(step.session)} here, "
                f"the step starts at {step.pos0}"
            )
        positions = np.arange(step.pos0, step.pos0 + len(step.ids), dtype=np.int64)[None, :]
        x = np.asarray(step.ids, dtype=np.int64)[None, :] if self.first else step.hidden
        assert x is not None
        out = self.runner.step(step.session, x, positions)
        if not self.last:
            return out
        if step.reset:
            assert step.sampling is not None
            self._samplers[step.session] = Sampler.resume(step.sampling, step.ids, step.generated)
        sampler = self._samplers.get(step.session)
        if sampler is None:
            raise ProtocolError(f"no sampler for session {step.session}")
        return sampler.sample(out[0, -1])

    async def _forward(self, step: Step, out: np.ndarray | int) -> None:
        if self.last:
            assert isinstance(out, int)
            reply = {"session": step.session, "seq": step.seq, "token": out}
            await self.send(step.entry, protocol.TOKEN, reply)
            return
        assert isinstance(out, np.ndarray) and self.next_node is not None
        step.hidden = None
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
