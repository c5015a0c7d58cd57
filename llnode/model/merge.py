"""Merge the module graphs of a shard set into one ONNX graph: the single-session baseline.

WHY: ``bench modules`` asks what cutting the model into 32 sessions costs. Comparing the chain with a
separately traced whole-model export would also measure the difference between two exporters (the
hand-built Llama layers have ~1/3 of the traced graph's nodes). Merging the very module files gives one
session with exactly the same operators, weights and KV contract; only the cuts disappear. Each module's
internal names get a ``m<index>/`` prefix; the contract names (``hidden.m``, ``key.l``, ``position_ids``,
...) are already unique or meant to be shared, so the hidden states simply connect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import helper

from llnode.model import names
from llnode.model.manifest import Manifest


def merge_modules(shard_dir: Path, manifest: Manifest) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: list[onnx.ValueInfoProto] = []
    opsets: dict[str, int] = {}
    internal_hidden = {names.hidden(m.index) for m in manifest.modules if m.index > 0}
    for m in manifest.modules:
        model = onnx.load(str(shard_dir / m.file))
        g = model.graph
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        keep = {v.name for v in g.input} | {v.name for v in g.output}
        prefix = f"m{m.index}/"

        def rename(name: str, keep: set[str] = keep, prefix: str = prefix) -> str:
            return name if not name or name in keep else prefix + name

        for node in g.node:
            node.input[:] = [rename(x) for x in node.input]
            node.output[:] = [rename(x) for x in node.output]
            node.name = prefix + node.name
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    raise ValueError(f"{m.file}: subgraphs are not supported by the merge")
            nodes.append(node)
        for init in g.initializer:
            init.name = rename(init.name)
            inits.append(init)
        init_names = {i.name for i in g.initializer}
        for v in g.input:
            if v.name not in init_names and v.name not in internal_hidden:
                inputs.setdefault(v.name, v)
        outputs += [v for v in g.output if v.name not in internal_hidden]
    outputs.sort(key=lambda v: v.name != names.LOGITS)  # logits first, then key/value per layer in order
    graph = helper.make_graph(nodes, "whole", list(inputs.values()), outputs, inits)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    merged.ir_version = 8
    return merged


def cached_merge(shard_dir: Path, manifest: Manifest) -> Path:
    """The merged graph of a shard set, written once under ``$LLNODE_CACHE/merged`` (keyed by the sha256s)."""
    from llnode.model.source import cache_dir

    key = hashlib.sha256("".join(m.sha256 for m in manifest.modules).encode()).hexdigest()[:16]
    path = cache_dir() / "merged" / f"{manifest.name}-{key}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(merge_modules(shard_dir, manifest), str(tmp))
        tmp.replace(path)
    return path
