"""Sliding-window softmax attention with attention sinks, optionally plus linear terms for older keys.

One definition everywhere (every form, training, prefill and decode). Query t of a row sees

- as softmax terms: the keys s with t - window < s <= t (the window, by index), and the row's sinks:
  its first `sink_tokens` real tokens (StreamingLLM), wherever they lie;
- as linear terms (when key features are given): every older real key, s <= t - window, that is not a
  sink, weighted by fq_t . fk_s and, with gates, by the decay exp(A_t - A_s) (A = cumsum of log-gates):

    y_t = (sum_soft exp(q_t.k_s scale - c_t) [v_s, 1] + sum_older decay fq_t.fk_s [v_s, 1])   -> [num, den]
    o_t = num / (den + eps)

with c_t the max of the softmax scores only. Without features this is plain sliding-window attention
with sinks; with them, the LoLCATS hybrid (whose window factor g is the same as dividing fq by g).
With a recall memory (`token_ids` [B, T] and `memory_buckets` > 0; `linearize.ops.memory`) each query
has a few more softmax keys, the memory's entries for the n-grams ending at its own token, one per order in
`memory_ngram` (an int or a list), a key recalled twice counted once: each exp(q_t.k_mem scale - c_t)
[v_mem, 1] joins the sum, c_t still the window's and sinks' max (so a strong match outweighs the linear
terms as the teacher's softmax would; computed stably).
Padding: `key_mask` [B, T] (True = real token) takes padded keys out of every term; gates are ignored
at padding; a row's sinks are its first real tokens. Outputs at padded query positions are finite but
meaningless.

Shapes: q [B, H, T, D], k, v [B, Hk, T, D], fq [B, H, T, F], fk [B, Hk, T, F], log_gate [B, Hk, T]
(one decay per key/value head and token, <= 0), H % Hk == 0: query head h reads kv head h // (H // Hk).
Every form returns (o [B, H, T, D] in v's dtype, DecodeState or None); math runs in float32.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import memory
from .linear import append_ones, chunks, group_heads, readout, unchunk
from .state import DecodeState, full_mask, real_positions


def _inputs(q, k, v, fq, fk, log_gate, key_mask):
    """Float32 copies; padding zeroed out of features and gates."""
    batch, _, t, _ = k.shape
    mask = full_mask(batch, t, k.device) if key_mask is None else key_mask.bool()
    if fk is not None:
        fk = fk.float().masked_fill(~mask[:, None, :, None], 0.0)
        fq = fq.float()
    if log_gate is not None:
        log_gate = log_gate.float().masked_fill(~mask[:, None, :], 0.0)
    return q.float(), k.float(), v.float(), fq, fk, log_gate, mask


def final_state(
    k, v, fk, log_gate, mask, positions, window: int, sink_tokens: int, seen: torch.Tensor | None = None,
    memory_state: tuple | None = None, table_dtype: torch.dtype | None = None,
) -> DecodeState:
    """The DecodeState after processing a whole sequence from scratch (float32 inputs as from `_inputs`):
    the last window - 1 tokens stay in the window, sinks that left it go to the sink slots, and the
    other real tokens that left it are summed into the linear state (when features are given). The recall
    memory's table is kept in `table_dtype`, the dtype the keys and values came in (bf16 keys lose nothing
    in a bf16 table)."""
    batch, kv_heads, t, head_dim = k.shape
    keep = window - 1
    start, pad = max(t - keep, 0), max(keep - t, 0)

    def last(x, fill=0.0):  # [B, Hk, T, X] -> [B, Hk, keep, X]
        return F.pad(x[:, :, start:], (0, 0, pad, 0), value=fill)

    state = DecodeState(
        seen=mask.sum(-1) if seen is None else seen + mask.sum(-1),
        window_keys=last(k),
        window_values=last(v),
        window_valid=F.pad(mask[:, start:], (pad, 0), value=False),
        window_position=F.pad(positions[:, start:], (pad, 0), value=-1),
    )
    if fk is not None:
        state.window_features = last(fk)
    if log_gate is not None:
        state.window_log_gates = F.pad(log_gate[:, :, start:], (pad, 0), value=0.0)
    left = mask.clone()
    left[:, start:] = False  # real tokens that left the window
    is_sink = left & (positions < sink_tokens)
    if sink_tokens > 0:
        slot = torch.where(is_sink, positions, sink_tokens)  # slot `sink_tokens` collects the rest
        index = slot[:, None, :, None].expand(batch, kv_heads, t, head_dim)
        state.sink_keys = k.new_zeros(batch, kv_heads, sink_tokens + 1, head_dim).scatter(2, index, k)[:, :, :-1]
        state.sink_values = v.new_zeros(batch, kv_heads, sink_tokens + 1, head_dim).scatter(2, index, v)[:, :, :-1]
        valid = torch.zeros(batch, sink_tokens + 1, dtype=torch.long, device=k.device)
        state.sink_valid = valid.scatter(1, slot, is_sink.long())[:, :-1].bool()
    if fk is not None:
        weight = (left & ~is_sink).float()[:, None, :].expand(batch, kv_heads, t)
        if log_gate is not None:
            total = log_gate.cumsum(-1)
            weight = weight * (total[..., -1:] - total).exp()
        state.recurrent = (fk * weight[..., None]).transpose(-1, -2) @ append_ones(v)
    if memory_state is not None:
        key_bucket, recent, table_size = memory_state
        state.memory_keys, state.memory_values, state.memory_position = memory.final_table(
            k, v, key_bucket, positions, window, table_size, table_dtype)
        state.window_buckets = F.pad(key_bucket[:, start:], (0, 0, pad, 0), value=-1)
        state.recent_tokens = recent
    return state


def _memory_inputs(token_ids, mask, positions, window: int, sink_tokens: int, buckets: int, ngram, length: int):
    """A fresh sequence's memory keys: per query and order the index of its recalled key [B, length, K] (0
    where it has none; queries past T, padding up to `length`, have none), whether it has one, and what
    `final_state` needs to build the table."""
    if token_ids is None:
        raise ValueError("a recall memory (memory_buckets > 0) needs the token ids (token_ids)")
    query_bucket, key_bucket, recent = memory.key_buckets(token_ids, mask, positions, sink_tokens, buckets,
                                                          ngram=ngram)
    table_size = buckets * len(memory.orders(ngram))
    index = memory.lookup(query_bucket, key_bucket, window, table_size)  # [B, T, K]
    index = F.pad(index, (0, 0, 0, length - index.shape[1]), value=-1)
    return index.clamp(min=0), index >= 0, (key_bucket, recent, table_size)


def _recalled(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, Hk, L, X] at index [B, T, K] -> [B, Hk, T, K, X], picked as whole rows (index_select; a
    gather along L is several times slower)."""
    batch, kv_heads, length, width = x.shape
    base = torch.arange(batch * kv_heads, device=x.device).view(batch, kv_heads, 1, 1) * length
    rows = (base + index[:, None]).flatten()
    return x.reshape(-1, width).index_select(0, rows).view(batch, kv_heads, *index.shape[1:], width)


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
) -> tuple[torch.Tensor, DecodeState | None]:
    """Quadratic reference: every [T, T] weight materialised."""
    _check(window, sink_tokens, fq, fk)
    out_dtype = v.dtype
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
    scores = scores.masked_fill(~soft[:, None, None], float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    window_max = row_max  # c_t
    memory_state = None
    if memory_buckets > 0:
        index, has, memory_state = _memory_inputs(token_ids, mask, positions, window, sink_tokens, memory_buckets,
                                                  memory_ngram, t)
        mem_k, mem_v = _recalled(k, index), _recalled(append_ones(v), index)  # [B, Hk, T, K, D (+ 1)]
        mem_scores = torch.einsum("bkgtd,bktmd->bkgtm", group_heads(q, kv_heads), mem_k) * scale
        mem_scores = mem_scores.masked_fill(~has[:, None, None], float("-inf"))  # [B, Hk, G, T, K]
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
                            table_dtype=out_dtype)
    return o, state


def _block_masks(chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, 2C] masks for query chunk i (local t) against key chunks i - 1 and i (local j); chunk == window:
    key (i - 1) C + j is in the window iff t < j <= t + C (older iff j <= t); j == t + C is the query."""
    t = torch.arange(chunk, device=device)[:, None]
    j = torch.arange(2 * chunk, device=device)[None, :]
    return (j > t) & (j <= t + chunk), j == t + chunk


def _with_previous_chunk(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Chunks along `dim` (the chunk axis; the next one is the position in the chunk) preceded by the
    previous chunk: [..., N, C, ...] -> [..., N, 2C, ...] (zeros before the first)."""
    return torch.cat([_previous_chunk(x, dim), x], dim=dim + 1)


def _previous_chunk(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Chunk i - 1 in place of chunk i along the chunk axis `dim` (zeros for the first)."""
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


GROUP_TOKENS = 2048  # query chunks are processed this many tokens at a time: blocks stay cache-sized


def _query_chunks(x: torch.Tensor, kv_heads: int, chunk: int) -> torch.Tensor:
    """Queries [B, H, T, X] -> [B, Hk, N, G * C, X]: chunk n's queries of all G heads that read kv head k
    in one contiguous matrix, so every product with chunk n's keys is a plain batched matmul."""
    grouped = chunks(group_heads(x, kv_heads), chunk)  # [B, Hk, G, N, C, X]
    return grouped.transpose(2, 3).flatten(3, 4).contiguous()


def window_attention_chunked(
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
) -> tuple[torch.Tensor, DecodeState | None]:
    """Linear in T: chunks of size `window`. Query chunk i reaches its window in chunks i - 1 and i (one
    [C, 2C] softmax block); the linear terms of chunk i - 1's keys that already left the window are one
    [C, C] block, chunks <= i - 2 enter through their summed (decayed) state, carried by a short scan over
    chunks; sinks add a [C, S] block against each row's first real tokens, counted where they lie
    outside the window. No [N, N] or [C, C, F] tensor, and the blocks are built `GROUP_TOKENS` queries at
    a time: memory and time grow linearly in T."""
    _check(window, sink_tokens, fq, fk)
    out_dtype = v.dtype
    q, k, v, fq, fk, log_gate, mask = _inputs(q, k, v, fq, fk, log_gate, key_mask)
    batch, kv_heads, t, head_dim = k.shape
    groups = q.shape[1] // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    chunk = window
    positions = real_positions(mask)
    is_sink = mask & (positions < sink_tokens)

    qc = _query_chunks(q, kv_heads, chunk)  # [B, Hk, N, G C, D]
    n_chunks = qc.shape[2]
    vc = chunks(append_ones(v), chunk)  # [B, Hk, N, C, D + 1]
    keys_t = _with_previous_chunk(chunks(k, chunk), 2).transpose(-1, -2)  # [B, Hk, N, D, 2C]
    values = _with_previous_chunk(vc, 2)  # [B, Hk, N, 2C, D + 1]
    valid = _with_previous_chunk(chunks(mask[..., None].float(), chunk), 1)[..., 0].bool()  # [B, N, 2C]
    in_window, itself = _block_masks(chunk, k.device)
    hidden = ~((in_window & valid[:, :, None, :]) | itself)[:, None, :, None]  # [B, 1, N, 1, C, 2C]
    memory_state = None
    if memory_buckets > 0:
        index, has, memory_state = _memory_inputs(token_ids, mask, positions, window, sink_tokens, memory_buckets,
                                                  memory_ngram, n_chunks * chunk)
        mem_kc = _recalled(k, index).unflatten(2, (n_chunks, chunk))  # [B, Hk, N, C, K, D]
        mem_vc = _recalled(vc.flatten(2, 3), index).unflatten(2, (n_chunks, chunk))  # [B, Hk, N, C, K, D + 1]
        mem_hidden = ~has.view(batch, 1, n_chunks, 1, chunk, -1)  # [B, 1, N, 1, C, K]

    if sink_tokens > 0:
        # slot j = the row's real token j; visible to query t when it lies outside t's window
        slot = torch.where(is_sink, positions, sink_tokens)
        where = torch.full((batch, sink_tokens + 1), -1, dtype=torch.long, device=k.device)
        where = where.scatter(1, slot, torch.arange(t, device=k.device).expand(batch, t))[:, :sink_tokens]
        gather = where.clamp(min=0)[:, None, :, None].expand(batch, kv_heads, sink_tokens, head_dim)
        sink_keys_t = k.gather(2, gather).transpose(-1, -2)[:, :, None]  # [B, Hk, 1, D, S]
        sink_values = append_ones(v.gather(2, gather))[:, :, None]  # [B, Hk, 1, S, D + 1]
        query_index = torch.arange(n_chunks * chunk, device=k.device).view(n_chunks, chunk, 1)
        sink_hidden = ~((where[:, None, None, :] >= 0) & (where[:, None, None, :] <= query_index - window))
        sink_hidden = sink_hidden[:, None, :, None]  # [B, 1, N, 1, C, S]

    if fk is not None:
        # linear terms: query t of chunk i reads chunk i - 1's keys s <= t (local index) directly, and
        # chunks <= i - 2 through the state after chunk i - 2 (a short scan over chunks, as the plain
        # linear op), decayed by exp(A_t - A_s) with A the log-gate cumsum
        fqc = _query_chunks(fq, kv_heads, chunk)  # [B, Hk, N, G C, F]
        fkc = chunks(fk.masked_fill(is_sink[:, None, :, None], 0.0), chunk)  # [B, Hk, N, C, F]
        previous_fk_t, previous_v = _previous_chunk(fkc, 2).transpose(-1, -2), _previous_chunk(vc, 2)
        not_older = ~torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
        from_state = fqc  # the queries' reads of the state, decayed from the end of chunk i - 2
        if log_gate is None:
            local = fkc.transpose(-1, -2) @ vc  # [B, Hk, N, F, D + 1]
            chunk_decay = None
        else:
            total = chunks(log_gate.cumsum(-1)[..., None], chunk)[..., 0]  # [B, Hk, N, C]
            log_decay = total[..., :, None] - _previous_chunk(total, 2)[..., None, :]  # [B, Hk, N, C, C]
            older_decay = log_decay.masked_fill(not_older, float("-inf")).exp()[:, :, :, None]
            end = total[..., -1]  # [B, Hk, N]: A at each chunk's end
            local = (fkc * (end[..., None] - total).exp()[..., None]).transpose(-1, -2) @ vc  # decayed to its end
            chunk_decay = (end - F.pad(end, (1, 0))[..., :-1]).exp()[..., None, None]  # [B, Hk, N, 1, 1]
            end_before = F.pad(end, (2, 0))[..., :n_chunks]  # A at the end of chunk i - 2
            query_decay = (total - end_before[..., None]).exp()[:, :, :, None, :, None]  # [B, Hk, N, 1, C, 1]
            from_state = (fqc.view(*fqc.shape[:3], groups, chunk, -1) * query_decay).flatten(3, 4)
        current = torch.zeros_like(local[:, :, 0])
        states_before = [current, current]  # a query in chunk i reads the state after chunk i - 2
        for i in range(n_chunks - 2):
            current = current if chunk_decay is None else chunk_decay[:, :, i] * current
            current = current + local[:, :, i]
            states_before.append(current)
        state_before = torch.stack(states_before[:n_chunks], dim=2)  # [B, Hk, N, F, D + 1]

    def block(n: slice) -> torch.Tensor:
        """Outputs [B, Hk, n, G C, D + 1] (numerator and normaliser) of query chunks n."""
        shape = (batch, kv_heads, -1, groups, chunk)
        scores = (qc[:, :, n] @ keys_t[:, :, n]).mul_(scale).view(*shape, 2 * chunk).masked_fill_(
            hidden[:, :, n], float("-inf"))  # [B, Hk, n, G, C, 2C]
        row_max = scores.amax(-1, keepdim=True)
        if sink_tokens > 0:
            sink_scores = (qc[:, :, n] @ sink_keys_t).mul_(scale).view(*shape, sink_tokens).masked_fill_(
                sink_hidden[:, :, n], float("-inf"))
            row_max = torch.maximum(row_max, sink_scores.amax(-1, keepdim=True))
        window_max = row_max  # c_t
        if memory_buckets > 0:
            # a query's K recalled keys are its own: products batched over (chunk, position), the G query
            # heads of a group as the rows of one small matmul (no copy of the keys per head)
            mem_scores = torch.einsum("bkngcd,bkncmd->bkngcm", qc[:, :, n].view(*shape, head_dim), mem_kc[:, :, n])
            mem_scores = mem_scores.mul_(scale).masked_fill_(mem_hidden[:, :, n], float("-inf"))  # [B, Hk, n, G, C, K]
            row_max = torch.maximum(row_max, mem_scores.amax(-1, keepdim=True))
        weights = (scores - row_max).exp_().flatten(3, 4)
        o = weights @ values[:, :, n]
        if sink_tokens > 0:
            o = o + (sink_scores - row_max).exp_().flatten(3, 4) @ sink_values
        if memory_buckets > 0:
            o = o + torch.einsum("bkngcm,bkncmd->bkngcd", (mem_scores - row_max).exp_(), mem_vc[:, :, n]).flatten(3, 4)
        if fk is not None:
            lin = (fqc[:, :, n] @ previous_fk_t[:, :, n]).view(*shape, chunk)  # [B, Hk, n, G, C, C]
            lin = lin.masked_fill(not_older, 0.0) if log_gate is None else lin * older_decay[:, :, n]
            linear = lin.flatten(3, 4) @ previous_v[:, :, n] + from_state[:, :, n] @ state_before[:, :, n]
            o = o + (linear if memory_buckets == 0 else linear * (window_max - row_max).exp().flatten(3, 4))
        return o

    per_block = max(1, GROUP_TOKENS // chunk)
    o = torch.cat([block(slice(i, i + per_block)) for i in range(0, n_chunks, per_block)], dim=2)
    o = readout(o, eps).view(batch, kv_heads, n_chunks, groups, chunk, head_dim).transpose(2, 3)
    o = unchunk(o, t).flatten(1, 2).to(out_dtype)
    state = None
    if output_final_state:
        state = final_state(k, v, fk, log_gate, mask, positions, window, sink_tokens, memory_state=memory_state,
                            table_dtype=out_dtype)
    return o, state


def window_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    state: DecodeState,
    *,
    sink_tokens: int = 0,
    fq: torch.Tensor | None = None,
    fk: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    token_ids: torch.Tensor | None = None,
    memory_buckets: int = 0,
    memory_ngram: int | tuple[int, ...] = 1,
) -> tuple[torch.Tensor, DecodeState]:
    """Token by token from `state` (decoding; T is usually 1). Each new token joins the window; the oldest
    window token leaves it: into its sink slot if it is one of the row's first `sink_tokens` real tokens,
    else into the linear state (with features), else it is dropped; with a recall memory, it is also
    written to the memory (in place; see `DecodeState`)."""
    _check(window, sink_tokens, fq, fk)
    if memory_buckets > 0 and token_ids is None:
        raise ValueError("a recall memory (memory_buckets > 0) needs the token ids (token_ids)")
    if q.shape[2] == 1 and key_mask is None and window > 1:
        return _one_token(q, k, v, window, state, sink_tokens, fq, fk, log_gate, scale, eps, token_ids,
                          memory_buckets, memory_ngram)
    out_dtype = v.dtype
    q, k, v, fq, fk, log_gate, mask = _inputs(q, k, v, fq, fk, log_gate, key_mask)
    batch, kv_heads, t, head_dim = k.shape
    scale = head_dim**-0.5 if scale is None else scale
    q = group_heads(q, kv_heads)
    fq = None if fq is None else group_heads(fq, kv_heads)
    s = state
    w_keys, w_values, w_valid, w_position = s.window_keys, s.window_values, s.window_valid, s.window_position
    w_features, w_gates, recurrent = s.window_features, s.window_log_gates, s.recurrent
    sink_keys, sink_values, sink_valid = s.sink_keys, s.sink_values, s.sink_valid
    seen = s.seen
    if memory_buckets > 0:  # copies: this general path leaves the caller's state as it was
        mem_keys, mem_values, mem_position = (s.memory_keys.clone(), s.memory_values.clone(),
                                              s.memory_position.clone())
        w_buckets = s.window_buckets
        query_bucket, key_bucket, recent = memory.key_buckets(
            token_ids, mask, real_positions(mask, seen), sink_tokens, memory_buckets, s.recent_tokens, memory_ngram)
    recalled = query_bucket.shape[-1] if memory_buckets > 0 else 0  # memory keys, first in each row
    outputs = []
    for i in range(t):
        valid_i = mask[:, i]
        position_i = torch.where(valid_i, seen, -1)
        keys = torch.cat([w_keys, k[:, :, i : i + 1]], dim=2)
        values = torch.cat([w_values, v[:, :, i : i + 1]], dim=2)
        visible = torch.cat([w_valid, torch.ones_like(valid_i)[:, None]], dim=1)  # a query sees itself
        if sink_tokens > 0:
            keys = torch.cat([sink_keys, keys], dim=2)
            values = torch.cat([sink_values, values], dim=2)
            visible = torch.cat([sink_valid, visible], dim=1)
        if memory_buckets > 0:
            mem_k, mem_v, has = memory.read(mem_keys, mem_values, mem_position, query_bucket[:, i])
            keys, values = torch.cat([mem_k, keys], dim=2), torch.cat([mem_v, values], dim=2)
            visible = torch.cat([has, visible], dim=1)
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], keys) * scale
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        num = (scores - row_max).exp() @ append_ones(values)  # [B, Hk, G, D + 1]
        if recurrent is not None:
            if log_gate is not None:
                recurrent = recurrent * log_gate[:, :, i].exp()[..., None, None]
            linear = fq[:, :, :, i] @ recurrent
            if memory_buckets > 0:  # the memory keys are weighed against c_t, the window's max
                linear = linear * (scores[..., recalled:].amax(-1, keepdim=True) - row_max).exp()
            num = num + linear
        outputs.append(num)

        # the new token joins the window, the oldest leaves it
        keys, values = keys[:, :, -window:], values[:, :, -window:]
        w_valid_all = torch.cat([w_valid, valid_i[:, None]], dim=1)
        w_position_all = torch.cat([w_position, position_i[:, None]], dim=1)
        leaving_valid, leaving_position = w_valid_all[:, 0], w_position_all[:, 0]
        if memory_buckets > 0:  # the leaving token's buckets (-1: not to be stored, or not a real token)
            buckets_all = torch.cat([w_buckets, key_bucket[:, i : i + 1]], dim=1)
            memory.write_(mem_keys, mem_values, mem_position, buckets_all[:, 0], keys[:, :, :1], values[:, :, :1],
                          leaving_position)
            w_buckets = buckets_all[:, 1:]
        leaving_k, leaving_v = keys[:, :, 0], values[:, :, 0]
        w_keys, w_values = keys[:, :, 1:], values[:, :, 1:]
        w_valid, w_position = w_valid_all[:, 1:], w_position_all[:, 1:]
        leaving_sink = leaving_valid & (leaving_position < sink_tokens)
        if sink_tokens > 0:
            into = (torch.arange(sink_tokens, device=k.device) == leaving_position[:, None]) & leaving_sink[:, None]
            sink_keys = torch.where(into[:, None, :, None], leaving_k[:, :, None], sink_keys)
            sink_values = torch.where(into[:, None, :, None], leaving_v[:, :, None], sink_values)
            sink_valid = sink_valid | into
        if fk is not None:
            features = torch.cat([w_features, fk[:, :, i : i + 1]], dim=2)
            leaving_fk, w_features = features[:, :, 0], features[:, :, 1:]
            weight = (leaving_valid & ~leaving_sink).float()[:, None].expand(batch, kv_heads)
            if log_gate is not None:
                gates = torch.cat([w_gates, log_gate[:, :, i : i + 1]], dim=2)
                w_gates = gates[:, :, 1:]
                weight = weight * w_gates.sum(-1).exp()  # decay from the leaving token to the new one
            recurrent = recurrent + (weight[..., None] * leaving_fk)[..., None] * append_ones(leaving_v)[..., None, :]
        seen = seen + valid_i.long()
    o = readout(torch.stack(outputs, dim=3), eps).flatten(1, 2).to(out_dtype)
    new_state = DecodeState(
        seen=seen,
        window_keys=w_keys,
        window_values=w_values,
        window_features=w_features,
        window_log_gates=w_gates,
        window_valid=w_valid,
        window_position=w_position,
        sink_keys=sink_keys,
        sink_values=sink_values,
        sink_valid=sink_valid,
        recurrent=recurrent,
    )
    if memory_buckets > 0:
        new_state.memory_keys, new_state.memory_values, new_state.memory_position = mem_keys, mem_values, mem_position
        new_state.window_buckets, new_state.recent_tokens = w_buckets, recent
    return o, new_state


def _one_token(q, k, v, window, state, sink_tokens, fq, fk, log_gate, scale, eps, token_ids, memory_buckets,
               memory_ngram):
    """`window_attention_recurrent` for one real token per row (the decoding step), in as few ops as the
    math allows: per-step dispatch, not arithmetic, is what a decoding step costs on a CPU. The same
    result as the general loop (tests hold them equal)."""
    out_dtype = v.dtype
    batch, kv_heads, _, head_dim = k.shape
    scale = head_dim**-0.5 if scale is None else scale
    s = state
    q = q.float().view(batch, kv_heads, -1, head_dim)  # [B, Hk, G, D]
    k, v = k.float(), v.float()  # [B, Hk, 1, D]
    ones = torch.ones(batch, 1, dtype=torch.bool, device=k.device)
    if sink_tokens > 0:
        keys = torch.cat([s.sink_keys, s.window_keys, k], dim=2)
        values = torch.cat([s.sink_values, s.window_values, v], dim=2)
        visible = torch.cat([s.sink_valid, s.window_valid, ones], dim=1)
    else:
        keys = torch.cat([s.window_keys, k], dim=2)
        values = torch.cat([s.window_values, v], dim=2)
        visible = torch.cat([s.window_valid, ones], dim=1)
    first = sink_tokens + 1  # index of window slot 1 in keys / values / visible
    recalled = 0  # memory keys, first in each row
    if memory_buckets > 0:
        query_bucket, key_bucket, recent = memory.key_buckets(token_ids, ones, s.seen[:, None], sink_tokens,
                                                              memory_buckets, s.recent_tokens, memory_ngram)
        mem_k, mem_v, has = memory.read(s.memory_keys, s.memory_values, s.memory_position, query_bucket[:, 0])
        keys, values = torch.cat([mem_k, keys], dim=2), torch.cat([mem_v, values], dim=2)
        visible = torch.cat([has, visible], dim=1)
        recalled = has.shape[1]
        first += recalled
    scores = (q @ keys.transpose(-1, -2)).mul_(scale).masked_fill_(~visible[:, None, None], float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    weights = (scores - row_max).exp_()  # a new tensor: `scores` stays for c_t
    num, den = weights @ values, weights.sum(-1, keepdim=True)  # [B, Hk, G, D], [B, Hk, G, 1]
    recurrent = s.recurrent
    if recurrent is not None:
        if log_gate is not None:
            recurrent = recurrent * log_gate.float().exp()[..., None]  # [B, Hk, 1] -> [B, Hk, 1, 1]
        linear = fq.float().view(batch, kv_heads, -1, fq.shape[-1]) @ recurrent  # [B, Hk, G, D + 1]
        if memory_buckets > 0:  # the memory keys are weighed against c_t, the window's max
            linear = linear * (scores[..., recalled:].amax(-1, keepdim=True) - row_max).exp()
        num, den = num + linear[..., :-1], den + linear[..., -1:]
    o = (num / (den + eps)).view(batch, -1, 1, head_dim).to(out_dtype)

    # the new token joins the window, the oldest (slot 0) leaves it
    leaving_valid, leaving_position = s.window_valid[:, 0], s.window_position[:, 0]
    new = DecodeState(
        seen=s.seen + 1,
        window_keys=keys[:, :, first:],
        window_values=values[:, :, first:],
        window_valid=visible[:, first:],
        window_position=torch.cat([s.window_position[:, 1:], s.seen[:, None]], dim=1),
        sink_keys=s.sink_keys,
        sink_values=s.sink_values,
        sink_valid=s.sink_valid,
    )
    leaving_sink = leaving_valid & (leaving_position < sink_tokens)
    # on a CPU, skip the sink update in the (usual) steps where no sink leaves the window; elsewhere, or
    # traced by torch.compile, no data-dependent branch
    if sink_tokens > 0 and (k.device.type != "cpu" or torch.compiler.is_compiling() or bool(leaving_sink.any())):
        into = (torch.arange(sink_tokens, device=k.device) == leaving_position[:, None]) & leaving_sink[:, None]
        new.sink_keys = torch.where(into[:, None, :, None], s.window_keys[:, :, :1], s.sink_keys)
        new.sink_values = torch.where(into[:, None, :, None], s.window_values[:, :, :1], s.sink_values)
        new.sink_valid = s.sink_valid | into
    if fk is not None:
        features = torch.cat([s.window_features, fk.float()], dim=2)
        new.window_features = features[:, :, 1:]
        weight = (leaving_valid & ~leaving_sink).float()[:, None, None]  # [B, 1, 1]
        if log_gate is not None:
            gates = torch.cat([s.window_log_gates, log_gate.float()], dim=2)
            new.window_log_gates = gates[:, :, 1:]
            weight = weight * new.window_log_gates.sum(-1, keepdim=True).exp()  # decay since it left
        leaving = features[:, :, :1].transpose(-1, -2) * weight[..., None]  # [B, Hk, F, 1]
        update = torch.cat([leaving * s.window_values[:, :, :1], leaving], dim=-1)  # fk^T [v, 1]
        new.recurrent = recurrent + update
    if memory_buckets > 0:  # the leaving token goes into the memory, the new one's bucket is kept
        if not _caller_writes_memory:  # our compiled step writes it after its graph (store_leaving)
            store_leaving(s)
        new.memory_keys, new.memory_values, new.memory_position = s.memory_keys, s.memory_values, s.memory_position
        new.window_buckets = torch.cat([s.window_buckets[:, 1:], key_bucket], dim=1)
        new.recent_tokens = recent
    return o, new


_caller_writes_memory = False


@contextmanager
def caller_writes_memory():
    """Within: decoding steps leave the recall memory's table write to their caller (`store_leaving`). For a
    torch.compile graph of the step, where a write into the table (a graph input) would copy the whole table
    at every step; the graph reads this flag as a constant, so a graph compiled without it writes the table
    itself (correct, slower)."""
    global _caller_writes_memory
    before, _caller_writes_memory = _caller_writes_memory, True
    try:
        yield
    finally:
        _caller_writes_memory = before


def store_leaving(state: DecodeState) -> None:
    """In place: the token that leaves the window at the next decoding step from `state` (its slot 0) goes
    into the recall memory under each of its buckets (-1: not stored). `_one_token` does it itself, except
    within `caller_writes_memory`, whose caller calls this on the state it passed in, after the step (the
    step reads the table before it writes, so the order is the same)."""
    memory.write_(state.memory_keys, state.memory_values, state.memory_position, state.window_buckets[:, 0],
                  state.window_keys[:, :, :1], state.window_values[:, :, :1], state.window_position[:, 0])


def empty_window_state(
    batch: int,
    kv_heads: int,
    head_dim: int,
    window: int,
    sink_tokens: int = 0,
    feature_dim: int | None = None,
    gated: bool = False,
    device=None,
    memory_buckets: int = 0,
    memory_ngram: int | tuple[int, ...] = 1,
) -> DecodeState:
    """The state before the first token: every window and sink slot invalid, a zero linear state, an
    empty memory."""
    keep = window - 1
    zeros = torch.zeros(batch, kv_heads, keep, head_dim, device=device)
    state = DecodeState(
        seen=torch.zeros(batch, dtype=torch.long, device=device),
        window_keys=zeros,
        window_values=zeros.clone(),
        window_valid=torch.zeros(batch, keep, dtype=torch.bool, device=device),
        window_position=torch.full((batch, keep), -1, dtype=torch.long, device=device),
    )
    if sink_tokens > 0:
        state.sink_keys = torch.zeros(batch, kv_heads, sink_tokens, head_dim, device=device)
        state.sink_values = state.sink_keys.clone()
        state.sink_valid = torch.zeros(batch, sink_tokens, dtype=torch.bool, device=device)
    if feature_dim is not None:
        state.window_features = torch.zeros(batch, kv_heads, keep, feature_dim, device=device)
        state.recurrent = torch.zeros(batch, kv_heads, feature_dim, head_dim + 1, device=device)
        if gated:
            state.window_log_gates = torch.zeros(batch, kv_heads, keep, device=device)
    if memory_buckets > 0:
        grams = memory.orders(memory_ngram)
        state.memory_keys, state.memory_values, state.memory_position = memory.empty_table(
            batch, kv_heads, memory_buckets * len(grams), head_dim, device)
        state.window_buckets = torch.full((batch, keep, len(grams)), -1, dtype=torch.long, device=device)
        state.recent_tokens = torch.full((batch, max(grams)), -1, dtype=torch.long, device=device)
    return state


def _check(window: int, sink_tokens: int, fq, fk) -> None:
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) must be >= 0")
    if (fq is None) != (fk is None):
        raise ValueError("give both fq and fk, or neither")
