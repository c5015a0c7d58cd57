"""``llnode prepare SPEC``: resolve a model, export its modules, quantize, and write a shard set.

Everything expensive is cached under ``$LLNODE_CACHE`` (default ``~/.cache/llnode``): the download, the fp32
HF conversion, the fp32 module export and each quantized variant, keyed by the model's config and weight
files. A second ``prepare`` of the same model only copies files and hashes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

EXPORT_VERSION = 3  # bump when the module graphs change (invalidates cached exports); 3: mask-based past
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="'smollm2-135m', a local Hugging Face folder, or a .gguf file")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default shards/<name>/)")
    parser.add_argument("--quant", choices=("fp32", "int8", "int4"), default="fp32", help="weight precision")
    parser.add_argument(
        "--name", default=None, help="shard-set name (default from the spec, plus -int8/-int4)"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also write reference.onnx (the whole fp32 model in one graph) so that 'llnode verify' works "
        "where transformers is not installed",
    )


def _fingerprint(hf_dir: Path) -> str:
    """Cheap identity of a model folder: config content plus name/size/mtime of every weight file."""
    h = hashlib.sha256(f"llnode-export-{EXPORT_VERSION}".encode())
    h.update((hf_dir / "config.json").read_bytes())
    for f in sorted(hf_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _export_fp32(hf_dir: Path, dest: Path) -> None:
    from llnode.model.arch import adapter_for
    from llnode.model.export import export_modules
    from llnode.model.source import load_hf

    model = load_hf(hf_dir)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plan = export_modules(model, tmp)
    info = dataclasses.asdict(adapter_for(model).info)
    (tmp / "plan.json").write_text(
        json.dumps({"arch": info, "plan": [[k, layer, p.name] for k, layer, p in plan]}, indent=1)
    )
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def _quantize_all(src: Path, dest: Path, precision: str) -> None:
    from llnode.model.quantize import quantize_module

    plan = json.loads((src / "plan.json").read_text())["plan"]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for kind, _layer, fname in tqdm(plan, desc=f"quantize {precision}", unit="module"):
        quantize_module(src / fname, tmp / fname, kind, precision)
    shutil.copyfile(src / "plan.json", tmp / "plan.json")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def _format_versions(precision: str) -> dict[str, int]:
    """Recorded in the manifest's ``source``: a shard set from an older exporter or quantizer still runs
    (the module I/O contract is unchanged) but is slower or less accurate, so ``ensure_prepared`` redoes
    it."""
    from llnode.model.quantize import QUANT_VERSION

    versions = {"export_version": EXPORT_VERSION}
    if precision != "fp32":
        versions["quant_version"] = QUANT_VERSION
    return versions


def cached_modules(hf_dir: Path, precision: str) -> Path:
    """The folder of exported (and quantized) module files for this model, building it if needed."""
    from llnode.model.source import cache_dir

    base = cache_dir() / "exports" / _fingerprint(hf_dir)
    fp32 = base / "fp32"
    if not (fp32 / "plan.json").is_file():
        _export_fp32(hf_dir, fp32)
    if precision == "fp32":
        return fp32
    from llnode.model.quantize import QUANT_VERSION

    out = base / f"{precision}-q{QUANT_VERSION}"
    if not (out / "plan.json").is_file():
        _quantize_all(fp32, out, precision)
    return out


def _token_ids(hf_dir: Path) -> tuple[int | None, list[int], int | None]:
    cfg = json.loads((hf_dir / "config.json").read_text())
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    return bos, eos_list, pad


def _chat_template(hf_dir: Path) -> str | None:
    jinja = hf_dir / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text()
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        tmpl = json.loads(tc.read_text()).get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    return None


def _special_tokens(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text())
    return {t["content"]: int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}


def prepare(spec: str, out: Path | None = None, precision: str = "fp32", name: str | None = None) -> Path:
    """Build a shard set; returns its folder."""
    from llnode.model.arch import ArchInfo
    from llnode.model.manifest import save_manifest
    from llnode.model.shardset import build_manifest
    from llnode.model.source import resolve

    resolved = resolve(spec)
    name = name or (resolved.name if precision == "fp32" else f"{resolved.name}-{precision}")
    out = out if out is not None else Path("shards") / name
    tok = resolved.hf_dir / "tokenizer.json"
    if not tok.is_file():
        raise FileNotFoundError(f"{resolved.hf_dir} has no tokenizer.json (a fast tokenizer is required)")
    mods = cached_modules(resolved.hf_dir, precision)
    meta = json.loads((mods / "plan.json").read_text())
    arch = ArchInfo(**meta["arch"])
    out.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, int | None, Path]] = []
    for kind, layer, fname in tqdm(meta["plan"], desc="copy modules", unit="module", leave=False):
        # Copied beside and renamed over: a runner using the old file maps its weights from it (fused
        # blocks), and a file rewritten in place under a mapping would crash that process.
        shutil.copyfile(mods / fname, out / f".{fname}.part")
        (out / f".{fname}.part").replace(out / fname)
        plan.append((kind, layer, out / fname))
    shutil.copyfile(tok, out / "tokenizer.json")
    template = _chat_template(resolved.hf_dir)
    if template is not None:
        (out / CHAT_TEMPLATE_FILE).write_text(template)
    bos, eos, pad = _token_ids(resolved.hf_dir)
    source: dict[str, Any] = {
        **resolved.source,
        "hf_dir": str(resolved.hf_dir),
        **_format_versions(precision),
    }
    manifest = build_manifest(
        name=name,
        arch=arch,
        precision=precision,
        plan=plan,
        bos=bos,
        eos=eos,
        pad=pad,
        chat_template=template,
        special_tokens=_special_tokens(tok),
        source=source,
    )
    save_manifest(manifest, out)
    return out


def run(args: argparse.Namespace) -> int:
    from llnode.model.arch import UnsupportedArchitecture
    from llnode.model.source import SourceError

    try:
        out = prepare(args.spec, args.out, args.quant, args.name)
        if args.reference:
            from llnode.model.source import resolve

            shutil.copyfile(cached_whole(resolve(args.spec).hf_dir), out / "reference.onnx")
    except (SourceError, UnsupportedArchitecture, FileNotFoundError) as exc:
        print(f"llnode prepare: {exc}", file=sys.stderr)
        return 1
    from llnode.model.manifest import load_manifest

    m = load_manifest(out)
    total = sum(x.size_bytes for x in m.modules)
    print(
        f"wrote {out}: {m.num_modules} modules ({m.architecture}, {m.precision}), {total / 1e6:.1f} MB, "
        f"{m.boundaries[0].bytes_per_token} bytes/token cross each cut"
    )
    return 0


def cached_whole(hf_dir: Path) -> Path:
    """A whole-model fp32 ONNX file with the same K/V contract (cached): the one-session baseline."""
    from llnode.model.export import export_whole
    from llnode.model.source import cache_dir, load_hf

    path = cache_dir() / "exports" / _fingerprint(hf_dir) / "whole-fp32.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        print("exporting the whole model as one ONNX graph (once; cached) ...", file=sys.stderr)
        export_whole(load_hf(hf_dir), tmp)
        tmp.replace(path)
    return path


def ensure_prepared(spec: str = "smollm2-135m", precision: str = "fp32") -> Path:
    """A shard set of ``spec`` kept in ``$LLNODE_CACHE/test-shards/<name>``, prepared on first use.

    Shared by the test fixtures and the benchmarks so the expensive preparation happens once per machine.
    The check is by file sizes (fast); ``llnode verify`` does the full sha256 check.
    """
    from llnode.model.manifest import ManifestError, load_manifest
    from llnode.model.source import cache_dir

    base = Path(spec).name if Path(spec).exists() else spec  # a local folder/GGUF: not its absolute path
    name = base if precision == "fp32" else f"{base}-{precision}"
    out = cache_dir() / "test-shards" / name
    try:
        m = load_manifest(out)
        # An older export version still runs (same I/O contract) but has slower graphs: re-prepare.
        current = _format_versions(precision)
        ok = (
            m.precision == precision
            and all(m.source.get(k) == v for k, v in current.items())
            and all(
                (out / x.file).is_file() and (out / x.file).stat().st_size == x.size_bytes for x in m.modules
            )
        )
    except ManifestError:
        ok = False
    if not ok:
        prepare(spec, out=out, precision=precision)
    return out
