"""LoLCATS (Zhang et al., 2024): learnable feature maps + sliding-window softmax hybrid, attention transfer,
then LoRA."""

from __future__ import annotations

import math

import torch
from torch import nn

from linearize.attention import Mixer, remember_sinks, sink_arguments
from linearize.config import AttentionConfig, RunConfig
from linearize.errors import LinearizeError
from linearize.feature_maps import build_feature_map
from linearize.methods.base import Method
from linearize.ops import (
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
    linear_attention_chunked,
    linear_attention_recurrent,
)


class LolcatsMixer(Mixer):
    """y_t = (g * sum_window exp(q.k/sqrt(d) - c) v + sum_older phi(q).phi(k) v) / (same without v).

    window_size 0 gives plain linear attention (Hedgehog without a window).
    Key feature maps live per key/value head (GQA kept) unless `key_maps: per_query_head`, the reference's
    choice, where keys are expanded to every query head first.
    """

    def __init__(self, config: AttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.window_size = config.window_size
        self.sink_tokens = config.sink_tokens
        self.chunk_size = config.chunk_size
        self.scale = head_dim**-0.5
        self.groups = num_heads // num_kv_heads
        self.expand_keys = config.key_maps == "per_query_head"
        key_heads = num_heads if self.expand_keys else num_kv_heads
        self.feature_map_q = build_feature_map(config.feature_map, num_heads, head_dim, config.feature_dim)
        self.feature_map_k = build_feature_map(config.feature_map, key_heads, head_dim, config.feature_dim)
        init = config.window_factor_init
        self.window_factor_logit = nn.Parameter(torch.full((num_heads,), math.log(init / (1 - init))))

    def forward(self, q, k, v, q_nope, k_nope, cache):
        if self.expand_keys:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        if self.window_size == 0:
            return self._linear(fq, fk, v, cache)
        g = torch.sigmoid(self.window_factor_logit)
        sinks = self.sink_tokens
        if cache is None:
            return hybrid_attention_chunked(q, k, v, fq, fk, g, self.window_size, scale=self.scale, sink_tokens=sinks)
        head_dim = k.shape[-1]
        if cache.get_seq_length() == 0:
            out, state = hybrid_attention_chunked(
                q, k, v, fq, fk, g, self.window_size, scale=self.scale, sink_tokens=sinks, output_final_state=True
            )
        else:
            keys = cache.keys
            window_cache = (keys[..., :head_dim], cache.values, keys[..., head_dim:])
            state = cache.recurrent_states[0]
            out, state, _ = hybrid_attention_recurrent(
                q, k, v, fq, fk, g, self.window_size, state, window_cache, scale=self.scale,
                **sink_arguments(cache, sinks),
            )
        remember_sinks(cache, k, v, sinks)
        # the window keeps raw keys beside their features: a key leaving the window enters the state
        cache.update(torch.cat([k, fk.to(k.dtype)], dim=-1), v)
        cache.update_recurrent_state(state)
        return out

    def _linear(self, fq, fk, v, cache):
        if cache is None:
            return linear_attention_chunked(fq, fk, v, chunk_size=self.chunk_size)
        if cache.get_seq_length() == 0:
            out, state = linear_attention_chunked(fq, fk, v, chunk_size=self.chunk_size, output_final_state=True)
        else:
            out, state = linear_attention_recurrent(fq, fk, v, initial_state=cache.recurrent_states[0])
        cache.cumulative_length += fq.shape[-2]
        cache.update_recurrent_state(state)
        return out


class Lolcats(Method):
    name = "lolcats"
    defaults = {
        "attention": {"feature_map": "hedgehog", "window_size": 64},
        "transfer": {"enabled": True},
        # lr 1e-3, not the reference's 1e-4: that suits 20M tokens; at tens of thousands it barely moves
        "finetune": {"lora_alpha": 16.0},
    }
    foreign_attention_keys = {
        "gate": "LoLCATS has no gates (that is Liger's gated recurrence)",
        "gate_normalizer": "LoLCATS has no gates",
        "mix": "LoLCATS normalises window and linear terms jointly; 'mix' is Liger Attention's weighting",
        "normalize": "LoLCATS attention is always normalised",
    }

    def build_mixer(self, config, num_heads, num_kv_heads, head_dim):
        return LolcatsMixer(config, num_heads, num_kv_heads, head_dim)

    def check_config(self, config: RunConfig) -> None:
        super().check_config(config)
        if config.attention.feature_map == "identity":
            raise LinearizeError(
                "feature_map 'identity' can give negative attention weights; LoLCATS normalises by them, "
                "so use hedgehog, t2r, elu or softmax"
            )
