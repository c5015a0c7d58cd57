"""Device profiling: time real modules of the model on this device (never assumed speeds).

The planner needs, per device, how fast it runs this model's modules. We time one real decoder-layer
module for decode (one token on a short past) and for prefill (a short prompt), after warm-ups, and turn
the times into effective FLOP/s with the manifest's FLOP counts; the planner scales them to every other
module by FLOPs. Decode on a CPU is memory-bound, so the two speeds differ and are kept apart. The
fixed cost of one ``session.run`` is measured too (an empty-ish step), since a stage pays it per module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from llnode.model.manifest import Manifest
from llnode.model.runner import ModuleRunner
from llnode.net.resources import battery_sysfs, memory
from llnode.plan.types import DeviceProfile

DECODE_CONTEXT = 32
PREFILL_TOKENS = 32


def _median_time(fn: object, repeats: int) -> float:
    assert callable(fn)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def profile_device(
    shard_dir: Path,
    manifest: Manifest,
    *,
    device_id: str,
    name: str = "",
    module: int | None = None,
    repeats: int = 7,
) -> DeviceProfile:
    """Measure this device on module ``module`` (default: the first decoder layer present on disk)."""
    began = time.perf_counter()
    if module is None:
        layers = [m for m in manifest.modules if m.kind == "layer" and (Path(shard_dir) / m.file).is_file()]
        if not layers:
            raise FileNotFoundError(f"no decoder-layer module of {manifest.name} in {shard_dir} to time")
        module = layers[0].index
    info = manifest.modules[module]
    runner = ModuleRunner(shard_dir, manifest, module, module + 1)
    rng = np.random.default_rng(0)
    hidden = manifest.hidden_size

    def prefill() -> None:
        x = rng.standard_normal((1, PREFILL_TOKENS, hidden), dtype=np.float32)
        runner.step("profile-prefill", x, np.arange(PREFILL_TOKENS, dtype=np.int64)[None])
        runner.free("profile-prefill")

    prefill()  # warm-up
    prefill_s = _median_time(prefill, max(3, repeats // 2))
    x = rng.standard_normal((1, DECODE_CONTEXT, hidden), dtype=np.float32)
    runner.step("profile-decode", x, np.arange(DECODE_CONTEXT, dtype=np.int64)[None])
    pos = [DECODE_CONTEXT]

    def decode() -> None:
        step = rng.standard_normal((1, 1, hidden), dtype=np.float32)
        runner.step("profile-decode", step, np.asarray([[pos[0]]], dtype=np.int64))
        pos[0] += 1

    decode()
    decode_s = _median_time(decode, repeats)
    runner.free("profile-decode")
    decode_flops = info.flops.at(DECODE_CONTEXT)
    prefill_flops = sum(info.flops.at(i) for i in range(PREFILL_TOKENS))
    mem = memory()
    battery = battery_sysfs()
    return DeviceProfile(
        device_id=device_id,
        name=name,
        decode_flops_per_s=decode_flops / decode_s,
        prefill_flops_per_s=prefill_flops / prefill_s,
        memory_available_bytes=int(mem.get("free", 0)),
        memory_total_bytes=int(mem.get("total", 0)),
        cores=os.cpu_count() or 1,
        battery_pct=None if battery is None else battery.get("level"),
        charging=None if battery is None else battery.get("charging"),
        profile_s=time.perf_counter() - began,
        measured={"decode_s": decode_s, "prefill_s": prefill_s, "module": float(module)},
    )
