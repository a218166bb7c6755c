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
