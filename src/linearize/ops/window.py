"""Causal sliding-window softmax attention and the LoLCATS window + linear hybrid.

One window definition everywhere: query t sees with softmax terms the keys s with
t - window < s <= t (exactly `window` keys, itself included, once t >= window - 1).

The hybrid (LoLCATS) mixes those softmax terms with linear terms for every older key:

    y_t = (g sum_{win} exp(q_t.k_s scale - c_t) v_s + sum_{s <= t - window} fq_t.fk_s v_s)
          / (g sum_{win} exp(q_t.k_s scale - c_t) + sum_{s <= t - window} fq_t.fk_s + eps)

with c_t the max of the window scores only and g in (0, 1) one factor per query head.

Shapes: q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F], H % Hk == 0
(query head h reads kv head h // (H // Hk)).

Decode caches hold the most recent previous tokens: window_cache = (k_win, v_win[, fk_win]), each
[B, Hk, W, D | F]. Only the last window - 1 are read (a longer cache, e.g. the last `window` tokens,
is fine) and the returned caches hold exactly the last min(tokens so far, window - 1). The hybrid's
linear state is [B, Hk, F, D + 1] float32 (last column = normaliser) and covers the keys
s <= T - window, i.e. the keys that are linear for the next query, at position T.

Math runs in float32; outputs come back in v's dtype.
"""

import torch

from .linear import _append_ones, _chunks, _readout, _unchunk, empty_state, group_heads


def _window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool, True where t - window < s <= t."""
    pos = torch.arange(t, device=device)
    age = pos[:, None] - pos[None, :]
    return (age >= 0) & (age < window)


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


def sliding_window_attention_parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None = None
) -> torch.Tensor:
    """Quadratic reference: full [T, T] causal softmax, masked to the window.

    q: [B, H, T, D], k, v: [B, Hk, T, D] -> o: [B, H, T, D]
    """
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    scores = torch.einsum("bkgtd,bksd->bkgts", group_heads(q.float(), kv_heads), k.float()) * scale
    scores = scores.masked_fill(~_window_mask(t, window, k.device), float("-inf"))
    o = torch.einsum("bkgts,bksd->bkgtd", scores.softmax(-1), v.float())
    return o.flatten(1, 2).to(v.dtype)


def sliding_window_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None = None
) -> torch.Tensor:
    """Chunks of size `window`: a query chunk only reaches its own chunk and the previous one,
    so each sees a [C, 2C] block; linear in T.

    q: [B, H, T, D], k, v: [B, Hk, T, D] -> o: [B, H, T, D]
    """
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    q = _chunks(group_heads(q.float(), kv_heads), window)  # [B, Hk, G, N, C, D]
    k = _with_previous_chunk(_chunks(k.float(), window))  # [B, Hk, N, 2C, D]
    vv = _with_previous_chunk(_chunks(v.float(), window))
    in_window, _ = _block_masks(q.shape[3], window, k.device)
    # every query row keeps at least itself (j = t + C); padded keys lie after every real query
    scores = torch.einsum("bkgntd,bknsd->bkgnts", q, k) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    o = torch.einsum("bkgnts,bknsd->bkgntd", scores.softmax(-1), vv)  # [B, Hk, G, N, C, D]
    return _unchunk(o, t).flatten(1, 2).to(v.dtype)


def sliding_window_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    window_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Decode form: token by token against the cache of previous tokens.

    q: [B, H, T, D], k, v: [B, Hk, T, D]
    window_cache: (k_win, v_win) [B, Hk, W, D], the most recent previous tokens (the last window - 1
    are used), or None
    returns o: [B, H, T, D] and the new cache (the last window - 1 tokens, in k's and v's dtypes)
    """
    kv_heads, t, head_dim = k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    q = group_heads(q.float(), kv_heads)
    k_win, v_win = (k[:, :, :0], v[:, :, :0]) if window_cache is None else window_cache
    outs = []
    for i in range(t):
        k_win = torch.cat([_keep_last(k_win, window - 1), k[:, :, i : i + 1]], dim=2)
        v_win = torch.cat([_keep_last(v_win, window - 1), v[:, :, i : i + 1]], dim=2)
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], k_win.float()) * scale
        outs.append(scores.softmax(-1) @ v_win.float())  # [B, Hk, G, D]
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
) -> torch.Tensor:
    """Quadratic reference for the LoLCATS hybrid: [T, T] softmax-window and linear weights.

    q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F] (non-negative),
    window_factor: [H] in (0, 1) -> o: [B, H, T, D]
    """
    heads, (kv_heads, t, head_dim) = q.shape[1], k.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    g = _factor(window_factor, heads, kv_heads)[..., None, None]  # [Hk, G, 1, 1]
    in_window = _window_mask(t, window, k.device)
    older = torch.ones(t, t, dtype=torch.bool, device=k.device).tril(-window)  # s <= t - window

    scores = torch.einsum("bkgtd,bksd->bkgts", group_heads(q.float(), kv_heads), k.float()) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    soft = (scores - scores.amax(-1, keepdim=True)).exp() * g  # c_t: max over the window only
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
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked LoLCATS hybrid, chunk size = window, linear in T.

    For query chunk i the window keys lie in chunks i - 1 and i: one [C, 2C] block carries the
    softmax terms and the linear terms of chunk i - 1's keys that already left the window; chunks
    <= i - 2 are entirely linear and enter through their summed state.

    q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F] (non-negative),
    window_factor: [H] in (0, 1)
    returns o: [B, H, T, D], and if output_final_state the linear state [B, Hk, F, D + 1] of the keys
    s <= T - window (those linear for the next query), to continue with hybrid_attention_recurrent
    """
    batch, kv_heads, t, head_dim = k.shape
    heads, feat = q.shape[1], fk.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    g = _factor(window_factor, heads, kv_heads)[..., None, None, None]  # [Hk, G, 1, 1, 1]
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
    soft = (scores - scores.amax(-1, keepdim=True)).exp() * g
    lin = torch.einsum("bkgntf,bknsf->bkgnts", fq, _with_previous_chunk(fk_c)).masked_fill(~older, 0.0)
    # [B, Hk, G, N, C, D + 1]
    o = torch.einsum("bkgnts,bknsd->bkgntd", soft + lin, _with_previous_chunk(ve_c))

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
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decode form of the hybrid, token by token.

    q: [B, H, T, D], k, v: [B, Hk, T, D], fq: [B, H, T, F], fk: [B, Hk, T, F], window_factor: [H]
    state: [B, Hk, F, D + 1] linear state of the keys s <= (first new position) - window, or None (zeros)
    window_cache: (k_win, v_win, fk_win) [B, Hk, W, D | D | F], the most recent previous tokens, or
    None (empty). Only the last window - 1 are used: older ones are already in the state.
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
    outs = []
    for i in range(t):
        k_win = torch.cat([k_win, k[:, :, i : i + 1]], dim=2)
        v_win = torch.cat([v_win, v[:, :, i : i + 1]], dim=2)
        fk_win = torch.cat([fk_win, fk[:, :, i : i + 1]], dim=2)
        # softmax terms over the last `window` keys, linear terms from the state
        scores = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, i], k_win.float()) * scale
        soft = (scores - scores.amax(-1, keepdim=True)).exp() * g
        outs.append(soft @ _append_ones(v_win.float()) + fq[:, :, :, i] @ state)  # [B, Hk, G, D + 1]
        # the oldest key leaves the window for the next query: fold it into the linear state
        n_out = max(k_win.shape[2] - (window - 1), 0)
        state = state + _linear_state(fk_win[:, :, :n_out], v_win[:, :, :n_out])
        k_win, v_win, fk_win = k_win[:, :, n_out:], v_win[:, :, n_out:], fk_win[:, :, n_out:]
    o = _readout(torch.stack(outs, dim=3), True, eps)
    return o.flatten(1, 2).to(v.dtype), state, (k_win, v_win, fk_win)
