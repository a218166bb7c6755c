"""Causal linear attention, optionally gated, in three equivalent forms.

Shapes: B batch, H query heads, Hk key/value heads (H % Hk == 0; query head h reads kv head
h // (H // Hk)), T tokens, F feature dim of the feature-mapped queries/keys, D head dim.

    S_t = diag(a_t) S_{t-1} + fk_t^T [v_t, 1]            S: [B, Hk, F, D + 1]
    o_t = fq_t S_t[:, :D] / (fq_t S_t[:, D] + eps)       (fq_t S_t[:, :D] if not normalize)

The last column of the state accumulates the normaliser z_t = a_t z_{t-1} + fk_t, so one tensor holds
everything needed to continue a sequence (`DecodeState.recurrent`). Gates come in log space,
a_t = exp(log_gate_t) with finite log_gate <= 0, and are one of
    None           no decay (a = 1)
    [B, Hk, T]     one decay per head and token (RetNet / Mamba-2 style)
    [B, Hk, T, F]  one decay per feature (GLA style)

`key_mask` [B, T] (True = real token) takes padding out: a padded token adds nothing to the state and
does not decay it. Every form returns (o [B, H, T, D] in v's dtype, DecodeState or None); states live
per KV head (queries are grouped as [B, Hk, G, T, F] rather than keys expanded); math runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import DecodeState, empty_state, full_mask


def group_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, Hk, G, T, ...]: query head h = kv head h // G, so a plain reshape."""
    batch, heads = x.shape[:2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    return x.reshape(batch, kv_heads, heads // kv_heads, *x.shape[2:])


def append_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D + 1]: the column of ones makes every value sum also produce the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def readout(num: torch.Tensor, eps: float = 1e-6, normalize: bool = True) -> torch.Tensor:
    """[..., D + 1] -> [..., D]: value sum, divided by the normaliser (last column) if normalize."""
    out = num[..., :-1]
    return out / (num[..., -1:] + eps) if normalize else out


def chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[..., T, X] -> [..., N, C, X], zero-padding T up to N * C."""
    t = x.shape[-2]
    n = -(-t // chunk_size)
    x = F.pad(x, (0, 0, 0, n * chunk_size - t))
    return x.reshape(*x.shape[:-2], n, chunk_size, x.shape[-1])


def unchunk(x: torch.Tensor, t: int) -> torch.Tensor:
    """[..., N, C, X] -> [..., T, X], dropping the padding."""
    return x.flatten(-3, -2)[..., :t, :]


def _masked_decay(log_decay: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) where keep, else 0. Masking in log space first means the non-causal entries
    (positive exponents) are never exponentiated, so nothing overflows whatever the gate strength."""
    return log_decay.masked_fill(~keep, float("-inf")).exp()


SUB_CHUNK = 16  # per-feature gates: reference points this many tokens apart inside a chunk
MAX_SUB_CHUNK_DECAY = 60.0  # larger log-decays inside one sub-chunk take the exact [C, C, F] form


def _feature_gated_scores(fqc: torch.Tensor, fkc: torch.Tensor, a: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Intra-chunk scores with one decay per feature, w[t, s] = sum_f fq[t, f] fk[s, f] exp(a[t, f] - a[s, f])
    for s <= t (a: log-gate cumsum inside the chunk), without the [C, C, F] decay tensor: keys of sub-chunk j
    are referred to r_j, the cumsum just before sub-chunk j, so exp(a_t - a_s) = exp(a_t - r_j) exp(r_j - a_s);
    the first factor is <= 1 for every key a query may see, the second at most the decay across one
    sub-chunk (the exact form takes over where that could overflow). Shapes: fqc [B, Hk, G, N, C, F],
    fkc and a [B, Hk, N, C, F] -> [B, Hk, G, N, C, C]."""
    chunk = a.shape[-2]
    sub = SUB_CHUNK if chunk % SUB_CHUNK == 0 else chunk
    subs = chunk // sub
    a_sub = a.unflatten(-2, (subs, sub))  # [B, Hk, N, J, c, F]
    before = F.pad(a_sub[..., -1, :], (0, 0, 1, 0))[..., :subs, :]  # r_j: [B, Hk, N, J, F]
    rise = before[..., None, :] - a_sub  # r_j - a_s >= 0: the log-decay from a sub-chunk's start to key s
    if a.numel() and not a.is_meta and rise.amax().item() > MAX_SUB_CHUNK_DECAY:  # meta: shapes only
        decay = _masked_decay(a[..., :, None, :] - a[..., None, :, :], causal[..., None])  # [B, Hk, N, C, C, F]
        return torch.einsum("bkgntf,bkntsf->bkgnts", fqc, decay * fkc[..., None, :, :])
    keys = fkc.unflatten(-2, (subs, sub)) * rise.exp()  # [B, Hk, N, J, c, F]
    # exp(a_t - r_j), clamped at 0 where t precedes sub-chunk j (those scores are masked below)
    queries = fqc[..., None, :] * (a[..., :, None, :] - before[..., None, :, :]).clamp(max=0).exp()[:, :, None]
    w = torch.einsum("bkgntjf,bknjsf->bkgntjs", queries, keys).flatten(-2)  # [B, Hk, G, N, C, C]
    return w.masked_fill(~causal, 0.0)


def _prepare(fq, fk, v, log_gate, key_mask):
    """float32 inputs with padding removed: zero key features, zero log-gates (no decay) at padding;
    scalar gates become width-1 feature gates."""
    batch, _, t, _ = fk.shape
    mask = full_mask(batch, t, fk.device) if key_mask is None else key_mask.bool()
    fk = fk.float().masked_fill(~mask[:, None, :, None], 0.0)
    if log_gate is not None:
        log_gate = log_gate.float()
        log_gate = log_gate[..., None] if log_gate.dim() == 3 else log_gate  # [B, Hk, T, F | 1]
        log_gate = log_gate.masked_fill(~mask[:, None, :, None], 0.0)
    return fq.float(), fk, v.float(), log_gate, mask


def _state_out(state: torch.Tensor, mask: torch.Tensor, initial: DecodeState | None) -> DecodeState:
    seen = mask.sum(-1) if initial is None else initial.seen + mask.sum(-1)
    return DecodeState(seen=seen, recurrent=state)


def linear_attention_parallel(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, DecodeState | None]:
    """Quadratic reference: materialise the causal [T, T] weights ([T, T, F] decays for feature gates).

    fq: [B, H, T, F], fk: [B, Hk, T, F], v: [B, Hk, T, D], log_gate: None | [B, Hk, T] | [B, Hk, T, F]
    """
    out_dtype = v.dtype
    fq, fk, v, log_gate, mask = _prepare(fq, fk, v, log_gate, key_mask)
    kv_heads, t = fk.shape[1:3]
    fqg, ve = group_heads(fq, kv_heads), append_ones(v)
    causal = torch.ones(t, t, dtype=torch.bool, device=fk.device).tril()
    if log_gate is None:
        w = torch.einsum("bkgtf,bksf->bkgts", fqg, fk).masked_fill(~causal, 0.0)
    else:
        # the weight of key s at query t decays by prod_{s < j <= t} a_j = exp(A_t - A_s)
        a = log_gate.cumsum(-2)  # [B, Hk, T, F | 1]
        decay = _masked_decay(a[..., :, None, :] - a[..., None, :, :], causal[..., None])  # [B, Hk, T, T, F | 1]
        w = torch.einsum("bkgtf,bktsf->bkgts", fqg, decay * fk[:, :, None])
    o = readout(torch.einsum("bkgts,bksd->bkgtd", w, ve), eps, normalize).flatten(1, 2).to(out_dtype)
    if not output_final_state:
        return o, None
    if log_gate is None:
        state = fk.transpose(-1, -2) @ ve
    else:
        a = log_gate.cumsum(-2)
        state = (fk * (a[..., -1:, :] - a).exp()).transpose(-1, -2) @ ve
    return o, _state_out(state, mask, None)


def linear_attention_chunked(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    key_mask: torch.Tensor | None = None,
    state: DecodeState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, DecodeState | None]:
    """Chunked form, linear in T: quadratic inside chunks of chunk_size, a state carried between them.
    Continues from `state` (its `recurrent` part) when given."""
    out_dtype = v.dtype
    fq, fk, v, log_gate, mask = _prepare(fq, fk, v, log_gate, key_mask)
    batch, kv_heads, t, feat = fk.shape
    head_dim = v.shape[-1]
    # Padding adds zero keys (nothing enters the state) with zero log-gates (a = 1, nothing decays),
    # so neither the real outputs nor the final state change.
    fqc = chunks(group_heads(fq, kv_heads), chunk_size)  # [B, Hk, G, N, C, F]
    fkc = chunks(fk, chunk_size)  # [B, Hk, N, C, F]
    ve = chunks(append_ones(v), chunk_size)  # [B, Hk, N, C, D + 1]
    n_chunks = fkc.shape[2]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=fk.device).tril()

    # Inside each chunk (all chunks at once): the quadratic form with decays exp(A_t - A_s) where A is the
    # log-gate cumsum from the chunk start. Towards the state, a query t first sees the decay exp(A_t) from
    # the chunk start, a key s reaches the chunk end decayed by exp(A_end - A_s), and the state itself
    # decays by exp(A_end) per chunk: every exponent is <= 0.
    if log_gate is None:
        w = torch.einsum("bkgntf,bknsf->bkgnts", fqc, fkc).masked_fill(~causal, 0.0)
        fq_in, fk_out, chunk_decay = fqc, fkc, None
    else:
        a = chunks(log_gate, chunk_size).cumsum(-2)  # [B, Hk, N, C, F | 1]
        a_end = a[..., -1:, :]  # [B, Hk, N, 1, F | 1]
        if a.shape[-1] == 1:  # one decay per token: decay the [C, C] scores, no [C, C, F] tensor needed
            decay = _masked_decay(a[..., :, None, 0] - a[..., None, :, 0], causal)  # [B, Hk, N, C, C]
            w = torch.einsum("bkgntf,bknsf->bkgnts", fqc, fkc) * decay[:, :, None]
        else:
            w = _feature_gated_scores(fqc, fkc, a, causal)
        fq_in = fqc * a.exp()[:, :, None]
        fk_out = fkc * (a_end - a).exp()
        chunk_decay = a_end.exp().transpose(-1, -2)  # [B, Hk, N, F | 1, 1]
    o = torch.einsum("bkgnts,bknsd->bkgntd", w, ve)  # [B, Hk, G, N, C, D + 1]

    # Between chunks: each chunk's own contribution to the state, then a short scan over chunks.
    chunk_states = fk_out.transpose(-1, -2) @ ve  # [B, Hk, N, F, D + 1]
    if state is not None and state.recurrent is not None:
        current = state.recurrent.float()
    else:
        current = empty_state(batch, kv_heads, feat, head_dim, fk.device)
    states_before = []
    for i in range(n_chunks):
        states_before.append(current)
        current = current if chunk_decay is None else chunk_decay[:, :, i] * current
        current = current + chunk_states[:, :, i]
    o = o + torch.einsum("bkgntf,bknfd->bkgntd", fq_in, torch.stack(states_before, dim=2))
    o = unchunk(readout(o, eps, normalize), t).flatten(1, 2).to(out_dtype)
    return o, (_state_out(current, mask, state) if output_final_state else None)


def linear_attention_recurrent(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    state: DecodeState | None = None,
) -> tuple[torch.Tensor, DecodeState]:
    """Token-by-token recurrence (decoding; T is often 1), from `state` (zeros if None)."""
    out_dtype = v.dtype
    fq, fk, v, log_gate, mask = _prepare(fq, fk, v, log_gate, key_mask)
    batch, kv_heads, t, feat = fk.shape
    fqg, ve = group_heads(fq, kv_heads), append_ones(v)
    gate = None if log_gate is None else log_gate.exp()  # [B, Hk, T, F | 1]
    if state is not None and state.recurrent is not None:
        current = state.recurrent.float()
    else:
        current = empty_state(batch, kv_heads, feat, v.shape[-1], fk.device)
    outs = []
    for i in range(t):
        if gate is not None:
            current = gate[:, :, i, :, None] * current
        current = current + fk[:, :, i, :, None] * ve[:, :, i, None, :]
        outs.append(fqg[:, :, :, i] @ current)  # [B, Hk, G, D + 1]
    o = readout(torch.stack(outs, dim=3), eps, normalize).flatten(1, 2).to(out_dtype)
    return o, _state_out(current, mask, state)
