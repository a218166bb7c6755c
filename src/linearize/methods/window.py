"""Sliding-window softmax attention alone: the baseline every linearization must beat at the same budget.

Its decoding memory is constant too (the last window_size keys), so a linear-attention method earns its
place only where its recurrent state carries what the window alone cannot.
"""

from __future__ import annotations

from linearize.attention import Mixer, remember_sinks, sink_arguments
from linearize.config import AttentionConfig, RunConfig
from linearize.errors import LinearizeError
from linearize.methods.base import Method
from linearize.ops import sliding_window_attention_chunked, sliding_window_attention_recurrent


class WindowMixer(Mixer):
    def __init__(self, config: AttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.window_size = config.window_size
        self.sink_tokens = config.sink_tokens
        self.scale = head_dim**-0.5

    def forward(self, q, k, v, q_nope, k_nope, cache):
        return sliding_window_softmax(q, k, v, self.window_size, self.scale, cache, self.sink_tokens)


def sliding_window_softmax(q, k, v, window: int, scale: float, cache, sink_tokens: int = 0):
    """Sliding-window softmax attention (plus the first `sink_tokens` keys): chunked for a prefill,
    recurrent over the cached window after it; the cache layer (if any) keeps the last window - 1 keys
    and values, and the sinks."""
    if cache is None or cache.get_seq_length() == 0:
        out = sliding_window_attention_chunked(q, k, v, window, scale=scale, sink_tokens=sink_tokens)
    else:
        out, _ = sliding_window_attention_recurrent(
            q, k, v, window, (cache.keys, cache.values), scale=scale, **sink_arguments(cache, sink_tokens)
        )
    if cache is not None:
        remember_sinks(cache, k, v, sink_tokens)
        cache.update(k, v)
    return out


class Window(Method):
    name = "window"
    defaults = {"attention": {"window_size": 64}, "transfer": {"enabled": False}}
    foreign_attention_keys = {
        key: "the window-only baseline has no linear-attention part"
        for key in ("feature_map", "feature_dim", "window_factor_init", "key_maps", "gate", "gate_normalizer", "mix")
    }

    def build_mixer(self, config, num_heads, num_kv_heads, head_dim):
        return WindowMixer(config, num_heads, num_kv_heads, head_dim)

    def check_config(self, config: RunConfig) -> None:
        super().check_config(config)
        if config.attention.window_size < 1:
            raise LinearizeError("method 'window' needs attention.window_size >= 1")
