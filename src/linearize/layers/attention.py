"""The attention module that replaces a teacher's softmax attention, and the mixer interface.

`LinearizedAttention` reuses the teacher's own q/k/v/o projections (and Qwen3's q/k norms) by
reference, applies the teacher's rotary embedding, and hands the heads to a `Mixer`: the
method-specific token mixer (LoLCATS hybrid, Liger Attention, ...). It can also run as the teacher
("softmax" mode) with the very same projections, so one model in memory serves as student, teacher and
activation recorder.

Prefill, decode and cache bookkeeping are written once, here: a mixer is handed the layer's
`DecodeState` (None for a fresh sequence) and returns its output and the new state; `Mixer.window_op`
and `Mixer.linear_op` pick the chunked form for a fresh sequence and the recurrent form to continue
one, each through the backend registry (`linearize.ops.backend`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from linearize.layers.cache import adopt_cache_layer
from linearize.ops import DecodeState, backend
from linearize.teacher.families import local_mask, teacher_window

TOKEN_IDS = "linearize_token_ids"  # the keyword that carries input_ids from the model's forward to its layers
# the keyword that carries a compiled decoding step's per-layer states (`linearize.models.compiled`): a list,
# layer i reads entry i and replaces it with its new state
STEP_STATES = "linearize_step_states"


@dataclass
class MixerInput:
    """What a mixer sees of one layer call. q: [B, H, T, D] and k: [B, Hk, T, D] after RoPE; q_nope, k_nope:
    the same before RoPE; v: [B, Hk, T, D]; hidden: the layer input [B, T, C]; key_mask: [B, T] bool
    (True = real token) or None (no padding); token_ids: [B, T] the input token ids, for mixers that
    remember by token (None where the model was called without input_ids); sink_q: [B, H, T, D] the queries
    rotated to position `mixer.sink_distance`, for mixers that have one (None otherwise), computed by
    `sink_query` where it is read: a fresh sequence no longer than that distance never reads it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_nope: torch.Tensor
    k_nope: torch.Tensor
    hidden: torch.Tensor
    key_mask: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    sink_query: Callable[[], torch.Tensor | None] | None = field(default=None, repr=False)

    @property
    def sink_q(self) -> torch.Tensor | None:
        return None if self.sink_query is None else self.sink_query()


class Mixer(nn.Module):
    """A causal token mixer over per-head tensors.

    forward(x: MixerInput, state: DecodeState | None, output_state: bool) -> (o [B, H, T, D], state)
    `state` is None for a fresh sequence; `output_state` asks for the state after the last token
    (for decoding). Subclasses build their op arguments and call `window_op` / `linear_op`.

    `branches`: the parts of the mixer's state that can be switched off at inference to measure what each
    carries (`branches_off`); a switched-off branch is skipped for the whole sequence, prefill and decoding.
    """

    branches: tuple[str, ...] = ()
    off: frozenset[str] = frozenset()
    # a query farther than this from the sinks (the first real tokens) scores them as if from this distance:
    # positions the student trained on (StreamingLLM's positions in the cache); None = their true distance
    sink_distance: int | None = None

    sparse_keys: int = 0  # a sparse cache (`linearize.ops.sparse`): exact keys per chosen key/value head
    sparse_score: str = "recall-error"
    sparse_training: bool = True  # false: only where no gradient is taken (evaluation, generation), as LoLA

    def keep_sparse(self, settings, chosen: list[bool] | None) -> None:
        """Give this mixer a sparse cache in the key/value heads `chosen` (None: none), as `settings`
        (`linearize.methods.base.SparseSettings`) say; it adds a branch, "sparse", and no parameter."""
        if chosen is None:
            return
        self.sparse_keys, self.sparse_score = settings.sparse_keys, settings.sparse_score
        self.sparse_training = settings.sparse_training
        # their indices, a constant of the op's calls (a compiled step's state keeps those heads only)
        self.sparse_heads = None if all(chosen) else tuple(i for i, c in enumerate(chosen) if c)
        self.branches = (*self.branches, "sparse")

    def sparse_inputs(self) -> dict:
        """The window op's arguments for the sparse cache (none without one, switched off, or while training a
        mixer that keeps it for inference only)."""
        if not self.sparse_keys or "sparse" in self.off or (not self.sparse_training and torch.is_grad_enabled()):
            return {}
        return {"sparse_keys": self.sparse_keys, "sparse_heads": self.sparse_heads, "sparse_score": self.sparse_score}

    def sink_inputs(self, x: MixerInput, state: DecodeState | None = None) -> dict:
        """The window op's arguments for `sink_distance` (none without it, or for a fresh sequence no longer
        than it: no query there is farther than that from the sinks)."""
        if self.sink_distance is None or (state is None and x.q.shape[2] - 1 <= self.sink_distance):
            return {}
        return {"sink_q": x.sink_q, "sink_distance": self.sink_distance}

    def window_op(self, q, k, v, window: int, state: DecodeState | None, output_state: bool, **kwargs):
        """Sliding-window softmax (+ sinks, + linear terms for older keys): chunked for a fresh sequence,
        recurrent from a state."""
        if state is None:
            op = backend.get("window_attention_chunked", q.device)
            return op(q, k, v, window, output_final_state=output_state, **kwargs)
        return backend.get("window_attention_recurrent", q.device)(q, k, v, window, state, **kwargs)

    def linear_op(
        self, fq, fk, v, log_gate, state: DecodeState | None, output_state: bool, chunk_size: int = 64, **kwargs
    ):
        """(Gated) linear attention over every key: chunked for a fresh sequence, recurrent from a state."""
        if state is None:
            op = backend.get("linear_attention_chunked", fq.device)
            return op(fq, fk, v, log_gate, output_final_state=output_state, chunk_size=chunk_size, **kwargs)
        return backend.get("linear_attention_recurrent", fq.device)(fq, fk, v, log_gate, state=state, **kwargs)


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attention_mask: torch.Tensor | None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention, the teacher's. q: [B, H, T, D]; k, v: [B, Hk, S, D] -> [B, H, T, D].
    `window`: the teacher attends over its last `window` keys only (a local layer), applied when no 4D mask
    (which already carries it) is given."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask[..., : k.shape[-2]], scale=scale, enable_gqa=True
        )
    if window is not None and k.shape[-2] > window:
        mask = local_mask(k.shape[-2], window, q.device, query_length=q.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1, scale=scale, enable_gqa=True)


def key_mask_from(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """[B, T] bool validity of this call's T tokens, from the 4D mask transformers hands attention layers
    (bool: True = attend; float: 0 = attend). A real key is seen by some query of the call (its own, at least,
    whatever window the mask has); a padding key by none. None when there is no mask or no padding."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    columns = attention_mask[:, 0, :, -length:]
    valid = (columns if columns.dtype == torch.bool else columns == 0).any(dim=-2)
    return None if bool(valid.all()) else valid


class LinearizedAttention(nn.Module):
    """Drop-in replacement for a Llama-family attention module (same forward signature).

    mode "linear": the mixer (student). mode "softmax": the teacher's softmax attention.
    mode "record": the teacher's output, and `self.recorded` = (layer input [B, T, C], teacher output per
    head before o_proj [B, H, T, D]) for attention transfer, which recomputes the heads with `mix`.
    """

    def __init__(self, teacher_attention: nn.Module, mixer: Mixer, layer_idx: int, rotary=None):
        """`rotary`: (the model's rotary embedding module, its extra arguments for this layer), which
        `sink_distance` needs to rotate queries to that position."""
        super().__init__()
        config = teacher_attention.config
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = teacher_attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = teacher_attention.scaling
        self.teacher_window = teacher_window(config, layer_idx)  # the teacher's own local window, if any
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
        self.rotary = rotary  # a tuple: the module is the model's, not a submodule of this layer
        self._far_rotary: dict = {}  # (cos, sin) at the sink distance, per device, dtype and distance

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

    def sink_query(self, q_nope: torch.Tensor) -> torch.Tensor | None:
        """q before RoPE [B, H, T, D] rotated to position `mixer.sink_distance` (None without one)."""
        distance = self.mixer.sink_distance
        if distance is None:
            return None
        key = (q_nope.device, q_nope.dtype, distance)
        if key not in self._far_rotary:
            if self.rotary is None:
                raise ValueError("attention.sink_distance needs the model's rotary embedding: build the layer with "
                                 "swap_attention")
            module, args = self.rotary
            position = torch.tensor([[distance]], device=q_nope.device)
            cos, sin = module(q_nope, position, *args)  # [1, 1, D]
            self._far_rotary[key] = (cos[:, None].to(q_nope.dtype), sin[:, None].to(q_nope.dtype))
        cos, sin = self._far_rotary[key]
        return q_nope * cos + rotate_half(q_nope) * sin

    def mixer_input(self, hidden_states, position_embeddings, key_mask=None, token_ids=None) -> MixerInput:
        q, k, v, q_nope, k_nope = self.project(hidden_states, position_embeddings)
        return MixerInput(q, k, v, q_nope, k_nope, hidden_states, key_mask, token_ids,
                          lambda: self.sink_query(q_nope))

    def mix(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mixer's per-head output [B, H, T, D] for a fresh sequence, without decoding state (what
        attention transfer compares with the teacher's output)."""
        if under_autocast(hidden_states):
            with torch.autocast(hidden_states.device.type, enabled=False):
                return self.mix(hidden_states.to(self.o_proj.weight.dtype), position_embeddings, token_ids)
        return self.mixer(self.mixer_input(hidden_states, position_embeddings, token_ids=token_ids), None,
                          output_state=False)[0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if under_autocast(hidden_states):  # the whole layer in the weights' dtype (see `under_autocast`)
            with torch.autocast(hidden_states.device.type, enabled=False):
                return self.forward(hidden_states.to(self.o_proj.weight.dtype), position_embeddings, attention_mask,
                                    past_key_values, **kwargs)
        batch, length, _ = hidden_states.shape
        if self.mode == "linear" and STEP_STATES in kwargs:  # inside a compiled step: no padding, no cache
            states = kwargs[STEP_STATES]
            inputs = self.mixer_input(hidden_states, position_embeddings, token_ids=kwargs.get(TOKEN_IDS))
            out, states[self.layer_idx] = self.mixer(inputs, states[self.layer_idx], output_state=True)
        elif self.mode == "linear":
            cache = None if past_key_values is None else adopt_cache_layer(past_key_values, self.layer_idx)
            inputs = self.mixer_input(hidden_states, position_embeddings, key_mask_from(attention_mask, length),
                                      kwargs.get(TOKEN_IDS))
            out, state = self.mixer(inputs, None if cache is None else cache.state, output_state=cache is not None)
            if cache is not None:
                cache.advance(state, length)
        else:
            q, k, v, _, _ = self.project(hidden_states, position_embeddings)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            out = softmax_attention(q, k, v, self.scaling, attention_mask, self.teacher_window)
            if self.mode == "record":
                self.recorded = (hidden_states, out)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), None


def under_autocast(x: torch.Tensor) -> bool:
    """Whether an autocast is on for `x`'s device. A converted attention layer then runs outside it, in its
    weights' dtype: its projections (which carry stage 2's LoRA adapter: in a bf16 sum its small updates would
    round away), the mixer's running sums and softmax blocks (softmax mode too); the MLPs around it take the
    autocast's lower dtype (`linearize.devices.autocast`)."""
    device = x.device.type
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)


BRANCHES = ("linear", "memory", "sparse", "sinks")  # every switchable branch any mixer has


@contextmanager
def branches_off(model: nn.Module, names: tuple[str, ...] | list[str]) -> Iterator[list[LinearizedAttention]]:
    """Temporarily switch off these branches (e.g. "memory") in every converted layer that has them: an
    ablation at inference. A name no layer of the model has is an error naming the ones it has."""
    from linearize.errors import LinearizeError

    layers = linearized_attentions(model)
    present = {branch for layer in layers for branch in layer.mixer.branches}
    missing = [n for n in names if n not in present]
    if missing:
        raise LinearizeError(f"this model has no {', '.join(missing)} branch to switch off; its branches: "
                             f"{', '.join(sorted(present)) or 'none'}")
    previous = [layer.mixer.off for layer in layers]
    for layer in layers:
        layer.mixer.off = frozenset(n for n in names if n in layer.mixer.branches)
    try:
        yield layers
    finally:
        for layer, old in zip(layers, previous):
            layer.mixer.off = old


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
