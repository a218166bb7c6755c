"""Device and dtype names of a run config, resolved to torch's."""

from __future__ import annotations

import torch

from linearize.checkpoint import DTYPES
from linearize.errors import LinearizeError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LinearizeError(f"dtype '{name}' is not supported: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


AUTOCASTS = ("auto", "bfloat16", None)


def resolve_autocast(name: str | None, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a run's autocast multiplies the weights in (None: no autocast, every product in `dtype`).
    auto = bfloat16 on a CPU that multiplies it in hardware (Intel AMX: about 7 times float32's matmul
    throughput on the same cores) for a float32 model; nothing elsewhere (a CPU without it would emulate
    bf16, slower than float32; a GPU run sets `dtype: bfloat16` instead)."""
    if name not in AUTOCASTS:
        raise LinearizeError(f"autocast must be auto, bfloat16 or null (none), got '{name}'")
    if name is None or dtype != torch.float32:
        return None
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and amx_available() else None


def amx_available() -> bool:
    """Whether this CPU has Intel AMX tiles (bf16 matrix products in hardware), as torch detects it."""
    detect = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(detect()) if detect is not None else False
    except RuntimeError:
        return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device` (None: autocast off inside, whatever was on outside). Inside it the
    MLPs' matrix products run in `dtype`; a converted model's attention layers and output head run outside it,
    in the weights' own dtype (`linearize.layers.attention.under_autocast`)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
