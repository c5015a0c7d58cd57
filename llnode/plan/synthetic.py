"""Synthetic manifests and device fleets with SmolLM2-like numbers, for tests, benchmarks and the simulator.

The per-module figures follow the Llama architecture arithmetic (2 FLOPs per weight per token, attention
4 * heads * head_dim FLOPs per past token, KV = 2 * kv_heads * head_dim * 4 bytes per token); no model
file is needed, so planner tests never wait on an export.
"""

from __future__ import annotations

import random

from llnode.model.manifest import Boundary, FlopsModel, Manifest, ModuleInfo, TensorSpec
from llnode.plan.types import DeviceProfile, LinkProfile

GB = 1024**3


def synthetic_manifest(
    num_layers: int = 30,
    hidden: int = 576,
    intermediate: int = 1536,
    heads: int = 9,
    kv_heads: int = 3,
    vocab: int = 49152,
    max_context: int = 2048,
    bytes_per_param: float = 4.0,
    name: str = "synthetic-smollm2",
) -> Manifest:
    """A Llama-shaped manifest: embed, ``num_layers`` decoder layers, head (num_layers + 2 modules)."""
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    layer_params = hidden * (hidden + 2 * kv_dim + hidden) + 3 * hidden * intermediate + 2 * hidden
    hid = TensorSpec("hidden_states", "float32", ["batch", "new_tokens", hidden])
    ids = TensorSpec("input_ids", "int64", ["batch", "new_tokens"])
    logits = TensorSpec("logits", "float32", ["batch", "new_tokens", vocab])
    modules = [
        ModuleInfo(
            0,
            "embed",
            "embed",
            "embed.onnx",
            "",
            0,
            int(vocab * hidden * bytes_per_param),
            FlopsModel(float(hidden)),
            0,
            [ids],
            [hid],
        ),
    ]
    for i in range(num_layers):
        modules.append(
            ModuleInfo(
                i + 1,
                f"layer_{i}",
                "layer",
                f"layer_{i}.onnx",
                "",
                0,
                int(layer_params * bytes_per_param),
                FlopsModel(2.0 * layer_params, 4.0 * heads * head_dim),
                2 * kv_dim * 4,
                [hid],
                [hid],
                layer=i,
            )
        )
    modules.append(
        ModuleInfo(
            num_layers + 1,
            "head",
            "head",
            "head.onnx",
            "",
            0,
            int(vocab * hidden * bytes_per_param),
            FlopsModel(2.0 * vocab * hidden),
            0,
            [hid],
            [logits],
        )
    )
    boundaries = [Boundary(i, [hid], hidden * 4) for i in range(num_layers + 1)]
    return Manifest(
        name=name,
        architecture="llama",
        precision="fp32",
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=max_context,
        bos_token_id=1,
        eos_token_ids=[2],
        pad_token_id=None,
        modules=modules,
        boundaries=boundaries,
    )


# (name, decode GFLOP/s, available GiB) for typical devices; decode GFLOP/s from ~10 ms/token for the
# 135M model (~0.27 GFLOP/token) on this 2-core box = ~27 GFLOP/s, phones a fraction of that.
DEVICE_CLASSES = [
    ("laptop", 27.0, 6.0),
    ("flagship-phone", 14.0, 3.0),
    ("mid-phone", 7.0, 1.5),
    ("old-phone", 3.0, 0.8),
    ("linux-box", 20.0, 4.0),
]


def random_fleet(
    n: int,
    rng: random.Random,
    *,
    link_mbit: tuple[float, float] = (10.0, 200.0),
    rtt_ms: tuple[float, float] = (1.0, 8.0),
) -> tuple[list[DeviceProfile], list[LinkProfile]]:
    """Heterogeneous devices (jittered classes) and a full mesh of symmetric Wi-Fi-like links."""
    devices = []
    for i in range(n):
        cls, gflops, gib = DEVICE_CLASSES[rng.randrange(len(DEVICE_CLASSES))]
        devices.append(
            DeviceProfile(
                device_id=f"{cls}-{i}",
                decode_flops_per_s=gflops * 1e9 * rng.uniform(0.8, 1.2),
                prefill_flops_per_s=gflops * 4e9 * rng.uniform(0.8, 1.2),
                module_overhead_s=15e-6,
                memory_available_bytes=int(gib * GB * rng.uniform(0.8, 1.2)),
                battery_pct=None if cls in ("laptop", "linux-box") else rng.uniform(5, 100),
                charging=None if cls in ("laptop", "linux-box") else rng.random() < 0.4,
            )
        )
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            rtt = rng.uniform(*rtt_ms) / 1e3
            bw = rng.uniform(*link_mbit) * 1e6 / 8
            a, b = devices[i].device_id, devices[j].device_id
            links.append(LinkProfile(a, b, rtt, bw))
            links.append(LinkProfile(b, a, rtt, bw))
    return devices, links
