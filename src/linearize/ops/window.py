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
Padding: `key_mask` [B, T] (True = real token) takes padded keys out of every term; gates are ignored
at padding; a row's sinks are its first real tokens. Outputs at padded query positions are finite but
meaningless.

Shapes: q [B, H, T, D], k, v [B, Hk, T, D], fq [B, H, T, F], fk [B, Hk, T, F], log_gate [B, Hk, T]
(one decay per key/value head and token, <= 0), H % Hk == 0: query head h reads kv head h // (H // Hk).
Every form returns (o [B, H, T, D] in v's dtype, DecodeState or None); math runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    k, v, fk, log_gate, mask, positions, window: int, sink_tokens: int, seen: torch.Tensor | None = None
) -> DecodeState:
    """The DecodeState after processing a whole sequence from scratch (float32 inputs as from `_inputs`):
    the last window - 1 tokens stay in the window, sinks that left it go to the sink slots, and the
    other real tokens that left it are summed into the linear state (when features are given)."""
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
    return state


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
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    if fk is not None:
        older = visible & (age >= window)[None] & ~is_sink[:, None, :]
        lin = torch.einsum("bkgtf,bksf->bkgts", group_heads(fq, kv_heads), fk)
        if log_gate is not None:
            total = log_gate.cumsum(-1)  # [B, Hk, T]
            log_decay = (total[..., :, None] - total[..., None, :]).masked_fill(~older[:, None], float("-inf"))
            lin = lin * log_decay.exp()[:, :, None]
        weights = weights + lin.masked_fill(~older[:, None, None], 0.0)
    o = readout(torch.einsum("bkgts,bksd->bkgtd", weights, append_ones(v)), eps)
    o = o.flatten(1, 2).to(out_dtype)
    state = final_state(k, v, fk, log_gate, mask, positions, window, sink_tokens) if output_final_state else None
    return o, state


def _block_masks(n_chunks: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[C, 2C] masks for query chunk i (local t) against key chunks i - 1 and i (local j); chunk == window:
    key (i - 1) C + j is in the window iff t < j <= t + C, older iff j <= t; j == t + C is the query itself."""
    t = torch.arange(chunk, device=device)[:, None]
    j = torch.arange(2 * chunk, device=device)[None, :]
    return (j > t) & (j <= t + chunk), j <= t, j == t + chunk


def _with_previous_chunk(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Chunks along `dim` (the chunk axis; the next one is the position in the chunk) preceded by the
    previous chunk: [..., N, C, ...] -> [..., N, 2C, ...] (zeros before the first)."""
    previous = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
    return torch.cat([previous, x], dim=dim + 1)


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
) -> tuple[torch.Tensor, DecodeState | None]:
    """Linear in T: chunks of size `window`. Query chunk i reaches its window in chunks i - 1 and i (one
    [C, 2C] block, which also carries the linear terms of chunk i - 1's keys that already left the
    window); chunks <= i - 2 are older and enter through their summed (decayed) state; sinks add a
    [C, S] block against each row's first real tokens, counted where they lie outside the window."""
    _check(window, sink_tokens, fq, fk)
    out_dtype = v.dtype
    q, k, v, fq, fk, log_gate, mask = _inputs(q, k, v, fq, fk, log_gate, key_mask)
    batch, kv_heads, t, head_dim = k.shape
    scale = head_dim**-0.5 if scale is None else scale
    chunk = window
    positions = real_positions(mask)
    is_sink = mask & (positions < sink_tokens)

    qc = chunks(group_heads(q, kv_heads), chunk)  # [B, Hk, G, N, C, D]
    n_chunks = qc.shape[3]
    keys = _with_previous_chunk(chunks(k, chunk), 2)  # [B, Hk, N, 2C, D]
    values = _with_previous_chunk(chunks(append_ones(v), chunk), 2)  # [B, Hk, N, 2C, D + 1]
    valid = _with_previous_chunk(chunks(mask[..., None].float(), chunk), 1)[..., 0].bool()  # [B, N, 2C]
    in_window, older, itself = _block_masks(n_chunks, chunk, k.device)

    soft = (in_window & valid[:, :, None, :]) | itself  # [B, N, C, 2C]
    scores = torch.einsum("bkgntd,bknsd->bkgnts", qc, keys) * scale
    scores = scores.masked_fill(~soft[:, None, None], float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    sink_part = None
    if sink_tokens > 0:
        # slot j = the row's real token j; visible to query t when it lies outside t's window
        slot = torch.where(is_sink, positions, sink_tokens)
        where = torch.full((batch, sink_tokens + 1), -1, dtype=torch.long, device=k.device)
        where = where.scatter(1, slot, torch.arange(t, device=k.device).expand(batch, t))[:, :sink_tokens]
        present = where >= 0
        gather = where.clamp(min=0)[:, None, :, None].expand(batch, kv_heads, sink_tokens, head_dim)
        k_sink = k.gather(2, gather)
        v_sink = append_ones(v.gather(2, gather))
        query_index = torch.arange(n_chunks * chunk, device=k.device).view(n_chunks, chunk, 1)
        sink_visible = present[:, None, None, :] & (where[:, None, None, :] <= query_index - window)  # [B, N, C, S]
        sink_scores = torch.einsum("bkgntd,bksd->bkgnts", qc, k_sink) * scale
        sink_scores = sink_scores.masked_fill(~sink_visible[:, None, None], float("-inf"))
        row_max = torch.maximum(row_max, sink_scores.amax(-1, keepdim=True))
        sink_part = torch.einsum("bkgnts,bksd->bkgntd", (sink_scores - row_max).exp(), v_sink)
    weights = (scores - row_max).exp()

    if fk is not None:
        fqc = chunks(group_heads(fq, kv_heads), chunk)  # [B, Hk, G, N, C, F]
        fk_lin = fk.masked_fill(is_sink[:, None, :, None], 0.0)
        fkc = chunks(fk_lin, chunk)  # [B, Hk, N, C, F]
        lin = torch.einsum("bkgntf,bknsf->bkgnts", fqc, _with_previous_chunk(fkc, 2))
        if log_gate is None:
            lin = lin.masked_fill(~older, 0.0)
            local = fkc.transpose(-1, -2) @ chunks(append_ones(v), chunk)  # [B, Hk, N, F, D + 1]
            through = local.cumsum(2)  # the state after chunk n
            query_decay = None
        else:
            total = chunks(log_gate.cumsum(-1)[..., None], chunk)[..., 0]  # [B, Hk, N, C]
            total_kk = _with_previous_chunk(total, 2)  # [B, Hk, N, 2C]
            log_decay = (total[..., :, None] - total_kk[..., None, :]).masked_fill(~older, float("-inf"))
            lin = lin * log_decay.exp()[:, :, None]
            end = total[..., -1]  # [B, Hk, N]: A at each chunk's end
            local = (fkc * (end[..., None] - total).exp()[..., None]).transpose(-1, -2)
            local = local @ chunks(append_ones(v), chunk)  # chunk n's keys, decayed to its end
            between = (end[..., :, None] - end[..., None, :]).masked_fill(
                ~torch.ones(n_chunks, n_chunks, dtype=torch.bool, device=k.device).tril(), float("-inf")
            )
            through = torch.einsum("bknm,bkmfd->bknfd", between.exp(), local)  # the state after chunk n
            # a query in chunk i reads the state after chunk i - 2, decayed from that chunk's end
            end_before = F.pad(end, (2, 0))[..., :n_chunks]
            query_decay = (total - end_before[..., None]).exp()  # [B, Hk, N, C]
        weights = weights + lin
        state_before = F.pad(through, (0, 0, 0, 0, 2, 0))[:, :, :n_chunks]  # after chunk i - 2
        from_state = fqc if query_decay is None else fqc * query_decay[:, :, None, ..., None]
        o = torch.einsum("bkgntf,bknfd->bkgntd", from_state, state_before)
        o = o + torch.einsum("bkgnts,bknsd->bkgntd", weights, values)
    else:
        o = torch.einsum("bkgnts,bknsd->bkgntd", weights, values)
    if sink_part is not None:
        o = o + sink_part
    o = unchunk(readout(o, eps), t).flatten(1, 2).to(out_dtype)
    state = final_state(k, v, fk, log_gate, mask, positions, window, sink_tokens) if output_final_state else None
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
) -> tuple[torch.Tensor, DecodeState]:
    """Token by token from `state` (decoding; T is usually 1). Each new token joins the window; the oldest
    window token leaves it: into its sink slot if it is one of the row's first `sink_tokens` real tokens,
    else into the linear state (with features), else it is dropped."""
    _check(window, sink_tokens, fq, fk)
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
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], keys) * scale
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        num = (scores - scores.amax(-1, keepdim=True)).exp() @ append_ones(values)  # [B, Hk, G, D + 1]
        if recurrent is not None:
            if log_gate is not None:
                recurrent = recurrent * log_gate[:, :, i].exp()[..., None, None]
            num = num + fq[:, :, :, i] @ recurrent
        outputs.append(num)

        # the new token joins the window, the oldest leaves it
        keys, values = keys[:, :, -window:], values[:, :, -window:]
        w_valid_all = torch.cat([w_valid, valid_i[:, None]], dim=1)
        w_position_all = torch.cat([w_position, position_i[:, None]], dim=1)
        leaving_valid, leaving_position = w_valid_all[:, 0], w_position_all[:, 0]
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
    return o, new_state


def empty_window_state(
    batch: int,
    kv_heads: int,
    head_dim: int,
    window: int,
    sink_tokens: int = 0,
    feature_dim: int | None = None,
    gated: bool = False,
    device=None,
) -> DecodeState:
    """The state before the first token: every window and sink slot invalid, a zero linear state."""
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
    return state


def _check(window: int, sink_tokens: int, fq, fk) -> None:
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) must be >= 0")
    if (fq is None) != (fk is None):
        raise ValueError("give both fq and fk, or neither")
