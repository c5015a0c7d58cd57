"""The one cost model shared by every solver (MILP, brute force, DP, baselines) and the simulator.

An :class:`Instance` turns a manifest, measured device and link profiles and options into plain numbers:
seconds per module per device, seconds per hop, bytes per device. :func:`evaluate` prices a candidate
assignment (device order + cut points); the MILP encodes exactly the same arithmetic linearly, so the
optimum values of all solvers agree to rounding, which the tests check.

Model (per generated token, decode):
- compute of module m on device d: ``flops_m(cost_context) / decode_flops_per_s_d + module_overhead_s_d``
  plus its share of the fused runs' fixed cost; every stage step adds a fixed cost of its device (its
  own CPU per step and its first run, :func:`stage_fixed_s`): a range costs ``a_d + b_d * k``;
- a hop d -> d' after module m: ``rtt/2 + bytes_after(m) / bandwidth``; the last stage sends the token id
  back to the first (a ring), a one-stage plan sends nothing;
- stage time: compute of its range + its outgoing hop;
- ``throughput`` objective: the largest stage time (the pipeline's bottleneck with concurrent sessions);
  ``latency`` objective: the sum of all stage times (one token's trip around the ring);
- memory of a range: weights + KV cache (max context x max sessions) + the largest activation working set
  in the range + runtime overhead, which must stay within ``memory_fraction`` of available memory;
- optional energy term: ``energy_weight * sum_d energy_factor_d * compute_d``;
- optional movement term: ``movement_weight * moved_bytes / model_bytes * reference_s`` where the
  reference is the current plan's own objective value (when still evaluable), so a weight of 0.1 means
  "moving the whole model must gain at least 10%".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llnode.model.manifest import Manifest
from llnode.plan.types import DeviceProfile, LinkProfile, PlanError, PlanOptions

FLOAT_BYTES = 4
# Working set of one module for one prefill token, in units of hidden-state bytes: input and output
# hidden states, q/k/v, attention output and the MLP intermediate (~2.7x hidden, gate and up).
ACTIVATION_HIDDEN_FACTOR = 10


def runs_per_step(start: int, end: int, block: int) -> int:
    """``session.run`` calls one step of modules ``[start, end)`` makes: the runner fuses blocks of
    ``block`` modules aligned to module indices (``llnode.model.runner.ModuleRunner``), so a range pays
    one call per block it touches (``block`` <= 1: one per module). Why it matters: each call has a
    fixed CPU cost that a per-module price would charge once per module."""
    if end <= start:
        return 0
    if block <= 1:
        return end - start
    return (end - 1) // block - start // block + 1


def stage_fixed_s(device: DeviceProfile) -> float:
    """What one stage step of ``device`` costs whatever its range: its own CPU per step and its first
    ``session.run``. A range of k modules makes ``1 + (k - 1) / block`` runs on average over the block
    alignments, so the cost model charges ``call * (1 - 1 / block)`` here and ``call / block`` per module
    (:func:`module_call_s`): cost(k) = a + b * k, linear, and one constant per used device."""
    block = max(1, device.fuse_block)
    return device.step_overhead_s + device.call_overhead_s * (1.0 - 1.0 / block)


def module_call_s(device: DeviceProfile) -> float:
    """The per-module share of the fused runs' fixed cost (see :func:`stage_fixed_s`)."""
    return device.call_overhead_s / max(1, device.fuse_block)


def energy_factor(device: DeviceProfile) -> float:
    """How much we would rather not load this device: 0 on mains/charging, up to 1 (+ load) on battery.

    A device on battery pays at least 0.5 (running inference drains it), plus up to 0.5 more the emptier
    it is; a device busy with other work adds its load fraction.
    """
    factor = 0.0
    if device.battery_pct is not None and device.charging is False:
        factor += 0.5 + 0.5 * (1.0 - min(max(device.battery_pct, 0.0), 100.0) / 100.0)
    return factor + min(max(device.load, 0.0), 1.0)


@dataclass(frozen=True)
class ModelCosts:
    """Per-module numbers from the manifest, at the options' context length and session count."""

    name: str
    decode_flops: list[float]  # per token at cost_context
    prefill_flops: list[float]  # per prompt token, averaged over a prompt of prompt_tokens
    weight_bytes: list[int]
    kv_bytes: list[int]  # for max_context x max_sessions
    act_bytes: list[int]
    out_bytes: list[int]  # bytes per token after module m; the last is the token id sent back

    @property
    def num_modules(self) -> int:
        return len(self.decode_flops)

    @classmethod
    def from_manifest(cls, manifest: Manifest, options: PlanOptions) -> ModelCosts:
        max_ctx = options.max_context or manifest.max_context
        ctx = options.cost_context if options.cost_context is not None else max_ctx // 2
        prompt_ctx = options.prompt_tokens // 2
        hidden_bytes = manifest.hidden_size * FLOAT_BYTES
        act = []
        for m in manifest.modules:
            per_token = ACTIVATION_HIDDEN_FACTOR * hidden_bytes
            if m.kind == "head":
                per_token += manifest.vocab_size * FLOAT_BYTES  # logits
            act.append(per_token * options.prefill_chunk)
        return cls(
            name=manifest.name,
            decode_flops=[m.flops.at(ctx) for m in manifest.modules],
            prefill_flops=[m.flops.at(prompt_ctx) for m in manifest.modules],
            weight_bytes=[m.param_bytes for m in manifest.modules],
            kv_bytes=[m.kv_bytes_per_token * max_ctx * options.max_sessions for m in manifest.modules],
            act_bytes=act,
            out_bytes=[manifest.boundary_bytes(i) for i in range(manifest.num_modules)],
        )


@dataclass
class Instance:
    """Everything a solver needs, as numbers. Devices are indexed 0..D-1 in the given order."""

    model: ModelCosts
    devices: list[DeviceProfile]
    options: PlanOptions
    t: list[list[float]]  # t[d][m]: decode seconds of module m on device d
    tp: list[list[float]]  # prefill seconds per prompt token of module m on device d
    rtt: list[list[float]]  # rtt[d][e] one-way latency part (rtt/2) of hop d -> e
    inv_bw: list[list[float]]  # seconds per byte of hop d -> e
    usable: list[int]  # bytes each device may use
    overhead: int
    energy: list[float]
    current: dict[int, tuple[int, int]] = field(default_factory=dict)  # device index -> current range
    movement_ref_s: float = 0.0
    # fixed[d]: seconds every stage step of device d costs whatever its range (``stage_fixed_s``); a
    # stage of [j, k) costs ``fixed[d] + sum(t[d][j:k])``: in the MILP a constant on each range binary
    fixed: list[float] = field(default_factory=list)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_modules(self) -> int:
        return self.model.num_modules

    def hop_s(self, d: int, e: int, after: int) -> float:
        """Sending the output of module ``after`` from device d to device e (0 if d == e)."""
        if d == e:
            return 0.0
        return self.rtt[d][e] + self.model.out_bytes[after] * self.inv_bw[d][e]

    def compute_s(self, d: int, start: int, end: int) -> float:
        """Decode seconds of one stage step of device d over ``[start, end)``: fixed + per module."""
        return self.fixed_s(d) + sum(self.t[d][start:end])

    def fixed_s(self, d: int) -> float:
        return self.fixed[d] if self.fixed else 0.0

    def memory_bytes(self, start: int, end: int) -> int:
        m = self.model
        return (
            self.overhead
            + sum(m.weight_bytes[start:end])
            + sum(m.kv_bytes[start:end])
            + max(m.act_bytes[start:end], default=0)
        )

    def fits(self, d: int, start: int, end: int) -> bool:
        return self.memory_bytes(start, end) <= self.usable[d]

    def moved_bytes(self, d: int, start: int, end: int) -> int:
        """Weight bytes device d would have to fetch to hold [start, end) given its current range."""
        cur = self.current.get(d)
        if cur is None:
            return sum(self.model.weight_bytes[start:end])
        return sum(
            w for m, w in enumerate(self.model.weight_bytes[start:end], start) if not cur[0] <= m < cur[1]
        )

    @property
    def model_bytes(self) -> int:
        return max(1, sum(self.model.weight_bytes))


@dataclass(frozen=True)
class Evaluation:
    """The price of one assignment, in the same terms the solvers minimise."""

    order: tuple[int, ...]
    cuts: tuple[int, ...]  # module boundaries: stage i holds [cuts[i], cuts[i+1])
    compute_s: tuple[float, ...]
    link_s: tuple[float, ...]
    memory: tuple[int, ...]
    feasible: bool
    bottleneck_s: float
    latency_s: float
    energy_penalty_s: float
    moved_bytes: int
    movement_penalty_s: float
    objective_value: float


def build_instance(
    model: Manifest | ModelCosts,
    devices: Sequence[DeviceProfile],
    links: Sequence[LinkProfile] | Mapping[tuple[str, str], LinkProfile] = (),
    options: PlanOptions | None = None,
    current: Mapping[str, tuple[int, int]] | None = None,
) -> Instance:
    """Turn profiles into the numeric instance. Missing links get the options' default RTT/bandwidth."""
    options = options or PlanOptions()
    costs = model if isinstance(model, ModelCosts) else ModelCosts.from_manifest(model, options)
    if not devices:
        raise PlanError("no devices to plan for")
    ids = [d.device_id for d in devices]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PlanError(f"duplicate device ids {dup} (copied data directory?)")
    link_map: dict[tuple[str, str], LinkProfile] = (
        dict(links) if isinstance(links, Mapping) else {(lk.src, lk.dst): lk for lk in links}
    )
    n = len(devices)
    # defaults first, then each measured link in both directions unless the reverse was measured too:
    # linear in the number of links, so a thousand devices with few links stay cheap
    rtt = [[options.default_rtt_s / 2.0] * n for _ in range(n)]
    inv_bw = [[1.0 / options.default_bandwidth_bytes_per_s] * n for _ in range(n)]
    index = {d.device_id: i for i, d in enumerate(devices)}
    for (src, dst), lk in link_map.items():
        i, j = index.get(src), index.get(dst)
        if i is None or j is None or i == j:
            continue
        rtt[i][j], inv_bw[i][j] = lk.rtt_s / 2.0, 1.0 / lk.bandwidth_bytes_per_s
        if (dst, src) not in link_map:
            rtt[j][i], inv_bw[j][i] = rtt[i][j], inv_bw[i][j]
    for i in range(n):
        rtt[i][i] = inv_bw[i][i] = 0.0
    t = [
        [f / d.decode_flops_per_s + d.module_overhead_s + module_call_s(d) for f in costs.decode_flops]
        for d in devices
    ]
    tp = [[f / d.prefill_speed + d.module_overhead_s / 1.0 for f in costs.prefill_flops] for d in devices]
    usable = [int(d.memory_available_bytes * options.memory_fraction) for d in devices]
    inst = Instance(
        model=costs,
        devices=list(devices),
        options=options,
        t=t,
        tp=tp,
        rtt=rtt,
        inv_bw=inv_bw,
        usable=usable,
        overhead=options.runtime_overhead_bytes,
        energy=[energy_factor(d) for d in devices],
        fixed=[stage_fixed_s(d) for d in devices],
    )
    if current:
        for dev, (s, e) in current.items():
            if dev in index:
                inst.current[index[dev]] = (int(s), int(e))
        inst.movement_ref_s = _movement_reference(inst, current)
    return inst


def _movement_reference(inst: Instance, current: Mapping[str, tuple[int, int]]) -> float:
    """The current plan's own main objective if it is still valid, else one device doing everything."""
    fallback = sum(min(inst.t[d][m] for d in range(inst.num_devices)) for m in range(inst.num_modules))
    index = {d.device_id: i for i, d in enumerate(inst.devices)}
    stages = sorted(current.items(), key=lambda kv: kv[1][0])
    if any(dev not in index for dev, _ in stages):
        return fallback
    order = tuple(index[dev] for dev, _ in stages)
    cuts = (*tuple(r[0] for _, r in stages), inst.num_modules)
    if cuts[0] != 0 or any(cuts[i] >= cuts[i + 1] for i in range(len(order))) or stages[-1][1][1] != cuts[-1]:
        return fallback
    ev = evaluate(inst, order, cuts, with_terms=False)
    if not ev.feasible:
        return fallback
    return ev.latency_s if inst.options.objective == "latency" else ev.bottleneck_s


def evaluate(
    inst: Instance, order: Sequence[int], cuts: Sequence[int], with_terms: bool = True
) -> Evaluation:
    """Price devices ``order`` holding ``[cuts[i], cuts[i+1])``; ``cuts`` starts at 0 and ends at M."""
    k = len(order)
    if len(cuts) != k + 1 or cuts[0] != 0 or cuts[-1] != inst.num_modules:
        raise PlanError(f"bad cut points {list(cuts)} for {k} stages and {inst.num_modules} modules")
    compute, link, memory = [], [], []
    feasible = True
    moved = 0
    energy = 0.0
    for i, d in enumerate(order):
        s, e = cuts[i], cuts[i + 1]
        if e <= s:
            raise PlanError(f"empty stage {i} in cut points {list(cuts)}")
        c = inst.compute_s(d, s, e)
        compute.append(c)
        link.append(inst.hop_s(d, order[(i + 1) % k], e - 1))
        mem = inst.memory_bytes(s, e)
        memory.append(mem)
        feasible = feasible and mem <= inst.usable[d]
        moved += inst.moved_bytes(d, s, e)
        energy += inst.energy[d] * c
    stage = [c + lk for c, lk in zip(compute, link, strict=True)]
    bottleneck = max(stage)
    latency = sum(stage)
    opts = inst.options
    energy_pen = opts.energy_weight * energy if with_terms else 0.0
    move_pen = 0.0
    if with_terms and opts.movement_weight > 0 and inst.current:
        move_pen = opts.movement_weight * moved / inst.model_bytes * inst.movement_ref_s
    main = latency if opts.objective == "latency" else bottleneck
    return Evaluation(
        order=tuple(order),
        cuts=tuple(cuts),
        compute_s=tuple(compute),
        link_s=tuple(link),
        memory=tuple(memory),
        feasible=feasible,
        bottleneck_s=bottleneck,
        latency_s=latency,
        energy_penalty_s=energy_pen,
        moved_bytes=moved,
        movement_penalty_s=move_pen,
        objective_value=main + energy_pen + move_pen,
    )
