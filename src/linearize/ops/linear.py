"""Causal linear attention, optionally gated, in three equivalent forms.

Shapes: B batch, H query heads, Hk key/value heads (H % Hk == 0; query head h reads kv head
h // (H // Hk)), T tokens, F feature dim of the feature-mapped queries/keys, D head dim.

    S_t = diag(a_t) S_{t-1} + fk_t^T [v_t, 1]            S: [B, Hk, F, D + 1]
    o_t = fq_t S_t[:, :D] / (fq_t S_t[:, D] + eps)       (fq_t S_t[:, :D] if not normalize)

The last column of the state accumulates the normaliser z_t = a_t z_{t-1} + fk_t, so one tensor
holds everything needed to continue a sequence. Gates come in log space, a_t = exp(log_gate_t)
with finite log_gate <= 0, and are one of
    None           no decay (a = 1)
    [B, Hk, T]     one decay per head and token (RetNet / Mamba-2 style)
    [B, Hk, T, F]  one decay per feature (GLA style)

States live per KV head: queries are grouped as [B, Hk, G, T, F] (G = H // Hk) rather than
keys expanded to H heads. Math runs in float32; outputs come back in v's dtype, states stay float32.
"""

import torch
import torch.nn.functional as F


def empty_state(
    batch: int, kv_heads: int, feature_dim: int, head_dim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Zero linear-attention state: [B, Hk, F, D + 1] float32 (last column = normaliser)."""
    return torch.zeros(batch, kv_heads, feature_dim, head_dim + 1, dtype=torch.float32, device=device)


def group_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, Hk, G, T, ...]: query head h = kv head h // G, so a plain reshape."""
    batch, heads = x.shape[:2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    return x.reshape(batch, kv_heads, heads // kv_heads, *x.shape[2:])


def _append_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D + 1]: the column of ones makes every value sum also produce the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _readout(num: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """[..., D + 1] -> [..., D]: value sum, divided by the normaliser (last column) if normalize."""
    out = num[..., :-1]
    return out / (num[..., -1:] + eps) if normalize else out


def _masked_decay(log_decay: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) where keep, else 0. Masking in log space first means the non-causal entries
    (positive exponents) are never exponentiated, so nothing overflows whatever the gate strength."""
    return log_decay.masked_fill(~keep, float("-inf")).exp()


def _chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[..., T, X] -> [..., N, C, X], zero-padding T up to N * C."""
    t = x.shape[-2]
    n = -(-t // chunk_size)
    x = F.pad(x, (0, 0, 0, n * chunk_size - t))
    return x.reshape(*x.shape[:-2], n, chunk_size, x.shape[-1])


def _unchunk(x: torch.Tensor, t: int) -> torch.Tensor:
    """[..., N, C, X] -> [..., T, X], dropping the padding."""
    return x.flatten(-3, -2)[..., :t, :]


def _log_gate_per_feature(log_gate: torch.Tensor) -> torch.Tensor:
    """[B, Hk, T] or [B, Hk, T, F] -> float32 [B, Hk, T, F | 1] (a scalar gate = width-1 feature gate)."""
    log_gate = log_gate.float()
    return log_gate[..., None] if log_gate.dim() == 3 else log_gate


def linear_attention_parallel(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic reference: materialise the causal [T, T] weights ([T, T, F] decays for feature gates).

    fq: [B, H, T, F], fk: [B, Hk, T, F], v: [B, Hk, T, D], log_gate: None | [B, Hk, T] | [B, Hk, T, F]
    returns o: [B, H, T, D]
    """
    kv_heads, t = fk.shape[1:3]
    fq, fk, ve = group_heads(fq.float(), kv_heads), fk.float(), _append_ones(v.float())
    causal = torch.ones(t, t, dtype=torch.bool, device=fk.device).tril()

    if log_gate is None:
        w = torch.einsum("bkgtf,bksf->bkgts", fq, fk).masked_fill(~causal, 0.0)
    else:
        # the weight of key s at query t decays by prod_{s < j <= t} a_j = exp(A_t - A_s)
        a = _log_gate_per_feature(log_gate).cumsum(-2)  # [B, Hk, T, F | 1]
        # [B, Hk, T, T, F | 1]
        decay = _masked_decay(a[..., :, None, :] - a[..., None, :, :], causal[..., None])
        w = torch.einsum("bkgtf,bktsf->bkgts", fq, decay * fk[:, :, None])  # [B, Hk, G, T, T]
    o = _readout(torch.einsum("bkgts,bksd->bkgtd", w, ve), normalize, eps)  # [B, Hk, G, T, D]
    return o.flatten(1, 2).to(v.dtype)


def linear_attention_chunked(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked form, linear in T: quadratic inside chunks of chunk_size, a state carried between them.

    fq: [B, H, T, F], fk: [B, Hk, T, F], v: [B, Hk, T, D], log_gate: None | [B, Hk, T] | [B, Hk, T, F]
    initial_state: [B, Hk, F, D + 1] or None (zeros)
    returns o: [B, H, T, D], and the state after the last token [B, Hk, F, D + 1] if output_final_state
    """
    batch, kv_heads, t, feat = fk.shape
    head_dim = v.shape[-1]
    # Padding adds zero keys (nothing enters the state) with zero log-gates (a = 1, nothing decays),
    # so neither the real outputs nor the final state change.
    fq = _chunks(group_heads(fq.float(), kv_heads), chunk_size)  # [B, Hk, G, N, C, F]
    fk = _chunks(fk.float(), chunk_size)  # [B, Hk, N, C, F]
    ve = _chunks(_append_ones(v.float()), chunk_size)  # [B, Hk, N, C, D + 1]
    n_chunks = fk.shape[2]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=fk.device).tril()

    # Inside each chunk (all chunks at once): the quadratic form with decays exp(A_t - A_s) where A
    # is the log-gate cumsum from the chunk start. Towards the state, a query t first sees the decay
    # exp(A_t) from the chunk start, a key s reaches the chunk end decayed by exp(A_end - A_s), and
    # the state itself decays by exp(A_end) per chunk: every exponent is <= 0.
    if log_gate is None:
        w = torch.einsum("bkgntf,bknsf->bkgnts", fq, fk).masked_fill(~causal, 0.0)
        fq_in, fk_out, chunk_decay = fq, fk, None
    else:
        a = _chunks(_log_gate_per_feature(log_gate), chunk_size).cumsum(-2)  # [B, Hk, N, C, F | 1]
        a_end = a[..., -1:, :]  # [B, Hk, N, 1, F | 1]
        if a.shape[-1] == 1:  # one decay per token: decay the [C, C] scores, no [C, C, F] tensor needed
            decay = _masked_decay(a[..., :, None, 0] - a[..., None, :, 0], causal)  # [B, Hk, N, C, C]
            w = torch.einsum("bkgntf,bknsf->bkgnts", fq, fk) * decay[:, :, None]
        else:
            # [B, Hk, N, C, C, F]
            decay = _masked_decay(a[..., :, None, :] - a[..., None, :, :], causal[..., None])
            w = torch.einsum("bkgntf,bkntsf->bkgnts", fq, decay * fk[..., None, :, :])
        fq_in = fq * a.exp()[:, :, None]
        fk_out = fk * (a_end - a).exp()
        chunk_decay = a_end.exp().transpose(-1, -2)  # [B, Hk, N, F | 1, 1]
    o = torch.einsum("bkgnts,bknsd->bkgntd", w, ve)  # [B, Hk, G, N, C, D + 1]

    # Between chunks: each chunk's own contribution to the state, then a short scan over chunks.
    chunk_states = fk_out.transpose(-1, -2) @ ve  # [B, Hk, N, F, D + 1]
    if initial_state is None:
        initial_state = empty_state(batch, kv_heads, feat, head_dim, fk.device)
    state = initial_state.float()
    states_before = []
    for i in range(n_chunks):
        states_before.append(state)
        state = state if chunk_decay is None else chunk_decay[:, :, i] * state
        state = state + chunk_states[:, :, i]
    o = o + torch.einsum("bkgntf,bknfd->bkgntd", fq_in, torch.stack(states_before, dim=2))

    o = _unchunk(_readout(o, normalize, eps), t).flatten(1, 2).to(v.dtype)
    return (o, state) if output_final_state else o


def linear_attention_recurrent(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (decoding; T is often 1).

    fq: [B, H, T, F], fk: [B, Hk, T, F], v: [B, Hk, T, D], log_gate: None | [B, Hk, T] | [B, Hk, T, F]
    initial_state: [B, Hk, F, D + 1] or None (zeros)
    returns o: [B, H, T, D], state: [B, Hk, F, D + 1] float32
    """
    batch, kv_heads, t, feat = fk.shape
    fq, fk, ve = group_heads(fq.float(), kv_heads), fk.float(), _append_ones(v.float())
    gate = None if log_gate is None else _log_gate_per_feature(log_gate).exp()  # [B, Hk, T, F | 1]
    if initial_state is None:
        initial_state = empty_state(batch, kv_heads, feat, v.shape[-1], fk.device)
    state = initial_state.float()
    outs = []
    for i in range(t):
        if gate is not None:
            state = gate[:, :, i, :, None] * state
        state = state + fk[:, :, i, :, None] * ve[:, :, i, None, :]
        outs.append(fq[:, :, :, i] @ state)  # [B, Hk, G, D + 1]
    o = _readout(torch.stack(outs, dim=3), normalize, eps)  # [B, Hk, G, T, D]
    return o.flatten(1, 2).to(v.dtype), state
