"""What every benchmark needs: the shard set to measure (given, or SmolLM2 prepared once and cached)."""

from __future__ import annotations

from pathlib import Path


def shard_dir(arg: Path | None) -> Path:
    """``arg`` if given, else the fp32 SmolLM2 shard set, prepared on first use and cached."""
    if arg is not None:
        return arg
    from llnode.model.prepare import ensure_prepared

    return ensure_prepared("smollm2-135m", "fp32")
