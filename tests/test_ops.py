"""The math core: every form of every op agrees with its quadratic reference and with the definition written
out literally; padding, sinks, gates and GQA included."""

import pytest
import torch
import torch.nn.functional as F

from linearize.ops import (
    DecodeState,
    empty_window_state,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
    memory,
    window_attention_chunked,
    window_attention_parallel,
    window_attention_recurrent,
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


# ---------------------------------------------------------------- linear attention


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gate", GATES)
def test_linear_parallel_matches_definition(gate, normalize):
    torch.manual_seed(13)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate, t=12)
    expected = naive_linear(fq, fk, v, log_gate, normalize)
    close(linear_attention_parallel(fq, fk, v, log_gate, normalize=normalize)[0], expected)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gate", GATES)
def test_linear_forms_agree(gate, normalize, heads):
    torch.manual_seed(0)
    fq, fk, v, log_gate = linear_inputs(*heads, gate)
    expected, s_par = linear_attention_parallel(fq, fk, v, log_gate, normalize=normalize, output_final_state=True)
    o_chunk, s_chunk = linear_attention_chunked(
        fq, fk, v, log_gate, normalize=normalize, chunk_size=16, output_final_state=True
    )
    o_rec, s_rec = linear_attention_recurrent(fq, fk, v, log_gate, normalize=normalize)
    assert expected.shape == (B, heads[0], T, D)
    assert s_chunk.recurrent.shape == (B, heads[1], FEAT, D + 1) and s_chunk.recurrent.dtype == torch.float32
    close(o_chunk, expected)
    close(o_rec, expected)
    close(s_chunk.recurrent, s_rec.recurrent)
    close(s_par.recurrent, s_rec.recurrent)
    assert s_rec.seen.tolist() == [T] * B


@pytest.mark.parametrize("gate", GATES)
def test_linear_continues_from_state(gate):
    torch.manual_seed(1)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate)
    expected, _ = linear_attention_chunked(fq, fk, v, log_gate, chunk_size=16)
    first, rest = slice(0, 20), slice(20, T)
    gate_first, gate_rest = (
        (None, None) if log_gate is None else (log_gate[:, :, first], log_gate[:, :, rest])
    )
    o1, state = linear_attention_chunked(
        fq[:, :, first], fk[:, :, first], v[:, :, first], gate_first, chunk_size=16, output_final_state=True
    )
    o2, _ = linear_attention_chunked(
        fq[:, :, rest], fk[:, :, rest], v[:, :, rest], gate_rest, chunk_size=16, state=state
    )
    o2_rec, _ = linear_attention_recurrent(fq[:, :, rest], fk[:, :, rest], v[:, :, rest], gate_rest, state=state)
    close(torch.cat([o1, o2], dim=2), expected)
    close(o2_rec, expected[:, :, rest])


@pytest.mark.parametrize("chunk_size", [16, 24, 64])
def test_linear_feature_gates_factorised_equals_exact(chunk_size, monkeypatch):
    """Per-feature gates inside a chunk: the sub-chunk factorisation and the exact [C, C, F] form agree
    (chunk sizes with and without 16-token sub-chunks, T not a multiple of the chunk)."""
    import linearize.ops.linear as linear_ops

    torch.manual_seed(13)
    fq, fk, v, log_gate = linear_inputs(6, 2, "feature", t=150)
    results = []
    for threshold in (float("inf"), -1.0):  # always factorised; always exact
        monkeypatch.setattr(linear_ops, "MAX_SUB_CHUNK_DECAY", threshold)
        results.append(linear_attention_chunked(fq, fk, v, log_gate, chunk_size=chunk_size, output_final_state=True))
    close(results[0][0], results[1][0])
    close(results[0][1].recurrent, results[1][1].recurrent)
    close(results[0][0], linear_attention_recurrent(fq, fk, v, log_gate)[0])


@pytest.mark.parametrize("low", [-5.0, -1e-3], ids=["strong", "weak"])
@pytest.mark.parametrize("gate", ["scalar", "feature"])
def test_linear_long_sequence_gates_are_stable(gate, low):
    """Decays down to exp(-5) per token over 4096 tokens: within a 64-token chunk the cumulative
    log-gate reaches -320, which would overflow any exp(-A) factorisation. Weak gates sum ~4096 terms."""
    torch.manual_seed(2)
    fq, fk, v, log_gate = linear_inputs(2, 1, gate, t=4096, low=low)
    o_chunk, s_chunk = linear_attention_chunked(fq, fk, v, log_gate, output_final_state=True)
    o_rec, s_rec = linear_attention_recurrent(fq, fk, v, log_gate)
    assert torch.isfinite(o_chunk).all() and torch.isfinite(s_chunk.recurrent).all()
    assert relative_error(o_chunk, o_rec) < 1e-5
    assert relative_error(s_chunk.recurrent, s_rec.recurrent) < 1e-5


@pytest.mark.parametrize("gate", GATES)
def test_linear_gqa_equals_expanded_heads(gate):
    torch.manual_seed(3)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate)
    expected, _ = linear_attention_parallel(fq, expand(fk, 3), expand(v, 3), expand(log_gate, 3))
    close(linear_attention_chunked(fq, fk, v, log_gate, chunk_size=16)[0], expected)
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
        linear_attention_parallel(fq, fk, v, log_gate, eps=0.0)[0],
        linear_attention_chunked(fq, fk, v, log_gate, eps=0.0, chunk_size=16)[0],
        linear_attention_recurrent(fq, fk, v, log_gate, eps=0.0)[0],
    ]
    for o in outputs:
        assert ((o >= low) & (o <= high)).all()


def test_dtype_in_dtype_out_state_stays_fp32():
    torch.manual_seed(5)
    fq, fk, v, log_gate = linear_inputs(6, 2, "feature")
    expected, _ = linear_attention_chunked(fq, fk, v, log_gate)
    o, state = linear_attention_chunked(
        fq.bfloat16(), fk.bfloat16(), v.bfloat16(), log_gate.bfloat16(), output_final_state=True
    )
    assert o.dtype == torch.bfloat16 and state.recurrent.dtype == torch.float32
    close(o.float(), expected, tol=5e-2)




def left_padding(pads: list[int], t: int = T) -> torch.Tensor:
    """[B, T] key mask with the given number of padding tokens at the start of each row."""
    mask = torch.ones(len(pads), t, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


@pytest.mark.parametrize("gate", GATES)
def test_linear_left_padded_rows_equal_the_rows_alone(gate):
    torch.manual_seed(6)
    fq, fk, v, log_gate = linear_inputs(6, 2, gate)
    mask = left_padding([0, 9])
    o_chunk, s_chunk = linear_attention_chunked(fq, fk, v, log_gate, key_mask=mask, chunk_size=16,
                                                output_final_state=True)
    o_rec, s_rec = linear_attention_recurrent(fq, fk, v, log_gate, key_mask=mask)
    alone = [t[1:, :, 9:] if t is not None else None for t in (fq, fk, v, log_gate)]
    o_alone, s_alone = linear_attention_chunked(*alone, chunk_size=16, output_final_state=True)
    for o, s in ((o_chunk, s_chunk), (o_rec, s_rec)):
        close(o[1:, :, 9:], o_alone)
        close(s.recurrent[1:], s_alone.recurrent)
    assert s_chunk.seen.tolist() == [T, T - 9]


# ---------------------------------------------------------------- sliding window, sinks, hybrid

WINDOWS = [1, 5, 8]
VARIANTS = ["window", "hybrid", "gated"]  # softmax only; + linear terms for older keys; + per-token decays


def naive_window(q, k, v, window, sink_tokens=0, fq=None, fk=None, log_gate=None, key_mask=None, eps=1e-6,
                 token_ids=None, memory_buckets=0, memory_ngram=1):
    """The definition, literally, one row, head and query at a time. Softmax keys: real s <= t with
    t - s < window, or s among the row's first sink_tokens real tokens, and (with a memory) for each
    order n the most recent real non-sink s <= t - window whose n previous tokens are real and hash to the
    bucket of the n tokens ending at t (-1 for a position that is padding or before the row), each key
    once. Linear
    keys (with features): the other real s <= t - window, weighted fq_t.fk_s prod_{s < j <= t} a_j. One
    shared normaliser."""
    batch, heads, t, head_dim = q.shape
    groups = heads // k.shape[1]
    mask = torch.ones(batch, t, dtype=torch.bool) if key_mask is None else key_mask
    out = torch.zeros(batch, heads, t, head_dim)
    for b in range(batch):
        real = (mask[b].long().cumsum(0) - 1).tolist()
        for head in range(heads):
            kv = head // groups
            for i in range(t):
                if not mask[b, i]:
                    continue
                soft = [s for s in range(i + 1) if mask[b, s] and (i - s < window or real[s] < sink_tokens)]
                recalled = []
                for n in [memory_ngram] if isinstance(memory_ngram, int) else memory_ngram:
                    if not memory_buckets:
                        break

                    def gram(end, n=n, b=b):  # the n token ids ending at `end`
                        return torch.tensor([token_ids[b, j].item() if j >= 0 and mask[b, j] else -1
                                             for j in range(end - n + 1, end + 1)])

                    def bucket(g):  # fold the ids into 31 bits (one id: itself), then Knuth's multiplicative hash
                        folded = g.item() if len(g) == 1 else 0
                        for token in g.tolist() if len(g) > 1 else []:
                            folded = (folded * 2654435761 + token + 1) % 2**31
                        return folded * 2654435761 % memory_buckets

                    found = [s for s in range(i - window + 1) if mask[b, s] and real[s] >= sink_tokens
                             and (gram(s - 1) >= 0).all() and bucket(gram(s - 1)) == bucket(gram(i))]
                    recalled += [s for s in found[-1:] if s not in recalled]
                soft += recalled
                scores = torch.stack([(q[b, head, i] * k[b, kv, s]).sum() * head_dim**-0.5 for s in soft])
                c = scores[: len(soft) - len(recalled)].max()  # c_t: the window's and sinks' max
                weights = list((scores - c).exp())
                keys = list(soft)
                if fq is not None:
                    for s in range(i + 1):
                        if mask[b, s] and i - s >= window and real[s] >= sink_tokens:
                            decay = 1.0 if log_gate is None else log_gate[b, kv, s + 1 : i + 1].sum().exp()
                            weights.append((fq[b, head, i] * fk[b, kv, s]).sum() * decay)
                            keys.append(s)
                w = torch.stack(weights)
                out[b, head, i] = (w[:, None] * v[b, kv, keys]).sum(0) / (w.sum() + eps)
    return out


def window_args(variant: str, heads: int, kv_heads: int, t: int = T, batch: int = B) -> dict:
    q, k, v = torch.randn(batch, heads, t, D), torch.randn(batch, kv_heads, t, D), torch.randn(batch, kv_heads, t, D)
    args = {"q": q, "k": k, "v": v}
    if variant != "window":
        args["fq"], args["fk"] = features(batch, heads, t, FEAT), features(batch, kv_heads, t, FEAT)
    if variant == "gated":
        args["log_gate"] = F.logsigmoid(torch.randn(batch, kv_heads, t) + 2.0)
    return args


def sliced(args: dict, part: slice, mask: torch.Tensor | None) -> dict:
    out = {name: value[:, :, part] if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    if mask is not None:
        out["key_mask"] = mask[:, part]
    return out


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Outputs at padded query positions are meaningless: zero them before comparing."""
    return x if mask is None else x * mask[:, None, :, None]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink_tokens", [0, 2])
@pytest.mark.parametrize("window", [1, 3])
def test_window_parallel_matches_definition(window, sink_tokens, variant, padded):
    torch.manual_seed(7)
    args = window_args(variant, 4, 2, t=11)
    mask = left_padding([0, 4], t=11) if padded else None
    expected = naive_window(**args, window=window, sink_tokens=sink_tokens, key_mask=mask)
    o, _ = window_attention_parallel(**args, window=window, sink_tokens=sink_tokens, key_mask=mask)
    close(masked(o, mask), expected)


def assert_same_state(a: DecodeState, b: DecodeState) -> None:
    assert torch.equal(a.seen, b.seen)
    assert torch.equal(a.window_valid, b.window_valid) and torch.equal(a.window_position, b.window_position)
    valid = a.window_valid[:, None, :, None]
    for name in ("window_keys", "window_values", "window_features"):
        if getattr(a, name) is not None:
            close(getattr(a, name) * valid, getattr(b, name) * valid)
    if a.sink_valid is not None:
        assert torch.equal(a.sink_valid, b.sink_valid)
        close(a.sink_keys * a.sink_valid[:, None, :, None], b.sink_keys * b.sink_valid[:, None, :, None])
    if a.recurrent is not None:
        close(a.recurrent, b.recurrent)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink_tokens", [0, 3])
@pytest.mark.parametrize("window", WINDOWS)
def test_window_forms_agree_and_continue(window, sink_tokens, variant, padded, heads):
    """Parallel = chunked; recurrent from the empty state = parallel; a chunked prefill continued by
    the recurrent form = parallel; all three end in the same decode state."""
    torch.manual_seed(8)
    args = window_args(variant, *heads)
    mask = left_padding([0, 13]) if padded else None
    common = {"window": window, "sink_tokens": sink_tokens, "key_mask": mask}
    expected, s_par = window_attention_parallel(**args, **common, output_final_state=True)
    o_chunk, s_chunk = window_attention_chunked(**args, **common, output_final_state=True)
    empty = empty_window_state(B, heads[1], D, window, sink_tokens, None if variant == "window" else FEAT,
                               gated=variant == "gated")
    o_rec, s_rec = window_attention_recurrent(**args, **common, state=empty)
    close(masked(o_chunk, mask), masked(expected, mask))
    close(masked(o_rec, mask), masked(expected, mask))
    assert_same_state(s_chunk, s_rec)
    assert_same_state(s_par, s_rec)
    for split in (2, 20):
        first, rest = slice(0, split), slice(split, T)
        _, state = window_attention_chunked(**sliced(args, first, mask), window=window, sink_tokens=sink_tokens,
                                            output_final_state=True)
        o_rest, s_end = window_attention_recurrent(**sliced(args, rest, mask), window=window,
                                                   sink_tokens=sink_tokens, state=state)
        close(masked(o_rest, None if mask is None else mask[:, rest]), masked(expected, mask)[:, :, rest])
        assert_same_state(s_end, s_rec)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", ["hybrid", "gated"])
def test_window_keeps_feature_inputs_and_maps_keys_as_they_leave(variant, padded):
    """`key_features`: the op is given what the key feature map reads (D numbers per key) and the map; every
    form gives what it gives for the mapped features, the window keeps the inputs (D wide, not F), and
    decoding maps each key as it leaves the window: the same outputs and linear state, step by step."""
    torch.manual_seed(13)
    window, sink_tokens, kv_heads = 5, 2, 2
    args = window_args(variant, 6, kv_heads)
    mask = left_padding([0, 9]) if padded else None
    weight = torch.randn(kv_heads, D, FEAT)

    def key_features(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hdf->bhtf", x, weight.to(x.dtype)).softmax(-1)

    inputs = torch.randn(B, kv_heads, T, D)
    mapped = {**args, "fk": key_features(inputs)}
    given = {**args, "fk": inputs, "key_features": key_features}
    common = {"window": window, "sink_tokens": sink_tokens, "key_mask": mask}
    expected, s_mapped = window_attention_parallel(**mapped, **common, output_final_state=True)
    for form in (window_attention_parallel, window_attention_chunked):
        o, state = form(**given, **common, output_final_state=True)
        close(masked(o, mask), masked(expected, mask))
        assert state.window_features.shape[-1] == D and s_mapped.window_features.shape[-1] == FEAT
        close(state.recurrent, s_mapped.recurrent)
    empty = empty_window_state(B, kv_heads, D, window, sink_tokens, FEAT, gated=variant == "gated",
                               feature_inputs=D)
    o_rec, s_rec = window_attention_recurrent(**given, **common, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    close(s_rec.recurrent, s_mapped.recurrent)
    if mask is None:  # one token per call (the lean step) from a short prefill
        _, state = window_attention_chunked(**sliced(given, slice(0, 2), None), window=window,
                                            sink_tokens=sink_tokens, output_final_state=True)
        for i in range(2, T):
            o, state = window_attention_recurrent(**sliced(given, slice(i, i + 1), None), window=window,
                                                  sink_tokens=sink_tokens, state=state)
            close(o, expected[:, :, i : i + 1])
        close(state.recurrent, s_mapped.recurrent)
        close(state.window_features, s_rec.window_features)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_window_chunked_in_query_groups_equals_one_group(variant, padded, monkeypatch):
    """Long inputs are processed GROUP_TOKENS queries at a time; groups of 1 and 2 chunks give the same."""
    import linearize.ops.window.chunked as window_ops

    torch.manual_seed(12)
    args = window_args(variant, 6, 2)
    mask = left_padding([0, 9]) if padded else None
    common = {"window": 4, "sink_tokens": 2, "key_mask": mask}
    expected, _ = window_attention_parallel(**args, **common)
    for group_tokens in (4, 8):
        monkeypatch.setattr(window_ops, "GROUP_TOKENS", group_tokens)
        close(masked(window_attention_chunked(**args, **common)[0], mask), masked(expected, mask))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink_tokens", [0, 3])
@pytest.mark.parametrize("window", WINDOWS)
def test_window_single_token_steps_equal_parallel(window, sink_tokens, variant, heads):
    """Decoding one token per call (the lean step) from a short prefill: outputs equal the parallel form's,
    and the final state equals the general recurrent loop's, across sinks leaving the window."""
    torch.manual_seed(11)
    args = window_args(variant, *heads)
    common = {"window": window, "sink_tokens": sink_tokens}
    expected, _ = window_attention_parallel(**args, **common)
    empty = empty_window_state(B, heads[1], D, window, sink_tokens, None if variant == "window" else FEAT,
                               gated=variant == "gated")
    _, s_loop = window_attention_recurrent(**args, **common, state=empty)
    _, state = window_attention_chunked(**sliced(args, slice(0, 2), None), **common, output_final_state=True)
    for i in range(2, T):
        o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None), **common, state=state)
        close(o, expected[:, :, i : i + 1])
    assert_same_state(state, s_loop)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_window_left_padded_row_equals_the_row_alone(sink_tokens, variant):
    torch.manual_seed(9)
    args = window_args(variant, 6, 2)
    mask = left_padding([0, 11])
    common = {"window": 5, "sink_tokens": sink_tokens}
    alone = {name: value[1:, :, 11:] for name, value in args.items()}
    expected, s_alone = window_attention_chunked(**alone, **common, output_final_state=True)
    o, s = window_attention_chunked(**args, **common, key_mask=mask, output_final_state=True)
    close(o[1:, :, 11:], expected)
    assert s.seen.tolist() == [T, T - 11]
    if s.recurrent is not None:
        close(s.recurrent[1:], s_alone.recurrent)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_window_covering_the_sequence_is_causal_softmax(variant, heads):
    torch.manual_seed(10)
    args = window_args(variant, *heads)
    expected = causal_softmax(args["q"], args["k"], args["v"])
    for window in (T, T + 5):
        close(window_attention_chunked(**args, window=window)[0], expected)
        close(window_attention_parallel(**args, window=window)[0], expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sinks_covering_the_sequence_are_causal_softmax(variant):
    torch.manual_seed(11)
    args = window_args(variant, 6, 2)
    expected = causal_softmax(args["q"], args["k"], args["v"])
    close(window_attention_chunked(**args, window=4, sink_tokens=T)[0], expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_gqa_equals_expanded_heads(variant):
    torch.manual_seed(12)
    args = window_args(variant, 6, 2)
    expanded = {name: (expand(value, 3) if name != "q" and name != "fq" else value) for name, value in args.items()}
    expected, _ = window_attention_parallel(**expanded, window=5, sink_tokens=2)
    close(window_attention_chunked(**args, window=5, sink_tokens=2)[0], expected)


def test_hybrid_is_a_convex_combination_of_the_values():
    torch.manual_seed(13)
    args = window_args("gated", 6, 2)
    seen = expand(args["v"], 3)
    low, high = seen.cummin(dim=2).values - 1e-5, seen.cummax(dim=2).values + 1e-5
    o, _ = window_attention_chunked(**args, window=5, sink_tokens=2, eps=0.0)
    assert ((o >= low) & (o <= high)).all()


@pytest.mark.parametrize("variant", ["window", "gated"])
def test_window_chunked_gradients_match_parallel(variant):
    torch.manual_seed(14)
    args = {name: value.requires_grad_() for name, value in window_args(variant, 6, 2).items()}
    mask = left_padding([0, 7])
    grads = []
    for op in (window_attention_parallel, window_attention_chunked):
        o, _ = op(**args, window=5, sink_tokens=3, key_mask=mask)
        grads.append(torch.autograd.grad(masked(o, mask).square().sum(), list(args.values())))
    for a, b in zip(*grads):
        close(a, b, tol=1e-4)


def test_hybrid_long_sequence_with_strong_gates_is_stable():
    """exp(-5) decays per token over 4096 tokens: the chunked form must never exponentiate a positive sum."""
    torch.manual_seed(15)
    args = window_args("gated", 2, 1, t=4096, batch=1)
    args["log_gate"] = -5.0 * torch.rand(1, 1, 4096)
    o_chunk, s_chunk = window_attention_chunked(**args, window=64, sink_tokens=4, output_final_state=True)
    o_par, s_par = window_attention_parallel(**args, window=64, sink_tokens=4, output_final_state=True)
    assert torch.isfinite(o_chunk).all() and torch.isfinite(s_chunk.recurrent).all()
    assert relative_error(o_chunk, o_par) < 1e-5


def test_decode_state_has_the_same_size_at_any_length():
    torch.manual_seed(16)
    sizes = []
    for t in (16, 64):
        args = window_args("gated", 6, 2, t=t)
        _, state = window_attention_chunked(**args, window=5, sink_tokens=3, output_final_state=True)
        sizes.append(state.nbytes())
    assert sizes[0] == sizes[1]


def test_window_op_refuses_bad_arguments():
    args = window_args("hybrid", 6, 2)
    with pytest.raises(ValueError, match="window"):
        window_attention_chunked(**args, window=0)
    with pytest.raises(ValueError, match="fq and fk"):
        window_attention_chunked(args["q"], args["k"], args["v"], 4, fq=args["fq"])


# --- recall memory: one more softmax key per query, found by token identity ---------------------------------


def memory_state_equal(a: DecodeState, b: DecodeState) -> None:
    assert_same_state(a, b)
    assert torch.equal(a.memory_position, b.memory_position)
    keep = (a.memory_position >= 0)[:, None, :, None]
    fmt = memory.stored_format(a.memory_keys, a.memory_key_params, a.window_keys.shape[-1])
    assert fmt == memory.stored_format(b.memory_keys, b.memory_key_params, b.window_keys.shape[-1])
    if fmt == "auto":
        close(a.memory_keys * keep, b.memory_keys * keep)
        close(a.memory_values * keep, b.memory_values * keep)
    else:  # the same rows quantized the same way: equal codes and params
        for x, y in zip(memory_table(a), memory_table(b)):
            assert torch.equal(x * keep, y * keep)
    valid = a.window_valid
    valid = valid[..., None]
    assert torch.equal(a.window_buckets.masked_fill(~valid, -1), b.window_buckets.masked_fill(~valid, -1))
    assert torch.equal(a.recent_tokens, b.recent_tokens)


@pytest.mark.parametrize("ngram", [1, 2, 3, (2, 1), (1, 3, 2)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sink_tokens", [0, 2])
@pytest.mark.parametrize("window", [1, 4])
def test_memory_parallel_and_chunked_match_definition(window, sink_tokens, variant, padded, ngram):
    torch.manual_seed(21)
    t = 23
    args = window_args(variant, 4, 2, t=t)
    mask = left_padding([0, 5], t=t) if padded else None
    vocab = 6 if ngram == 1 else 3  # a small vocabulary: matches (and bucket collisions) abound
    orders = [ngram] if isinstance(ngram, int) else ngram
    token_ids = torch.randint(0, vocab, (B, t))
    common = {"window": window, "sink_tokens": sink_tokens, "key_mask": mask, "token_ids": token_ids,
              "memory_buckets": 4 * max(orders), "memory_ngram": ngram}
    expected = naive_window(**args, **common)
    close(masked(window_attention_parallel(**args, **common)[0], mask), expected)
    close(masked(window_attention_chunked(**args, **common)[0], mask), expected)
    without = naive_window(**args, window=window, sink_tokens=sink_tokens, key_mask=mask)
    assert (expected - without).abs().max() > 1e-3  # the memory changed something


@pytest.mark.parametrize("ngram", [1, 2, (2, 1)])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", [1, 5])
def test_memory_forms_agree_and_continue(window, variant, padded, heads, ngram):
    """With a memory: recurrent from the empty state = chunked prefill continued by the general loop =
    single-token steps = parallel, and every path ends in the same state (table included)."""
    torch.manual_seed(22)
    args = window_args(variant, *heads)
    mask = left_padding([0, 13]) if padded else None
    token_ids = torch.randint(0, 7 if ngram == 1 else 3, (B, T))
    common = {"window": window, "sink_tokens": 3, "memory_buckets": 5, "memory_ngram": ngram}
    expected, s_par = window_attention_parallel(**args, **common, key_mask=mask, token_ids=token_ids,
                                                output_final_state=True)
    empty = empty_window_state(B, heads[1], D, window, 3, None if variant == "window" else FEAT,
                               gated=variant == "gated", memory_buckets=5, memory_ngram=ngram)
    o_rec, s_rec = window_attention_recurrent(**args, **common, key_mask=mask, token_ids=token_ids, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    memory_state_equal(s_par, s_rec)
    for split in (2, 20):
        first, rest = slice(0, split), slice(split, T)
        _, state = window_attention_chunked(**sliced(args, first, mask), **common, token_ids=token_ids[:, first],
                                            output_final_state=True)
        o_rest, s_end = window_attention_recurrent(**sliced(args, rest, mask), **common,
                                                   token_ids=token_ids[:, rest], state=state)
        close(masked(o_rest, None if mask is None else mask[:, rest]), masked(expected, mask)[:, :, rest])
        memory_state_equal(s_end, s_rec)
    if mask is None and window > 1:  # the lean single-token step
        memory_state_equal(stepped_with_memory(args, common, token_ids, expected), s_rec)


def stepped_with_memory(args: dict, common: dict, token_ids: torch.Tensor, expected: torch.Tensor) -> DecodeState:
    """A 2-token chunked prefill continued one token per call (the lean step), each output checked against
    `expected`; -> the final state."""
    _, state = window_attention_chunked(**sliced(args, slice(0, 2), None), **common, token_ids=token_ids[:, :2],
                                        output_final_state=True)
    for i in range(2, T):
        o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None), **common,
                                              token_ids=token_ids[:, i : i + 1], state=state)
        close(o, expected[:, :, i : i + 1])
    return state


def test_longest_recall_keeps_only_the_longest_orders_key():
    """memory_recall "longest": of the keys a query's orders recall, only the longest order's (orders in any
    listed order); "all": each distinct key once, as the longest order that recalled it."""
    from linearize.ops.memory import recalled

    index = torch.tensor([[4, 9, -1], [4, 4, 4], [-1, -1, -1], [7, -1, -1]])  # orders n = 1, 3, 2
    assert recalled(index, (1, 3, 2), "longest").tolist() == [[False, True, False], [False, True, False],
                                                             [False, False, False], [True, False, False]]
    assert recalled(index, (1, 3, 2), "all").tolist() == [[True, True, False], [False, True, False],
                                                         [False, False, False], [True, False, False]]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("option, value, plain", [("memory_recall", "longest", "all"),
                                                  ("memory_bias", (1.5, -0.5), ())])
def test_memory_reading_options_forms_agree_and_continue(padded, option, value, plain):
    """memory_recall "longest" (only the longest order's key) and memory_bias (a number per order added to a
    recalled key's score): parallel = chunked = recurrent from the empty state = chunked prefill +
    single-token steps, states equal; and each changes the output."""
    torch.manual_seed(23)
    args = window_args("hybrid", 6, 2)
    mask = left_padding([0, 13]) if padded else None
    token_ids = torch.randint(0, 3, (B, T))
    common = {"window": 5, "sink_tokens": 3, "memory_buckets": 5, "memory_ngram": (2, 1), option: value}
    expected, s_par = window_attention_parallel(**args, **common, key_mask=mask, token_ids=token_ids,
                                                output_final_state=True)
    without, _ = window_attention_parallel(**args, **{**common, option: plain}, key_mask=mask, token_ids=token_ids)
    assert (masked(expected - without, mask)).abs().max() > 1e-3
    close(masked(window_attention_chunked(**args, **common, key_mask=mask, token_ids=token_ids)[0], mask),
          masked(expected, mask))
    empty = empty_window_state(B, 2, D, 5, 3, FEAT, memory_buckets=5, memory_ngram=(2, 1))
    o_rec, s_rec = window_attention_recurrent(**args, **common, key_mask=mask, token_ids=token_ids, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    memory_state_equal(s_par, s_rec)
    if mask is None:
        memory_state_equal(stepped_with_memory(args, common, token_ids, expected), s_rec)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("memory_buckets", [0, 5])
def test_far_sinks_forms_agree_and_change_only_the_farther_queries(padded, memory_buckets):
    """sink_q / sink_distance (a query beyond sink_distance scores the sinks with sink_q): parallel = chunked
    = recurrent from the empty state = chunked prefill + single-token steps, states equal; queries at real
    positions up to sink_distance give the outputs without it, every later one others."""
    torch.manual_seed(27)
    args = window_args("hybrid", 6, 2)
    mask = left_padding([0, 13]) if padded else None
    token_ids = torch.randint(0, 3, (B, T))
    far = {"sink_q": torch.randn(B, 6, T, D), "sink_distance": 9}
    common = {"window": 5, "sink_tokens": 3, "memory_buckets": memory_buckets, "memory_ngram": (2, 1),
              "memory_bias": (1.0, 0.0), "token_ids": token_ids, "key_mask": mask}
    expected, s_par = window_attention_parallel(**args, **common, **far, output_final_state=True)
    plain, _ = window_attention_parallel(**args, **common)
    positions = torch.arange(T).expand(B, T) if mask is None else mask.long().cumsum(-1) - 1
    near, beyond = positions <= 9, (positions > 9) & (torch.ones(B, T, dtype=torch.bool) if mask is None else mask)
    close(expected.transpose(1, 2)[near], plain.transpose(1, 2)[near])
    assert (expected - plain).transpose(1, 2)[beyond].abs().amax(-1).min() > 1e-4
    close(masked(window_attention_chunked(**args, **common, **far)[0], mask), masked(expected, mask))
    empty = empty_window_state(B, 2, D, 5, 3, FEAT, memory_buckets=memory_buckets, memory_ngram=(2, 1))
    o_rec, s_rec = window_attention_recurrent(**args, **common, **far, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    same_state = memory_state_equal if memory_buckets else assert_same_state
    same_state(s_par, s_rec)
    if mask is None:
        steps = {**common, "sink_distance": far["sink_distance"]}
        _, state = window_attention_chunked(**sliced(args, slice(0, 2), None),
                                            **{**steps, "token_ids": token_ids[:, :2]},
                                            sink_q=far["sink_q"][:, :, :2], output_final_state=True)
        for i in range(2, T):
            o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None),
                                                  **{**steps, "token_ids": token_ids[:, i : i + 1]},
                                                  sink_q=far["sink_q"][:, :, i : i + 1], state=state)
            close(o, expected[:, :, i : i + 1])
        same_state(state, s_rec)


def test_a_key_recalled_by_two_orders_takes_the_longer_orders_bias():
    """One token id repeated: from the first query whose both orders recall a key (t >= window + 2), the last
    1 and the last 2 tokens recall the same key, so only the bias of the longer order (2) changes the output
    there; a bias on order 1 alone changes nothing."""
    torch.manual_seed(26)
    args = window_args("hybrid", 6, 2)
    token_ids = torch.zeros(B, T, dtype=torch.long)
    common = {"window": 5, "sink_tokens": 1, "memory_buckets": 5, "memory_ngram": (2, 1)}
    plain, _ = window_attention_parallel(**args, **common, token_ids=token_ids)
    longer, _ = window_attention_parallel(**args, **common, token_ids=token_ids, memory_bias=(2.0, 0.0))
    shorter, _ = window_attention_parallel(**args, **common, token_ids=token_ids, memory_bias=(0.0, 2.0))
    both = slice(5 + 2, None)
    close(shorter[:, :, both], plain[:, :, both])
    assert (longer - plain)[:, :, both].abs().max() > 1e-3


def memory_table(state: DecodeState) -> list[torch.Tensor]:
    return [state.memory_keys, state.memory_values, state.memory_key_params, state.memory_value_params]


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("padded", [False, True])
def test_quantized_memory_forms_agree_and_continue(fmt, padded):
    """A table in bf16, int8 or int4: every form recalls the entries as the table holds them, so parallel =
    chunked = recurrent from the empty state = chunked prefill + single-token steps, states equal; and the
    format changes the output (it is applied), by little."""
    torch.manual_seed(25)
    window, heads = 4, (6, 2)
    args = window_args("gated", *heads)
    mask = left_padding([0, 13]) if padded else None
    token_ids = torch.randint(0, 3, (B, T))
    common = {"window": window, "sink_tokens": 2, "memory_buckets": 5, "memory_ngram": (2, 1)}
    expected, s_par = window_attention_parallel(**args, **common, key_mask=mask, token_ids=token_ids,
                                                output_final_state=True, memory_format=fmt)
    full, _ = window_attention_parallel(**args, **common, key_mask=mask, token_ids=token_ids)
    difference = (masked(expected, mask) - masked(full, mask)).abs().max()
    assert 0 < difference < {"bfloat16": 0.02, "int8": 0.05, "int4": 0.5}[fmt]
    o_chunked, s_chunked = window_attention_chunked(**args, **common, key_mask=mask, token_ids=token_ids,
                                                    output_final_state=True, memory_format=fmt)
    close(masked(o_chunked, mask), masked(expected, mask))
    memory_state_equal(s_par, s_chunked)
    empty = empty_window_state(B, heads[1], D, window, 2, FEAT, gated=True, memory_buckets=5, memory_ngram=(2, 1),
                               memory_format=fmt)
    o_rec, s_rec = window_attention_recurrent(**args, **common, key_mask=mask, token_ids=token_ids, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    memory_state_equal(s_par, s_rec)
    if mask is None:
        _, state = window_attention_chunked(**sliced(args, slice(0, 9), None), **common, token_ids=token_ids[:, :9],
                                            output_final_state=True, memory_format=fmt)
        for i in range(9, T):
            o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None), **common,
                                                  token_ids=token_ids[:, i : i + 1], state=state)
            close(o, expected[:, :, i : i + 1])
        memory_state_equal(state, s_rec)


def test_a_bf16_state_keeps_its_window_in_bf16_and_loses_nothing():
    """A bf16 model's window, sinks and features are kept in bf16 (half the bytes; the linear state stays
    float32): decoding on from it gives the same outputs, bit for bit, as from the same state widened to
    float32, since every stored number came in as bf16."""
    torch.manual_seed(28)
    args = {name: x.bfloat16() for name, x in window_args("gated", 6, 2).items()}
    token_ids = torch.randint(0, 3, (B, T))
    common = {"window": 4, "sink_tokens": 2, "memory_buckets": 5, "memory_ngram": (2, 1)}
    _, state = window_attention_chunked(**sliced(args, slice(0, 20), None), **common, token_ids=token_ids[:, :20],
                                        output_final_state=True)
    assert state.window_keys.dtype == state.window_features.dtype == state.sink_keys.dtype == torch.bfloat16
    assert state.recurrent.dtype == torch.float32
    wide = state.map_batch(lambda t: t.float() if t.dtype == torch.bfloat16 else t.clone())
    assert state.nbytes() < wide.nbytes()
    for i in range(20, T):
        step = {"token_ids": token_ids[:, i : i + 1], **sliced(args, slice(i, i + 1), None), **common}
        (o, state), (o_wide, wide) = (window_attention_recurrent(**step, state=state),
                                      window_attention_recurrent(**step, state=wide))
        assert torch.equal(o, o_wide)
    assert state.window_keys.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_rows_round_trip_within_a_step(fmt):
    torch.manual_seed(26)
    x = torch.randn(3, 5, 16) * torch.rand(3, 5, 1) * 10
    codes, params = memory.encode(x, fmt)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (8 if fmt == "int4" else 16)
    step = (x.amax(-1) - x.amin(-1)) / memory.LEVELS[fmt]
    error = (memory.decode(codes, params, fmt) - x).abs().amax(-1)
    assert (error <= step * 0.51 + x.abs().amax(-1) / 256).all()  # half a step, plus bf16's rounding of the params
    y = x.clone().requires_grad_()
    memory.round_trip(y, fmt).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(x))  # straight through


def test_memory_format_auto_is_the_full_precision_path():
    """Quantization off: the same output, bit for bit, as without the argument, and a table of the keys'
    own values."""
    torch.manual_seed(27)
    args = window_args("hybrid", 6, 2)
    token_ids = torch.randint(0, 3, (B, T))
    common = {"window": 4, "sink_tokens": 2, "memory_buckets": 5, "memory_ngram": (2, 1), "token_ids": token_ids,
              "output_final_state": True}
    o, state = window_attention_chunked(**args, **common)
    o_auto, state_auto = window_attention_chunked(**args, **common, memory_format="auto")
    assert torch.equal(o, o_auto) and torch.equal(state.memory_keys, state_auto.memory_keys)
    assert state_auto.memory_key_params is None and state_auto.memory_keys.dtype == torch.float32


def test_memory_copies_beyond_the_window():
    """A key far outside the window is recalled by token: with keys that match the query strongly, the
    output at the repeat is (almost) the value stored after the first occurrence."""
    torch.manual_seed(23)
    t, window = 40, 4
    token_ids = torch.arange(100, 100 + t)[None]
    token_ids[0, 30] = token_ids[0, 5]  # token 5 again at 30: its memory key is 6, the token after it
    q, k, v = torch.randn(1, 1, t, D), torch.randn(1, 1, t, D), torch.randn(1, 1, t, D)
    k[0, 0, 6] = q[0, 0, 30] * 4
    common = {"window": window, "token_ids": token_ids, "memory_buckets": 64}
    o, _ = window_attention_chunked(q, k, v, **common)
    close(o[0, 0, 30], v[0, 0, 6], tol=1e-3)
    o_without, _ = window_attention_chunked(q, k, v, window=window)
    assert (o_without[0, 0, 30] - v[0, 0, 6]).abs().max() > 0.1


def test_memory_needs_token_ids():
    args = window_args("window", 2, 2)
    with pytest.raises(ValueError, match="token ids"):
        window_attention_chunked(**args, window=4, memory_buckets=8)


def test_a_decoding_step_compiled_without_our_step_still_writes_the_memory():
    """Only `caller_writes_memory` moves the table write out of the step: a graph someone else compiles
    writes the table itself, as eager does."""
    torch.manual_seed(24)
    t, window = 12, 3
    token_ids = torch.randint(0, 6, (1, t + 1))
    q, k, v = torch.randn(1, 1, t + 1, D), torch.randn(1, 1, t + 1, D), torch.randn(1, 1, t + 1, D)
    common = {"window": window, "memory_buckets": 8, "memory_ngram": (1, 2)}
    _, state = window_attention_chunked(q[:, :, :t], k[:, :, :t], v[:, :, :t], **common, token_ids=token_ids[:, :t],
                                        output_final_state=True)

    def step(state):
        return window_attention_recurrent(q[:, :, t:], k[:, :, t:], v[:, :, t:], **common,
                                          token_ids=token_ids[:, t:], state=state)

    eager_state, compiled_state = state.map_batch(torch.clone), state.map_batch(torch.clone)
    o_eager, _ = step(eager_state)
    o_compiled, _ = torch.compile(step, dynamic=False)(compiled_state)
    close(o_compiled, o_eager, tol=1e-5)
    assert not torch.equal(eager_state.memory_position, state.memory_position)  # the step stored a key
    assert torch.equal(compiled_state.memory_position, eager_state.memory_position)
    close(compiled_state.memory_keys, eager_state.memory_keys, tol=0)
