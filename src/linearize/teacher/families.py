"""The model families a teacher may come from: decoder-only models whose attention has q/k/v/o projections
with RoPE, as transformers implements them, and what differs between them that conversion must know.

- Which layers the teacher itself attends locally (`teacher_window`): Gemma 3's "sliding_attention" layers
  (five of every six, window 512), Qwen2/3 layers past `max_window_layers` with `use_sliding_window`, and
  every layer of a Mistral with `sliding_window` set. Such a layer already has a constant-size cache.
- Which rotary embedding a layer uses (`LayerRotary`): Gemma 3 has one per layer type (local layers
  theta 1e4, global ones 1e6); the others one for every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from linearize.errors import LinearizeError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
LOCAL = "sliding_attention"  # transformers' name of a layer type that attends over a sliding window


def check_supported(model_type: str | None, name: str = "") -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        where = f" (teacher '{name}')" if name else ""
        hint = ""
        if model_type == "gemma3":
            hint = (": this is Gemma 3 with its vision tower; pass the text-only model (model type gemma3_text, "
                    "e.g. google/gemma-3-270m or -1b), or load its language model alone")
        raise LinearizeError(
            f"model type '{model_type}' is not supported{where}: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(decoder-only models whose attention has q/k/v/o projections with RoPE){hint}"
        )


def teacher_window(config, index: int) -> int | None:
    """The sliding window (keys a query sees, itself included) of the teacher's layer `index` where the
    teacher attends locally there; None where it attends over every earlier token."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return getattr(config, "sliding_window", None) if layer_types[index] == LOCAL else None
    if getattr(config, "model_type", None) == "mistral":
        return getattr(config, "sliding_window", None)
    return None


def local_layers(config) -> list[int]:
    """The layers a model of interleaved local and global attention (Gemma 3; Qwen2/3 with sliding layers)
    marks as local. A Mistral whose every layer has a (long) sliding window has none: all of them are global
    layers of a long-window model, what linearizing replaces."""
    layer_types = getattr(config, "layer_types", None) or []
    return [i for i, kind in enumerate(layer_types) if kind == LOCAL]


def local_mask(length: int, window: int, device: torch.device, query_length: int | None = None) -> torch.Tensor:
    """[1, 1, Tq, T] bool mask (True = attend) of causal attention over the last `window` keys, for the last
    `query_length` (default all) of `length` positions."""
    query_length = length if query_length is None else query_length
    keys = torch.arange(length, device=device)
    queries = keys[length - query_length:, None]
    return ((keys <= queries) & (keys > queries - window))[None, None]


class LayerRotary:
    """The teacher's rotary (cos, sin) for positions 0 .. T - 1 of `hidden` [B, T, C], per layer:
    `rotary[layer_index]`, computed once per layer type."""

    def __init__(self, model: nn.Module, hidden: torch.Tensor):
        self.model, self.hidden = model, hidden
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        self._by_type: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rotary, args = layer_rotary(self.model, index)
        if args not in self._by_type:
            self._by_type[args] = rotary(self.hidden, self.positions, *args)
        return self._by_type[args]


def layer_rotary(model: nn.Module, index: int) -> tuple[nn.Module, tuple]:
    """(the model's rotary embedding module, its extra arguments for layer `index`): Gemma 3's module takes
    the layer's type (local layers have their own base)."""
    rotary = model.model.rotary_emb
    config = getattr(model.config, "text_config", None) or model.config  # a student's config holds its teacher's
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return rotary, ((config.layer_types[index],) if hasattr(rotary, "layer_types") else ())

