"""The shard-set manifest: the only thing the planner and the daemon read about a model.

A shard set is a folder ``shards/<name>/`` holding one ONNX file per module, ``manifest.json``, and the
tokenizer. Modules are numbered in pipeline order: 0 is the embedding, 1..L the decoder layers, L+1 the
final norm + LM head. A device always holds a contiguous range ``[start, end)`` of them.

The transmission map (``boundaries``) says, for every cut point between module i and i+1, which tensors
cross and how many bytes per token; it is derived from the ONNX graphs by the exporter, not typed by
hand. Only the hidden state crosses: masks and rotary terms are recomputed inside every module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match its files."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Symbolic dimensions are strings (``"batch"``, ``"new_tokens"``)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class FlopsModel:
    """FLOPs to process one token at a given context length: ``base + per_context * context``.

    The per-context part is attention (scores and weighted sum grow with the past), the base part the
    matrix multiplications, which do not.
    """

    base: float
    per_context: float = 0.0

    def at(self, context: int) -> float:
        return self.base + self.per_context * context


@dataclass(frozen=True)
class ModuleInfo:
    """One module (embedding, one decoder layer, or the head) and what it costs to hold and run."""

    index: int
    name: str
    kind: str  # "embed" | "layer" | "head"
    file: str
    sha256: str
    size_bytes: int
    param_bytes: int
    flops: FlopsModel
    kv_bytes_per_token: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layer: int | None = None


@dataclass(frozen=True)
class Boundary:
    """What crosses the cut after module ``after`` (from module ``after`` to ``after + 1``)."""

    after: int
    tensors: list[TensorSpec]
    bytes_per_token: int


@dataclass(frozen=True)
class Manifest:
    name: str
    architecture: str  # "llama" | "gpt2" | "bloom"
    precision: str  # "fp32" | "int8" | "int4"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    modules: list[ModuleInfo]
    boundaries: list[Boundary]
    tokenizer_file: str = "tokenizer.json"
    chat_template: str | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)
    # Bytes sent from the last stage back to the first per generated token (the sampled token id).
    token_bytes: int = 8
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # sha256 of the shard set's non-module files (tokenizer, chat template file) by file name, so that a
    # node fetching them from a peer can verify them against the manifest too (filled by the exporter).
    file_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def boundary_bytes(self, after: int) -> int:
        """Bytes per token crossing the cut after module ``after``; the last module sends a token id."""
        if after == self.num_modules - 1:
            return self.token_bytes
        return self.boundaries[after].bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise ManifestError(
                    f"manifest format {data.get('format_version')!r} is not supported (expected "
                    f"{FORMAT_VERSION}); re-run 'llnode prepare'"
                )
            modules = [
                ModuleInfo(
                    **{
                        **m,
                        "flops": FlopsModel(**m["flops"]),
                        "inputs": [TensorSpec(**t) for t in m["inputs"]],
                        "outputs": [TensorSpec(**t) for t in m["outputs"]],
                    }
                )
                for m in data["modules"]
            ]
            boundaries = [
                Boundary(**{**b, "tensors": [TensorSpec(**t) for t in b["tensors"]]})
                for b in data["boundaries"]
            ]
            fields = {k: v for k, v in data.items() if k not in ("modules", "boundaries")}
            manifest = cls(modules=modules, boundaries=boundaries, **fields)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        manifest.check()
        return manifest

    def check(self) -> None:
        """Structural invariants every consumer relies on."""
        if not self.modules:
            raise ManifestError("manifest lists no modules")
        for i, m in enumerate(self.modules):
            if m.index != i:
                raise ManifestError(f"module {m.name} has index {m.index}, expected {i}")
        if self.modules[0].kind != "embed" or self.modules[-1].kind != "head":
            raise ManifestError("the first module must be the embedding and the last the head")
        if len(self.boundaries) != self.num_modules - 1:
            raise ManifestError(
                f"{len(self.boundaries)} boundaries for {self.num_modules} modules (expected one per cut)"
            )


def load_manifest(shard_dir: Path | str) -> Manifest:
    path = Path(shard_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {shard_dir}: prepare one with 'llnode prepare'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def save_manifest(manifest: Manifest, shard_dir: Path | str) -> Path:
    manifest.check()
    path = Path(shard_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path
