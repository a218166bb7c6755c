"""Recall memory: one more softmax key per query, found by token identity in a table of constant size.

A window with sinks cannot copy a token it saw more than `window` tokens ago, and a linear state of a few
hundred feature dimensions cannot single out one of hundreds of old keys (bench/recall.py measures why).
What a copying (induction) head of the teacher looks for is known, though: the key just after an earlier
occurrence of what the query is reading. The memory keeps, for each of `buckets` hash buckets of n-grams
(the last `ngram` token ids), the key and value of the most recent token (already out of the window) that
*followed* an n-gram hashing there; a query adds the entry of the n-gram ending at its own token to its
softmax keys, weighted by the teacher's own q.k like any window key. Constant size (buckets x 2 x head_dim
per key/value head), constant work per token, no new parameters; where the teacher does not want the
entry, its q.k gives it little weight.

    query t's extra key: the most recent key j <= t - window, j not a sink, with
    hash(token[j - n .. j - 1]) == hash(token[t - n + 1 .. t]) (none if there is no such key or the bucket
    was overwritten by a later one); n = `ngram`

Buckets: for n = 1, (id * 2654435761) mod `buckets` (Knuth's multiplicative hash); for longer n-grams the
ids are folded into one 31-bit number first. Two n-grams that collide share an entry, the more recent one
wins. A key is stored only when its n preceding tokens are all real (not padding, not before the row).
Bigrams (n = 2) recall better than single tokens on code, where single tokens repeat too often
(README, "What we tried").
"""

from __future__ import annotations

import torch

HASH_MULTIPLIER = 2654435761
FOLD = 1 << 31  # n-gram ids are folded modulo 2^31, so every product stays inside int64


def bucket_of(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    return (ids.long().clamp(min=0) * HASH_MULTIPLIER) % buckets


def ngram_buckets(grams: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket of each n-gram [..., n] of token ids (-1: no token there; it hashes like no other id)."""
    if grams.shape[-1] == 1:
        return bucket_of(grams[..., 0], buckets)
    folded = torch.zeros_like(grams[..., 0])
    for i in range(grams.shape[-1]):
        folded = (folded * HASH_MULTIPLIER + grams[..., i] + 1) % FOLD
    return (folded * HASH_MULTIPLIER) % buckets


def key_buckets(
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    sink_tokens: int,
    buckets: int,
    recent: torch.Tensor | None = None,
    ngram: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (query bucket [B, T]: the bucket of the n-gram ending at each token; key bucket [B, T]: the bucket
    of the n-gram just before each key, -1 where the key is never stored: padding, sinks, a key without n
    real tokens before it, so a window slot that is not a real token always holds -1; the last n ids [B, n],
    for the next call). `recent` [B, n]: the n ids before this call's first token (-1: none, or padding),
    when continuing from a state; n = `ngram`."""
    batch = token_ids.shape[0]
    if recent is None:
        recent = torch.full((batch, ngram), -1, dtype=torch.long, device=token_ids.device)
    context = torch.cat([recent.long(), torch.where(mask, token_ids.long(), -1)], dim=1)  # [B, n + T]
    grams = context.unfold(1, ngram, 1)  # [B, T + 1, n]: entry i is the n-gram before token i
    storable = mask & (grams[:, :-1] >= 0).all(-1) & (positions >= sink_tokens)
    key_bucket = torch.where(storable, ngram_buckets(grams[:, :-1], buckets), -1)
    return ngram_buckets(grams[:, 1:], buckets), key_bucket, context[:, -ngram:]


def lookup(query_bucket: torch.Tensor, key_bucket: torch.Tensor, window: int, buckets: int) -> torch.Tensor:
    """For a fresh sequence: index [B, T] of query t's memory key (the most recent j <= t - window with
    key_bucket[j] == query_bucket[t]; -1: none). One sort and a binary search: O(T log T)."""
    batch, t = key_bucket.shape
    index = torch.arange(t, device=key_bucket.device)
    slots = buckets + 1  # bucket b sorts in slot b + 1 of its row
    row = torch.arange(batch, device=key_bucket.device)[:, None] * slots
    keys = ((row + key_bucket + 1) * t + index).flatten()  # bucket -1 (never stored) gets slot 0
    keys, _ = keys.sort()
    limit = index - window  # [T]
    wanted = (row + query_bucket + 1) * t + limit.clamp(min=0)
    found = torch.searchsorted(keys, wanted.flatten(), right=True).view(batch, t) - 1
    candidate = keys[found.clamp(min=0)]
    ok = (found >= 0) & (candidate // t == wanted // t) & (limit >= 0)
    return torch.where(ok, candidate % t, -1)


def final_table(k: torch.Tensor, v: torch.Tensor, key_bucket: torch.Tensor, window: int, buckets: int):
    """The memory after a fresh sequence (for decoding on from it): per bucket the most recent key that has
    left the window (j <= T - window). -> keys, values [B, Hk, buckets, D], valid [B, buckets]."""
    batch, kv_heads, t, head_dim = k.shape
    index = torch.arange(t, device=k.device).expand(batch, t)
    stored = (key_bucket >= 0) & (index <= t - window)
    latest = torch.full((batch, buckets + 1), -1, dtype=torch.long, device=k.device)
    slot = torch.where(stored, key_bucket, buckets)  # slot `buckets` collects the rest
    latest = latest.scatter_reduce(1, slot, index, reduce="amax")[:, :buckets]
    valid = latest >= 0
    gather = latest.clamp(min=0)[:, None, :, None].expand(batch, kv_heads, buckets, head_dim)
    keep = valid[:, None, :, None]
    return k.gather(2, gather) * keep, v.gather(2, gather) * keep, valid


def empty_table(batch: int, kv_heads: int, buckets: int, head_dim: int, device=None):
    keys = torch.zeros(batch, kv_heads, buckets, head_dim, device=device)
    return keys, keys.clone(), torch.zeros(batch, buckets, dtype=torch.bool, device=device)


def read(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, bucket: torch.Tensor):
    """One query per row: the entry of `bucket` [B] -> key, value [B, Hk, 1, D], valid [B]."""
    batch, kv_heads, _, head_dim = keys.shape
    at = bucket[:, None, None, None].expand(batch, kv_heads, 1, head_dim)
    return keys.gather(2, at), values.gather(2, at), valid.gather(1, bucket[:, None])[:, 0]


def write_(keys, values, valid, bucket: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """In place: rows with bucket >= 0 store key, value [B, Hk, 1, D] at it (other rows keep theirs)."""
    batch, kv_heads, _, head_dim = keys.shape
    store = bucket >= 0
    slot = bucket.clamp(min=0)
    at = slot[:, None, None, None].expand(batch, kv_heads, 1, head_dim)
    keep = store[:, None, None, None]
    keys.scatter_(2, at, torch.where(keep, key, keys.gather(2, at)))
    values.scatter_(2, at, torch.where(keep, value, values.gather(2, at)))
    valid.scatter_(1, slot[:, None], (store | valid.gather(1, slot[:, None])[:, 0])[:, None])
