"""The chunked form of the window op: a fresh sequence, chunk by chunk (each query chunk against its own
and the previous key chunk, the linear terms carried as a state between chunks); what training and
prefill run."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import memory, sparse
from ..linear import append_ones, chunks, group_heads, readout, unchunk
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


def _add_at(x: torch.Tensor, heads: torch.Tensor | None, part: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """x [B, Hk, ...] += alpha * part [B, len(heads), ...] in the heads `heads` (None: every head), in place."""
    return x.add_(part, alpha=alpha) if heads is None else x.index_add_(1, heads, part, alpha=alpha)


GROUP_TOKENS = 2048  # query chunks are processed this many tokens at a time: blocks stay cache-sized


def _query_chunks(x: torch.Tensor, kv_heads: int, chunk: int) -> torch.Tensor:
    """Queries [B, H, T, X] -> [B, Hk, N, G * C, X]: chunk n's queries of all G heads that read kv head k
    in one contiguous matrix, so every product with chunk n's keys is a plain batched matmul. Written in one
    pass into the new layout (zeros after T), not padded first and then copied."""
    batch, heads, t, width = x.shape
    n, full, rest = -(-t // chunk), t // chunk, t % chunk
    out = x.new_empty(batch, kv_heads, n, heads // kv_heads, chunk, width)
    into, grouped = out.transpose(2, 3), group_heads(x, kv_heads)  # [B, Hk, G, N, C, X], [B, Hk, G, T, X]
    if full:
        into[:, :, :, :full] = grouped[:, :, :, : full * chunk].unflatten(3, (full, chunk))
    if rest:
        into[:, :, :, full, :rest] = grouped[:, :, :, full * chunk :]
        into[:, :, :, full, rest:] = 0.0
    return out.flatten(3, 4)


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
    """Linear in T: chunks of size `window`. Query chunk i reaches its window in chunks i - 1 and i (one
    [C, 2C] softmax block); the linear terms of chunk i - 1's keys that already left the window are one
    [C, C] block, chunks <= i - 2 enter through their summed (decayed) state, carried by a short scan over
    chunks; sinks add a [C, S] block against each row's first real tokens, counted where they lie
    outside the window. No [N, N] or [C, C, F] tensor, and the blocks are built `GROUP_TOKENS` queries at
    a time: memory and time grow linearly in T. `sink_q` [B, H, T, D]: each query rotated to position
    `sink_distance`, what a query farther than that from the sinks scores them with (the attention layer's
    `sink_distance`).

    A sparse cache (`sparse_keys` > 0 exact keys per key/value head in `sparse_heads`, their indices, None = all;
    `linearize.ops.sparse`) follows the chunks: chunk = group, so query chunk i reads chunk i - 1's keys that
    left the window exactly (its pending group: in the window's block, as window keys) and the cache after
    update i - 2 ([C, size] more scores);
    the state read for chunks <= i - 2 holds every key, so the cached ones' linear terms are taken out again
    (the same sum, without a second state). Rows with left padding are first moved to start at index 0."""
    _check(window, sink_tokens, fq, fk, sink_q, sink_distance)
    out_dtype = v.dtype
    fk, kept = key_features_of(fk, key_features)
    q, k, v, fq, fk, log_gate, mask = _inputs(q, k, v, fq, fk, log_gate, key_mask)
    final_inputs = (k, v, fk, log_gate, mask, kept, token_ids)  # the final state is built in the caller's layout
    order = None
    if sparse_keys > 0:  # groups follow real positions: rows start at index 0
        sparse.check_score(sparse_score, fk is not None)
        order = compaction(mask)
        q, fq, sink_q, k, v, fk, log_gate, kept = (reorder(x, order, 2) for x in (q, fq, sink_q, k, v, fk, log_gate,
                                                                                   kept))
        mask, token_ids = reorder(mask, order, 1), reorder(token_ids, order, 1)
    batch, kv_heads, t, head_dim = k.shape
    groups = q.shape[1] // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    chunk = window
    positions = real_positions(mask)
    is_sink = mask & (positions < sink_tokens)

    qc = _query_chunks(q * scale, kv_heads, chunk)  # [B, Hk, N, G C, D], scaled once: every score reads them
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
                                                  memory_ngram, n_chunks * chunk, memory_recall)
        # recalled as the table holds them (memory_format)
        mem_k, mem_v = memory.round_trip(k, memory_format), append_ones(memory.round_trip(v, memory_format))
        mem_kc = _recalled(mem_k, index).unflatten(2, (n_chunks, chunk))  # [B, Hk, N, C, K, D]
        mem_vc = _recalled(mem_v, index).unflatten(2, (n_chunks, chunk))  # [B, Hk, N, C, K, D + 1]
        mem_hidden = ~has.view(batch, 1, n_chunks, 1, chunk, -1)  # [B, 1, N, 1, C, K]

    cache_heads = with_cache = None  # the key/value heads with a cache (tuple; tensor) where not every head has one
    if sparse_keys > 0:
        chosen = sparse.heads_mask(kv_heads, sparse_heads, k.device)
        eligible = (mask & ~is_sink)[:, None, :] & chosen[None, :, None]  # [B, Hk, T]
        cumulative = None if log_gate is None else log_gate.cumsum(-1)  # A, [B, Hk, T]
        if sparse_heads is not None and len(sparse_heads) < kv_heads:  # the cache's work in those heads only
            cache_heads = tuple(sparse_heads)
            with_cache = torch.tensor(cache_heads, dtype=torch.long, device=k.device)
        # in the Hc heads with a cache
        cache_fk, cache_cumulative = sparse.compact(fk, cache_heads), sparse.compact(cumulative, cache_heads)
        cache_keys, cache_values = sparse.compact(k, cache_heads), sparse.compact(v, cache_heads)
        updates = sparse.chunk_updates(sparse_score, cache_fk, cache_values, cache_cumulative,
                                       sparse.compact(eligible, cache_heads), chunk, sparse_keys, eps)  # [B, Hc, N, S]
        reads = F.pad(updates, (0, 0, 2, 0), value=-1)[:, :, :n_chunks]  # chunk i: the cache after update i - 2
        cache_k = sparse.rows_at(cache_keys, reads)  # [B, Hc, N, size, D]
        cache_v = append_ones(sparse.rows_at(cache_values, reads))  # [B, Hc, N, size, D + 1]
        cache_hidden = (reads < 0)[:, :, :, None, None, :]  # [B, Hc, N, 1, 1, size]
        # chunk i - 1's real, non-sink keys that left the window of query t (local j <= t): exact, in chosen heads
        sinks_c = _with_previous_chunk(chunks(is_sink[..., None].float(), chunk), 1)[..., 0].bool()  # [B, N, 2C]
        left = torch.arange(2 * chunk, device=k.device)[None, :] <= torch.arange(chunk, device=k.device)[:, None]
        pending = (left & (valid & ~sinks_c)[:, :, None, :])[:, None, :, None] & chosen[:, None, None, None, None]
        hidden = hidden & ~pending  # [B, Hk, N, 1, C, 2C]
        every_head = bool(chosen.all()) if chosen.device.type != "meta" else False
        if fk is not None:
            cache_fk_t = sparse.rows_at(cache_fk, reads).transpose(-1, -2)  # [B, Hc, N, F, size]
            if cumulative is not None:  # exp(A_t - A_s) of query t and cached key s
                cache_total = cache_cumulative.gather(-1, reads.clamp(min=0).flatten(2)).view_as(reads)
                query_total = chunks(cache_cumulative[..., None], chunk)[..., 0]  # [B, Hc, N, C]
                # <= 0 for every real pair; clamped so the padding after the last chunk stays finite
                cache_decay = (query_total[..., :, None] - cache_total[..., None, :]).clamp(max=0).exp()[:, :, :, None]
        if memory_buckets > 0:  # a recalled key the cache or the pending group holds is read there, once
            recalled_at = index.view(batch, n_chunks, chunk, -1)  # [B, N, C, K]
            chunk_of = torch.arange(n_chunks, device=k.device)[None, :, None, None]
            held = (recalled_at // chunk == chunk_of - 1)[:, None] & chosen[:, None, None, None]  # [B, Hk, N, C, K]
            cached = (recalled_at[:, None, :, :, :, None] == reads[:, :, :, None, None, :]).any(-1)  # [B, Hc, ...]
            held = held | cached if with_cache is None else held.index_copy(
                1, with_cache, sparse.compact(held, cache_heads) | cached)
            mem_hidden = mem_hidden | held[:, :, :, None]

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
        if sink_q is not None:  # queries beyond sink_distance read the sinks from there
            far_qc = _query_chunks(sink_q.float() * scale, kv_heads, chunk)
            reads_far = F.pad(positions, (0, n_chunks * chunk - t), value=-1) > sink_distance
            reads_far = reads_far.view(batch, 1, n_chunks, 1, chunk, 1)  # [B, 1, N, 1, C, 1]

    if fk is not None:
        # linear terms: query t of chunk i reads chunk i - 1's keys s <= t (local index) directly, and
        # chunks <= i - 2 through the state after chunk i - 2 (a short scan over chunks, as the plain
        # linear op), decayed by exp(A_t - A_s) with A the log-gate cumsum
        fqc = _query_chunks(fq, kv_heads, chunk)  # [B, Hk, N, G C, F]
        fkc = chunks(fk.masked_fill(is_sink[:, None, :, None], 0.0), chunk)  # [B, Hk, N, C, F]
        previous_fk_t, previous_v = _previous_chunk(fkc, 2).transpose(-1, -2), _previous_chunk(vc, 2)
        not_older = ~torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
        query_decay = None  # each query's read of the state, decayed from the end of chunk i - 2 (on its row)
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
        scores = (qc[:, :, n] @ keys_t[:, :, n]).view(*shape, 2 * chunk).masked_fill_(
            hidden[:, :, n], float("-inf"))  # [B, Hk, n, G, C, 2C]
        row_max = scores.amax(-1, keepdim=True)
        if sink_tokens > 0:
            sink_scores = (qc[:, :, n] @ sink_keys_t).view(*shape, sink_tokens)
            if sink_q is not None:
                far = (far_qc[:, :, n] @ sink_keys_t).view(*shape, sink_tokens)
                sink_scores = torch.where(reads_far[:, :, n], far, sink_scores)
            sink_scores = sink_scores.masked_fill_(sink_hidden[:, :, n], float("-inf"))
            row_max = torch.maximum(row_max, sink_scores.amax(-1, keepdim=True))
        window_max = row_max  # c_t
        if memory_buckets > 0:
            # a query's K recalled keys are its own: products batched over (chunk, position), the G query
            # heads of a group as the rows of one small matmul (no copy of the keys per head)
            mem_scores = torch.einsum("bkngcd,bkncmd->bkngcm", qc[:, :, n].view(*shape, head_dim), mem_kc[:, :, n])
            mem_scores = mem_scores.masked_fill_(mem_hidden[:, :, n], float("-inf"))  # [B, Hk, n, G, C, K]
            if memory_bias:
                mem_scores = mem_scores + memory.bias_of(mem_scores, memory_bias)
            row_max = torch.maximum(row_max, mem_scores.amax(-1, keepdim=True))
        if sparse_keys > 0:  # in the heads with a cache
            cache_shape = (batch, cache_k.shape[1], -1, groups, chunk, sparse_keys)
            cache_scores = sparse.compact(qc[:, :, n], cache_heads) @ cache_k[:, :, n].transpose(-1, -2)
            cache_scores = cache_scores.view(cache_shape)
            cache_scores = cache_scores.masked_fill_(cache_hidden[:, :, n], float("-inf"))  # [B, Hc, n, G, C, size]
            cache_max = torch.maximum(sparse.compact(row_max, cache_heads), cache_scores.amax(-1, keepdim=True))
            row_max = cache_max if with_cache is None else row_max.index_copy(1, with_cache, cache_max)
        in_place = not torch.is_grad_enabled()  # no backward reads the scores (the row max's does, with one)

        def weights_of(block_scores: torch.Tensor, top: torch.Tensor) -> torch.Tensor:  # exp(score - row max)
            return (block_scores.sub_(top) if in_place else block_scores - top).exp_()

        weights = weights_of(scores, row_max).flatten(3, 4)
        o = weights @ values[:, :, n]
        if sparse_keys > 0:  # o: a product's, no backward reads it
            _add_at(o, with_cache, weights_of(cache_scores, cache_max).flatten(3, 4) @ cache_v[:, :, n])
        if sink_tokens > 0:
            o += weights_of(sink_scores, row_max).flatten(3, 4) @ sink_values
        if memory_buckets > 0:
            o += torch.einsum("bkngcm,bkncmd->bkngcd", weights_of(mem_scores, row_max), mem_vc[:, :, n]).flatten(3, 4)
        if fk is not None:
            linear = fqc[:, :, n] @ state_before[:, :, n]
            if query_decay is not None:
                linear = (linear.view(*shape, head_dim + 1) * query_decay[:, :, n]).flatten(3, 4)
            if not (sparse_keys > 0 and every_head):  # a head with a cache reads its pending group exactly
                lin = (fqc[:, :, n] @ previous_fk_t[:, :, n]).view(*shape, chunk)  # [B, Hk, n, G, C, C]
                lin = lin.masked_fill(not_older, 0.0) if log_gate is None else lin * older_decay[:, :, n]
                if sparse_keys > 0:
                    lin = lin * ~chosen[:, None, None, None, None]
                linear += lin.flatten(3, 4) @ previous_v[:, :, n]
            if sparse_keys > 0:  # the state holds the cached keys too: their linear terms out again
                cached = (sparse.compact(fqc[:, :, n], cache_heads) @ cache_fk_t[:, :, n]).view(cache_shape)
                cached = cached if log_gate is None else cached * cache_decay[:, :, n]
                _add_at(linear, with_cache, cached.masked_fill(cache_hidden[:, :, n], 0.0).flatten(3, 4)
                        @ cache_v[:, :, n], alpha=-1.0)
            if memory_buckets > 0 or sparse_keys > 0:  # the extra keys are weighed against c_t, the window's max
                linear = linear * (window_max - row_max).exp().flatten(3, 4)
            o += linear
        return o

    per_block = max(1, GROUP_TOKENS // chunk)
    o = torch.cat([block(slice(i, i + per_block)) for i in range(0, n_chunks, per_block)], dim=2)
    o = readout(o, eps).view(batch, kv_heads, n_chunks, groups, chunk, head_dim).transpose(2, 3)
    o = reorder(unchunk(o, t).flatten(1, 2), order, 2, inverse=True).to(out_dtype)
    state = None
    if output_final_state:
        fields, exclude = {}, None
        if sparse_keys > 0:
            updates = updates if with_cache is None else sparse.expand(updates, sparse_heads, kv_heads, -1)
            fields, exclude = sparse_final(updates, k, v, kept if kept is not None else fk, cumulative, mask,
                                           eligible, window, out_dtype, sparse_heads)
            exclude = reorder(exclude, order, 2, inverse=True)
        k, v, fk, log_gate, mask, kept, token_ids = final_inputs
        if memory_state is not None and order is not None:  # its buckets and last token ids, as the rows lie
            key_bucket, recent, table_size = memory_state
            recent = F.pad(torch.where(mask, token_ids, -1), (recent.shape[1], 0), value=-1)[:, -recent.shape[1]:]
            memory_state = (reorder(key_bucket, order, 1, inverse=True), recent, table_size)
        state = final_state(k, v, fk, log_gate, mask, real_positions(mask), window, sink_tokens,
                            memory_state=memory_state, table_dtype=out_dtype, memory_format=memory_format, kept=kept,
                            exclude=exclude)
        for name, value in fields.items():
            setattr(state, name, value)
    return o, state
