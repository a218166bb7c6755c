"""The attention module that replaces a teacher's softmax attention.

It reuses the teacher's own q/k/v/o projections (and Qwen3's q/k norms) by reference, applies the
teacher's rotary embedding, and hands the heads to a `Mixer`: the method-specific token mixer
(LoLCATS hybrid, Liger Attention, ...). The module can also run as the teacher ("softmax" mode) with the
very same projections, so one model in memory serves as student, teacher and activation recorder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, LinearAttentionAndSlidingWindowAttentionLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from linearize.errors import LinearizeError


class Mixer(nn.Module):
    """A token mixer over per-head tensors. Subclasses implement `forward` and say their window.

    forward(q, k, v, q_nope, k_nope, cache) -> o
      q: [B, H, T, D] and k: [B, Hk, T, D] after RoPE; q_nope, k_nope: the same before RoPE;
      v: [B, Hk, T, D]; cache: a transformers cache layer for this layer, or None (no decoding state).
      Returns o: [B, H, T, D]. Causal.
    """

    window_size: int = 0

    def new_cache_layer(self) -> LinearAttentionAndSlidingWindowAttentionLayer:
        # transformers' hybrid layer: a recurrent state plus a window of the last window_size - 1 keys
        return LinearAttentionAndSlidingWindowAttentionLayer(sliding_window=max(self.window_size, 1))


def sink_arguments(cache, sink_tokens: int) -> dict:
    """Keyword arguments for a recurrent window op continuing from `cache`: the sink keys/values kept so far
    (the first `sink_tokens` of the sequence) and the absolute position of the first new token."""
    if sink_tokens == 0:
        return {}
    return {"sink_tokens": sink_tokens, "sinks": getattr(cache, "sinks", None), "position": cache.get_seq_length()}


def remember_sinks(cache, k: torch.Tensor, v: torch.Tensor, sink_tokens: int) -> None:
    """Keep the sequence's first `sink_tokens` keys and values on the cache layer (call before it advances)."""
    position = cache.get_seq_length()
    take = max(min(sink_tokens - position, k.shape[-2]), 0)
    if take == 0:
        return
    new = (k[:, :, :take], v[:, :, :take])
    old = getattr(cache, "sinks", None)
    cache.sinks = new if old is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(old, new))


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Causal softmax attention, the teacher's. q: [B, H, T, D]; k, v: [B, Hk, T, D] -> [B, H, T, D]."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask[..., : k.shape[-2]], scale=scale, enable_gqa=True
        )
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def check_no_left_padding(attention_mask: torch.Tensor | None) -> None:
    """The mixers have no key-padding mask yet: refuse left-padded batches instead of mixing pad tokens in.
    (Right padding is harmless: pads come after every real token, and attention is causal.)"""
    if attention_mask is None or attention_mask.dim() != 4:
        return
    last_row_first_key = attention_mask[:, 0, -1, 0]
    visible = last_row_first_key if last_row_first_key.dtype == torch.bool else last_row_first_key == 0
    if not bool(visible.all()):
        raise LinearizeError(
            "left-padded batches are not supported by linearized attention yet: generate or score one "
            "sequence per batch, or pad on the right (tokenizer.padding_side = 'right')"
        )


class LinearizedAttention(nn.Module):
    """Drop-in replacement for a Llama-family attention module (same forward signature).

    mode "linear": the mixer (student). mode "softmax": the teacher's softmax attention.
    mode "record": the teacher's output, and the per-head inputs/outputs kept in `self.recorded`
    as (q, k, v, y) for attention transfer.
    """

    def __init__(self, teacher_attention: nn.Module, mixer: Mixer, layer_idx: int):
        super().__init__()
        config = teacher_attention.config
        self.layer_idx = layer_idx
        self.head_dim = teacher_attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = teacher_attention.scaling
        # shared with the teacher, never copied
        self.q_proj = teacher_attention.q_proj
        self.k_proj = teacher_attention.k_proj
        self.v_proj = teacher_attention.v_proj
        self.o_proj = teacher_attention.o_proj
        self.q_norm = getattr(teacher_attention, "q_norm", None)
        self.k_norm = getattr(teacher_attention, "k_norm", None)
        self.mixer = mixer
        self.mode = "linear"
        self.recorded: tuple[torch.Tensor, ...] | None = None

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """hidden [B, T, C] -> q, k (after RoPE), v, q_nope, k_nope as [B, heads, T, D]."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q_rope, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
        return q_rope, k_rope, v, q, k

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape
        q, k, v, q_nope, k_nope = self.project(hidden_states, position_embeddings)
        if self.mode == "linear":
            cache = self._cache_layer(past_key_values)
            if cache is None or cache.get_seq_length() == 0:
                check_no_left_padding(attention_mask)
            out = self.mixer(q, k, v, q_nope, k_nope, cache)
        else:
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            out = softmax_attention(q, k, v, self.scaling, attention_mask)
            if self.mode == "record":
                self.recorded = (q, k, v, out)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), None

    def _cache_layer(self, past_key_values: Cache | None):
        """This layer's decoding state; swaps in a linear-attention cache layer on first use, so the
        DynamicCache that `generate()` builds works unchanged."""
        if past_key_values is None:
            return None
        layer = past_key_values.layers[self.layer_idx]
        if not isinstance(layer, LinearAttentionAndSlidingWindowAttentionLayer):
            layer = self.mixer.new_cache_layer()
            past_key_values.layers[self.layer_idx] = layer
        return layer


def linearized_attentions(model: nn.Module) -> list[LinearizedAttention]:
    return [m for m in model.modules() if isinstance(m, LinearizedAttention)]


@contextmanager
def attention_mode(model: nn.Module, mode: str) -> Iterator[list[LinearizedAttention]]:
    """Temporarily run every converted layer in `mode` ("linear", "softmax" or "record")."""
    layers = linearized_attentions(model)
    previous = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode = mode
    try:
        yield layers
    finally:
        for layer, old in zip(layers, previous):
            layer.mode = old
            layer.recorded = None
