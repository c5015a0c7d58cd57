"""The pipeline on one node: profile, plan (as leader), follow the plan, serve stages and requests.

Everything travels through gossip and the peer links the daemon already has:

- ``profile``  every node measures itself on real modules of the model and gossips the result;
- ``plan``     the leader solves the assignment over the live, profiled nodes and gossips it (with an
               ever-growing epoch); it re-plans when membership changes;
- ``stage``    every node loads its range of the leader's plan (fetching module files it lacks from
               peers, verified by sha256), then gossips ``{epoch, ready}``;
- a plan *serves* once every stage node says it is ready for that epoch; any node is then an entry:
  its :class:`DistributedEngine` drives sessions through the stages.

Shard files are served to peers over the same authenticated, encrypted links (``shard`` requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from llnode.api.routes import setup_openai_routes
from llnode.model.manifest import Manifest
from llnode.model.runner import ModuleRunner, disable_spinning
from llnode.model.tokenizer import load_tokenizer
from llnode.pipeline import protocol
from llnode.pipeline.distributed import DistributedEngine, Route
from llnode.pipeline.local import ShardTokenizer, prefill_chunk
from llnode.pipeline.metrics import live_context
from llnode.pipeline.rebalance import Rebalancer
from llnode.pipeline.stage import StageWorker
from llnode.plan.profile import profile_device
from llnode.plan.solve import solve
from llnode.plan.types import DeviceProfile, LinkProfile, Plan, PlanError, PlanInfeasible, PlanOptions
from llnode.process import release_memory
from llnode.shards.errors import ShardError
from llnode.shards.fetch import ShardFetcher, peers_holding
from llnode.shards.rpc import RpcShardTransport, handle_shard_request
from llnode.shards.serve import ShardServer
from llnode.shards.store import ShardStore

if TYPE_CHECKING:
    from llnode.daemon import Node

log = logging.getLogger(__name__)

SHARD_MSG = "shard"
# Gossip keys this service publishes in the node's state.
PLAN_KEY = "plan"  # leader only: {model, epoch, leader, plan | error}
PROFILE_KEY = "profile"  # {model, manifest, device: DeviceProfile}
STAGE_KEY = "stage"  # {epoch, ready, range, problem?}
INVENTORY_KEY = "inventory"  # ShardStore.inventory()
METRICS_KEY = "metrics"  # StageMetrics snapshot + epoch, range, sessions
METRICS_EVERY_S = 2.0
TICK_S = 0.5
REPLAN_SETTLE_S = 1.5


class PipelineService:
    """Attach with ``PipelineService(node)`` before ``node.start()``; then ``await service.start()``."""

    def __init__(self, node: Node, *, plan_options: PlanOptions | None = None) -> None:
        if os.environ.get("LLNODE_SPIN", "0") != "1":
            disable_spinning()  # a stage mostly waits for its neighbours: idle threads must sleep
        prefill_chunk()  # a bad LLNODE_PREFILL_CHUNK stops the daemon now, not at its first prompt
        self.node = node
        self.model = node.config.model
        self.store = ShardStore(node.config.shards_path)
        self.server = ShardServer(self.store)
        self.fetcher = ShardFetcher(self.store, RpcShardTransport(self._shard_call))
        self.plan_options = plan_options or PlanOptions()
        self.manifest: Manifest | None = None
        self.manifest_sha: str | None = None
        self.engine: DistributedEngine | None = None
        self.worker: StageWorker | None = None  # the stage of the newest plan this node has loaded
        # Stages of older plans, kept serving until the newest plan serves (make-before-break).
        self._retiring: dict[int, StageWorker] = {}
        self.following: Plan | None = None
        self.state = "starting"
        self.problem: str | None = None
        self.events: list[dict[str, Any]] = []
        self._route: Route | None = None
        self._route_changed = asyncio.Condition()
        self._planned_key: tuple[Any, ...] | None = None
        self._key_since: tuple[tuple[Any, ...] | None, float] = (None, 0.0)
        self._switch_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._metrics_at = 0.0
        node.links.on(protocol.STEP, self._on_step, inline=True)
        node.links.on(protocol.TOKEN, self._on_token, inline=True)
        node.links.on(protocol.FREE, self._on_free, inline=True)
        node.links.on(SHARD_MSG, self._on_shard)
        node.links.disconnect_callbacks.append(self._on_link_down)
        node.status_providers["pipeline"] = self.status
        self.rebalancer = Rebalancer(self)  # drift detection and rebalance requests (rebalance.py)
        node.subscribe(self._on_node_event)
        setup_openai_routes(node.app, lambda: self.engine)

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._main(), name="pipeline"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._switch_task is not None:
            self._switch_task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._retire(before=1 << 62)
        if self.worker is not None:
            await self.worker.close()

    def event(self, kind: str, message: str, **data: Any) -> None:
        log.info("%s: %s", kind, message)
        self.events.append({"t": time.time(), "kind": kind, "message": message, **data})
        del self.events[:-100]

    async def _main(self) -> None:
        await self._publish_inventory()
        while self.manifest is None:
            try:
                await self._load_model()
            except (ShardError, OSError, ValueError) as exc:
                self.problem = f"model {self.model!r} not available yet: {exc}"
                await asyncio.sleep(2.0)
        await self._profile()
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pipeline tick failed")
            await asyncio.sleep(TICK_S)

    # ---- model, tokenizer, profile -----------------------------------------------------------------
    def _inventories(self) -> dict[str, Any]:
        gossip = self.node.gossip
        return {
            n: gossip.get(n, INVENTORY_KEY) or {}
            for n in self.node.live_members()
            if n != self.node.node_id
        }

    async def _publish_inventory(self) -> None:
        inventory = await asyncio.to_thread(self.store.inventory)
        self.node.gossip.set_local(INVENTORY_KEY, inventory)

    async def _load_model(self) -> None:
        """Manifest and tokenizer here (from a peer if need be), then the entry engine."""
        if not await asyncio.to_thread(self.store.has_manifest, self.model):
            holders = peers_holding(self._inventories(), self.model)
            if not holders:
                raise ShardError(f"no peer holds {self.model!r} yet")
            self.state = "fetching model"
            await self.fetcher.ensure(self.model, (0, 0), holders)
        else:
            await self.fetcher.ensure(self.model, (0, 0), peers_holding(self._inventories(), self.model))
        manifest = await asyncio.to_thread(self.store.manifest, self.model)
        self.manifest_sha = await asyncio.to_thread(self.store.manifest_sha256, self.model)
        model_tokenizer = await asyncio.to_thread(
            load_tokenizer, self.store.model_dir(self.model), manifest.tokenizer_file
        )
        tokenizer = ShardTokenizer(model_tokenizer, manifest)
        self.engine = DistributedEngine(
            node_id=self.node.node_id,
            model_ids=list(dict.fromkeys([self.model, manifest.name])),
            max_context=manifest.max_context,
            vocab_size=manifest.vocab_size,
            eos_ids=manifest.eos_token_ids,
            tokenizer=tokenizer,
            route=lambda: self._route,
            route_changed=self._route_changed,
            not_ready_reason=lambda: self.problem or self.state,
            send=self.send,
            hopeless=self._plan_error_since,
            accepting=self._plan_pending,
        )
        self.manifest = manifest
        await self._publish_inventory()

    async def _profile(self) -> None:
        assert self.manifest is not None
        self.state = "profiling"
        probe = next(m.index for m in self.manifest.modules if m.kind == "layer")
        while True:
            try:
                await self.fetcher.ensure(
                    self.model, (probe, probe + 1), peers_holding(self._inventories(), self.model)
                )
                break
            except ShardError as exc:
                self.problem = f"cannot fetch a module to profile with: {exc}"
                await asyncio.sleep(2.0)
        profile = await asyncio.to_thread(
            profile_device, self.store.model_dir(self.model), self.manifest, device_id=self.node.node_id,
            name=self.node.name, memory_limit=self.node.config.memory_limit,
        )
        await asyncio.to_thread(release_memory)  # the profiling runners' memory (60 MB for SmolLM2)
        self.node.gossip.set_local(
            PROFILE_KEY, {"model": self.model, "manifest": self.manifest_sha, "device": profile.to_dict()}
        )
        self.event("profile", f"profiled in {profile.profile_s:.2f} s: "
                   f"{profile.decode_flops_per_s / 1e9:.2f} GFLOP/s decode")
        self.state = "waiting for a plan"
        self.problem = None
        await self._publish_inventory()

    # ---- leader: plan -----------------------------------------------------------------------------
    def _profiles(self) -> dict[str, DeviceProfile]:
        out: dict[str, DeviceProfile] = {}
        for n in self.node.live_members():
            entry = self.node.gossip.get(n, PROFILE_KEY)
            if not isinstance(entry, dict) or entry.get("model") != self.model:
                continue
            if entry.get("manifest") != self.manifest_sha:
                continue
            try:
                out[n] = DeviceProfile.from_dict(entry.get("device"))
            except PlanError as exc:
                log.warning("ignoring %s's profile: %s", n, exc)
        return out

    def _links(self, nodes: list[str]) -> list[LinkProfile]:
        """The round trips and bandwidths every node measured to its peers and gossiped (``links``)."""
        out: list[LinkProfile] = []
        for src in nodes:
            measured = self.node.gossip.get(src, "links")
            if not isinstance(measured, dict):
                continue
            for dst, link in measured.items():
                if dst not in nodes or not isinstance(link, dict):
                    continue
                with contextlib.suppress(PlanError, TypeError):
                    out.append(LinkProfile.from_dict({"src": src, "dst": dst, **link}))
        return out

    def _published(self) -> dict[str, Any] | None:
        leader = self.node.leader_id
        entry = self.node.gossip.get(leader, PLAN_KEY) if leader else None
        return entry if isinstance(entry, dict) and entry.get("model") == self.model else None

    def _max_epoch(self) -> int:
        best = 0
        for n in self.node.gossip.view:
            entry = self.node.gossip.get(n, PLAN_KEY)
            if isinstance(entry, dict) and isinstance(entry.get("epoch"), int):
                best = max(best, entry["epoch"])
        return best

    async def _maybe_plan(self) -> None:
        if not self.node.is_leader or self.manifest is None:
            return
        profiles = self.rebalancer.adjust(self._profiles())  # speeds measured while serving, if any
        key = (tuple(sorted(profiles)), self.manifest_sha)
        now = time.monotonic()
        if key != self._key_since[0]:
            self._key_since = (key, now)
        published = self._published()
        mine = published is not None and published.get("leader") == self.node.node_id
        if mine and key == self._planned_key and published is not None and published.get("epoch", 0) >= (
            self._max_epoch()
        ):
            return  # (a leader back from a pause re-plans: others planned newer epochs meanwhile)
        if now - self._key_since[1] < REPLAN_SETTLE_S or not profiles:
            return
        current = Plan.from_dict(published["plan"]) if published and published.get("plan") else None
        epoch = self._max_epoch() + 1
        entry: dict[str, Any] = {"model": self.model, "epoch": epoch, "leader": self.node.node_id}
        try:
            plan = await asyncio.to_thread(
                solve,
                self.manifest,
                list(profiles.values()),
                self._links(list(profiles)),
                self.rebalancer.options(),  # costed at the context sessions are really at, once measured
                current=current,
                epoch=epoch,
            )
        except PlanInfeasible as exc:
            entry["error"] = str(exc)
            self.event("plan", f"no feasible plan over {len(profiles)} node(s): {exc}")
        else:
            entry["plan"] = plan.to_dict()
            self.event(
                "plan",
                f"epoch {epoch}: "
                + ", ".join(f"{s.name or s.device_id}[{s.start},{s.end})" for s in plan.stages)
                + f", predicted {plan.tokens_per_s:.1f} tok/s ({plan.solver})",
                epoch=epoch,
            )
        self._planned_key = key
        self.node.gossip.set_local(PLAN_KEY, entry)

    def _plan_pending(self) -> bool:
        """A plan is loading, or the cluster served before and is electing a leader or re-planning: new
        requests wait for it (bounded by the engine's recovery budget) instead of getting a 503."""
        published = self._published()
        if published is None:
            return self.following is not None
        return "plan" in published and "error" not in published

    def _plan_error_since(self, epoch: int) -> str | None:
        """The leader's reason why no plan can serve, if it decided so after plan ``epoch``."""
        published = self._published()
        if published is None or "error" not in published or not isinstance(published.get("epoch"), int):
            return None
        if published["epoch"] <= epoch:
            return None
        return f"no plan can serve: {published['error']}"

    # ---- every node: follow the plan ----------------------------------------------------------------
    async def _tick(self) -> None:
        await self._maybe_plan()
        self._publish_metrics()
        published = self._published()
        if published is None:
            self._set_route(None)
            return
        stale = self.following is not None and published.get("epoch", 0) < self.following.epoch
        if stale:
            # A leader back from a pause still shows its old plan until it re-plans: keep the newer one.
            assert self.following is not None
            self._set_route(self._serving_route(self.following))
            return
        if "error" in published:
            self.problem = f"no plan can serve: {published['error']}"
            self._set_route(None)
            return
        plan = Plan.from_dict(published["plan"])
        if self.following is None or plan.epoch != self.following.epoch:
            self.following = plan
            if self._switch_task is not None and not self._switch_task.done():
                self._switch_task.cancel()
            self._switch_task = asyncio.create_task(self._switch(plan))
        route = self._serving_route(plan)
        old = self._route
        # Make-before-break: keep serving on the previous plan while the new one loads, as long as its
        # stage nodes live (each keeps its old stage until it sees the new plan serve).
        previous_usable = old is not None and all(self.node.gossip.is_alive(n) for n in old.nodes)
        if route is None and old is not None and old.epoch != plan.epoch and previous_usable:
            route = old
        self._set_route(route)
        if route is not None and route.epoch == plan.epoch:
            await self._retire(before=plan.epoch)
        await self.rebalancer.tick()

    def _keep_retiring(self, worker: StageWorker | None) -> None:
        if worker is not None:
            self._retiring[worker.epoch] = worker

    async def _retire(self, before: int) -> None:
        """Close the stages of plans older than ``before``: their in-flight steps finish first. Then
        give the old runner's memory back to the OS: without it every plan switch raised RSS for good
        (glibc keeps freed arenas; llnode/process.py)."""
        closed = [e for e in self._retiring if e < before]
        for epoch in closed:
            await self._retiring.pop(epoch).close()
        if closed:
            released = await asyncio.to_thread(release_memory)
            log.info("closed the stage(s) of epoch(s) %s: %.0f MB given back", closed, released / 2**20)

    def _publish_metrics(self) -> None:
        """Gossip this node's stage measurements (at most every 2 s): drift detection and the dashboard."""
        now = time.monotonic()
        if now - self._metrics_at < METRICS_EVERY_S:
            return
        self._metrics_at = now
        metrics: dict[str, Any] = {"sessions": self.engine.active_sessions if self.engine else 0}
        metrics.update(self.stage_metrics() or {})
        if metrics != self.node.gossip.get(self.node.node_id, METRICS_KEY):
            self.node.gossip.set_local(METRICS_KEY, metrics)

    def stage_metrics(self) -> dict[str, Any] | None:
        """This node's stage measurements now (None without a stage): what it gossips under
        ``metrics`` besides its session count, and what a rebalance request carries."""
        worker = self.worker
        if worker is None:
            return None
        context = live_context(worker.runner)
        return {**worker.metrics.snapshot(), "epoch": worker.epoch, "range": [worker.start, worker.end],
                "context": None if context is None else round(context, 1)}

    def _serving_route(self, plan: Plan) -> Route | None:
        nodes = tuple(s.device_id for s in plan.stages)
        gossip = self.node.gossip
        for n in nodes:
            stage = gossip.get(n, STAGE_KEY)
            if not gossip.is_alive(n) or not isinstance(stage, dict) or stage.get("epoch") != plan.epoch:
                self.problem = f"plan epoch {plan.epoch}: waiting for stage node {n} to load its modules"
                return None
            if not stage.get("ready"):
                self.problem = f"plan epoch {plan.epoch}: stage node {n}: {stage.get('problem', 'loading')}"
                return None
        self.problem = None
        return Route(epoch=plan.epoch, nodes=nodes)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task this service holds until it ends (cancelled by ``stop``)."""
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _set_route(self, route: Route | None) -> None:
        old = self._route
        if route == old:
            return
        self._route = route
        self.state = "serving" if route else "waiting for a plan"
        if old is not None and self.engine is not None and (route is None or route.epoch != old.epoch):
            self.engine.on_route_lost(set(old.nodes))
        if route is not None:
            self.event("route", f"serving plan epoch {route.epoch} over {len(route.nodes)} stage(s)")

        async def notify() -> None:
            async with self._route_changed:
                self._route_changed.notify_all()

        self._spawn(notify())

    async def _switch(self, plan: Plan) -> None:
        """Load this node's range of ``plan`` (fetching missing modules), then announce readiness."""
        assert self.manifest is not None
        me = self.node.node_id
        stages = plan.stages
        mine = next((i for i, s in enumerate(stages) if s.device_id == me), None)
        gossip = self.node.gossip
        if mine is None:
            old, self.worker = self.worker, None
            self._keep_retiring(old)
            gossip.set_local(STAGE_KEY, {"epoch": plan.epoch, "ready": True, "range": None})
            return
        stage = stages[mine]
        began = time.monotonic()
        gossip.set_local(STAGE_KEY, {"epoch": plan.epoch, "ready": False, "range": [stage.start, stage.end]})
        while True:
            try:
                holders = peers_holding(self._inventories(), self.model, self.manifest_sha)
                fetched = await self.fetcher.ensure(
                    self.model, (stage.start, stage.end), holders, self.manifest_sha
                )
                break
            except ShardError as exc:
                gossip.set_local(
                    STAGE_KEY,
                    {
                        "epoch": plan.epoch,
                        "ready": False,
                        "range": [stage.start, stage.end],
                        "problem": str(exc),
                    },
                )
                await asyncio.sleep(2.0)
        if fetched:
            self.event("shards", f"fetched {len(fetched)} file(s) for modules [{stage.start},{stage.end})")
            await self._publish_inventory()
        held = self.worker or (self._retiring[max(self._retiring)] if self._retiring else None)
        runner = await asyncio.to_thread(  # sessions of modules this node already runs are shared
            ModuleRunner, self.store.model_dir(self.model), self.manifest, stage.start, stage.end,
            reuse=held.runner if held is not None else None,
        )
        worker = StageWorker(
            node_id=me,
            epoch=plan.epoch,
            manifest=self.manifest,
            runner=runner,
            next_node=stages[mine + 1].device_id if mine + 1 < len(stages) else None,
            send=self.send,
            stages=len(stages),
        )
        worker.start_worker()
        old, self.worker = self.worker, worker
        self._keep_retiring(old)
        gossip.set_local(STAGE_KEY, {"epoch": plan.epoch, "ready": True, "range": [stage.start, stage.end]})
        load_s = time.monotonic() - began
        self.event("stage", f"epoch {plan.epoch}: running modules [{stage.start},{stage.end}) after "
                   f"{load_s:.1f} s ({runner.built} of {stage.end - stage.start} module(s) built)",
                   epoch=plan.epoch, load_s=round(load_s, 2), built=runner.built)

    # ---- messages ---------------------------------------------------------------------------------
    async def send(self, peer: str, msg_type: str, payload: dict[str, Any]) -> None:
        """Send over the peer link, or hand to ourselves when this node is the addressee."""
        if peer == self.node.node_id:
            handlers = {
                protocol.STEP: self._on_step,
                protocol.TOKEN: self._on_token,
                protocol.FREE: self._on_free,
            }
            await handlers[msg_type](peer, payload)
            return
        await self.node.links.send(peer, msg_type, payload)

    async def _on_step(self, peer: str, payload: Any) -> None:
        epoch = payload.get("epoch") if isinstance(payload, dict) else None
        # A step of an older plan goes to that plan's stage while it is still kept (make-before-break);
        # anything else goes to the newest stage, which rejects a wrong epoch with a reason.
        worker = self._retiring.get(epoch) if isinstance(epoch, int) else None
        worker = worker or self.worker
        if worker is None:
            entry = payload.get("entry") if isinstance(payload, dict) else None
            if isinstance(entry, str) and isinstance(payload.get("session"), str):
                with contextlib.suppress(Exception):
                    await self.send(entry, protocol.TOKEN, {
                        "session": payload["session"], "seq": payload.get("seq", -1),
                        "error": "this node runs no stage (plan switching)",
                    })
            return
        await worker.submit(payload)

    async def _on_token(self, peer: str, payload: Any) -> None:
        if self.engine is not None:
            self.engine.on_token(payload)

    async def _on_free(self, peer: str, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("session"), str):
            return
        for worker in [self.worker, *self._retiring.values()]:
            if worker is not None:
                worker.free(payload["session"])

    async def _on_shard(self, peer: str, payload: Any) -> dict[str, Any]:
        return await handle_shard_request(self.server, payload)

    async def _shard_call(self, peer: str, request: dict[str, Any]) -> dict[str, Any]:
        reply = await self.node.links.request(peer, SHARD_MSG, request, timeout=60.0)
        if not isinstance(reply, dict):
            raise ShardError("shard reply is not a map", "bad_reply")
        return reply

    def _on_link_down(self, peer: str) -> None:
        """A link to ``peer`` dropped or was replaced: frames on it may be lost without a trace. Steps
        waiting on it must fail now (and re-prefill) rather than wait out the 30 s step timeout, during
        which a client sees no token and no error: the entry fails its sessions' steps through ``peer``,
        and a stage reports what it forwarded to ``peer`` to those steps' entries."""
        if self.engine is not None:
            self.engine.on_route_lost({peer}, "unreachable: the link dropped")
        for worker in [self.worker, *self._retiring.values()]:
            if worker is not None:
                self._spawn(worker.link_down(peer))

    def _on_node_event(self, kind: str) -> None:
        if kind != "membership" or self.engine is None or self._route is None:
            return
        dead = {n for n in self._route.nodes if not self.node.gossip.is_alive(n)}
        if dead:
            self.engine.on_route_lost(dead)

    # ---- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        published = self._published()
        return {
            "model": self.model,
            "state": self.state,
            "serving": self._route is not None,
            "problem": self.problem,
            "epoch": self._route.epoch if self._route else None,
            "plan": published,
            # this node's start-up profile as gossiped (benchmarks re-plan from it the leader's way)
            "profile": (self.node.gossip.get(self.node.node_id, PROFILE_KEY) or {}).get("device"),
            "stage": None if self.worker is None else {
                "epoch": self.worker.epoch,
                "range": [self.worker.start, self.worker.end],
                "sessions": self.worker.sessions,
                "metrics": self.worker.metrics.snapshot(),
                "batches": {str(k): v for k, v in sorted(self.worker.batch_sizes.items())},
            },
            "sessions": self.engine.active_sessions if self.engine else 0,
            "recoveries": self.engine.recoveries if self.engine else 0,
            "hops": self.engine.hops.snapshot() if self.engine else None,  # per-hop decode timing
            "fetch": self.fetcher.snapshot(),
            "events": self.events[-20:],
        }
