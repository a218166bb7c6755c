"""The parallel form of the window op: every query against every key with an explicit mask. The reference
the chunked and recurrent forms are tested against (O(T^2) memory: for tests and short inputs)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import memory
from ..linear import append_ones, group_heads, readout
from ..state import DecodeState, real_positions
from .common import _check, _inputs, _memory_inputs, _recalled, final_state, key_features_of


def window_attention_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    sink_tokens: int = 0,
    fq: torch.Tensor | None = None,
    fk: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    output_final_state: bool = False,
    token_ids: torch.Tensor | None = None,
    memory_buckets: int = 0,
    memory_ngram: int | tuple[int, ...] = 1,
    memory_format: str = "auto",
    memory_recall: str = "all",
    memory_bias: tuple[float, ...] = (),
    key_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sink_q: torch.Tensor | None = None,
    sink_distance: int | None = None,
) -> tuple[torch.Tensor, DecodeState | None]:
    """Quadratic reference: every [T, T] weight materialised."""
    _check(window, sink_tokens, fq, fk, sink_q, sink_distance)
    out_dtype = v.dtype
    fk, kept = key_features_of(fk, key_features)
    q, k, v, fq, fk, log_gate, mask = _inputs(q, k, v, fq, fk, log_gate, key_mask)
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    positions = real_positions(mask)
    index = torch.arange(t, device=k.device)
    age = index[:, None] - index[None, :]  # [T, T]: query t, key s
    is_sink = mask & (positions < sink_tokens)  # [B, T]
    visible = (age >= 0)[None] & mask[:, None, :]  # [B, T, T]
    soft = visible & ((age < window)[None] | is_sink[:, None, :])
    soft = soft | torch.eye(t, dtype=torch.bool, device=k.device)  # a padded query sees itself: no NaN
    scores = torch.einsum("bkgtd,bksd->bkgts", group_heads(q, kv_heads), k) * scale
    if sink_q is not None and sink_tokens > 0:  # a query beyond sink_distance reads the sinks from there
        far = torch.einsum("bkgtd,bksd->bkgts", group_heads(sink_q.float(), kv_heads), k) * scale
        reads_far = (positions > sink_distance)[:, :, None] & is_sink[:, None, :]  # [B, T, T]
        scores = torch.where(reads_far[:, None, None], far, scores)
    scores = scores.masked_fill(~soft[:, None, None], float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    window_max = row_max  # c_t
    memory_state = None
    if memory_buckets > 0:
        index, has, memory_state = _memory_inputs(token_ids, mask, positions, window, sink_tokens, memory_buckets,
                                                  memory_ngram, t, memory_recall)
        mem_k = _recalled(memory.round_trip(k, memory_format), index)  # [B, Hk, T, K, D]: as the table holds it
        mem_v = _recalled(append_ones(memory.round_trip(v, memory_format)), index)  # [B, Hk, T, K, D + 1]
        mem_scores = torch.einsum("bkgtd,bktmd->bkgtm", group_heads(q, kv_heads), mem_k) * scale
        mem_scores = mem_scores.masked_fill(~has[:, None, None], float("-inf"))  # [B, Hk, G, T, K]
        if memory_bias:
            mem_scores = mem_scores + memory.bias_of(mem_scores, memory_bias)
        row_max = torch.maximum(row_max, mem_scores.amax(-1, keepdim=True))
    weights = (scores - row_max).exp()
    if fk is not None:
        older = visible & (age >= window)[None] & ~is_sink[:, None, :]
        lin = torch.einsum("bkgtf,bksf->bkgts", group_heads(fq, kv_heads), fk)
        if log_gate is not None:
            total = log_gate.cumsum(-1)  # [B, Hk, T]
            log_decay = (total[..., :, None] - total[..., None, :]).masked_fill(~older[:, None], float("-inf"))
            lin = lin * log_decay.exp()[:, :, None]
        weights = weights + lin.masked_fill(~older[:, None, None], 0.0) * (window_max - row_max).exp()
    o = torch.einsum("bkgts,bksd->bkgtd", weights, append_ones(v))
    if memory_buckets > 0:
        o = o + torch.einsum("bkgtm,bktmd->bkgtd", (mem_scores - row_max).exp(), mem_v)
    o = readout(o, eps).flatten(1, 2).to(out_dtype)
    state = None
    if output_final_state:
        state = final_state(k, v, fk, log_gate, mask, positions, window, sink_tokens, memory_state=memory_state,
                            table_dtype=out_dtype, memory_format=memory_format, kept=kept)
    return o, state
