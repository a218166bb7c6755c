"""What every form of the window op shares: its inputs checked and laid out, the recall memory's inputs,
the state after a fresh sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import memory, sparse
from ..linear import append_ones
from ..state import DecodeState, full_mask


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


def key_features_of(fk, key_features):
    """-> (the keys' features, what the state keeps of each window key): with `key_features`, `fk` holds the
    inputs of the keys' feature map (the state keeps those, and maps a key when it leaves the window), else
    the features themselves (kept as they are)."""
    if fk is None or key_features is None:
        return fk, None
    return key_features(fk), fk


def final_state(
    k, v, fk, log_gate, mask, positions, window: int, sink_tokens: int, seen: torch.Tensor | None = None,
    memory_state: tuple | None = None, table_dtype: torch.dtype | None = None, memory_format: str = "auto",
    kept: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
) -> DecodeState:
    """The DecodeState after processing a whole sequence from scratch (float32 inputs as from `_inputs`):
    the last window - 1 tokens stay in the window, sinks that left it go to the sink slots, and the
    other real tokens that left it are summed into the linear state (when features are given). Window and
    sinks are kept in `table_dtype`, the dtype the keys and values came in (bf16 keys lose nothing in bf16),
    the linear state in float32, the recall memory's table in `memory_format` ("auto": `table_dtype`). `kept`:
    what the window keeps of each key in place of its features (the feature map's inputs, `key_features_of`).
    `exclude` [B, Hk, T]: tokens the sparse cache holds, kept out of the linear state (`SparseFinal`)."""
    batch, kv_heads, t, head_dim = k.shape
    dtype = table_dtype or k.dtype
    keep = window - 1
    start, pad = max(t - keep, 0), max(keep - t, 0)

    def last(x, fill=0.0):  # [B, Hk, T, X] -> [B, Hk, keep, X], in the keys' dtype
        return F.pad(x[:, :, start:], (0, 0, pad, 0), value=fill).to(dtype)

    state = DecodeState(
        seen=mask.sum(-1) if seen is None else seen + mask.sum(-1),
        window_keys=last(k),
        window_values=last(v),
        window_valid=F.pad(mask[:, start:], (pad, 0), value=False),
        window_position=F.pad(positions[:, start:], (pad, 0), value=-1),
    )
    if fk is not None:
        state.window_features = last(fk if kept is None else kept.masked_fill(~mask[:, None, :, None], 0.0))
    if log_gate is not None:
        state.window_log_gates = F.pad(log_gate[:, :, start:], (pad, 0), value=0.0)
    left = mask.clone()
    left[:, start:] = False  # real tokens that left the window
    is_sink = left & (positions < sink_tokens)
    if sink_tokens > 0:
        slot = torch.where(is_sink, positions, sink_tokens)  # slot `sink_tokens` collects the rest
        index = slot[:, None, :, None].expand(batch, kv_heads, t, head_dim)
        slots = k.new_zeros(batch, kv_heads, sink_tokens + 1, head_dim)
        state.sink_keys = slots.scatter(2, index, k)[:, :, :-1].to(dtype)
        state.sink_values = slots.scatter(2, index, v)[:, :, :-1].to(dtype)
        valid = torch.zeros(batch, sink_tokens + 1, dtype=torch.long, device=k.device)
        state.sink_valid = valid.scatter(1, slot, is_sink.long())[:, :-1].bool()
    if fk is not None:
        weight = (left & ~is_sink).float()[:, None, :].expand(batch, kv_heads, t)
        if exclude is not None:
            weight = weight * ~exclude
        if log_gate is not None:
            total = log_gate.cumsum(-1)
            weight = weight * (total[..., -1:] - total).exp()
        state.recurrent = (fk * weight[..., None]).transpose(-1, -2) @ append_ones(v)
    if memory_state is not None:
        key_bucket, recent, table_size = memory_state
        (state.memory_keys, state.memory_values, state.memory_position, state.memory_key_params,
         state.memory_value_params) = memory.final_table(k, v, key_bucket, positions, window, table_size,
                                                         table_dtype, memory_format)
        state.window_buckets = F.pad(key_bucket[:, start:], (0, 0, pad, 0), value=-1)
        state.recent_tokens = recent
    return state


def _memory_inputs(token_ids, mask, positions, window: int, sink_tokens: int, buckets: int, ngram, length: int,
                   select: str = "all"):
    """A fresh sequence's memory keys: per query and order the index of its recalled key [B, length, K] (0
    where it has none; queries past T, padding up to `length`, have none), whether it has one, and what
    `final_state` needs to build the table."""
    if token_ids is None:
        raise ValueError("a recall memory (memory_buckets > 0) needs the token ids (token_ids)")
    query_bucket, key_bucket, recent = memory.key_buckets(token_ids, mask, positions, sink_tokens, buckets,
                                                          ngram=ngram)
    table_size = buckets * len(memory.orders(ngram))
    index = memory.lookup(query_bucket, key_bucket, window, table_size, memory.orders(ngram), select)  # [B, T, K]
    index = F.pad(index, (0, 0, 0, length - index.shape[1]), value=-1)
    return index.clamp(min=0), index >= 0, (key_bucket, recent, table_size)


def _recalled(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, Hk, L, X] at index [B, T, K] -> [B, Hk, T, K, X], picked as whole rows (index_select; a
    gather along L is several times slower)."""
    batch, kv_heads, length, width = x.shape
    base = torch.arange(batch * kv_heads, device=x.device).view(batch, kv_heads, 1, 1) * length
    rows = (base + index[:, None]).flatten()
    return x.reshape(-1, width).index_select(0, rows).view(batch, kv_heads, *index.shape[1:], width)


def _check(window: int, sink_tokens: int, fq, fk, sink_q=None, sink_distance: int | None = None) -> None:
    if (sink_q is None) != (sink_distance is None):
        raise ValueError("give both sink_q and sink_distance, or neither")
    if sink_distance is not None and sink_distance < window:
        raise ValueError(f"sink_distance ({sink_distance}) must be >= window ({window})")
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) must be >= 0")
    if (fq is None) != (fk is None):
        raise ValueError("give both fq and fk, or neither")


def compaction(mask: torch.Tensor) -> torch.Tensor | None:
    """[B, T] validity -> the order [B, T] that puts each row's real tokens first, in their order (None when
    they already are): the sparse cache's groups follow real positions, which a chunk then holds from its
    start, whatever a row's left padding."""
    first = torch.arange(mask.shape[1], device=mask.device) < mask.sum(-1, keepdim=True)
    if mask.device.type == "meta" or bool((mask == first).all()):  # meta: shapes only (the plan counts the ops)
        return None
    return (~mask).long().argsort(dim=-1, stable=True)


def reorder(x: torch.Tensor | None, order: torch.Tensor | None, dim: int, inverse: bool = False):
    """x's time axis `dim` in `order` [B, T] (`compaction`), or (inverse) back from it."""
    if x is None or order is None:
        return x
    index = order.view(order.shape[0], *([1] * (dim - 1)), order.shape[1], *([1] * (x.dim() - dim - 1)))
    index = index.expand(*x.shape[:dim], order.shape[1], *x.shape[dim + 1 :])
    return x.new_empty(x.shape).scatter_(dim, index, x) if inverse else x.gather(dim, index)


def sparse_final(kept: torch.Tensor, k, v, inputs, total, mask, eligible, window: int, dtype: torch.dtype,
                 heads: tuple[int, ...] | None = None) -> tuple[dict, torch.Tensor]:
    """The sparse cache after a fresh sequence whose rows start at index 0 (`compaction`): the cache after the
    last update done (`kept` [B, Hk, N, size] from `sparse.chunk_updates`) and the tokens of the current group
    that left the window (`eligible` ones). -> the DecodeState fields (keys, values and `inputs`, what the
    window keeps for the linear state or None, in `dtype`; positions; with `total`, the cumulative log-gates,
    their decay since their position), kept for the heads with a cache (`heads`; None: all), and the tokens it
    holds [B, Hk, T], which the linear state must not."""
    length = mask.sum(-1)
    done = sparse.updates_done(length, window)  # [B]
    last = (done - 1).clamp(min=0)[:, None, None, None].expand(*kept.shape[:2], 1, kept.shape[-1])
    cache = torch.where((done > 0)[:, None, None], kept.gather(2, last)[:, :, 0], -1)  # [B, Hk, size]
    pending = sparse.pending_positions(length, window)[:, None].expand(-1, k.shape[1], -1)  # [B, Hk, W]
    pending = torch.where(eligible.gather(-1, pending.clamp(min=0)) & (pending >= 0), pending, -1)
    position = torch.cat([cache, pending], dim=-1)  # [B, Hk, size + W]
    held = (position >= 0)[..., None]
    fields = {"sparse_keys": (sparse.rows_at(k, position) * held).to(dtype),
              "sparse_values": (sparse.rows_at(v, position) * held).to(dtype), "sparse_position": position}
    if inputs is not None:
        fields["sparse_features"] = (sparse.rows_at(inputs, position) * held).to(dtype)
    if total is not None:
        end = total.gather(-1, (length - 1).clamp(min=0)[:, None, None].expand(-1, k.shape[1], 1))
        fields["sparse_log_decay"] = (end - total.gather(-1, position.clamp(min=0))).masked_fill(position < 0, 0.0)
    fields = {name: sparse.compact(value, heads) for name, value in fields.items()}
    length_t = eligible.shape[-1]  # an empty slot writes the extra column
    exclude = torch.zeros(*eligible.shape[:2], length_t + 1, dtype=torch.bool, device=k.device)
    return fields, exclude.scatter(-1, torch.where(position >= 0, position, length_t), True)[..., :length_t]
