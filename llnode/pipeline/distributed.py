"""The entry node's side of a generation: drive a session through the pipeline, survive failures.

The node a client called owns the session: it keeps the whole token history and sends one
``pipe.step`` per token to the first stage, then waits for the last stage's ``pipe.token``. If anything
goes wrong on the way (a stage dies, a plan switch makes the stages drop the session, a step times
out), the entry waits for a serving plan and re-prefills the history on it: with greedy or seeded
sampling the continuation is exactly the one an uninterrupted run would have produced. A client sees a
pause, never a lost request; only when no plan can serve within ``recover_within_s`` does the request
fail, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llnode.pipeline import protocol
from llnode.pipeline.engine import EngineUnavailable, GenerationRequest, Tokenizer
from llnode.pipeline.local import PREFILL_CHUNK
from llnode.pipeline.protocol import Step
from llnode.pipeline.trace import HopProfile, Trace, mark, parse_trace

log = logging.getLogger(__name__)

SendFn = Callable[[str, str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    """A serving plan as the entry node needs it: epoch and the stage nodes in order."""

    epoch: int
    nodes: tuple[str, ...]
    step_timeout_s: float = 30.0  # per PREFILL_CHUNK tokens of a step (each stage runs them chunk by chunk)


class StepFailed(Exception):
    """This step will not complete on this route: re-prefill on the next one."""


@dataclass
class _Live:
    """The entry-side state of one session in flight."""

    route: Route
    seq: int = 0
    waiter: asyncio.Future[int] | None = None
    timeout_s: float = 30.0  # of the step in flight
    stages_used: set[str] = field(default_factory=set)
    trace: Trace | None = None  # of the step in flight, if it is traced
    woke_at: float | None = None  # when the generator last had its token (time.time)


class DistributedEngine:
    """An :class:`~llnode.pipeline.engine.Engine` whose stages run on peers (or on this node too)."""

    def __init__(
        self,
        *,
        node_id: str,
        model_ids: Sequence[str],
        max_context: int,
        vocab_size: int,
        eos_ids: Sequence[int],
        tokenizer: Tokenizer,
        route: Callable[[], Route | None],
        route_changed: asyncio.Condition,
        not_ready_reason: Callable[[], str],
        send: SendFn,
        recover_within_s: float = 60.0,
        hopeless: Callable[[int], str | None] = lambda epoch: None,
        accepting: Callable[[], bool] = lambda: False,
    ) -> None:
        self.node_id = node_id
        self._model_ids = list(model_ids)
        self._max_context = max_context
        self._vocab_size = vocab_size
        self.eos_ids = set(eos_ids)
        self._tokenizer = tokenizer
        self._route = route
        self._route_changed = route_changed
        self._not_ready_reason = not_ready_reason
        self._send = send
        self.recover_within_s = recover_within_s
        self._hopeless = hopeless
        self._accepting = accepting
        self._live: dict[str, _Live] = {}
        self.recoveries = 0
        self.completed = 0
        self.longest_pause_s = 0.0
        # Per-hop timing of every n-th decode step (trace.py); 0 turns it off.
        self.trace_every = int(os.environ.get("LLNODE_TRACE_EVERY", "16"))
        self.hops = HopProfile()
        self._decode_steps = 0

    # ---- Engine protocol --------------------------------------------------------------------------
    @property
    def model_ids(self) -> Sequence[str]:
        return self._model_ids

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def ready(self) -> str | None:
        """None while requests are served, or would be after a short wait (a plan is loading)."""
        if self._route() is not None or self._accepting():
            return None
        return self._not_ready_reason()

    @property
    def active_sessions(self) -> int:
        return len(self._live)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        route = self._route()
        if route is None:
            if not self._accepting():
                raise EngineUnavailable(self._not_ready_reason())
            route = await self._recover(None, time.monotonic())  # a plan is loading: wait for it
        session = uuid.uuid4().hex[:16]
        live = _Live(route=route)
        self._live[session] = live
        history = list(request.prompt)
        generated = 0
        sampling = request.params.sampling()
        limit = min(request.params.max_tokens, self._max_context - len(history))
        reset = True
        failing_since: float | None = None
        # The next step, sent before the previous token is handed to the client: the detokenizing and
        # the SSE write then overlap the stages' work instead of adding to every token's latency.
        sent: asyncio.Future[int] | StepFailed | None = None
        try:
            while generated < limit:
                began = time.monotonic()
                try:
                    if sent is None:
                        sent = await self._send_step(session, live, history, generated, sampling, reset)
                    if isinstance(sent, StepFailed):
                        raise sent
                    token = await self._wait(live, sent)
                except StepFailed as exc:
                    sent = None
                    log.warning("session %s: %s; re-prefilling on the next plan", session, exc)
                    failing_since = failing_since or began
                    live.route = await self._recover(live.route, failing_since)
                    reset = True
                    continue
                sent = None
                if failing_since is not None:
                    self.longest_pause_s = max(self.longest_pause_s, time.monotonic() - failing_since)
                    failing_since = None
                reset = False
                if token in self.eos_ids and not request.params.ignore_eos:
                    break
                history.append(token)
                generated += 1
                if generated < limit:
                    try:
                        sent = await self._send_step(session, live, history, generated, sampling, False)
                    except StepFailed as exc:
                        sent = exc  # handled (re-prefill) after the token is out
                yield token
            self.completed += 1
        finally:
            if isinstance(sent, asyncio.Future) and sent.done() and not sent.cancelled():
                sent.exception()  # a step the client no longer waits for: its failure is no news
            self._live.pop(session, None)
            await self._free(session, live)

    # ---- one step ---------------------------------------------------------------------------------
    async def _send_step(
        self, session: str, live: _Live, history: list[int], generated: int, sampling: Any, reset: bool
    ) -> asyncio.Future[int]:
        """Send the step that produces the next token; its answer arrives in the returned future."""
        route = live.route
        live.seq += 1
        step = Step(
            session=session,
            epoch=route.epoch,
            seq=live.seq,
            entry=self.node_id,
            pos0=0 if reset else len(history) - 1,
            ids=list(history) if reset else [history[-1]],
            reset=reset,
            sampling=sampling if reset else None,
            generated=generated if reset else 0,
        )
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        live.waiter = waiter
        # A long prompt's prefill on a slow device may take minutes; a lost step must still be noticed.
        live.timeout_s = route.step_timeout_s * math.ceil(len(step.ids) / PREFILL_CHUNK)
        live.stages_used.update(route.nodes)
        live.trace = None
        if not reset and self.trace_every > 0:
            self._decode_steps += 1
            if self._decode_steps % self.trace_every == 0:
                # From the previous token's arrival, so the entry's own work between tokens shows too.
                step.trace = live.trace = [] if live.woke_at is None else [["entry.wake", live.woke_at]]
                mark(step.trace, "entry.send")
        try:
            await self._send(route.nodes[0], protocol.STEP, step.to_wire(None))
        except Exception as exc:
            live.waiter = None
            raise StepFailed(f"first stage {route.nodes[0]} unreachable: {exc}") from exc
        return waiter

    async def _wait(self, live: _Live, waiter: asyncio.Future[int]) -> int:
        timeout = live.timeout_s
        try:
            token = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError as exc:
            raise StepFailed(f"no token within {timeout:.0f} s") from exc
        finally:
            live.waiter = None
        live.woke_at = time.time()
        if live.trace is not None:
            mark(live.trace, "entry.wake")
            self.hops.add(live.trace)
            live.trace = None
        return token

    def on_token(self, payload: Any) -> None:
        """A ``pipe.token`` from a last stage (or a stage's error report) for one of our sessions."""
        if not isinstance(payload, dict):
            return
        live = self._live.get(payload.get("session"))  # type: ignore[arg-type]
        if live is None or live.waiter is None or live.waiter.done():
            return  # a late answer for a session already finished or re-routed
        seq = payload.get("seq")
        if "error" in payload:
            if seq in (-1, live.seq):
                live.waiter.set_exception(StepFailed(f"stage {payload.get('stage')}: {payload['error']}"))
            return
        token = payload.get("token")
        if seq != live.seq or not isinstance(token, int) or not 0 <= token < self._vocab_size:
            return
        if live.trace is not None:
            try:
                live.trace = parse_trace(payload.get("trace"))
                mark(live.trace, "entry.token")
            except ValueError:
                live.trace = None  # a stage that does not trace: no profile for this step
        live.waiter.set_result(token)

    def on_route_lost(self, dead: set[str], why: str = "lost") -> None:
        """Nodes died, the plan changed, or the link to a stage node dropped (``why``): fail the waiting
        step of every session that used them; they re-prefill on the next route."""
        for live in self._live.values():
            if live.waiter is not None and not live.waiter.done() and dead & set(live.route.nodes):
                lost = sorted(dead & set(live.route.nodes))
                live.waiter.set_exception(StepFailed(f"stage node(s) {lost} {why}"))

    async def _recover(self, old: Route | None, failing_since: float) -> Route:
        """Wait for a route to re-prefill on: a newer plan at once, or the same plan again after a
        backoff (the failure may have been transient: one rejected step, a link that reconnected).
        With ``old`` None (a new request while a plan loads) any serving route will do.

        Never returns a failed route without having waited, so a stage that keeps failing cannot make
        the entry spin, and gives up with :class:`EngineUnavailable` once ``recover_within_s`` has passed.
        """
        if old is not None:
            self.recoveries += 1
        old_epoch = -1 if old is None else old.epoch
        deadline = failing_since + self.recover_within_s
        backoff = min(2.0, 0.25 * 2 ** min(self.recoveries % 8, 3))
        retry_same_at = time.monotonic() + backoff
        async with self._route_changed:
            while True:
                route = self._route()
                now = time.monotonic()
                if route is not None and (route.epoch != old_epoch or now >= retry_same_at):
                    return route
                reason = self._hopeless(old_epoch) if route is None else None
                if reason is not None:
                    # The leader found no plan over the survivors: waiting out the recovery budget
                    # would only make every client hang for a minute before the same answer.
                    raise EngineUnavailable(reason)
                if now >= deadline:
                    raise EngineUnavailable(
                        "the pipeline lost a stage and no plan could serve within "
                        f"{self.recover_within_s:.0f} s: {self._not_ready_reason()}"
                    )
                with contextlib.suppress(TimeoutError):
                    wake = min(deadline, retry_same_at if route is not None else deadline) - now
                    await asyncio.wait_for(self._route_changed.wait(), max(0.01, min(wake, 1.0)))

    async def _free(self, session: str, live: _Live) -> None:
        for node in live.stages_used:
            with contextlib.suppress(Exception):
                await self._send(node, protocol.FREE, {"session": session})
