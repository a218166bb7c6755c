"""Recall memory: one more softmax key per query, found by token identity in a table of constant size.

A window with sinks cannot copy a token it saw more than `window` tokens ago, and a linear state of a few
hundred feature dimensions cannot single out one of hundreds of old keys (bench/recall.py measures why).
What a copying (induction) head of the teacher looks for is known, though: the key just after an earlier
occurrence of the query's own token. The memory keeps, for each of `buckets` hash buckets of token ids,
the key and value of the most recent token (already out of the window) whose *previous* token hashed
there; a query adds the entry of its own token's bucket to its softmax keys, weighted by the teacher's own
q.k like any window key. Constant size (buckets x 2 x head_dim per key/value head), constant work per
token, no new parameters; where the teacher does not want the entry, its q.k gives it little weight.

    query t's extra key: the most recent key j <= t - window, j not a sink, with hash(token[j - 1]) ==
    hash(token[t]) (none if there is no such key or the bucket was overwritten by a later one)

Buckets: (id * 2654435761) mod `buckets` (Knuth's multiplicative hash); two tokens that collide share an
entry, the more recent one wins.
"""

from __future__ import annotations

import torch

HASH_MULTIPLIER = 2654435761


def bucket_of(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    return (ids.long().clamp(min=0) * HASH_MULTIPLIER) % buckets


def key_buckets(
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    sink_tokens: int,
    buckets: int,
    last_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query bucket [B, T]: each token's own bucket; key bucket [B, T]: the bucket of the token before
    each key, -1 where the key is never stored: padding, sinks, a row's first token; a window slot that
    is not a real token therefore always holds -1). `last_token` [B]: the id of the token before this
    call's first one (-1: none), when continuing from a state."""
    batch = token_ids.shape[0]
    before = torch.full((batch, 1), -1, dtype=torch.long, device=token_ids.device)
    if last_token is not None:
        before = last_token.long()[:, None]
    previous = torch.cat([before, token_ids[:, :-1].long()], dim=1)
    previous_real = torch.cat([before >= 0, mask[:, :-1]], dim=1)
    storable = mask & previous_real & (positions >= sink_tokens)
    return bucket_of(token_ids, buckets), torch.where(storable, bucket_of(previous, buckets), -1)


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
