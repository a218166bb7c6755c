"""The decoding state every mixer carries from one call to the next: one convention for all ops.

A sequence is continued from a `DecodeState`; every op form returns `(output, state)` where the state
is a `DecodeState` (or None when the caller did not ask for one). Its parts:

- the window: the most recent tokens, which are still softmax keys for the next query, with their
  key features (or what the key feature map reads, mapped when the key leaves: `key_features`) and
  log-gates (a hybrid moves a token from the window into the linear state when it leaves the window, and
  needs its features and the decay it has accumulated since);
- the sinks: the first `sink_tokens` tokens of each row that have already left the window; they stay
  softmax keys for every later query (StreamingLLM);
- the recurrent linear-attention state [B, Hk, F, D + 1] float32, last column the normaliser;
- per row, the number of real (non-padding) tokens seen so far: sinks are the first real tokens of a
  row, whatever its left padding;
- with a sparse cache (`linearize.ops.sparse`): per key/value head the exact keys kept beyond the window
  and the tokens that left it since the last update, with their values, what the linear state would read
  of them (key features or their inputs), positions and decays;
- with a recall memory (`linearize.ops.memory`): its table of keys and values by n-gram bucket, the
  buckets each window token will be stored under when it leaves the window, and the last token ids. Decoding
  steps update the table in place: to continue one state twice, copy it first
  (`state.map_batch(torch.clone)`).

Every tensor is batch-first, so beam search and batch selection act on all parts alike
(`DecodeState.map_batch`). Window and sink slots have fixed sizes with validity masks: left-padded rows
and short prompts simply leave slots invalid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class DecodeState:
    """window_*: [B, Hk, W', X] with W' = window - 1 (keys, values, key features, log-gates), window_valid
    [B, W'] and window_position [B, W'] (real position of each slot, -1 where invalid); sink_keys /
    sink_values [B, Hk, S, D] with sink_valid [B, S] (slot j holds the row's real token j once it left the
    window); recurrent [B, Hk, F, D + 1] float32 or None; seen [B] real tokens so far; memory_keys /
    memory_values [B, Hk, M, D] with memory_position [B, M] (the stored key's real position, -1: empty) and,
    for a quantized table, uint8 codes with memory_key_params / memory_value_params [B, Hk, M, 2],
    window_buckets [B, W', K] (the table rows each window token goes to, one per n-gram order, -1: never
    stored) and recent_tokens [B, n] (the last n token ids, -1: none) for a recall memory of M table rows
    keyed by n-grams of up to n tokens. sparse_keys / sparse_values [B, Hk, size + W, D], sparse_features
    [B, Hk, size + W, X], sparse_position [B, Hk, size + W] (-1: empty) and sparse_log_decay [B, Hk, size + W]
    (log-decay since the token's position): the sparse cache's `size` slots, then W slots for the current
    group's tokens that left the window (slot j: position g W + j)."""

    seen: torch.Tensor
    window_keys: torch.Tensor | None = None
    window_values: torch.Tensor | None = None
    window_features: torch.Tensor | None = None
    window_log_gates: torch.Tensor | None = None
    window_valid: torch.Tensor | None = None
    window_position: torch.Tensor | None = None
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    sink_valid: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None
    memory_keys: torch.Tensor | None = None
    memory_values: torch.Tensor | None = None
    memory_position: torch.Tensor | None = None
    memory_key_params: torch.Tensor | None = None
    memory_value_params: torch.Tensor | None = None
    window_buckets: torch.Tensor | None = None
    recent_tokens: torch.Tensor | None = None
    sparse_keys: torch.Tensor | None = None
    sparse_values: torch.Tensor | None = None
    sparse_features: torch.Tensor | None = None
    sparse_position: torch.Tensor | None = None
    sparse_log_decay: torch.Tensor | None = None

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DecodeState:
        """Apply `fn` (e.g. index_select on dim 0) to every tensor: beam reordering, batch selection."""
        present = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        return replace(self, **{name: fn(getattr(self, name)) for name in present})

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def empty_state(batch: int, kv_heads: int, feature_dim: int, head_dim: int, device=None) -> torch.Tensor:
    """Zero linear-attention state: [B, Hk, F, D + 1] float32 (last column = normaliser)."""
    return torch.zeros(batch, kv_heads, feature_dim, head_dim + 1, dtype=torch.float32, device=device)


def real_positions(key_mask: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each token among its row's real tokens, counting `seen` earlier ones: [B, T] long,
    -1 at padding. key_mask: [B, T] bool."""
    positions = key_mask.long().cumsum(-1) - 1
    if seen is not None:
        positions = positions + seen[:, None]
    return positions.masked_fill(~key_mask, -1)


def full_mask(batch: int, length: int, device) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.bool, device=device)
