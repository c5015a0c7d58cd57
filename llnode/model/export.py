"""Export a loaded transformers model as one ONNX graph per module (embedding, each layer, head).

Legacy tracing export (``dynamo=False``, opset 17): measured ~20x faster than the dynamo exporter with
readable graphs, and opset 17 / IR 8 also loads in the older onnxruntime (1.22) that Termux ships.
Example shapes are batch 2, 3 new tokens, 2 past slots: with size-1 example dims the tracer bakes in
single-token code paths.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from tqdm import tqdm

from llnode.model import names
from llnode.model.arch import Adapter, adapter_for

OPSET = 17
_B, _T, _P = 2, 3, 2


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The tracer warns about every Python int it sees; those shapes are dynamic by construction here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _example(adapter: Adapter) -> dict[str, torch.Tensor]:
    info = adapter.info
    gen = torch.Generator().manual_seed(0)
    return {
        names.INPUT_IDS: torch.randint(0, info.vocab_size, (_B, _T), generator=gen),
        names.POSITION_IDS: torch.arange(_P, _P + _T).repeat(_B, 1),
        names.ATTENTION_MASK: torch.ones(_B, _P + _T, dtype=torch.int64),
        "past": torch.randn(_B, info.num_kv_heads, _P, info.head_dim, generator=gen),
        names.PAST_POSITIONS: torch.arange(_P).repeat(_B, 1),
        "hidden": torch.randn(_B, _T, info.hidden_size, generator=gen),
    }


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
) -> None:
    module.eval()
    with _quiet(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


_BT = {0: "batch", 1: "new_tokens"}
_KV_PAST = {0: "batch", 2: "past"}
_KV_NEW = {0: "batch", 2: "new_tokens"}


def module_file(index: int, kind: str, layer: int | None) -> str:
    return f"{index:03d}-{kind}{'' if layer is None else f'-{layer:02d}'}.onnx"


def export_embed(adapter: Adapter, path: Path, module: nn.Module | None = None) -> None:
    ex = _example(adapter)
    _export(
        module or adapter.embed(),
        (ex[names.INPUT_IDS], ex[names.POSITION_IDS]),
        path,
        [names.INPUT_IDS, names.POSITION_IDS],
        [names.hidden(1)],
        {names.INPUT_IDS: _BT, names.POSITION_IDS: _BT, names.hidden(1): _BT},
    )


def export_layer(adapter: Adapter, layer: int, path: Path) -> None:
    built = adapter.layer_onnx(layer)
    if built is not None:
        onnx.save(built, str(path))
        return
    ex = _example(adapter)
    m = layer + 1
    ins = [
        names.hidden(m),
        names.POSITION_IDS,
        names.ATTENTION_MASK,
        names.past_key(layer),
        names.past_value(layer),
        names.PAST_POSITIONS,
    ]
    outs = [names.hidden(m + 1), names.key(layer), names.value(layer)]
    axes = {
        names.hidden(m): _BT,
        names.POSITION_IDS: _BT,
        names.ATTENTION_MASK: {0: "batch", 1: "past_and_new"},
        names.past_key(layer): _KV_PAST,
        names.past_value(layer): _KV_PAST,
        names.PAST_POSITIONS: {0: "batch", 1: "past"},
        names.hidden(m + 1): _BT,
        names.key(layer): _KV_NEW,
        names.value(layer): _KV_NEW,
    }
    args = (
        ex["hidden"],
        ex[names.POSITION_IDS],
        ex[names.ATTENTION_MASK],
        ex["past"],
        ex["past"].clone(),
        ex[names.PAST_POSITIONS],
    )
    _export(adapter.layer(layer), args, path, ins, outs, axes)


def export_head(adapter: Adapter, path: Path) -> None:
    ex = _example(adapter)
    m = adapter.info.num_layers + 1
    _export(
        adapter.head(),
        (ex["hidden"],),
        path,
        [names.hidden(m)],
        [names.LOGITS],
        {names.hidden(m): _BT, names.LOGITS: _BT},
    )


def export_modules(
    model: nn.Module, out_dir: Path, progress: bool = True
) -> list[tuple[str, int | None, Path]]:
    """Write every module of ``model`` into ``out_dir``; returns ``(kind, layer, path)`` in pipeline order."""
    adapter = adapter_for(model)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    n = adapter.info.num_layers
    plan: list[tuple[str, int | None, Path]] = [("embed", None, out_dir / module_file(0, "embed", None))]
    plan += [("layer", i, out_dir / module_file(i + 1, "layer", i)) for i in range(n)]
    plan.append(("head", None, out_dir / module_file(n + 1, "head", None)))
    for kind, layer, path in tqdm(plan, desc="export modules", unit="module", disable=not progress):
        if kind == "embed":
            export_embed(adapter, path)
        elif kind == "layer":
            assert layer is not None
            export_layer(adapter, layer, path)
        else:
            export_head(adapter, path)
    return plan


class WholeModel(nn.Module):
    """All modules in one graph with the same K/V contract: the single-session baseline for the benchmark
    and the reference for ``verify`` where transformers is not installed."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.embed = adapter.embed()
        self.layers = nn.ModuleList([adapter.layer(i) for i in range(adapter.info.num_layers)])
        self.head = adapter.head()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_positions: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        h = self.embed(input_ids, position_ids)
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, position_ids, attention_mask, past[2 * i], past[2 * i + 1], past_positions)
            new += [k, v]
        return (self.head(h), *new)


def export_whole(model: nn.Module, path: Path) -> None:
    adapter = adapter_for(model)
    model.eval()
    ex = _example(adapter)
    n = adapter.info.num_layers
    ins = [names.INPUT_IDS, names.POSITION_IDS, names.ATTENTION_MASK, names.PAST_POSITIONS]
    outs = [names.LOGITS]
    axes: dict[str, dict[int, str]] = {
        names.INPUT_IDS: _BT,
        names.POSITION_IDS: _BT,
        names.ATTENTION_MASK: {0: "batch", 1: "past_and_new"},
        names.PAST_POSITIONS: {0: "batch", 1: "past"},
        names.LOGITS: _BT,
    }
    past: list[torch.Tensor] = []
    for i in range(n):
        ins += [names.past_key(i), names.past_value(i)]
        outs += [names.key(i), names.value(i)]
        axes.update(
            {
                names.past_key(i): _KV_PAST,
                names.past_value(i): _KV_PAST,
                names.key(i): _KV_NEW,
                names.value(i): _KV_NEW,
            }
        )
        past += [ex["past"].clone(), ex["past"].clone()]
    args = (
        ex[names.INPUT_IDS],
        ex[names.POSITION_IDS],
        ex[names.ATTENTION_MASK],
        ex[names.PAST_POSITIONS],
        *past,
    )
    _export(WholeModel(adapter), args, path, ins, outs, axes)
