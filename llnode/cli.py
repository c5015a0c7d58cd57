"""The ``llnode`` command line.

Every sub-command lives in the module that owns its job; this file only maps names to modules, imported
lazily so that ``llnode run`` on a phone never imports the export stack (torch, transformers).
A command module provides ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("llnode.model.prepare", "cut a model into per-layer ONNX modules (PC side, needs [export])"),
    "verify": ("llnode.model.verify", "check a shard set against the reference model"),
    "run": ("llnode.daemon", "run the peer daemon on this device"),
    "status": ("llnode.status", "show a running cluster's membership, leader and plan"),
    "keygen": ("llnode.net.keys", "write a new random cluster key"),
    "plan": ("llnode.plan.cli", "show the module assignment for a shard set and device profiles"),
    "chat": ("llnode.api.chat", "interactive chat against a node"),
    "cluster": ("llnode.cluster", "start a local multi-node cluster on loopback"),
}

# ``llnode bench NAME``: each benchmark prints figures, and with --json ends with one JSON line.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "modules": ("llnode.bench.modules", "chained modules vs one whole-model session"),
    "links": ("llnode.bench.links", "peer-link frames/s and MB/s on loopback"),
    "shards": ("llnode.shards.bench", "shard fetch MB/s between peers on loopback"),
    "planner": ("llnode.bench.planner", "MILP solve time and plan quality"),
    "pipeline": ("llnode.bench.pipeline", "multi-node latency and throughput"),
    "balance": ("llnode.bench.balance", "heterogeneous placement and rebalancing"),
    "chaos": ("llnode.bench.chaos", "node failures under load"),
    "soak": ("llnode.bench.soak", "steady load over time"),
    "sim": ("llnode.bench.sim", "simulator validation and scale"),
    "speed": ("llnode.bench.speed", "per-device decode speed and memory by precision"),
}


def _add_lazy(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            # The command is not built yet (or not shipped in this install).
            parser.set_defaults(_module=None, _missing=f"'{name}' is not available: {exc}")
            return
        raise
    mod.add_arguments(parser)
    parser.set_defaults(_module=mod)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser, importing only the module of the command actually asked for."""
    from llnode import __version__

    parser = argparse.ArgumentParser(prog="llnode", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"llnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            _add_lazy(sub, name, module, help_text)
        else:
            sub.add_parser(name, help=help_text)
    bench = sub.add_parser("bench", help="benchmarks that print measured figures")
    bench_sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    rest = [a for a in argv if not a.startswith("-")]
    wanted_bench = rest[1] if len(rest) > 1 and rest[0] == "bench" else None
    for name, (module, help_text) in BENCHMARKS.items():
        if name == wanted_bench:
            _add_lazy(bench_sub, name, module, help_text)
        else:
            bench_sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    if args.command is None or (args.command == "bench" and args.benchmark is None):
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None)
    if missing:
        print(f"llnode: {missing}", file=sys.stderr)
        return 2
    try:
        code: int = args._module.run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
