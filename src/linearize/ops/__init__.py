"""Pure tensor math for linear, sliding-window and hybrid attention; knows nothing about models.

Every op is causal and GQA-aware: queries have H heads, keys / values / key features / gates Hk
heads (H % Hk == 0, query head h reads kv head h // (H // Hk)); states are kept per KV head. Every form
returns `(output, state)`: the state is a `DecodeState` (or None when not asked for), and the recurrent
forms continue from one. `key_mask` [B, T] takes padding out of every form.
"""

from . import backend, fla_backend, memory, sparse
from .linear import (
    append_ones,
    group_heads,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)
from .state import DecodeState, empty_state, real_positions
from .window import (
    empty_window_state,
    window_attention_chunked,
    window_attention_parallel,
    window_attention_recurrent,
)

fla_backend.install()  # flash-linear-attention's kernels for CUDA tensors, where fla is installed

__all__ = [
    "DecodeState",
    "append_ones",
    "backend",
    "empty_state",
    "empty_window_state",
    "group_heads",
    "linear_attention_chunked",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "memory",
    "real_positions",
    "sparse",
    "window_attention_chunked",
    "window_attention_parallel",
    "window_attention_recurrent",
]
