"""Per-architecture module wrappers. ``adapter_for(model)`` picks one or names the supported ones."""

from __future__ import annotations

from typing import Any

from llnode.model.arch.base import Adapter, ArchInfo

# transformers ``model_type`` -> family. Mistral and Qwen2 are Llama-shaped (Qwen2 adds q/k/v biases,
# which ride along inside the projections).
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "bloom": "bloom",
}


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no wrapper."""


def check_model_type(model_type: str | None) -> str:
    family = SUPPORTED_MODEL_TYPES.get(str(model_type))
    if family is None:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (Llama family incl. SmolLM2/TinyLlama, GPT-2, BLOOM)"
        )
    return family


def adapter_for(model: Any) -> Adapter:
    family = check_model_type(getattr(model.config, "model_type", None))
    if family == "llama":
        from llnode.model.arch.llama import LlamaAdapter

        cfg = model.config
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise UnsupportedArchitecture(
                "sliding-window attention is not supported; disable it in the config"
            )
        return LlamaAdapter(model)
    if family == "gpt2":
        from llnode.model.arch.gpt2 import Gpt2Adapter

        return Gpt2Adapter(model)
    from llnode.model.arch.bloom import BloomAdapter

    return BloomAdapter(model)


__all__ = ["SUPPORTED_MODEL_TYPES", "Adapter", "ArchInfo", "UnsupportedArchitecture", "adapter_for"]
