"""The parallel form of the window op: every query against every key with an explicit mask. The reference
the chunked and recurrent forms are tested against (O(T^2) memory: for tests and short inputs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import memory, sparse
from ..linear import append_ones, group_heads, readout
from ..state import DecodeState, real_positions
from .common import (
    _check,
    _inputs,
    _memory_inputs,
    _recalled,
    compaction,
    final_state,
    key_features_of,
    reorder,
    sparse_final,
)


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
    sparse_keys: int = 0,
    sparse_heads: tuple[int, ...] | None = None,
    sparse_score: str = "recall-error",
) -> tuple[torch.Tensor, DecodeState | None]:
    """Quadratic reference: every [T, T] weight materialised; the sparse cache's updates replayed one by one
    from their definition (`sparse_updates`)."""
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
    soft = (soft | torch.eye(t, dtype=torch.bool, device=k.device))[:, None]  # [B, 1, T, T]; a padded query sees
    # itself: no NaN
    scores = torch.einsum("bkgtd,bksd->bkgts", group_heads(q, kv_heads), k) * scale
    if sink_q is not None and sink_tokens > 0:  # a query beyond sink_distance reads the sinks from there
        far = torch.einsum("bkgtd,bksd->bkgts", group_heads(sink_q.float(), kv_heads), k) * scale
        reads_far = (positions > sink_distance)[:, :, None] & is_sink[:, None, :]  # [B, T, T]
        scores = torch.where(reads_far[:, None, None], far, scores)
    extra = None  # [B, Hk, T, T]: the sparse cache's exact keys beyond the window (its cache and pending group)
    if sparse_keys > 0:
        sparse.check_score(sparse_score, fk is not None)
        chosen = sparse.heads_mask(kv_heads, sparse_heads, k.device)
        eligible = (mask & ~is_sink)[:, None, :] & chosen[None, :, None]  # [B, Hk, T]
        total = None if log_gate is None else log_gate.cumsum(-1)
        updates = sparse_updates(sparse_score, fk, v, total, eligible, positions, window, sparse_keys, eps)
        cached, pending = sparse_reads(updates, eligible, positions, window)
        extra = cached | pending
        extra_scores = scores.masked_fill(~cached[:, :, None], float("-inf"))
        soft = soft | pending  # [B, Hk, T, T]: the pending group counts as window keys (it sets c_t with them)
    scores = scores.masked_fill(~soft[:, :, None], float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    window_max = row_max  # c_t
    if extra is not None:
        row_max = torch.maximum(row_max, extra_scores.amax(-1, keepdim=True))
    memory_state = None
    if memory_buckets > 0:
        index, has, memory_state = _memory_inputs(token_ids, mask, positions, window, sink_tokens, memory_buckets,
                                                  memory_ngram, t, memory_recall)
        if extra is not None:  # a recalled key the sparse cache holds is read there, once
            held = extra.gather(-1, index[:, None].expand(-1, kv_heads, -1, -1))  # [B, Hk, T, K]
            has = has[:, None] & ~held
        else:
            has = has[:, None]
        mem_k = _recalled(memory.round_trip(k, memory_format), index)  # [B, Hk, T, K, D]: as the table holds it
        mem_v = _recalled(append_ones(memory.round_trip(v, memory_format)), index)  # [B, Hk, T, K, D + 1]
        mem_scores = torch.einsum("bkgtd,bktmd->bkgtm", group_heads(q, kv_heads), mem_k) * scale
        mem_scores = mem_scores.masked_fill(~has[:, :, None], float("-inf"))  # [B, Hk, G, T, K]
        if memory_bias:
            mem_scores = mem_scores + memory.bias_of(mem_scores, memory_bias)
        row_max = torch.maximum(row_max, mem_scores.amax(-1, keepdim=True))
    weights = (scores - row_max).exp()
    if extra is not None:
        weights = weights + (extra_scores - row_max).exp()
    if fk is not None:
        older = (visible & (age >= window)[None] & ~is_sink[:, None, :])[:, None]  # [B, 1 or Hk, T, T]
        if extra is not None:
            older = older & ~extra
        lin = torch.einsum("bkgtf,bksf->bkgts", group_heads(fq, kv_heads), fk)
        if log_gate is not None:
            total = log_gate.cumsum(-1)  # [B, Hk, T]
            log_decay = (total[..., :, None] - total[..., None, :]).masked_fill(~older, float("-inf"))
            lin = lin * log_decay.exp()[:, :, None]
        weights = weights + lin.masked_fill(~older[:, :, None], 0.0) * (window_max - row_max).exp()
    o = torch.einsum("bkgts,bksd->bkgtd", weights, append_ones(v))
    if memory_buckets > 0:
        o = o + torch.einsum("bkgtm,bktmd->bkgtd", (mem_scores - row_max).exp(), mem_v)
    o = readout(o, eps).flatten(1, 2).to(out_dtype)
    state = None
    if output_final_state:
        fields, exclude = {}, None
        if sparse_keys > 0:  # built as the chunked form builds it, from rows moved to start at index 0
            order = compaction(mask)
            compact = [reorder(x, order, 2) for x in (k, v, kept if kept is not None else fk, total, eligible)]
            fields, exclude = sparse_final(updates, *compact[:4], reorder(mask, order, 1), compact[4], window,
                                           out_dtype, sparse_heads)
            exclude = reorder(exclude, order, 2, inverse=True)
        state = final_state(k, v, fk, log_gate, mask, positions, window, sink_tokens, memory_state=memory_state,
                            table_dtype=out_dtype, memory_format=memory_format, kept=kept, exclude=exclude)
        for name, value in fields.items():
            setattr(state, name, value)
    return o, state


def sparse_updates(score: str, fk, v, total, eligible, positions, window: int, size: int, eps: float = 1e-6
                   ) -> torch.Tensor:
    """The sparse cache's updates, one by one from their definition: [B, Hk, N, size] the real positions the
    cache holds after update m (ascending, -1: empty), N = ceil(T / W). Update m, at the end of the step of
    real position (m + 2) W - 1 (the row's last, for a shorter row): the cache and group m's eligible tokens
    compete by their score against the linear state of every other real non-sink token of the groups before."""
    batch, kv_heads, t = eligible.shape
    group = torch.where(positions >= 0, positions.div(window, rounding_mode="floor"), -1)[:, None]  # [B, 1, T]
    last = (positions.amax(-1) + 1).clamp(min=1)  # [B] real tokens
    cache = torch.zeros(batch, kv_heads, t, dtype=torch.bool, device=eligible.device)
    kept = []
    for m in range(-(-t // window)):
        now = torch.minimum(torch.full_like(last, (m + 2) * window - 1), last - 1)  # a real position
        now_index = (positions == now[:, None]).long().argmax(-1)  # [B]
        candidates = cache | (eligible & (group == m))
        state = None
        if fk is not None:
            # a head with a cache: every real non-sink token of the groups before, but the cached ones (a head
            # without one has no candidates: its score is never read)
            decay = (eligible & (group < m) & ~cache).float()
            if total is not None:
                decay = decay * (total.gather(-1, now_index[:, None, None].expand(-1, kv_heads, 1)) - total).exp()
            state = torch.einsum("bks,bksf,bksd->bkfd", decay, fk, append_ones(v))
        position = torch.where(candidates, positions[:, None], -1)
        pick = sparse.keep_best(sparse.scores(score, fk, v, position, state, eps), position, size)
        picked = position.gather(-1, pick)
        cache = torch.zeros_like(cache).scatter(-1, pick, True) & (position >= 0)
        kept.append(picked)
    return torch.stack(kept, dim=2)



def sparse_reads(updates: torch.Tensor, eligible: torch.Tensor, positions: torch.Tensor, window: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, Hk, T, T] bool twice) the keys beyond the window that query t (real position p, group g = p // W)
    reads exactly: the cache after update g - 2 (`updates` [B, Hk, N, size], real positions), and the eligible
    tokens of group g - 1 at p - W or before (its pending group)."""
    size = updates.shape[-1]
    query_group = positions.div(window, rounding_mode="floor")  # [B, T]; -1 at padding
    reads = F.pad(updates, (0, 0, 2, 0), value=-1)  # index g: the cache after update g - 2
    at = query_group.clamp(min=0)[:, None, :, None].expand(-1, updates.shape[1], -1, size)
    cached = reads.gather(2, at)  # [B, Hk, T, size]
    key = positions[:, None, None, :]  # [B, 1, 1, T]
    in_cache = (cached[:, :, :, None, :] == key[..., None]).any(-1) & (key >= 0)
    in_cache = in_cache & (query_group >= 0)[:, None, :, None]
    key_group = positions.div(window, rounding_mode="floor")[:, None, None, :]
    pending = eligible[:, :, None, :] & (key_group == query_group[:, None, :, None] - 1) & (
        key <= positions[:, None, :, None] - window)
    return in_cache, pending
