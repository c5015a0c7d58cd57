"""A discrete-event simulator of the llnode pipeline: the daemon's data path, priced by measured costs.

What it models, and why each piece is there (each mirrors the real code path):
- a request from a client to its *entry* node: a prefill of the prompt, then one decode step per token;
  every step goes entry -> stage 0 -> ... -> last stage -> entry, as ``pipeline.distributed`` does;
- each stage node runs one step at a time (``StageWorker`` has one worker thread): the decode steps
  waiting there as one batch (up to the sessions it holds divided by the number of stages), prefills in
  chunks alternating with the batches; for ``ModuleCosts`` seconds (measured, batch of 1 and of 4)
  scaled by the device's speed and any slowdown, plus a fixed per-step cost;
- each message leaves through its sender's link, one at a time (a Wi-Fi uplink, or the harness's token
  bucket): ``bytes / min(sender, receiver rate)``, plus half of both round trips and a fixed per-hop cost;
- clients: a closed loop of ``sessions`` clients (each sends its next request when one finishes, as the
  benchmarks do) or an open loop of Poisson arrivals at ``arrival_rate`` requests/s;
- events: a device slows down (optionally followed by a rebalance), leaves (detected after the failure
  detector's delay, re-planned), or joins (re-planned). Every plan comes from the real planner through
  ``plan_fn``; during a switch steps wait, and every session caught by it re-prefills its whole history
  on the new plan, exactly as the entry node does.

The per-step and per-hop fixed costs are inputs (:class:`Overheads`), calibrated from a real run; the
default is zero, which is the planner's own cost model with measured module times.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from llnode.emulate.profiles import LinkClass, pair_links
from llnode.model.manifest import Manifest
from llnode.pipeline.local import PREFILL_CHUNK
from llnode.pipeline.stage import GATHER_MAX_S
from llnode.plan import solve
from llnode.plan.costs import ModelCosts as ModelCosts_
from llnode.plan.profile import DaemonCpu
from llnode.plan.types import DeviceProfile, Plan, PlanOptions
from llnode.sim.costs import TOKEN_ID_BYTES, ModuleCosts

PlanFn = Callable[[list[DeviceProfile]], Plan]


@dataclass(frozen=True)
class Overheads:
    """Fixed costs of the daemon around the modules, in seconds (calibrated, see ``bench sim``)."""

    # the daemon's CPU per stage step beyond the modules, by role and rows, and its worker thread's CPU
    # over the modules' price (measured, ``DaemonCpu``): charged on the stage under the node's budget
    cpu: DaemonCpu = field(default_factory=DaemonCpu)
    # waiting per step at a stage (thread wake-ups, the GIL): the stage is busy but spends no CPU. Per
    # step, not per token at the entry: a 1-node run with 4 sessions ran batches of 4 (a wait between a
    # token and the next step longer than the stage's 5 ms gather wait would have split them, as a
    # fixed one did in the simulator: 3 + 1, -28 % tok/s), so the wait is where the batch is
    wait_s: float = 0.0
    hop_s: float = 0.0  # per message between two nodes: framing, encryption, event loop
    token_s: float = 0.0  # per token at the entry: detokenize, stream to the client


@dataclass(frozen=True)
class Workload:
    sessions: int = 4  # closed loop: concurrent clients
    arrival_rate: float | None = None  # open loop: requests/s (Poisson); then ``sessions`` is ignored
    prompt_tokens: int = 16
    max_tokens: int = 32
    duration_s: float = 60.0
    warmup_s: float = 5.0
    seed: int = 0


@dataclass(frozen=True)
class Event:
    at_s: float
    kind: str  # "slowdown" | "leave" | "join"
    device_id: str
    factor: float = 1.0  # slowdown: compute takes ``factor`` times longer
    profile: DeviceProfile | None = None  # join: the new device
    link: LinkClass | None = None  # join: its link


@dataclass(frozen=True)
class Delays:
    """How long the cluster takes to react (the daemon's own settings, docs/faults.md, docs/balance.md)."""

    detect_leave_s: float = 3.5  # failure detector
    detect_join_s: float = 2.0  # discovery + profile gossip
    detect_drift_s: float = 10.0  # EWMA crossing the threshold + the sustained window
    switch_s: float = 2.0  # followers load their new ranges (make-before-break)
    rebalance: bool = True
    min_gain: float = 0.10


@dataclass
class SimResult:
    tokens: int  # tokens produced inside the measuring window
    window_s: float
    tokens_per_s: float
    token_latency_s: float  # mean gap between consecutive tokens of a request (decode), in the window
    ttft_s: float  # mean time from request to first token
    requests: int
    plans: list[tuple[float, Plan]]
    timeline: list[tuple[float, float]]  # (bucket start, tokens/s)
    events: list[str] = field(default_factory=list)


@dataclass
class _Job:
    """One step waiting at (or running on) a stage."""

    session: _Session
    start: int
    end: int
    tokens: int
    prefill: bool
    then: Callable[[], None]
    epoch: int
    done: int = 0  # prefill tokens already run (chunks)


@dataclass
class _Session:
    client: int
    entry: str
    history: int  # tokens the entry holds (prompt + generated): a re-prefill sends them all
    remaining: int
    requested_at: float
    last_token_at: float | None = None
    epoch: int = -1
    first: bool = True


class Simulator:
    """One cluster, one workload, a list of events; :meth:`run` returns the measured figures."""

    def __init__(
        self,
        costs: ModuleCosts,
        devices: list[DeviceProfile],
        links: dict[str, LinkClass | None],
        plan_fn: PlanFn,
        *,
        entries: list[str] | None = None,
        overheads: Overheads | None = None,
        delays: Delays | None = None,
        events: Sequence[Event] = (),
        plan: Plan | None = None,
        max_batch: int = 0,
        quotas: Mapping[str, float] | None = None,
        period_s: float = 0.1,
        cpu_share: float = 1.0,
        own_scale: Mapping[str, float] | None = None,
    ) -> None:
        self.costs = costs
        self.profiles = {d.device_id: d for d in devices}
        self.links = dict(links)
        self.plan_fn = plan_fn
        self.entries = entries or [devices[0].device_id]
        self.over = overheads or Overheads()
        self.delays = delays or Delays()
        self.events = sorted(events, key=lambda e: e.at_s)
        self.alive = set(self.profiles)
        self.slow: dict[str, float] = dict.fromkeys(self.profiles, 1.0)
        self.max_batch = max_batch
        self.quotas = dict(quotas or {})
        self.period_s = period_s
        if not 0 < cpu_share <= 1:
            raise ValueError(f"cpu_share is the fraction of a core a busy process gets, got {cpu_share}")
        self.cpu_share = cpu_share
        # device -> seconds there per second of the daemon's own CPU measured on the reference core.
        # Default: the device's speed over the reference (a node of the validation is that core under
        # a quota); a device class runs the daemon's one interpreter thread at its core's speed, not at
        # the FLOP rate of its onnxruntime threads (``profiles.own_cpu_scale``)
        self.own_scale = dict(own_scale or {})
        self.cfs: dict[str, tuple[int, float]] = {}  # device -> (CFS period index, CPU seconds used in it)
        self.queues: dict[str, deque[_Job]] = {}
        self.busy: set[str] = set()
        self.prefilling: dict[str, _Job] = {}
        self.decode_turn: dict[str, bool] = {}
        self.gathering: dict[str, int] = {}  # device -> id of its wait for decode steps on their way
        self.gathered: set[str] = set()  # devices whose wait is over: the next batch runs at once
        self.last_batch_s: dict[str, float] = {}
        self.batches: Counter[int] = Counter()  # decode batches by size (compare: a stage's "batches")
        self.active = 0  # requests in progress (the sessions a stage holds: sizes its decode batches)
        self.link_free: dict[str, float] = {}
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.now = 0.0
        self.plan: Plan | None = plan or plan_fn(list(devices))
        self.epoch = 0
        self.plans: list[tuple[float, Plan]] = [(0.0, self.plan)]
        self.waiting: list[_Session] = []
        self.stamps: list[tuple[float, float | None, bool]] = []  # (time, gap to previous token, first)
        self.log: list[str] = []
        self.requests = 0

    # ---- scheduling -------------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    # ---- costs --------------------------------------------------------------------------------------
    def _hop_done(self, src: str, dst: str, nbytes: float, t: float) -> float:
        """When a message sent at ``t`` arrives (queued behind earlier ones on the sender's link)."""
        if src == dst:
            return t
        a, b = self.links.get(src), self.links.get(dst)
        rate = min(a.bytes_per_s if a else math.inf, b.bytes_per_s if b else math.inf)
        start = max(t, self.link_free.get(src, 0.0))
        done = start + (nbytes / rate if math.isfinite(rate) else 0.0)
        self.link_free[src] = done
        rtt = (a.rtt_ms if a else 0.0) + (b.rtt_ms if b else 0.0)
        return done + rtt / 2e3 + self.over.hop_s

    def _cpu_done(self, dev: str, t: float, work: float) -> float:
        """When ``work`` CPU seconds started at ``t`` finish on ``dev``.

        Other processes on the host leave a busy process ``cpu_share`` of a core, so work progresses
        at that rate. A device with a quota (the harness's CPU groups: ``cpu.cfs_quota_us`` per
        ``cfs_period_us``) runs until it has *used* ``quota * period`` CPU seconds in the current
        period, then waits for the next one (CFS bandwidth control counts CPU time, not wall time).
        Why model it: a stage that computes in short bursts never hits its quota, so a node at 0.4
        core serving one session runs at full speed while the same node busy all the time runs at
        0.4; a constant ``0.4 x`` speed got both wrong (-33 % and +50 % on a quiet machine).
        ``decode_flops_per_s`` of a device with a quota is therefore its unthrottled speed."""
        rate = self.cpu_share
        q = self.quotas.get(dev)
        if q is None:
            return t + work / rate
        period, budget = self.period_s, q * self.period_s
        k, used = self.cfs.get(dev, (-1, 0.0))
        while True:
            now_k = math.floor(t / period + 1e-9)
            if now_k != k:
                k, used = now_k, 0.0
            end = (k + 1) * period
            cpu = min(work, budget - used, (end - t) * rate)  # CPU seconds this period still allows
            if cpu > 0:
                t, used, work = t + cpu / rate, used + cpu, work - cpu
            if work <= 1e-12:
                break
            if t < end - 1e-12 and used < budget - 1e-12:
                continue
            t = end  # throttled (or the period ran out): the next period refills the budget
        self.cfs[dev] = (k, used)
        return t

    def _submit(self, dev: str, job: _Job) -> None:
        queue = self.queues.setdefault(dev, deque())
        queue.append(job)
        if dev in self.gathering and sum(not j.prefill for j in queue) >= self._gather_target(dev):
            self._end_gather(dev, self.gathering[dev])  # the batch is full: no need to wait longer
        elif dev not in self.busy:
            self._serve(dev)

    def _limit(self) -> int:
        """Decode batch limit (``StageWorker.batch_limit``): the sessions held, split over the stages."""
        stages = len(self.plan.stages) if self.plan is not None else 1
        return self.max_batch or max(1, math.ceil(max(self.active, 1) / stages))

    def _gather_target(self, dev: str) -> int:
        return min(self._limit(), max(self.active, 1))

    def _end_gather(self, dev: str, token: int) -> None:
        if self.gathering.get(dev) != token:
            return  # that wait already ended (the batch filled up earlier)
        del self.gathering[dev]
        self.gathered.add(dev)
        self.busy.discard(dev)
        self._serve(dev)

    def _serve(self, dev: str) -> None:
        """The stage worker's loop (``StageWorker._run``): decode steps waiting here run as one batch, a
        prefill runs in chunks of ``PREFILL_CHUNK`` tokens, and while a prefill waits the two take turns
        (a new session's prompt is not held back by the others' decoding), after the worker's short wait
        for decode steps on their way (``StageWorker._gather``: 5 % of the last batch, at most
        ``GATHER_MAX_S``, while fewer steps wait than the batch could hold and no prefill waits)."""
        queue = self.queues.setdefault(dev, deque())
        stale = [j for j in queue if j.epoch != self.epoch]  # a plan switch drops them: they re-prefill
        if stale:
            queue = self.queues[dev] = deque(j for j in queue if j.epoch == self.epoch)
            for job in stale:
                job.then()
        prefill = self.prefilling.get(dev)
        if prefill is not None and prefill.epoch != self.epoch:
            del self.prefilling[dev]
            prefill.then()
            prefill = None
        if prefill is None and not queue:
            return
        speed = self.profiles[dev].decode_flops_per_s
        limit = self._limit()
        waiting_prefill = prefill is not None or any(j.prefill for j in queue)
        batch: list[_Job] = []
        if not waiting_prefill and dev not in self.gathered:
            wait = min(GATHER_MAX_S, 0.05 * self.last_batch_s.get(dev, 0.0))
            if wait > 0 and sum(not j.prefill for j in queue) < self._gather_target(dev):
                self._seq += 1
                token = self.gathering[dev] = self._seq
                self.busy.add(dev)  # the worker waits: arrivals queue up (or end the wait when full)
                self.at(self.now + wait, lambda: self._end_gather(dev, token))
                return
        self.gathered.discard(dev)
        if self.decode_turn.get(dev, True) or not waiting_prefill:
            self.decode_turn[dev] = False
            keep: deque[_Job] = deque()
            blocked = {id(prefill.session)} if prefill is not None else set()
            while queue:
                job = queue.popleft()
                if len(batch) < limit and not job.prefill and id(job.session) not in blocked:
                    batch.append(job)
                else:
                    keep.append(job)
                blocked.add(id(job.session))
            queue.extend(keep)
        if batch:
            a, b = batch[0].start, batch[0].end
            work = self.costs.decode_range_s(a, b, speed, len(batch))
            decode = True
            self.batches[len(batch)] += 1
            done_jobs = batch
        elif waiting_prefill:
            if prefill is None:
                first = next(j for j in queue if j.prefill)
                queue.remove(first)
                prefill = self.prefilling[dev] = first
            chunk = min(PREFILL_CHUNK, prefill.tokens - prefill.done)
            work = self.costs.prefill_range_s(prefill.start, prefill.end, chunk, speed)
            prefill.done += chunk
            done_jobs = []
            if prefill.done >= prefill.tokens:
                done_jobs = [prefill]
                del self.prefilling[dev]
            self.decode_turn[dev] = True
            decode = False
        else:
            return
        self.busy.add(dev)
        # the daemon's per-step work (frames, hand-off, the entry's streaming) is CPU like the modules,
        # and its worker runs a decode step's modules at ``module_factor`` times their profiled price
        # (measured on decode steps only: a prefill chunk is priced as profiled)
        cpu = self.over.cpu
        own = cpu.own_s(max(1, len(batch)), entry=dev in self.entries)
        factor = cpu.module_factor if decode else 1.0
        scale = self.own_scale.get(dev, self.costs.reference_flops_per_s / speed)
        step = work * factor + own * scale
        began = self.now
        finish = self._cpu_done(dev, self.now, step * self.slow[dev]) + self.over.wait_s

        def complete() -> None:
            if decode:
                self.last_batch_s[dev] = self.now - began
            self.busy.discard(dev)
            for job in done_jobs:
                job.then()
            self._serve(dev)

        self.at(finish, complete)

    # ---- the data path ------------------------------------------------------------------------------
    def _step(self, s: _Session) -> None:
        """Send the session's next step (a prefill of its history, or one decode token)."""
        if not self._serving():
            self.waiting.append(s)
            return
        assert self.plan is not None
        prefill = s.epoch != self.epoch
        s.epoch = self.epoch
        tokens = s.history if prefill else 1
        stages = [(st.device_id, st.start, st.end) for st in self.plan.stages]
        epoch = self.epoch

        def at_stage(i: int, sender: str, nbytes: float) -> None:
            dev, a, b = stages[i]
            if epoch != self.epoch or dev not in self.alive or sender not in self.alive | {s.entry}:
                return self._lost(s)
            arrive = self._hop_done(sender, dev, nbytes, self.now)

            def compute() -> None:
                if epoch != self.epoch or dev not in self.alive:
                    return self._lost(s)
                last = i == len(stages) - 1
                out = TOKEN_ID_BYTES if last else self.costs.out_bytes_per_token[b - 1] * tokens

                def forward() -> None:
                    if epoch != self.epoch or dev not in self.alive:
                        return self._lost(s)
                    if last:
                        self.at(
                            self._hop_done(dev, s.entry, out, self.now) + self.over.token_s,
                            lambda: self._token(s, epoch),
                        )
                    else:
                        at_stage(i + 1, dev, out)
                    return None

                self._submit(dev, _Job(s, a, b, tokens, prefill, forward, epoch))
                return None

            self.at(arrive, compute)
            return None

        at_stage(0, s.entry, TOKEN_ID_BYTES * tokens)

    def _serving(self) -> bool:
        """A plan is in force and none of its devices is gone (else steps wait for the next plan)."""
        return self.plan is not None and all(d in self.alive for d in self.plan.devices)

    def _lost(self, s: _Session) -> None:
        """The step died with its plan (a device left, or a switch): re-prefill on the next plan."""
        s.epoch = -1
        self._step(s)

    def _token(self, s: _Session, epoch: int) -> None:
        if epoch != self.epoch:
            return self._lost(s)
        if s.first:
            self.stamps.append((self.now, self.now - s.requested_at, True))
        else:
            gap = None if s.last_token_at is None else self.now - s.last_token_at
            self.stamps.append((self.now, gap, False))
        s.first = False
        s.last_token_at = self.now
        s.history += 1
        s.remaining -= 1
        if s.remaining <= 0:
            self._request_done(s)
        else:
            self._step(s)
        return None

    # ---- clients ------------------------------------------------------------------------------------
    def _new_request(self, client: int) -> None:
        self.requests += 1
        self.active += 1
        w = self.workload
        s = _Session(
            client=client,
            entry=self.entries[client % len(self.entries)],
            history=w.prompt_tokens,
            remaining=w.max_tokens,
            requested_at=self.now,
        )
        self._step(s)

    def _request_done(self, s: _Session) -> None:
        self.active -= 1
        if self.workload.arrival_rate is None and self.now < self.workload.duration_s:
            self._new_request(s.client)

    def _arrivals(self, rng: random.Random) -> None:
        rate = self.workload.arrival_rate
        assert rate is not None
        t = 0.0
        k = 0
        while True:
            t += rng.expovariate(rate)
            if t >= self.workload.duration_s:
                break
            self.at(t, lambda k=k: self._new_request(k))  # type: ignore[misc]
            k += 1

    # ---- events and re-planning ---------------------------------------------------------------------
    def _apply(self, ev: Event) -> None:
        d = self.delays
        if ev.kind == "slowdown":
            self.slow[ev.device_id] = ev.factor
            self.log.append(f"{self.now:.1f}s {ev.device_id} slows down x{ev.factor:g}")
            if d.rebalance and self.plan is not None and ev.device_id in self.plan.devices:
                self.at(self.now + d.detect_drift_s, self._rebalance)
        elif ev.kind == "leave":
            self.alive.discard(ev.device_id)
            self.log.append(f"{self.now:.1f}s {ev.device_id} leaves")
            if self.plan is not None and ev.device_id in self.plan.devices:
                self.at(self.now + d.detect_leave_s, self._replan)
        elif ev.kind == "join":
            if ev.profile is None:
                raise ValueError(f"join event for {ev.device_id} needs a profile")
            self.profiles[ev.device_id] = ev.profile
            self.links[ev.device_id] = ev.link
            self.slow[ev.device_id] = 1.0
            self.alive.add(ev.device_id)
            self.log.append(f"{self.now:.1f}s {ev.device_id} joins")
            self.at(self.now + d.detect_join_s, self._replan)
        else:
            raise ValueError(f"unknown event kind {ev.kind!r} (slowdown, leave, join)")

    def _live_profiles(self, measured: bool) -> list[DeviceProfile]:
        out = []
        for dev in sorted(self.alive):
            p = self.profiles[dev]
            if measured and self.slow[dev] != 1.0:
                p = replace(p, decode_flops_per_s=p.decode_flops_per_s / self.slow[dev])
            out.append(p)
        return out

    def _install(self, plan: Plan, why: str) -> None:
        self.plan = None  # steps wait while followers load their ranges
        self.epoch += 1

        def done() -> None:
            self.plan = plan
            self.plans.append((self.now, plan))
            self.log.append(
                f"{self.now:.1f}s plan {why}: {[(s.device_id, s.start, s.end) for s in plan.stages]}"
            )
            waiting, self.waiting = self.waiting, []
            for s in waiting:
                s.epoch = -1
                self._step(s)

        self.at(self.now + self.delays.switch_s, done)

    def _replan(self) -> None:
        self._install(self.plan_fn(self._live_profiles(measured=True)), "re-plan after a membership change")

    def _rebalance(self) -> None:
        if self.plan is None:
            return
        new = self.plan_fn(self._live_profiles(measured=True))
        cur = self._bottleneck(self.plan)
        if new.ranges() != self.plan.ranges() and self._bottleneck(new) < cur / (1 + self.delays.min_gain):
            self._install(new, "rebalance after a slowdown")
        else:
            self.log.append(f"{self.now:.1f}s rebalance declined (gain below {self.delays.min_gain:.0%})")

    def _bottleneck(self, plan: Plan) -> float:
        worst = 0.0
        for st in plan.stages:
            speed = self.profiles[st.device_id].decode_flops_per_s / self.slow[st.device_id]
            worst = max(worst, self.costs.decode_range_s(st.start, st.end, speed) + st.link_s)
        return worst

    # ---- run ----------------------------------------------------------------------------------------
    def run(self, workload: Workload, bucket_s: float = 2.0) -> SimResult:
        self.workload = workload
        rng = random.Random(workload.seed)
        if workload.arrival_rate is None:
            for k in range(workload.sessions):
                self.at(0.0, lambda k=k: self._new_request(k))  # type: ignore[misc]
        else:
            self._arrivals(rng)
        for ev in self.events:
            self.at(ev.at_s, lambda ev=ev: self._apply(ev))  # type: ignore[misc]
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            if t > workload.duration_s:
                break
            self.now = t
            fn()
        t0, t1 = workload.warmup_s, workload.duration_s
        inside = [s for s in self.stamps if t0 <= s[0] < t1]
        gaps = [g for _, g, first in inside if not first and g is not None]
        firsts = [g for _, g, first in inside if first and g is not None]
        buckets = math.ceil(t1 / bucket_s)
        counts = [0] * buckets
        for t, _, _ in self.stamps:
            if t < t1:
                counts[int(t // bucket_s)] += 1
        return SimResult(
            tokens=len(inside),
            window_s=t1 - t0,
            tokens_per_s=len(inside) / (t1 - t0),
            token_latency_s=sum(gaps) / len(gaps) if gaps else math.nan,
            ttft_s=sum(firsts) / len(firsts) if firsts else math.nan,
            requests=self.requests,
            plans=self.plans,
            timeline=[(i * bucket_s, c / bucket_s) for i, c in enumerate(counts)],
            events=self.log,
        )


def planner(
    model: Manifest | ModelCosts_,
    links: Mapping[str, LinkClass | None],
    options: PlanOptions | None = None,
) -> PlanFn:
    """The real planner (:func:`llnode.plan.solve`) over whichever devices are live, links from profiles."""

    def plan_fn(devices: list[DeviceProfile]) -> Plan:
        return solve(model, devices, pair_links([d.device_id for d in devices], links), options)

    return plan_fn
