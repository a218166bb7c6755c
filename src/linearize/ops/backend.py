"""Which implementation runs each op: the PyTorch forms by default, a kernel library where one plugs in.

An op is looked up by name and the device of its inputs. `register` adds an implementation for a device
type (e.g. flash-linear-attention's Triton kernels for "cuda"); the first registered for the device
wins, else the PyTorch form. An implementation takes the PyTorch form's arguments and returns the same
`(output, state)`, and may hand a call back to the PyTorch form for cases it does not cover.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import linear, window

TORCH_OPS: dict[str, Callable] = {
    "linear_attention_chunked": linear.linear_attention_chunked,
    "linear_attention_recurrent": linear.linear_attention_recurrent,
    "window_attention_chunked": window.window_attention_chunked,
    "window_attention_recurrent": window.window_attention_recurrent,
}
_REGISTERED: dict[tuple[str, str], Callable] = {}


def register(name: str, device_type: str, implementation: Callable) -> None:
    if name not in TORCH_OPS:
        raise KeyError(f"unknown op '{name}': ops are {', '.join(TORCH_OPS)}")
    _REGISTERED.setdefault((name, device_type), implementation)


def unregister(name: str, device_type: str) -> None:
    _REGISTERED.pop((name, device_type), None)


def get(name: str, device: torch.device | str) -> Callable:
    device_type = torch.device(device).type
    return _REGISTERED.get((name, device_type), TORCH_OPS[name])
