"""The model families a teacher may come from: decoder-only models whose attention has q/k/v/o projections
with RoPE, as transformers implements them."""

from __future__ import annotations

from linearize.errors import LinearizeError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model_type: str | None, name: str = "") -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        where = f" (teacher '{name}')" if name else ""
        raise LinearizeError(
            f"model type '{model_type}' is not supported{where}: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(decoder-only models whose attention has q/k/v/o projections with RoPE)"
        )
