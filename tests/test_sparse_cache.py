"""The sparse cache (exact keys kept beyond the window, `linearize.ops.sparse`): its three forms agree, its
updates replayed from their definition equal the chunked scan's, it keeps what its score says it keeps, and
with room for every key it is exact softmax attention."""

import pytest
import torch
from test_ops import (
    FEAT,
    HEADS,
    B,
    D,
    T,
    assert_same_state,
    causal_softmax,
    close,
    left_padding,
    masked,
    sliced,
    window_args,
)

from linearize.ops import (
    empty_window_state,
    sparse,
    window_attention_chunked,
    window_attention_parallel,
    window_attention_recurrent,
)
from linearize.ops.window.parallel import sparse_updates

SCORES = [("window", "recency"), ("hybrid", "recency"), ("hybrid", "recall-error"), ("gated", "recall-error")]


def same_sparse_state(a, b) -> None:
    assert_same_state(a, b)
    assert torch.equal(a.sparse_position, b.sparse_position)
    held = (a.sparse_position >= 0)[..., None]
    for name in ("sparse_keys", "sparse_values", "sparse_features"):
        if getattr(a, name) is not None:
            close(getattr(a, name) * held, getattr(b, name) * held)
    if a.sparse_log_decay is not None:
        close(a.sparse_log_decay * held[..., 0], b.sparse_log_decay * held[..., 0])


def empty_for(variant: str, kv_heads: int, window: int, sink_tokens: int, size: int, **extra):
    return empty_window_state(B, kv_heads, D, window, sink_tokens, None if variant == "window" else FEAT,
                              gated=variant == "gated", sparse_keys=size, **extra)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant,score", SCORES)
@pytest.mark.parametrize("window,size", [(3, 2), (5, 4)])
def test_sparse_forms_agree_and_continue(window, size, variant, score, padded, heads):
    """Parallel (updates replayed from the definition) = chunked = recurrent from the empty state = a chunked
    prefill continued by the recurrent form = single-token steps; every path ends in the same state."""
    torch.manual_seed(31)
    args = window_args(variant, *heads)
    mask = left_padding([0, 13]) if padded else None
    common = {"window": window, "sink_tokens": 2, "sparse_keys": size, "sparse_score": score}
    expected, s_par = window_attention_parallel(**args, **common, key_mask=mask, output_final_state=True)
    o_chunk, s_chunk = window_attention_chunked(**args, **common, key_mask=mask, output_final_state=True)
    close(masked(o_chunk, mask), masked(expected, mask))
    same_sparse_state(s_chunk, s_par)
    empty = empty_for(variant, heads[1], window, 2, size)
    o_rec, s_rec = window_attention_recurrent(**args, **common, key_mask=mask, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    same_sparse_state(s_rec, s_par)
    for split in (4, 17):
        first, rest = slice(0, split), slice(split, T)
        _, state = window_attention_chunked(**sliced(args, first, mask), **common, output_final_state=True)
        o_rest, s_end = window_attention_recurrent(**sliced(args, rest, mask), **common, state=state)
        close(masked(o_rest, None if mask is None else mask[:, rest]), masked(expected, mask)[:, :, rest])
        same_sparse_state(s_end, s_par)
    if mask is None:  # the lean single-token step
        state = empty
        for i in range(T):
            o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None), **common, state=state)
            close(o, expected[:, :, i : i + 1])
        same_sparse_state(state, s_par)
    without = window_attention_parallel(**args, window=window, sink_tokens=2, key_mask=mask)[0]
    assert (masked(expected - without, mask)).abs().max() > 1e-3  # the cache changed something


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant,score", SCORES)
def test_chunked_updates_equal_the_updates_replayed_from_their_definition(variant, score, padded):
    torch.manual_seed(32)
    window, size, kv_heads = 4, 3, 2
    args = window_args(variant, 4, kv_heads, t=45)
    mask = left_padding([0, 7], t=45) if padded else None
    valid = torch.ones(B, 45, dtype=torch.bool) if mask is None else mask
    positions = valid.long().cumsum(-1) - 1
    positions = positions.masked_fill(~valid, -1)
    eligible = (valid & (positions >= 1))[:, None].expand(B, kv_heads, 45)  # one sink
    fk, v = args.get("fk"), args["v"]
    total = None if "log_gate" not in args else args["log_gate"].cumsum(-1)
    replayed = sparse_updates(score, fk, v, total, eligible, positions, window, size)
    # the chunked scan reads rows moved to start at index 0
    order = (~valid).long().argsort(dim=-1, stable=True)

    def first(x):
        return None if x is None else x.gather(2, order[:, None, :, None].expand_as(x) if x.dim() == 4
                                               else order[:, None].expand_as(x))

    scanned = sparse.chunk_updates(score, first(fk), first(v), first(total), first(eligible), window, size)
    assert torch.equal(scanned, replayed)
    assert (replayed >= 0).any() and (replayed[..., -1, :] >= 0).all()  # full caches by the end


@pytest.mark.parametrize("variant,score", SCORES)
def test_a_sparse_cache_with_room_for_every_key_is_causal_softmax(variant, score):
    """size >= T: no key ever leaves the exact keys, so window + pending + cache = every earlier key."""
    torch.manual_seed(33)
    args = window_args(variant, 6, 2)
    expected = causal_softmax(args["q"], args["k"], args["v"])
    for form in (window_attention_parallel, window_attention_chunked):
        o, _ = form(**args, window=4, sparse_keys=T, sparse_score=score)
        close(o, expected)
    empty = empty_for(variant, 2, 4, 0, T)
    close(window_attention_recurrent(**args, window=4, sparse_keys=T, sparse_score=score, state=empty)[0], expected)


def test_recall_error_keeps_the_key_the_state_cannot_recall_and_recency_does_not():
    """Repeated filler (one key/value pair said over and over) and one needle early on: the linear state
    recalls the filler from its many copies, so the recall error keeps the needle to the end; recency
    keeps only the latest filler."""
    torch.manual_seed(34)
    t, window, size = 120, 4, 3
    filler_k, filler_v, needle_k, needle_v = torch.randn(4, D)
    k = filler_k.expand(1, 1, t, D).clone()
    v = filler_v.expand(1, 1, t, D).clone()
    k[:, :, 10], v[:, :, 10] = needle_k, needle_v
    fk = torch.nn.functional.softmax(k @ torch.randn(D, FEAT), dim=-1)
    q = torch.randn(1, 1, t, D)
    kept = {}
    for score in ("recall-error", "recency"):
        _, state = window_attention_chunked(q, k, v, window, fq=fk, fk=fk, sparse_keys=size, sparse_score=score,
                                            output_final_state=True)
        kept[score] = state.sparse_position[0, 0, :size].tolist()
    assert 10 in kept["recall-error"]
    assert 10 not in kept["recency"] and min(kept["recency"]) > t - 3 * window


@pytest.mark.parametrize("padded", [False, True])
def test_heads_without_a_sparse_cache_are_the_plain_op(padded):
    torch.manual_seed(35)
    args = window_args("gated", 6, 3)
    mask = left_padding([0, 11]) if padded else None
    common = {"window": 5, "sink_tokens": 2, "key_mask": mask}
    plain = window_attention_chunked(**args, **common)[0]
    heads = torch.tensor([False, True, False])
    kv_of = torch.arange(6) // 2
    for form in (window_attention_parallel, window_attention_chunked):
        o = form(**args, **common, sparse_keys=3, sparse_heads=(1,))[0]
        close(masked(o, mask)[:, ~heads[kv_of]], masked(plain, mask)[:, ~heads[kv_of]])
        assert masked(o - plain, mask)[:, heads[kv_of]].abs().max() > 1e-3
    # the state keeps the one head's cache; decoding goes on from it
    expected = window_attention_parallel(**args, **common, sparse_keys=3, sparse_heads=(1,))[0]
    _, state = window_attention_chunked(**sliced(args, slice(0, 20), mask), window=5, sink_tokens=2, sparse_keys=3,
                                        sparse_heads=(1,), output_final_state=True)
    assert state.sparse_keys.shape[1] == 1 and state.sparse_position.shape[1] == 1
    rest = {**common, "key_mask": None}
    for i in range(20, T):
        o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None), **rest, sparse_keys=3,
                                              sparse_heads=(1,), state=state)
        close(o, expected[:, :, i : i + 1])


def test_a_left_padded_row_keeps_what_it_keeps_alone():
    torch.manual_seed(36)
    args = window_args("gated", 4, 2)
    mask = left_padding([0, 9])
    common = {"window": 4, "sink_tokens": 1, "sparse_keys": 3}
    o, state = window_attention_chunked(**args, **common, key_mask=mask, output_final_state=True)
    alone = {name: value[1:, :, 9:] for name, value in args.items()}
    o_alone, s_alone = window_attention_chunked(**alone, **common, output_final_state=True)
    close(o[1:, :, 9:], o_alone)
    assert torch.equal(state.sparse_position[1:], s_alone.sparse_position)


@pytest.mark.parametrize("sparse_heads", [None, (1,)])
@pytest.mark.parametrize("padded", [False, True])
def test_sparse_cache_and_recall_memory_count_a_key_once_in_every_form(padded, sparse_heads):
    """A recalled memory key that the sparse cache (or its pending group) holds is read there only; with a
    cache in some heads, the others read it from the memory as they would without one."""
    torch.manual_seed(37)
    args = window_args("hybrid", 4, 2)
    mask = left_padding([0, 13]) if padded else None
    token_ids = torch.randint(0, 3, (B, T))
    common = {"window": 4, "sink_tokens": 2, "sparse_keys": 3, "memory_buckets": 5, "memory_ngram": (1, 2),
              "token_ids": token_ids, "key_mask": mask, "sparse_heads": sparse_heads}
    expected, s_par = window_attention_parallel(**args, **common, output_final_state=True)
    close(masked(window_attention_chunked(**args, **common)[0], mask), masked(expected, mask))
    empty = empty_for("hybrid", 2, 4, 2, 3, memory_buckets=5, memory_ngram=(1, 2), sparse_heads=sparse_heads)
    o_rec, s_rec = window_attention_recurrent(**args, **common, state=empty)
    close(masked(o_rec, mask), masked(expected, mask))
    same_sparse_state(s_rec, s_par)
    # a chunked prefill of left-padded rows (its memory's last token ids as the rows lie), then one token a call
    prefill = {**common, "token_ids": token_ids[:, :15], "key_mask": None if mask is None else mask[:, :15]}
    _, state = window_attention_chunked(**sliced(args, slice(0, 15), None), **prefill, output_final_state=True)
    for i in range(15, T):
        step = {**common, "token_ids": token_ids[:, i : i + 1], "key_mask": None}
        o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), None), **step, state=state)
        close(o, expected[:, :, i : i + 1])
    same_sparse_state(state, s_par)


@pytest.mark.parametrize("sparse_heads", [None, (1,)])
def test_sparse_chunked_gradients_match_parallel(sparse_heads):
    torch.manual_seed(38)
    args = {name: value.requires_grad_() for name, value in window_args("gated", 4, 2).items()}
    common = {"window": 4, "sink_tokens": 1, "sparse_keys": 3, "sparse_heads": sparse_heads}
    grads = []
    for form in (window_attention_parallel, window_attention_chunked):
        out = form(**args, **common)[0]
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, D)).sum(), list(args.values())))
    for a, b in zip(*grads):
        close(a, b, tol=1e-4)


def test_sparse_cache_refuses_a_score_it_cannot_compute():
    args = window_args("window", 4, 2)
    with pytest.raises(ValueError, match="recency"):
        window_attention_chunked(**args, window=4, sparse_keys=2, sparse_score="recall-error")
