"""Pure tensor math for linear, sliding-window and hybrid attention; knows nothing about models.

Every op is causal and GQA-aware: queries have H heads, keys / values / key features / gates Hk
heads (H % Hk == 0, query head h reads kv head h // (H // Hk)); states are kept per KV head.
"""

from .linear import (
    empty_state,
    group_heads,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)
from .window import (
    hybrid_attention_chunked,
    hybrid_attention_parallel,
    hybrid_attention_recurrent,
    sliding_window_attention_chunked,
    sliding_window_attention_parallel,
    sliding_window_attention_recurrent,
)

__all__ = [
    "empty_state",
    "group_heads",
    "hybrid_attention_chunked",
    "hybrid_attention_parallel",
    "hybrid_attention_recurrent",
    "linear_attention_chunked",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "sliding_window_attention_chunked",
    "sliding_window_attention_parallel",
    "sliding_window_attention_recurrent",
]
