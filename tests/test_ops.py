"""The math core: every form of every op agrees with its quadratic reference, plus honest properties."""

import pytest
import torch
import torch.nn.functional as F

from linearize.ops import (
    hybrid_attention_chunked,
    hybrid_attention_parallel,
    hybrid_attention_recurrent,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
    sliding_window_attention_chunked,
    sliding_window_attention_parallel,
    sliding_window_attention_recurrent,
)

B, T, D, FEAT = 2, 37, 16, 8
HEADS = [(6, 2), (4, 4)]  # (query heads, key/value heads): GQA and MHA
GATES = [None, "scalar", "feature"]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the largest expected entry: rounding noise of long sums and
    cumulative log-gates is measured against the scale of the result, not of each entry."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def features(*shape: int) -> torch.Tensor:
    """Non-negative features, as a feature map would give (softmax keeps dot products <= 1)."""
    return torch.randn(*shape).softmax(-1)


def log_gates(kind: str | None, kv_heads: int, t: int, low: float | None = None) -> torch.Tensor | None:
    """None, [B, Hk, T] or [B, Hk, T, F] log-gates <= 0: uniform in [low, 0] or logsigmoid of a logit."""
    if kind is None:
        return None
    shape = (B, kv_heads, t) if kind == "scalar" else (B, kv_heads, t, FEAT)
    return low * torch.rand(shape) if low is not None else F.logsigmoid(torch.randn(shape) + 2.0)


def expand(x: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """Key/value-head tensors repeated to one copy per query head, as plain MHA would see them."""
    return None if x is None else x.repeat_interleave(groups, dim=1)


def last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n tokens of [B, Hk, T, X] (the window-cache convention)."""
    return x[:, :, max(x.shape[2] - n, 0) :]


def linear_inputs(heads: int, kv_heads: int, gate: str | None, t: int = T, low: float | None = None):
    fq, fk = features(B, heads, t, FEAT), features(B, kv_heads, t, FEAT)
    return fq, fk, torch.randn(B, kv_heads, t, D), log_gates(gate, kv_heads, t, low)


def window_inputs(heads: int, kv_heads: int, t: int = T):
    q, k, v = torch.randn(B, heads, t, D), torch.randn(B, kv_heads, t, D), torch.randn(B, kv_heads, t, D)
    return q, k, v, features(B, heads, t, FEAT), features(B, kv_heads, t, FEAT)


def causal_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, expand(k, groups), expand(v, groups), is_causal=True)


def naive_linear(fq, fk, v, log_gate, normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    """The definition, literally, one query head and token at a time (query head h reads kv head
    h // G): w_ts = sum_f fq_tf fk_sf prod_{s < j <= t} a_jf, o_t = sum_{s <= t} w_ts v_s
    (divided by sum_{s <= t} w_ts + eps if normalize)."""
    batch, heads, t, _ = fq.shape
    groups = heads // fk.shape[1]
    a = torch.ones(*fk.shape[:3], 1) if log_gate is None else log_gate.exp()
    a = a[..., None] if a.dim() == 3 else a
    out = torch.zeros(batch, heads, t, v.shape[-1])
    for head in range(heads):
        kv = head // groups
        for i in range(t):
            w = torch.stack(
                [
                    (fq[:, head, i] * fk[:, kv, s] * a[:, kv, s + 1 : i + 1].prod(dim=1)).sum(-1)
                    for s in range(i + 1)
                ],
                dim=1,
            )  # [B, i + 1]
            num = (w[..., None] * v[:, kv, : i + 1]).sum(1)
            out[:, head, i] = num / (w.sum(1, keepdim=True) + eps) if normalize else num
    return out


def naive_hybrid(q, k, v, fq, fk, factor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """The LoLCATS hybrid, literally: softmax terms (shifted by their own max) for the keys
    t - window < s <= t, linear terms for the keys s <= t - window."""
    batch, heads, t, head_dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, heads, t, head_dim)
    for head in range(heads):
        kv = head // groups
        for i in range(t):
            start = max(i - window + 1, 0)
            scores = (q[:, head, i, None] * k[:, kv, start : i + 1]).sum(-1) * head_dim**-0.5
            soft = factor[head] * (scores - scores.max(-1, keepdim=True).values).exp()
            lin = (fq[:, head, i, None] * fk[:, kv, :start]).sum(-1)
            w = torch.cat([lin, soft], dim=1)  # keys 0 .. i in order
            out[:, head, i] = (w[..., None] * v[:, kv, : i + 1]).sum(1) / (w.sum(1, keepdim=True) + eps)
    return out


def naive_sliding_window(q, k, v, window: int) -> torch.Tensor:
    """Softmax over the keys t - window < s <= t, literally."""
    batch, heads, t, head_dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, heads, t, head_dim)
    for head in range(heads):
        kv = head // groups
        for i in range(t):
            start = max(i - window + 1, 0)
            p = ((q[:, head, i, None] * k[:, kv, start : i + 1]).sum(-1) * head_dim**-0.5).softmax(-1)
            out[:, head, i] = (p[..., None] * v[:, kv, start : i + 1]).sum(1)
    return out


# ---------------------------------------------------------------- linear attention


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gate", GATES)
def test_linear_parallel_matches_definition(gate, normalize):
    torch.manual_seed(13)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate, t=12)
    expected = naive_linear(fq, fk, v, log_gate, normalize)
    close(linear_attention_parallel(fq, fk, v, log_gate, normalize=normalize), expected)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gate", GATES)
def test_linear_forms_agree(gate, normalize, heads):
    torch.manual_seed(0)
    fq, fk, v, log_gate = linear_inputs(*heads, gate)
    expected = linear_attention_parallel(fq, fk, v, log_gate, normalize=normalize)
    o_chunk, s_chunk = linear_attention_chunked(
        fq, fk, v, log_gate, normalize=normalize, chunk_size=16, output_final_state=True
    )
    o_rec, s_rec = linear_attention_recurrent(fq, fk, v, log_gate, normalize=normalize)
    assert expected.shape == (B, heads[0], T, D)
    assert s_chunk.shape == (B, heads[1], FEAT, D + 1) and s_chunk.dtype == torch.float32
    close(o_chunk, expected)
    close(o_rec, expected)
    close(s_chunk, s_rec)


@pytest.mark.parametrize("gate", GATES)
def test_linear_continues_from_state(gate):
    torch.manual_seed(1)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate)
    expected = linear_attention_chunked(fq, fk, v, log_gate, chunk_size=16)
    first, rest = slice(0, 20), slice(20, T)
    gate_first, gate_rest = (
        (None, None) if log_gate is None else (log_gate[:, :, first], log_gate[:, :, rest])
    )
    o1, state = linear_attention_chunked(
        fq[:, :, first], fk[:, :, first], v[:, :, first], gate_first, chunk_size=16, output_final_state=True
    )
    o2 = linear_attention_chunked(
        fq[:, :, rest], fk[:, :, rest], v[:, :, rest], gate_rest, chunk_size=16, initial_state=state
    )
    o2_rec, _ = linear_attention_recurrent(
        fq[:, :, rest], fk[:, :, rest], v[:, :, rest], gate_rest, initial_state=state
    )
    close(torch.cat([o1, o2], dim=2), expected)
    close(o2_rec, expected[:, :, rest])


@pytest.mark.parametrize("low", [-5.0, -1e-3], ids=["strong", "weak"])
@pytest.mark.parametrize("gate", ["scalar", "feature"])
def test_linear_long_sequence_gates_are_stable(gate, low):
    """Decays down to exp(-5) per token over 4096 tokens: within a 64-token chunk the cumulative
    log-gate reaches -320, which would overflow any exp(-A) factorisation. Weak gates sum ~4096 terms."""
    torch.manual_seed(2)
    fq, fk, v, log_gate = linear_inputs(2, 1, gate, t=4096, low=low)
    o_chunk, s_chunk = linear_attention_chunked(fq, fk, v, log_gate, output_final_state=True)
    o_rec, s_rec = linear_attention_recurrent(fq, fk, v, log_gate)
    assert torch.isfinite(o_chunk).all() and torch.isfinite(s_chunk).all()
    assert relative_error(o_chunk, o_rec) < 1e-5
    assert relative_error(s_chunk, s_rec) < 1e-5


@pytest.mark.parametrize("gate", GATES)
def test_linear_gqa_equals_expanded_heads(gate):
    torch.manual_seed(3)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate)
    expected = linear_attention_parallel(fq, expand(fk, 3), expand(v, 3), expand(log_gate, 3))
    close(linear_attention_chunked(fq, fk, v, log_gate, chunk_size=16), expected)
    close(linear_attention_recurrent(fq, fk, v, log_gate)[0], expected)


@pytest.mark.parametrize("gate", GATES)
def test_normalized_linear_attention_is_convex_combination_of_values(gate):
    """Non-negative weights divided by their sum (eps=0): each output channel lies between the min
    and the max of that channel over the values it can see, s <= t."""
    torch.manual_seed(4)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate)
    seen = expand(v, 3)
    low, high = seen.cummin(dim=2).values - 1e-5, seen.cummax(dim=2).values + 1e-5
    outputs = [
        linear_attention_parallel(fq, fk, v, log_gate, eps=0.0),
        linear_attention_chunked(fq, fk, v, log_gate, eps=0.0, chunk_size=16),
        linear_attention_recurrent(fq, fk, v, log_gate, eps=0.0)[0],
    ]
    for o in outputs:
        assert ((o >= low) & (o <= high)).all()


def test_dtype_in_dtype_out_state_stays_fp32():
    torch.manual_seed(5)
    fq, fk, v, log_gate = linear_inputs(6, 2, "feature")
    expected = linear_attention_chunked(fq, fk, v, log_gate)
    o, state = linear_attention_chunked(
        fq.bfloat16(), fk.bfloat16(), v.bfloat16(), log_gate.bfloat16(), output_final_state=True
    )
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    close(o.float(), expected, tol=5e-2)


# ---------------------------------------------------------------- sliding-window softmax


@pytest.mark.parametrize("window", [1, 4, 12])
def test_window_parallel_matches_definition(window):
    torch.manual_seed(14)
    q, k, v, fq, fk = window_inputs(6, 2, t=12)
    factor = torch.rand(6)
    close(sliding_window_attention_parallel(q, k, v, window), naive_sliding_window(q, k, v, window))
    close(
        hybrid_attention_parallel(q, k, v, fq, fk, factor, window),
        naive_hybrid(q, k, v, fq, fk, factor, window),
    )


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [1, 5, 8])
def test_sliding_window_forms_agree(window, heads):
    torch.manual_seed(6)
    q, k, v, _, _ = window_inputs(*heads)
    expected = sliding_window_attention_parallel(q, k, v, window)
    close(sliding_window_attention_chunked(q, k, v, window), expected)
    o_rec, (k_win, v_win) = sliding_window_attention_recurrent(q, k, v, window, None)
    close(o_rec, expected)
    close(k_win, last(k, window - 1))
    close(v_win, last(v, window - 1))

    # prefill with the chunked form, then decode one token at a time from its cache
    q1, k1, v1 = (x[:, :, :20] for x in (q, k, v))
    outs = [sliding_window_attention_chunked(q1, k1, v1, window)]
    cache = (last(k1, window - 1), last(v1, window - 1))
    for t in range(20, T):
        step = [x[:, :, t : t + 1] for x in (q, k, v)]
        o, cache = sliding_window_attention_recurrent(*step, window, cache)
        outs.append(o)
    close(torch.cat(outs, dim=2), expected)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [T, T + 5])
def test_sliding_window_covering_sequence_is_causal_softmax(window, heads):
    torch.manual_seed(7)
    q, k, v, _, _ = window_inputs(*heads)
    expected = causal_softmax(q, k, v)
    close(sliding_window_attention_parallel(q, k, v, window), expected)
    close(sliding_window_attention_chunked(q, k, v, window), expected)
    close(sliding_window_attention_recurrent(q, k, v, window)[0], expected)


# ---------------------------------------------------------------- LoLCATS hybrid


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("t1", [3, 20])
@pytest.mark.parametrize("window", [1, 5, 8])
def test_hybrid_forms_agree(window, t1, heads):
    torch.manual_seed(8)
    q, k, v, fq, fk = window_inputs(*heads)
    factor = torch.rand(heads[0]) * 0.9 + 0.05
    expected = hybrid_attention_parallel(q, k, v, fq, fk, factor, window)
    o_chunk, s_chunk = hybrid_attention_chunked(q, k, v, fq, fk, factor, window, output_final_state=True)
    close(o_chunk, expected)
    o_rec, s_rec, cache = hybrid_attention_recurrent(q, k, v, fq, fk, factor, window, None, None)
    close(o_rec, expected)
    close(s_chunk, s_rec)
    for cached, full in zip(cache, (k, v, fk), strict=True):
        close(cached, last(full, window - 1))

    # prefill with the chunked form, then decode one token at a time from its state and cache
    q1, k1, v1, fq1, fk1 = (x[:, :, :t1] for x in (q, k, v, fq, fk))
    o1, state = hybrid_attention_chunked(q1, k1, v1, fq1, fk1, factor, window, output_final_state=True)
    cache = (last(k1, window - 1), last(v1, window - 1), last(fk1, window - 1))
    outs = [o1]
    for t in range(t1, T):
        step = [x[:, :, t : t + 1] for x in (q, k, v, fq, fk)]
        o, state, cache = hybrid_attention_recurrent(*step, factor, window, state, cache)
        outs.append(o)
    close(torch.cat(outs, dim=2), expected)
    close(state, s_chunk)


def test_hybrid_gqa_equals_expanded_heads():
    torch.manual_seed(9)
    q, k, v, fq, fk = window_inputs(6, 2)
    factor = torch.rand(6)
    expected = hybrid_attention_parallel(q, expand(k, 3), expand(v, 3), fq, expand(fk, 3), factor, 5)
    close(hybrid_attention_chunked(q, k, v, fq, fk, factor, 5), expected)
    close(
        sliding_window_attention_chunked(q, k, v, 5),
        sliding_window_attention_parallel(q, expand(k, 3), expand(v, 3), 5),
    )


@pytest.mark.parametrize("window", [1, 5])
def test_decode_ignores_cache_entries_older_than_window(window):
    """A cache longer than window - 1 (here the whole prefix) decodes the same: its older tokens are
    outside the softmax window and, for the hybrid, already counted in the state."""
    torch.manual_seed(15)
    q, k, v, fq, fk = window_inputs(6, 2)
    factor = torch.rand(6)
    q1, k1, v1, fq1, fk1 = (x[:, :, :20] for x in (q, k, v, fq, fk))
    q2, k2, v2, fq2, fk2 = (x[:, :, 20:] for x in (q, k, v, fq, fk))
    o, _ = sliding_window_attention_recurrent(q2, k2, v2, window, (k1, v1))
    close(o, sliding_window_attention_parallel(q, k, v, window)[:, :, 20:])
    _, state = hybrid_attention_chunked(q1, k1, v1, fq1, fk1, factor, window, output_final_state=True)
    o, _, _ = hybrid_attention_recurrent(q2, k2, v2, fq2, fk2, factor, window, state, (k1, v1, fk1))
    close(o, hybrid_attention_parallel(q, k, v, fq, fk, factor, window)[:, :, 20:])


@pytest.mark.parametrize("factor", [1e-3, 0.1, 0.9])
def test_hybrid_window_covering_sequence_is_causal_softmax(factor):
    """No key is ever older than the window, so only softmax terms remain and g cancels
    (exactly with eps=0; with eps > 0 up to a relative eps / g)."""
    torch.manual_seed(10)
    q, k, v, fq, fk = window_inputs(6, 2)
    factor = torch.full((6,), factor)
    expected = causal_softmax(q, k, v)
    close(hybrid_attention_parallel(q, k, v, fq, fk, factor, T, eps=0.0), expected)
    close(hybrid_attention_chunked(q, k, v, fq, fk, factor, T, eps=0.0), expected)
    close(hybrid_attention_recurrent(q, k, v, fq, fk, factor, T, None, None, eps=0.0)[0], expected)


@pytest.mark.parametrize("factor", [0.0, 1e-7])
def test_hybrid_without_window_weight_is_linear_attention_on_older_keys(factor):
    """As g -> 0 only the linear terms remain: query t attends linearly to the keys s <= t - window,
    i.e. plain linear attention with the queries shifted by `window`. With g = 0 exactly, the first
    `window` queries have no terms at all and give 0."""
    torch.manual_seed(11)
    window = 8
    q, k, v, fq, fk = window_inputs(6, 2)
    o = hybrid_attention_chunked(q, k, v, fq, fk, torch.full((6,), factor), window)
    older = slice(0, T - window)
    close(o[:, :, window:], linear_attention_parallel(fq[:, :, window:], fk[:, :, older], v[:, :, older]))
    if factor == 0.0:
        assert (o[:, :, :window] == 0).all()


def test_hybrid_is_convex_combination_of_values():
    """Softmax and linear weights are all non-negative: with eps=0 each output channel lies between
    the min and the max of that channel over the values s <= t."""
    torch.manual_seed(12)
    q, k, v, fq, fk = window_inputs(6, 2)
    seen = expand(v, 3)
    low, high = seen.cummin(dim=2).values - 1e-5, seen.cummax(dim=2).values + 1e-5
    o = hybrid_attention_chunked(q, k, v, fq, fk, torch.rand(6), 5, eps=0.0)
    assert ((o >= low) & (o <= high)).all()
