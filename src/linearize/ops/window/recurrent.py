"""The recurrent form of the window op: continue from a DecodeState, token by token (what decoding runs),
and the state of an empty sequence."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from .. import memory, sparse
from ..linear import append_ones, group_heads, readout
from ..state import DecodeState, real_positions
from .common import _check, _inputs


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
    memory_format: str = "auto",
    memory_recall: str = "all",
    key_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    memory_bias: tuple[float, ...] = (),
    sink_q: torch.Tensor | None = None,
    sink_distance: int | None = None,
    sparse_keys: int = 0,
    sparse_heads: tuple[int, ...] | None = None,
    sparse_score: str = "recall-error",
) -> tuple[torch.Tensor, DecodeState]:
    """Token by token from `state` (decoding; T is usually 1). Each new token joins the window; the oldest
    window token leaves it: into its sink slot if it is one of the row's first `sink_tokens` real tokens,
    else into the linear state (with features), else it is dropped; with a recall memory, it is also
    written to the memory (in place; see `DecodeState`), in the format its table has (`memory_format` is
    taken for the same arguments as the fresh-sequence forms; the state's table decides). With `key_features`,
    `fk` holds the inputs of the keys' feature map, as the window keeps them: a key is mapped when it leaves
    the window (the same features, computed once, without keeping them beside the key). `sink_q`: the
    queries a query beyond `sink_distance` scores the sinks with (as the chunked form). With a sparse
    cache (`sparse_keys` > 0 in the heads `sparse_heads`), a leaving token of such a head joins its group's
    pending slots instead of the linear state, and the step whose leaving token starts a new group first lets
    the cache and the full group compete (`linearize.ops.sparse`)."""
    _check(window, sink_tokens, fq, fk, sink_q, sink_distance)
    if memory_buckets > 0 and token_ids is None:
        raise ValueError("a recall memory (memory_buckets > 0) needs the token ids (token_ids)")
    sparse_args = None
    if sparse_keys > 0:
        sparse.check_score(sparse_score, fk is not None)
        sparse_args = (sparse_keys, sparse.heads_mask(k.shape[1], sparse_heads, k.device), sparse_score, sparse_heads)
    if q.shape[2] == 1 and key_mask is None and window > 1:
        return _one_token(q, k, v, window, state, sink_tokens, fq, fk, log_gate, scale, eps, token_ids,
                          memory_buckets, memory_ngram, key_features, memory_recall, memory_bias, sink_q,
                          sink_distance, sparse_args)
    out_dtype = v.dtype
    q, k, v, fq, fk, log_gate, mask = _inputs(q, k, v, fq, fk, log_gate, key_mask)
    batch, kv_heads, t, head_dim = k.shape
    scale = head_dim**-0.5 if scale is None else scale
    q = group_heads(q, kv_heads)
    fq = None if fq is None else group_heads(fq, kv_heads)
    far_q = None if sink_q is None or sink_tokens == 0 else group_heads(sink_q.float(), kv_heads)
    s = state
    w_keys, w_values, w_valid, w_position = _float(s.window_keys), _float(s.window_values), s.window_valid, \
        s.window_position
    w_features, w_gates, recurrent = _float(s.window_features), s.window_log_gates, s.recurrent
    sink_keys, sink_values, sink_valid = _float(s.sink_keys), _float(s.sink_values), s.sink_valid
    seen = s.seen
    if memory_buckets > 0:  # copies: this general path leaves the caller's state as it was
        table = [None if x is None else x.clone() for x in memory_tensors(s)]
        table_format = memory.stored_format(s.memory_keys, s.memory_key_params, head_dim)
        w_buckets = s.window_buckets
        query_bucket, key_bucket, recent = memory.key_buckets(
            token_ids, mask, real_positions(mask, seen), sink_tokens, memory_buckets, s.recent_tokens, memory_ngram)
    recalled = query_bucket.shape[-1] if memory_buckets > 0 else 0  # memory keys, first in each row
    slots = None if sparse_args is None else sparse_tensors(s, sparse_args[3], kv_heads)  # out of place below
    extra = recalled + (0 if slots is None else slots[0].shape[2])  # memory and sparse keys, before the sinks
    reference = recalled + (0 if slots is None else sparse_args[0])  # c_t: over pending group, sinks, window
    bias = None  # the memory bias as a row of scores: the same for every token, built at the first
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
        keys, values, visible = _with_sparse(slots, keys, values, visible)
        if memory_buckets > 0:
            mem_k, mem_v, has = memory.read(*table[:3], query_bucket[:, i], *table[3:], table_format,
                                            memory.orders(memory_ngram), memory_recall)
            keys, values = torch.cat([mem_k, keys], dim=2), torch.cat([mem_v, values], dim=2)
            visible = torch.cat([has, visible], dim=1)
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], keys) * scale
        if far_q is not None:  # the sink columns follow the recalled and sparse ones
            scores = _far_sinks(scores, far_q[:, :, :, i], sink_keys, extra, position_i, sink_distance, scale)
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        if slots is not None:
            _hide_sparse(scores, slots, recalled, table[2] if memory_buckets > 0 else None,
                         query_bucket[:, i] if memory_buckets > 0 else None)
        if recalled and memory_bias:
            bias = memory.bias_of(scores, memory_bias, scores.shape[-1]) if bias is None else bias
            scores = scores + bias
        row_max = scores.amax(-1, keepdim=True)
        num = (scores - row_max).exp() @ append_ones(values)  # [B, Hk, G, D + 1]
        if recurrent is not None:
            if log_gate is not None:
                recurrent = recurrent * log_gate[:, :, i].exp()[..., None, None]
            linear = fq[:, :, :, i] @ recurrent
            if extra:  # the memory and cached keys are weighed against c_t, the window's (and pending group's) max
                linear = linear * (scores[..., reference:].amax(-1, keepdim=True) - row_max).exp()
            num = num + linear
        outputs.append(num)

        # the new token joins the window, the oldest leaves it
        keys, values = keys[:, :, -window:], values[:, :, -window:]
        w_valid_all = torch.cat([w_valid, valid_i[:, None]], dim=1)
        w_position_all = torch.cat([w_position, position_i[:, None]], dim=1)
        leaving_valid, leaving_position = w_valid_all[:, 0], w_position_all[:, 0]
        if memory_buckets > 0:  # the leaving token's buckets (-1: not to be stored, or not a real token)
            buckets_all = torch.cat([w_buckets, key_bucket[:, i : i + 1]], dim=1)
            memory.write_(*table[:3], buckets_all[:, 0], keys[:, :, :1], values[:, :, :1], leaving_position,
                          *table[3:])
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
        leaving_input = leaving_decay = None  # what the linear state reads of the leaving token; its decay
        if fk is not None:
            features = torch.cat([w_features, fk[:, :, i : i + 1]], dim=2)
            leaving_fk, w_features = features[:, :, 0], features[:, :, 1:]
            leaving_input = leaving_fk
            if key_features is not None:  # mapped from the stored input, in the dtype it was stored in
                leaving_fk = key_features(leaving_fk[:, :, None].to(out_dtype)).float()[:, :, 0]
            weight = (leaving_valid & ~leaving_sink).float()[:, None].expand(batch, kv_heads)
            if slots is not None:  # a head with a sparse cache keeps the token as a pending exact key
                weight = weight * ~sparse_args[1]
            if log_gate is not None:
                gates = torch.cat([w_gates, log_gate[:, :, i : i + 1]], dim=2)
                w_gates = gates[:, :, 1:]
                leaving_decay = w_gates.sum(-1)  # from the leaving token to the new one
                weight = weight * leaving_decay.exp()
            recurrent = recurrent + (weight[..., None] * leaving_fk)[..., None] * append_ones(leaving_v)[..., None, :]
        if slots is not None:
            eligible = (leaving_valid & ~leaving_sink)[:, None] & sparse_args[1]
            slots, recurrent = _sparse_leave(
                slots, (leaving_k, leaving_v, leaving_input, leaving_position, eligible, leaving_decay), recurrent,
                None if log_gate is None else log_gate[:, :, i], key_features, sparse_args, window, eps, out_dtype)
        seen = seen + valid_i.long()
    o = readout(torch.stack(outputs, dim=3), eps).flatten(1, 2).to(out_dtype)
    new_state = DecodeState(
        seen=seen,
        window_keys=_stored(w_keys, out_dtype),
        window_values=_stored(w_values, out_dtype),
        window_features=_stored(w_features, out_dtype),
        window_log_gates=w_gates,
        window_valid=w_valid,
        window_position=w_position,
        sink_keys=_stored(sink_keys, out_dtype),
        sink_values=_stored(sink_values, out_dtype),
        sink_valid=sink_valid,
        recurrent=recurrent,
    )
    if memory_buckets > 0:
        set_memory(new_state, table)
        new_state.window_buckets, new_state.recent_tokens = w_buckets, recent
    if slots is not None:
        set_sparse(new_state, slots, sparse_args[3])
    return o, new_state


def _far_sinks(scores, far_q, sink_keys, first: int, position, sink_distance: int, scale: float) -> torch.Tensor:
    """scores [B, Hk, G, S'] with its sink columns [first, first + sinks) scored by `far_q` [B, Hk, G, D]
    where the query's real position [B] lies beyond `sink_distance` (written into `scores`, returned)."""
    sinks = sink_keys.shape[2]
    far = (far_q @ sink_keys.transpose(-1, -2)).mul_(scale)
    near = scores[..., first : first + sinks]
    near.copy_(torch.where((position > sink_distance)[:, None, None, None], far, near))  # in place: no copy of the row
    return scores


def _one_token(q, k, v, window, state, sink_tokens, fq, fk, log_gate, scale, eps, token_ids, memory_buckets,
               memory_ngram, key_features=None, memory_recall="all", memory_bias=(), sink_q=None, sink_distance=None,
               sparse_args=None):
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
        keys = torch.cat([_float(s.sink_keys), _float(s.window_keys), k], dim=2)
        values = torch.cat([_float(s.sink_values), _float(s.window_values), v], dim=2)
        visible = torch.cat([s.sink_valid, s.window_valid, ones], dim=1)
    else:
        keys = torch.cat([_float(s.window_keys), k], dim=2)
        values = torch.cat([_float(s.window_values), v], dim=2)
        visible = torch.cat([s.window_valid, ones], dim=1)
    slots = None if sparse_args is None else sparse_tensors(s, sparse_args[3], kv_heads)
    keys, values, visible = _with_sparse(slots, keys, values, visible)
    first = sink_tokens + 1 + (0 if slots is None else slots[0].shape[2])  # index of window slot 1 in keys
    recalled = 0  # memory keys, first in each row
    if memory_buckets > 0:
        query_bucket, key_bucket, recent = memory.key_buckets(token_ids, ones, s.seen[:, None], sink_tokens,
                                                              memory_buckets, s.recent_tokens, memory_ngram)
        table = memory_tensors(s)
        mem_k, mem_v, has = memory.read(*table[:3], query_bucket[:, 0], *table[3:],
                                        memory.stored_format(s.memory_keys, s.memory_key_params, head_dim),
                                        memory.orders(memory_ngram), memory_recall)
        keys, values = torch.cat([mem_k, keys], dim=2), torch.cat([mem_v, values], dim=2)
        visible = torch.cat([has, visible], dim=1)
        recalled = has.shape[1]
        first += recalled
    extra = first - sink_tokens - 1  # memory and sparse keys, before the sinks
    reference = recalled + (0 if slots is None else sparse_args[0])  # c_t: over pending group, sinks, window
    scores = (q @ keys.transpose(-1, -2)).mul_(scale)
    if sink_q is not None and sink_tokens > 0:  # the sink columns follow the recalled and sparse ones
        far_q = sink_q.float().view(batch, kv_heads, -1, head_dim)
        scores = _far_sinks(scores, far_q, keys[:, :, extra : extra + sink_tokens], extra, s.seen,
                            sink_distance, scale)
    scores = scores.masked_fill_(~visible[:, None, None], float("-inf"))
    if slots is not None:
        _hide_sparse(scores, slots, recalled, s.memory_position, query_bucket[:, 0] if memory_buckets > 0 else None)
    if recalled and memory_bias:
        scores = scores + memory.bias_of(scores, memory_bias, scores.shape[-1])
    row_max = scores.amax(-1, keepdim=True)
    weights = (scores - row_max).exp_()  # a new tensor: `scores` stays for c_t
    num, den = weights @ values, weights.sum(-1, keepdim=True)  # [B, Hk, G, D], [B, Hk, G, 1]
    recurrent = s.recurrent
    if recurrent is not None:
        if log_gate is not None:
            recurrent = recurrent * log_gate.float().exp()[..., None]  # [B, Hk, 1] -> [B, Hk, 1, 1]
        linear = fq.float().view(batch, kv_heads, -1, fq.shape[-1]) @ recurrent  # [B, Hk, G, D + 1]
        if extra:  # the memory and cached keys are weighed against c_t, the window's (and pending group's) max
            linear = linear * (scores[..., reference:].amax(-1, keepdim=True) - row_max).exp()
        num, den = num + linear[..., :-1], den + linear[..., -1:]
    o = (num / (den + eps)).view(batch, -1, 1, head_dim).to(out_dtype)

    # the new token joins the window, the oldest (slot 0) leaves it
    leaving_valid, leaving_position = s.window_valid[:, 0], s.window_position[:, 0]
    new = DecodeState(
        seen=s.seen + 1,
        window_keys=_stored(keys[:, :, first:], out_dtype),
        window_values=_stored(values[:, :, first:], out_dtype),
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
        new.sink_keys = torch.where(into[:, None, :, None], s.window_keys[:, :, :1], s.sink_keys).to(out_dtype)
        new.sink_values = torch.where(into[:, None, :, None], s.window_values[:, :, :1], s.sink_values).to(out_dtype)
        new.sink_valid = s.sink_valid | into
    if fk is not None:
        features = torch.cat([_float(s.window_features), fk.float()], dim=2)
        new.window_features = _stored(features[:, :, 1:], out_dtype)
        if key_features is not None:  # the window keeps the feature map's inputs: map the leaving key
            features = key_features(s.window_features[:, :, :1].to(out_dtype)).float()
        weight = (leaving_valid & ~leaving_sink).float()[:, None, None]  # [B, 1, 1]
        if slots is not None:  # a head with a sparse cache keeps the token as a pending exact key
            weight = weight * ~sparse_args[1][:, None]
        if log_gate is not None:
            gates = torch.cat([s.window_log_gates, log_gate.float()], dim=2)
            new.window_log_gates = gates[:, :, 1:]
            leaving_decay = new.window_log_gates.sum(-1)  # [B, Hk]: since the token's position
            weight = weight * leaving_decay[..., None].exp()
        leaving = features[:, :, :1].transpose(-1, -2) * weight[..., None]  # [B, Hk, F, 1]
        update = torch.cat([leaving * values[:, :, first - 1 : first], leaving], dim=-1)  # fk^T [v, 1]
        new.recurrent = recurrent + update
    if slots is not None:
        eligible = (leaving_valid & ~leaving_sink)[:, None] & sparse_args[1]
        leaving_input = None if fk is None else s.window_features[:, :, 0]
        slots, new.recurrent = _sparse_leave(
            slots, (s.window_keys[:, :, 0], s.window_values[:, :, 0], leaving_input, leaving_position, eligible,
                    leaving_decay if log_gate is not None else None), new.recurrent,
            None if log_gate is None else log_gate[:, :, 0], key_features, sparse_args, window, eps, out_dtype)
        set_sparse(new, slots, sparse_args[3])
    if memory_buckets > 0:  # the leaving token goes into the memory, the new one's bucket is kept
        if not _caller_writes_memory:  # our compiled step writes it after its graph (store_leaving)
            store_leaving(s)
        set_memory(new, memory_tensors(s))
        new.window_buckets = torch.cat([s.window_buckets[:, 1:], key_bucket], dim=1)
        new.recent_tokens = recent
    return o, new


def sparse_tensors(state: DecodeState, heads: tuple[int, ...] | None = None, kv_heads: int = 0) -> list:
    """The sparse cache's slots of `state` for every key/value head (the state keeps those of `heads` only;
    the others come empty): keys, values, features (or their inputs; None without a linear state), position,
    log-decay (None without gates)."""
    return [sparse.expand(x, heads, kv_heads, fill) for x, fill in (
        (state.sparse_keys, 0.0), (state.sparse_values, 0.0), (state.sparse_features, 0.0),
        (state.sparse_position, -1), (state.sparse_log_decay, 0.0))]


def set_sparse(state: DecodeState, slots: list, heads: tuple[int, ...] | None = None) -> None:
    (state.sparse_keys, state.sparse_values, state.sparse_features, state.sparse_position,
     state.sparse_log_decay) = (sparse.compact(x, heads) for x in slots)


def _with_sparse(slots: list | None, keys, values, visible):
    """The sparse slots' keys and values before a step's others (their per-head validity: `_hide_sparse`)."""
    if slots is None:
        return keys, values, visible
    count = slots[0].shape[2]
    return (torch.cat([slots[0].float(), keys], dim=2), torch.cat([slots[1].float(), values], dim=2),
            torch.cat([visible.new_ones(visible.shape[0], count), visible], dim=1))


def _hide_sparse(scores, slots: list, recalled: int, memory_position=None, query_bucket=None) -> None:
    """In place: scores [B, Hk, G, S'] of empty sparse slots (columns `recalled` on) and of recalled memory
    keys (the first `recalled` columns) that a sparse slot of the same head holds (read there, once)."""
    position = slots[3]  # [B, Hk, size + W]
    columns = scores[..., recalled : recalled + position.shape[2]]
    columns.masked_fill_((position < 0)[:, :, None], float("-inf"))
    if query_bucket is not None:
        found = memory_position.gather(1, query_bucket)  # [B, K]: the recalled keys' positions
        held = (found[:, None, :, None] == position[:, :, None, :]).any(-1) & (found >= 0)[:, None]  # [B, Hk, K]
        scores[..., :recalled].masked_fill_(held[:, :, None], float("-inf"))


def _sparse_leave(slots: list, leaving: tuple, recurrent, log_gate, key_features, sparse_args: tuple, window: int,
                  eps: float, out_dtype: torch.dtype) -> tuple[list, torch.Tensor | None]:
    """The end of a step for the sparse cache: the slots' decays advance by this step's `log_gate` [B, Hk];
    where the leaving token starts a new group (the previous one complete and read once), the cache and that
    group compete and the losers enter the linear state `recurrent`; then the leaving token (key, value,
    input [B, Hk, X], position [B], `eligible` [B, Hk], decay [B, Hk]) takes its pending slot in the heads
    that keep it. -> the new slots and linear state."""
    size, _, score, _ = sparse_args
    keys, values, features, position, log_decay = slots
    key, value, feature, at, eligible, decay = leaving
    if log_decay is not None:
        log_decay = (log_decay + log_gate.float()[..., None]).masked_fill(position < 0, 0.0)
    update = (at >= window) & (at.remainder(window) == 0)  # [B]
    # on a CPU, only at the steps that update (one in W); traced by torch.compile, no data-dependent branch
    if keys.device.type != "cpu" or torch.compiler.is_compiling() or bool(update.any()):
        mapped = None
        if features is not None:
            mapped = key_features(features.to(out_dtype)).float() if key_features is not None else features.float()
        pick = sparse.keep_best(sparse.scores(score, mapped, values, position, recurrent, eps), position, size)
        if recurrent is not None:
            evicted = ((position >= 0) & ~sparse.picked_mask(pick, position) & update[:, None, None]).float()
            weight = evicted if log_decay is None else evicted * log_decay.exp()
            recurrent = recurrent + sparse.evicted_state(mapped, values, weight)

        def picked(x, fill):
            if x is None:
                return None
            index = pick.view(*pick.shape, *([1] * (x.dim() - 3))).expand(*pick.shape, *x.shape[3:])
            kept = torch.cat([x.gather(2, index), torch.full_like(x[:, :, size:], fill)], dim=2)
            return torch.where(update.view(-1, *([1] * (x.dim() - 1))), kept, x)

        keys, values, features = picked(keys, 0.0), picked(values, 0.0), picked(features, 0.0)
        position, log_decay = picked(position, -1), picked(log_decay, 0.0)
    slot = torch.arange(position.shape[2], device=position.device) == (size + at.remainder(window))[:, None]
    write = slot[:, None, :] & eligible[:, :, None]  # [B, Hk, size + W]

    def written(x, new):
        if x is None:
            return None
        return torch.where(write.view(*write.shape, *([1] * (x.dim() - 3))), new.to(x.dtype), x)

    return [written(keys.to(out_dtype), key[:, :, None]), written(values.to(out_dtype), value[:, :, None]),
            None if features is None else written(features.to(out_dtype), feature[:, :, None]),
            written(position, at[:, None, None]), written(log_decay, None if decay is None else decay[..., None])
            ], recurrent


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def _stored(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A window or sink part as the state keeps it: in the model's dtype (its keys, values and features came
    in that dtype, so a bf16 model's window loses nothing in bf16; float32 leaves the tensor as it is)."""
    return None if x is None else x.to(dtype)


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
    table = memory_tensors(state)
    memory.write_(*table[:3], state.window_buckets[:, 0], state.window_keys[:, :, :1], state.window_values[:, :, :1],
                  state.window_position[:, 0], *table[3:])


def memory_tensors(state: DecodeState) -> list:
    """The recall memory's table of `state`: keys, values, position, key params, value params (None: not
    quantized)."""
    return [state.memory_keys, state.memory_values, state.memory_position, state.memory_key_params,
            state.memory_value_params]


def set_memory(state: DecodeState, table: list) -> None:
    (state.memory_keys, state.memory_values, state.memory_position, state.memory_key_params,
     state.memory_value_params) = table


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
    memory_format: str = "auto",
    feature_inputs: int | None = None,
    sparse_keys: int = 0,
    sparse_heads: tuple[int, ...] | None = None,
) -> DecodeState:
    """The state before the first token: every window and sink slot invalid, a zero linear state, an
    empty memory. `feature_inputs`: the width of what the window keeps of each key for the linear state,
    when it keeps the feature map's inputs (`key_features`) rather than `feature_dim` features. `sparse_keys`:
    the sparse cache's size per key/value head (its slots: that many and `window` pending ones), in the heads
    `sparse_heads` (None: all)."""
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
        state.window_features = torch.zeros(batch, kv_heads, keep, feature_inputs or feature_dim, device=device)
        state.recurrent = torch.zeros(batch, kv_heads, feature_dim, head_dim + 1, device=device)
        if gated:
            state.window_log_gates = torch.zeros(batch, kv_heads, keep, device=device)
    if memory_buckets > 0:
        grams = memory.orders(memory_ngram)
        set_memory(state, memory.empty_table(batch, kv_heads, memory_buckets * len(grams), head_dim, device,
                                             memory_format))
        state.window_buckets = torch.full((batch, keep, len(grams)), -1, dtype=torch.long, device=device)
        state.recent_tokens = torch.full((batch, max(grams)), -1, dtype=torch.long, device=device)
    if sparse_keys > 0:
        slots, heads = sparse_keys + window, kv_heads if sparse_heads is None else len(sparse_heads)
        state.sparse_keys = torch.zeros(batch, heads, slots, head_dim, device=device)
        state.sparse_values = state.sparse_keys.clone()
        state.sparse_position = torch.full((batch, heads, slots), -1, dtype=torch.long, device=device)
        if feature_dim is not None:
            state.sparse_features = torch.zeros(batch, heads, slots, feature_inputs or feature_dim, device=device)
            if gated:
                state.sparse_log_decay = torch.zeros(batch, heads, slots, device=device)
    return state
