"""Causal sliding-window softmax attention and the LoLCATS window + linear hybrid.

One window definition everywhere: query t sees with softmax terms the keys s with
t - window < s <= t (exactly `window` keys, itself included, once t >= window - 1).

The hybrid (LoLCATS) mixes those softmax terms with linear terms for every older key:

    y_t = (g sum_{win} exp(q_t.k_s scale - c_t) v_s + sum_{s <= t - window} fq_t.fk_s v_s)
          / (g sum_{win} exp(q_t.k_s scale - c_t) + sum_{s <= t - window} fq_t.fk_s + eps)

with c_t the max of the window scores only and g in (0, 1) one factor per query head.

Attention sinks (StreamingLLM): with sink_tokens = S > 0 the first S keys of the sequence stay
softmax keys for every later query. The softmax key set of query t becomes
W_t | S_t with W_t = {s : t - window < s <= t} and S_t = {s : s < S, s <= t} (a key in both counts
once): sliding-window attention is a softmax over W_t | S_t; in the hybrid the softmax terms (and
c_t, their max) run over W_t | S_t and the linear terms over the keys s <= t - window with s >= S,
so a sink never enters the linear state. S = 0 is the plain window, computed exactly as without it.

Shapes: q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F], H % Hk == 0
(query head h reads kv head h // (H // Hk)).

Decode caches hold the most recent previous tokens: window_cache = (k_win, v_win[, fk_win]), each
[B, Hk, W, D | F]. Only the last window - 1 are read (a longer cache, e.g. the last `window` tokens,
is fine) and the returned caches hold exactly the last min(tokens so far, window - 1). The hybrid's
linear state is [B, Hk, F, D + 1] float32 (last column = normaliser) and covers the keys
s <= T - window, i.e. the keys that are linear for the next query, at position T (sinks excluded).

Decoding with sinks: the recurrent forms take sinks = (k_sink, v_sink) [B, Hk, S', D], the first
S' = min(sink_tokens, position) keys / values of the sequence, and position, the absolute position of
their first new token (the number of tokens before the call). They return the same values as without
sinks; the caller keeps the sinks itself: after a call at `position`, append the new tokens'
k[:, :, :max(sink_tokens - position, 0)] and the same of v (nothing once position >= sink_tokens).

Math runs in float32; outputs come back in v's dtype.
"""

import torch

from .linear import _append_ones, _chunks, _readout, _unchunk, empty_state, group_heads


def _window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool, True where t - window < s <= t."""
    pos = torch.arange(t, device=device)
    age = pos[:, None] - pos[None, :]
    return (age >= 0) & (age < window)


def _softmax_mask(t: int, window: int, sink_tokens: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool, True for the softmax keys: t - window < s <= t, or s < sink_tokens and s <= t."""
    mask = _window_mask(t, window, device)
    if sink_tokens > 0:
        pos = torch.arange(t, device=device)
        mask = mask | ((pos[None, :] < sink_tokens) & (pos[None, :] <= pos[:, None]))
    return mask


def _sink_count(sink_tokens: int, t: int) -> int:
    """How many of the T keys are sinks: min(sink_tokens, T)."""
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) must be >= 0")
    return min(sink_tokens, t)


def _sink_block_mask(n_chunks: int, chunk: int, n_sink: int, device: torch.device) -> torch.Tensor:
    """[N, C, S] bool for query chunk i (local t, absolute i C + t, chunk == window) against the sink
    keys s < S: True where the sink is not already in the query's window, s <= i C + t - window
    (which implies s <= the query's position)."""
    query = torch.arange(n_chunks * chunk, device=device).reshape(n_chunks, chunk, 1)
    return torch.arange(n_sink, device=device) <= query - chunk


def _not_sinks(x: torch.Tensor, n_sink: int) -> torch.Tensor:
    """[B, Hk, T, X] with the first n_sink tokens zeroed (as float32): sinks never enter linear terms."""
    pos = torch.arange(x.shape[2], device=x.device)
    return x.float().masked_fill((pos < n_sink)[:, None], 0.0)


def _check_sinks(
    sink_tokens: int,
    sinks: tuple[torch.Tensor, ...] | None,
    position: int,
    cached: int,
) -> None:
    """The recurrent forms' sink arguments must describe the sequence before the call."""
    if sink_tokens < 0 or position < 0:
        raise ValueError(f"sink_tokens ({sink_tokens}) and position ({position}) must be >= 0")
    if sink_tokens == 0:
        if sinks is not None and sinks[0].shape[2] > 0:
            raise ValueError("sinks given with sink_tokens=0")
        return
    n_sinks = 0 if sinks is None else sinks[0].shape[2]
    if n_sinks != min(sink_tokens, position):
        raise ValueError(
            f"sinks hold {n_sinks} keys, expected the first min(sink_tokens={sink_tokens}, "
            f"position={position}) keys of the sequence"
        )
    if cached > position:
        raise ValueError(f"the window cache holds {cached} tokens but position is {position}")


def _block_masks(n_chunks: int, chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [N, C, 2C] for query chunk i (local position t) against key chunks i - 1 and i (local j).

    With chunk == window, key j sits at (i - 1) C + j and query t at i C + t, so the key is in the
    window iff t < j <= t + C and older than the window iff j <= t. In the first chunk the keys
    j < C lie before the sequence start (zero padding): in neither.
    """
    t = torch.arange(chunk, device=device)[:, None]
    j = torch.arange(2 * chunk, device=device)[None, :]
    exists = torch.ones(n_chunks, 1, 2 * chunk, dtype=torch.bool, device=device)
    exists[0, :, :chunk] = False
    in_window = (j > t) & (j <= t + chunk) & exists
    older = (j <= t) & exists
    return in_window, older


def _with_previous_chunk(x: torch.Tensor) -> torch.Tensor:
    """[B, Hk, N, C, X] -> [B, Hk, N, 2C, X]: each chunk preceded by the one before (zeros for the first)."""
    previous = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)
    return torch.cat([previous, x], dim=3)


def _keep_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n tokens of [B, Hk, W, X] (all of them if W < n; none if n == 0)."""
    return x[:, :, max(x.shape[2] - n, 0) :]


def _linear_state(fk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over tokens of fk^T [v, 1]: [B, Hk, T, F], [B, Hk, T, D] -> float32 [B, Hk, F, D + 1]."""
    return fk.float().transpose(-1, -2) @ _append_ones(v.float())


def _factor(window_factor: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Per-query-head window factors [H] -> float32 [Hk, G]."""
    return window_factor.float().reshape(kv_heads, heads // kv_heads)


def _softmax_keys(
    k_sink: torch.Tensor, v_sink: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, current: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax keys/values of the query at absolute position `current` (decode forms): the window,
    plus the sinks that are outside it (positions <= current - window); the window holds the others."""
    n_extra = min(k_sink.shape[2], max(current - window + 1, 0))
    if n_extra == 0:
        return k_win, v_win
    return torch.cat([k_sink[:, :, :n_extra], k_win], dim=2), torch.cat([v_sink[:, :, :n_extra], v_win], dim=2)


def sliding_window_attention_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Quadratic reference: full [T, T] causal softmax, masked to the window (and the sinks).

    q: [B, H, T, D], k, v: [B, Hk, T, D] -> o: [B, H, T, D]
    """
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    scores = torch.einsum("bkgtd,bksd->bkgts", group_heads(q.float(), kv_heads), k.float()) * scale
    mask = _softmax_mask(t, window, _sink_count(sink_tokens, t), k.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.einsum("bkgts,bksd->bkgtd", scores.softmax(-1), v.float())
    return o.flatten(1, 2).to(v.dtype)


def sliding_window_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Chunks of size `window`: a query chunk only reaches its own chunk and the previous one,
    so each sees a [C, 2C] block; linear in T. Sinks add a [C, S] block against the first
    S = min(sink_tokens, T) keys, masked to the sinks outside each query's window.

    q: [B, H, T, D], k, v: [B, Hk, T, D] -> o: [B, H, T, D]
    """
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    n_sink = _sink_count(sink_tokens, t)
    k_sink, v_sink = k[:, :, :n_sink].float(), v[:, :, :n_sink].float()
    q = _chunks(group_heads(q.float(), kv_heads), window)  # [B, Hk, G, N, C, D]
    k = _with_previous_chunk(_chunks(k.float(), window))  # [B, Hk, N, 2C, D]
    vv = _with_previous_chunk(_chunks(v.float(), window))
    in_window, _ = _block_masks(q.shape[3], window, k.device)
    # every query row keeps at least itself (j = t + C); padded keys lie after every real query
    scores = torch.einsum("bkgntd,bknsd->bkgnts", q, k) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    if n_sink == 0:
        o = torch.einsum("bkgnts,bknsd->bkgntd", scores.softmax(-1), vv)  # [B, Hk, G, N, C, D]
        return _unchunk(o, t).flatten(1, 2).to(v.dtype)
    sink_scores = torch.einsum("bkgntd,bksd->bkgnts", q, k_sink) * scale  # [B, Hk, G, N, C, S]
    sink_scores = sink_scores.masked_fill(~_sink_block_mask(q.shape[3], window, n_sink, k.device), float("-inf"))
    # one softmax over both blocks: shared row max, shared denominator
    c = torch.maximum(scores.amax(-1, keepdim=True), sink_scores.amax(-1, keepdim=True))
    p, p_sink = (scores - c).exp(), (sink_scores - c).exp()
    o = torch.einsum("bkgnts,bknsd->bkgntd", p, vv) + torch.einsum("bkgnts,bksd->bkgntd", p_sink, v_sink)
    o = o / (p.sum(-1, keepdim=True) + p_sink.sum(-1, keepdim=True))
    return _unchunk(o, t).flatten(1, 2).to(v.dtype)


def sliding_window_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    window_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    sink_tokens: int = 0,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
    position: int = 0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Decode form: token by token against the cache of previous tokens.

    q: [B, H, T, D], k, v: [B, Hk, T, D]
    window_cache: (k_win, v_win) [B, Hk, W, D], the most recent previous tokens (the last window - 1
    are used), or None
    sink_tokens: the first sink_tokens keys of the sequence stay softmax keys for every later query
    sinks: (k_sink, v_sink) [B, Hk, min(sink_tokens, position), D], the sequence's first keys / values
    (None = none yet); new tokens at positions < sink_tokens become sinks for the later new tokens
    position: absolute position of the first new token (= number of tokens before this call)
    returns o: [B, H, T, D] and the new cache (the last window - 1 tokens, in k's and v's dtypes);
    the sinks are not returned: the caller appends the new tokens at positions < sink_tokens itself
    """
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    q = group_heads(q.float(), kv_heads)
    k_win, v_win = (k[:, :, :0], v[:, :, :0]) if window_cache is None else window_cache
    _check_sinks(sink_tokens, sinks, position, _keep_last(k_win, window - 1).shape[2])
    k_sink, v_sink = (k[:, :, :0], v[:, :, :0]) if sinks is None else (x.to(k.dtype) for x in sinks)
    outs = []
    for i in range(t):
        k_win = torch.cat([_keep_last(k_win, window - 1), k[:, :, i : i + 1]], dim=2)
        v_win = torch.cat([_keep_last(v_win, window - 1), v[:, :, i : i + 1]], dim=2)
        keys, values = _softmax_keys(k_sink, v_sink, k_win, v_win, position + i, window)
        if position + i < sink_tokens:  # this token is a sink for the following ones
            k_sink = torch.cat([k_sink, k[:, :, i : i + 1]], dim=2)
            v_sink = torch.cat([v_sink, v[:, :, i : i + 1]], dim=2)
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], keys.float()) * scale
        outs.append(scores.softmax(-1) @ values.float())  # [B, Hk, G, D]
    o = torch.stack(outs, dim=3).flatten(1, 2).to(v.dtype)
    return o, (_keep_last(k_win, window - 1), _keep_last(v_win, window - 1))


def hybrid_attention_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_factor: torch.Tensor,
    window: int,
    scale: float | None = None,
    eps: float = 1e-6,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Quadratic reference for the LoLCATS hybrid: [T, T] softmax-window and linear weights.
    Sinks (s < sink_tokens) are softmax keys for every query t >= s and never linear.

    q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F] (non-negative),
    window_factor: [H] in (0, 1) -> o: [B, H, T, D]
    """
    heads, (kv_heads, t, head_dim) = q.shape[1], k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    g = _factor(window_factor, heads, kv_heads)[..., None, None]  # [Hk, G, 1, 1]
    in_window = _softmax_mask(t, window, _sink_count(sink_tokens, t), k.device)
    older = torch.ones(t, t, dtype=torch.bool, device=k.device).tril(-window)  # s <= t - window
    if sink_tokens > 0:
        older = older & (torch.arange(t, device=k.device) >= sink_tokens)

    scores = torch.einsum("bkgtd,bksd->bkgts", group_heads(q.float(), kv_heads), k.float()) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    soft = (scores - scores.amax(-1, keepdim=True)).exp() * g  # c_t: max over the softmax keys only
    lin = torch.einsum("bkgtf,bksf->bkgts", group_heads(fq.float(), kv_heads), fk.float())
    lin = lin.masked_fill(~older, 0.0)
    o = _readout(torch.einsum("bkgts,bksd->bkgtd", soft + lin, _append_ones(v.float())), True, eps)
    return o.flatten(1, 2).to(v.dtype)


def hybrid_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_factor: torch.Tensor,
    window: int,
    scale: float | None = None,
    eps: float = 1e-6,
    sink_tokens: int = 0,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked LoLCATS hybrid, chunk size = window, linear in T.

    For query chunk i the window keys lie in chunks i - 1 and i: one [C, 2C] block carries the
    softmax terms and the linear terms of chunk i - 1's keys that already left the window; chunks
    <= i - 2 are entirely linear and enter through their summed state. Sinks add a [C, S] softmax
    block against the first S = min(sink_tokens, T) keys (those outside each query's window; they
    share the row max with the window), and their features are zeroed for the linear terms.

    q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F] (non-negative),
    window_factor: [H] in (0, 1)
    returns o: [B, H, T, D], and if output_final_state the linear state [B, Hk, F, D + 1] of the keys
    s <= T - window (those linear for the next query; sinks excluded), to continue with
    hybrid_attention_recurrent
    """
    batch, kv_heads, t, head_dim = k.shape
    heads, feat = q.shape[1], fk.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    g = _factor(window_factor, heads, kv_heads)[..., None, None, None]  # [Hk, G, 1, 1, 1]
    n_sink = _sink_count(sink_tokens, t)
    k_sink, ve_sink = k[:, :, :n_sink].float(), _append_ones(v[:, :, :n_sink].float())
    if n_sink > 0:
        fk = _not_sinks(fk, n_sink)
    q = _chunks(group_heads(q.float(), kv_heads), window)  # [B, Hk, G, N, C, D]
    fq = _chunks(group_heads(fq.float(), kv_heads), window)  # [B, Hk, G, N, C, F]
    fk_c = _chunks(fk.float(), window)  # [B, Hk, N, C, F]
    ve_c = _chunks(_append_ones(v.float()), window)  # [B, Hk, N, C, D + 1]
    n_chunks = q.shape[3]
    in_window, older = _block_masks(n_chunks, window, k.device)

    # the [C, 2C] block: softmax terms shifted by their own row max, linear terms unshifted
    kk = _with_previous_chunk(_chunks(k.float(), window))  # [B, Hk, N, 2C, D]
    scores = torch.einsum("bkgntd,bknsd->bkgnts", q, kk) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    lin = torch.einsum("bkgntf,bknsf->bkgnts", fq, _with_previous_chunk(fk_c)).masked_fill(~older, 0.0)
    if n_sink == 0:
        soft = (scores - scores.amax(-1, keepdim=True)).exp() * g
        # [B, Hk, G, N, C, D + 1]
        o = torch.einsum("bkgnts,bknsd->bkgntd", soft + lin, _with_previous_chunk(ve_c))
    else:
        sink_scores = torch.einsum("bkgntd,bksd->bkgnts", q, k_sink) * scale  # [B, Hk, G, N, C, S]
        sink_mask = _sink_block_mask(n_chunks, window, n_sink, k.device)
        sink_scores = sink_scores.masked_fill(~sink_mask, float("-inf"))
        c = torch.maximum(scores.amax(-1, keepdim=True), sink_scores.amax(-1, keepdim=True))
        soft, soft_sink = (scores - c).exp() * g, (sink_scores - c).exp() * g
        o = torch.einsum("bkgnts,bknsd->bkgntd", soft + lin, _with_previous_chunk(ve_c))
        o = o + torch.einsum("bkgnts,bksd->bkgntd", soft_sink, ve_sink)

    # chunks <= i - 2: cumulative per-chunk states, shifted by two chunks
    states = (fk_c.transpose(-1, -2) @ ve_c).cumsum(dim=2)  # [B, Hk, N, F, D + 1], through chunk i
    no_state = states.new_zeros(batch, kv_heads, 2, feat, head_dim + 1)
    states = torch.cat([no_state, states], dim=2)[:, :, :n_chunks]
    o = o + torch.einsum("bkgntf,bknfd->bkgntd", fq, states)

    o = _unchunk(_readout(o, True, eps), t).flatten(1, 2).to(v.dtype)
    if not output_final_state:
        return o
    n_linear = max(t - window + 1, 0)  # keys 0 .. T - window
    return o, _linear_state(fk[:, :, :n_linear], v[:, :, :n_linear])


def hybrid_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_factor: torch.Tensor,
    window: int,
    state: torch.Tensor | None = None,
    window_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    sink_tokens: int = 0,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
    position: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decode form of the hybrid, token by token.

    q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F], window_factor: [H]
    state: [B, Hk, F, D + 1] linear state of the keys s <= (first new position) - window, or None (zeros)
    window_cache: (k_win, v_win, fk_win) [B, Hk, W, D | D | F], the most recent previous tokens, or
    None (empty). Only the last window - 1 are used: older ones are already in the state.
    sink_tokens, sinks, position: as in sliding_window_attention_recurrent (sinks = (k_sink, v_sink),
    the first min(sink_tokens, position) keys / values). A key leaving the window at a position
    < sink_tokens stays out of the state (and out of the returned one).
    returns o: [B, H, T, D], the new state and the new cache (the last window - 1 tokens)
    """
    heads, (batch, kv_heads, t, head_dim) = q.shape[1], k.shape
    scale = head_dim**-0.5 if scale is None else scale
    g = _factor(window_factor, heads, kv_heads)[..., None]  # [Hk, G, 1]
    q, fq = group_heads(q.float(), kv_heads), group_heads(fq.float(), kv_heads)
    if state is None:
        state = empty_state(batch, kv_heads, fk.shape[-1], head_dim, k.device)
    state = state.float()
    if window_cache is None:
        window_cache = (k[:, :, :0], v[:, :, :0], fk[:, :, :0])
    k_win, v_win, fk_win = (_keep_last(x, window - 1) for x in window_cache)
    _check_sinks(sink_tokens, sinks, position, k_win.shape[2])
    k_sink, v_sink = (k[:, :, :0], v[:, :, :0]) if sinks is None else (x.to(k.dtype) for x in sinks)
    outs = []
    for i in range(t):
        k_win = torch.cat([k_win, k[:, :, i : i + 1]], dim=2)
        v_win = torch.cat([v_win, v[:, :, i : i + 1]], dim=2)
        fk_win = torch.cat([fk_win, fk[:, :, i : i + 1]], dim=2)
        keys, values = _softmax_keys(k_sink, v_sink, k_win, v_win, position + i, window)
        if position + i < sink_tokens:  # this token is a sink for the following ones
            k_sink = torch.cat([k_sink, k[:, :, i : i + 1]], dim=2)
            v_sink = torch.cat([v_sink, v[:, :, i : i + 1]], dim=2)
        # softmax terms over the last `window` keys (and the sinks), linear terms from the state
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], keys.float()) * scale
        soft = (scores - scores.amax(-1, keepdim=True)).exp() * g
        outs.append(soft @ _append_ones(values.float()) + fq[:, :, :, i] @ state)  # [B, Hk, G, D + 1]
        # the oldest key leaves the window for the next query: fold it into the linear state, unless
        # it is a sink. k_win holds the positions (position + i) - len + 1 .. position + i, so the
        # evicted ones (the first n_out) start at position + i - len + 1, i.e. position + i - (window - 1)
        n_out = max(k_win.shape[2] - (window - 1), 0)
        n_skip = 0
        if sink_tokens > 0:
            first = position + i - k_win.shape[2] + 1
            n_skip = min(max(sink_tokens - first, 0), n_out)
        state = state + _linear_state(fk_win[:, :, n_skip:n_out], v_win[:, :, n_skip:n_out])
        k_win, v_win, fk_win = k_win[:, :, n_out:], v_win[:, :, n_out:], fk_win[:, :, n_out:]
    o = _readout(torch.stack(outs, dim=3), True, eps)
    return o.flatten(1, 2).to(v.dtype), state, (k_win, v_win, fk_win)
