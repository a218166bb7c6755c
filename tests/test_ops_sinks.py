"""Attention sinks in the sliding-window and hybrid ops: the first sink_tokens keys stay softmax keys.

Softmax keys of query t: {s : t - window < s <= t} | {s : s < sink_tokens, s <= t}; in the hybrid the
linear keys are s <= t - window with s >= sink_tokens. Every form agrees with the literal definition.
"""

import pytest
import torch
import torch.nn.functional as F

from linearize.ops import (
    hybrid_attention_chunked,
    hybrid_attention_parallel,
    hybrid_attention_recurrent,
    sliding_window_attention_chunked,
    sliding_window_attention_parallel,
    sliding_window_attention_recurrent,
)

B, T, D, FEAT = 2, 29, 16, 8  # T is not a multiple of 4 or 8
HEADS = [(6, 2), (4, 4)]  # GQA and MHA
SINKS = [1, 3, 8]
WINDOWS = [1, 4, 8]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def inputs(heads: int, kv_heads: int, t: int = T):
    q, k, v = torch.randn(B, heads, t, D), torch.randn(B, kv_heads, t, D), torch.randn(B, kv_heads, t, D)
    fq, fk = torch.randn(B, heads, t, FEAT).softmax(-1), torch.randn(B, kv_heads, t, FEAT).softmax(-1)
    return q, k, v, fq, fk


def factors(heads: int) -> torch.Tensor:
    return torch.rand(heads) * 0.9 + 0.05


def last(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, :, max(x.shape[2] - n, 0) :]


def causal_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def key_sets(i: int, window: int, sink_tokens: int) -> tuple[list[int], list[int]]:
    """The softmax keys and the linear keys of query i, built from the definition."""
    soft = sorted({s for s in range(i + 1) if i - window < s} | {s for s in range(i + 1) if s < sink_tokens})
    linear = [s for s in range(i + 1) if s <= i - window and s >= sink_tokens]
    return soft, linear


def naive(q, k, v, fq, fk, factor, window: int, sink_tokens: int, hybrid: bool, eps: float = 1e-6):
    """Per head and query: softmax terms over the softmax keys (shifted by their max, times g), and in
    the hybrid linear terms fq.fk over the linear keys, jointly normalised."""
    batch, heads, t, head_dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, heads, t, head_dim)
    for head in range(heads):
        kv = head // groups
        for i in range(t):
            soft_keys, linear_keys = key_sets(i, window, sink_tokens)
            scores = (q[:, head, i, None] * k[:, kv, soft_keys]).sum(-1) * head_dim**-0.5
            if not hybrid:
                out[:, head, i] = (scores.softmax(-1)[..., None] * v[:, kv, soft_keys]).sum(1)
                continue
            soft = factor[head] * (scores - scores.max(-1, keepdim=True).values).exp()
            lin = (fq[:, head, i, None] * fk[:, kv, linear_keys]).sum(-1)
            w = torch.cat([soft, lin], dim=1)
            values = v[:, kv, soft_keys + linear_keys]
            out[:, head, i] = (w[..., None] * values).sum(1) / (w.sum(1, keepdim=True) + eps)
    return out


def state_of(fk: torch.Tensor, v: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """sum over the given keys of fk^T [v, 1]."""
    ve = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return fk[:, :, keys].transpose(-1, -2) @ ve[:, :, keys]


def sinks_of(k: torch.Tensor, v: torch.Tensor, sink_tokens: int, position: int):
    """What the caller keeps: the first min(sink_tokens, position) keys and values."""
    n = min(sink_tokens, position)
    return k[:, :, :n], v[:, :, :n]


# ---------------------------------------------------------------- definition


@pytest.mark.parametrize("sink_tokens", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
def test_parallel_and_chunked_match_definition(window, sink_tokens):
    torch.manual_seed(20)
    q, k, v, fq, fk = inputs(6, 2, t=13)
    factor = factors(6)
    expected = naive(q, k, v, fq, fk, factor, window, sink_tokens, hybrid=False)
    close(sliding_window_attention_parallel(q, k, v, window, sink_tokens=sink_tokens), expected)
    close(sliding_window_attention_chunked(q, k, v, window, sink_tokens=sink_tokens), expected)
    expected = naive(q, k, v, fq, fk, factor, window, sink_tokens, hybrid=True)
    close(hybrid_attention_parallel(q, k, v, fq, fk, factor, window, sink_tokens=sink_tokens), expected)
    close(hybrid_attention_chunked(q, k, v, fq, fk, factor, window, sink_tokens=sink_tokens), expected)


# ---------------------------------------------------------------- forms agree


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sink_tokens", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
def test_sliding_window_forms_agree(window, sink_tokens, heads):
    torch.manual_seed(21)
    q, k, v, _, _ = inputs(*heads)
    expected = sliding_window_attention_parallel(q, k, v, window, sink_tokens=sink_tokens)
    close(sliding_window_attention_chunked(q, k, v, window, sink_tokens=sink_tokens), expected)
    o, (k_win, v_win) = sliding_window_attention_recurrent(q, k, v, window, sink_tokens=sink_tokens)
    close(o, expected)
    close(k_win, last(k, window - 1))
    close(v_win, last(v, window - 1))

    # chunked prefill of t1 tokens (also fewer than the sinks), then decode in steps of `step` tokens
    for t1, step in [(2, 1), (2, 3), (11, 1), (11, 5)]:
        outs = [sliding_window_attention_chunked(q[:, :, :t1], k[:, :, :t1], v[:, :, :t1], window, None, sink_tokens)]
        cache = (last(k[:, :, :t1], window - 1), last(v[:, :, :t1], window - 1))
        for start in range(t1, T, step):
            new = [x[:, :, start : start + step] for x in (q, k, v)]
            sinks = sinks_of(k, v, sink_tokens, start)
            o, cache = sliding_window_attention_recurrent(
                *new, window, cache, sink_tokens=sink_tokens, sinks=sinks, position=start
            )
            outs.append(o)
        close(torch.cat(outs, dim=2), expected)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sink_tokens", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
def test_hybrid_forms_agree(window, sink_tokens, heads):
    torch.manual_seed(22)
    q, k, v, fq, fk = inputs(*heads)
    factor = factors(heads[0])
    expected = hybrid_attention_parallel(q, k, v, fq, fk, factor, window, sink_tokens=sink_tokens)
    o_chunk, s_chunk = hybrid_attention_chunked(
        q, k, v, fq, fk, factor, window, sink_tokens=sink_tokens, output_final_state=True
    )
    close(o_chunk, expected)
    # the final state: keys s <= T - window that are not sinks
    close(s_chunk, state_of(fk, v, list(range(sink_tokens, T - window + 1))))
    o_rec, s_rec, cache = hybrid_attention_recurrent(q, k, v, fq, fk, factor, window, sink_tokens=sink_tokens)
    close(o_rec, expected)
    close(s_rec, s_chunk)
    for cached, full in zip(cache, (k, v, fk), strict=True):
        close(cached, last(full, window - 1))

    for t1, step in [(2, 1), (2, 3), (11, 1), (11, 5)]:
        xs1 = [x[:, :, :t1] for x in (q, k, v, fq, fk)]
        o1, state = hybrid_attention_chunked(*xs1, factor, window, sink_tokens=sink_tokens, output_final_state=True)
        close(state, state_of(fk, v, list(range(sink_tokens, t1 - window + 1))))
        cache = tuple(last(x, window - 1) for x in (xs1[1], xs1[2], xs1[4]))
        outs = [o1]
        for start in range(t1, T, step):
            new = [x[:, :, start : start + step] for x in (q, k, v, fq, fk)]
            sinks = sinks_of(k, v, sink_tokens, start)
            o, state, cache = hybrid_attention_recurrent(
                *new, factor, window, state, cache, sink_tokens=sink_tokens, sinks=sinks, position=start
            )
            outs.append(o)
        close(torch.cat(outs, dim=2), expected)
        close(state, s_chunk)


@pytest.mark.parametrize("sink_tokens", [1, 8])
def test_chunked_gradients_match_parallel(sink_tokens):
    torch.manual_seed(23)
    window = 4
    leaves = [x.requires_grad_() for x in inputs(6, 2)]
    factor = factors(6).requires_grad_()
    grads = []
    for fn in (hybrid_attention_parallel, hybrid_attention_chunked):
        o = fn(*leaves, factor, window, sink_tokens=sink_tokens)
        grads.append(torch.autograd.grad((o * o.detach().sin()).sum(), [*leaves, factor]))
    for chunked, parallel in zip(grads[1], grads[0], strict=True):
        close(chunked, parallel)
    q, k, v = leaves[:3]
    grads = []
    for fn in (sliding_window_attention_parallel, sliding_window_attention_chunked):
        o = fn(q, k, v, window, sink_tokens=sink_tokens)
        grads.append(torch.autograd.grad((o * o.detach().sin()).sum(), [q, k, v]))
    for chunked, parallel in zip(grads[1], grads[0], strict=True):
        close(chunked, parallel)


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("window", [1, 5])
def test_zero_sinks_is_the_plain_window(window):
    """sink_tokens=0 runs exactly the code without sinks: bit-for-bit equal outputs and states."""
    torch.manual_seed(24)
    q, k, v, fq, fk = inputs(6, 2)
    factor = factors(6)
    assert torch.equal(
        sliding_window_attention_parallel(q, k, v, window, sink_tokens=0),
        sliding_window_attention_parallel(q, k, v, window),
    )
    assert torch.equal(
        sliding_window_attention_chunked(q, k, v, window, sink_tokens=0),
        sliding_window_attention_chunked(q, k, v, window),
    )
    close(
        sliding_window_attention_chunked(q, k, v, window),
        naive(q, k, v, fq, fk, factor, window, 0, hybrid=False),
    )
    close(
        hybrid_attention_chunked(q, k, v, fq, fk, factor, window),
        naive(q, k, v, fq, fk, factor, window, 0, hybrid=True),
    )
    assert torch.equal(
        hybrid_attention_parallel(q, k, v, fq, fk, factor, window, sink_tokens=0),
        hybrid_attention_parallel(q, k, v, fq, fk, factor, window),
    )
    with_arg = hybrid_attention_chunked(q, k, v, fq, fk, factor, window, sink_tokens=0, output_final_state=True)
    without = hybrid_attention_chunked(q, k, v, fq, fk, factor, window, output_final_state=True)
    assert all(torch.equal(a, b) for a, b in zip(with_arg, without, strict=True))

    # decoding with the new arguments at their defaults, or with position set, changes nothing
    cache1 = tuple(x[:, :, :20] for x in (k, v, fk))  # longer than window - 1: only the last are read
    new = [x[:, :, 20:] for x in (q, k, v, fq, fk)]
    state = hybrid_attention_chunked(
        *(x[:, :, :20] for x in (q, k, v, fq, fk)), factor, window, output_final_state=True
    )[1]
    plain = hybrid_attention_recurrent(*new, factor, window, state, cache1)
    for kwargs in ({"sink_tokens": 0}, {"sink_tokens": 0, "position": 20}):
        got = hybrid_attention_recurrent(*new, factor, window, state, cache1, **kwargs)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
        assert all(torch.equal(a, b) for a, b in zip(got[2], plain[2], strict=True))
        o, _ = sliding_window_attention_recurrent(*new[:3], window, cache1[:2], **kwargs)
        assert torch.equal(o, sliding_window_attention_recurrent(*new[:3], window, cache1[:2])[0])


@pytest.mark.parametrize("factor", [1e-3, 0.1, 0.9])
@pytest.mark.parametrize("window", [T, T + 5])
def test_window_covering_sequence_with_sinks_is_causal_softmax(window, factor):
    """Every key is in the window, the sinks add nothing, no key is linear: g cancels (eps=0)."""
    torch.manual_seed(25)
    q, k, v, fq, fk = inputs(6, 2)
    g = torch.full((6,), factor)
    expected = causal_softmax(q, k, v)
    for sink_tokens in (1, 4):
        close(hybrid_attention_parallel(q, k, v, fq, fk, g, window, eps=0.0, sink_tokens=sink_tokens), expected)
        close(hybrid_attention_chunked(q, k, v, fq, fk, g, window, eps=0.0, sink_tokens=sink_tokens), expected)
        o, state, _ = hybrid_attention_recurrent(q, k, v, fq, fk, g, window, eps=0.0, sink_tokens=sink_tokens)
        close(o, expected)
        assert (state == 0).all()
        close(sliding_window_attention_chunked(q, k, v, window, sink_tokens=sink_tokens), expected)


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("sink_tokens", [T, T + 3])
def test_all_sinks_is_causal_softmax(sink_tokens, window):
    """Every key is a sink: softmax over all s <= t whatever the window (and no linear terms)."""
    torch.manual_seed(26)
    q, k, v, fq, fk = inputs(6, 2)
    expected = causal_softmax(q, k, v)
    close(sliding_window_attention_parallel(q, k, v, window, sink_tokens=sink_tokens), expected)
    close(sliding_window_attention_chunked(q, k, v, window, sink_tokens=sink_tokens), expected)
    close(sliding_window_attention_recurrent(q, k, v, window, sink_tokens=sink_tokens)[0], expected)
    g = factors(6)
    o, state = hybrid_attention_chunked(
        q, k, v, fq, fk, g, window, eps=0.0, sink_tokens=sink_tokens, output_final_state=True
    )
    close(o, expected)
    assert (state == 0).all()
    o, state, _ = hybrid_attention_recurrent(q, k, v, fq, fk, g, window, eps=0.0, sink_tokens=sink_tokens)
    close(o, expected)
    assert (state == 0).all()


def test_inconsistent_sink_arguments_are_refused():
    torch.manual_seed(27)
    q, k, v, fq, fk = inputs(6, 2, t=10)
    g = factors(6)
    new = [x[:, :, 6:] for x in (q, k, v, fq, fk)]
    cache = tuple(x[:, :, 3:6] for x in (k, v, fk))
    with pytest.raises(ValueError, match="sinks hold"):  # position 6 needs the first 3 keys
        sliding_window_attention_recurrent(*new[:3], 4, cache[:2], sink_tokens=3, position=6)
    with pytest.raises(ValueError, match="sinks hold"):
        sinks = sinks_of(k, v, 2, 6)
        hybrid_attention_recurrent(*new, g, 4, None, cache, sink_tokens=3, sinks=sinks, position=6)
    with pytest.raises(ValueError, match="window cache holds"):  # forgot position: the cache is older than it
        hybrid_attention_recurrent(*new, g, 4, None, cache, sink_tokens=3, sinks=None, position=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        sliding_window_attention_chunked(q, k, v, 4, sink_tokens=-1)
