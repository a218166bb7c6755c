"""Recall memory: a few more softmax keys per query, found by token identity in a table of constant size.

A window with sinks cannot copy a token it saw more than `window` tokens ago, and a linear state of a few
hundred feature dimensions cannot single out one of hundreds of old keys (bench/recall.py measures why).
What a copying (induction) head of the teacher looks for is known, though: the key just after an earlier
occurrence of what the query is reading. The memory keeps, for each n-gram order n in `ngram` (e.g. (2, 1):
the last two token ids, and the last one) and each of `buckets` hash buckets of such n-grams, the key and
value of the most recent token (already out of the window) that *followed* an n-gram hashing there; a query
adds the entry of the n-gram ending at its own token, one per order, to its softmax keys, weighted by the
teacher's own q.k like any window key. A token recalled by two orders is one key, counted once (as the
longest order's). Constant size (orders x buckets x 2 x head_dim per key/value head), constant work per
token, no new parameters; where the teacher does not want an entry, its q.k gives it little weight.
`memory_bias` (one number per order, 0: none) adds to a recalled key's score: a prior that a key found
by a long match is wanted, where the teacher found it among thousands of keys and q.k alone, against a
window of recent keys, under-weighs it (docs/results.md: a passkey's first token).

    query t's extra key of order n: the most recent key j <= t - window, j not a sink, with
    hash(token[j - n .. j - 1]) == hash(token[t - n + 1 .. t]) (none if there is no such key or the bucket
    was overwritten by a later one)

Buckets: the n ids are folded into one 31-bit number, f = sum_i (id_i + 1) M^(n - 1 - i) mod 2^31 (a single
token: f = id), then hashed, (f M) mod `buckets` (M = 2654435761: Knuth's multiplicative hash). Two n-grams
that collide share an entry, the more recent one wins. Order i of the list owns table rows
[i * buckets, (i + 1) * buckets). A key is stored under an order only when its n preceding tokens are all
real (not padding, not before the row). Bigrams recall better than single tokens on code, where single
tokens repeat too often; the last 1, 2, 3 and 4 tokens together better than any one (docs/results.md, "What we
tried").

Table formats (`memory_format`): "auto" keeps entries in the keys' own dtype; "bfloat16" in bf16; "int8" and
"int4" quantize each stored key and value row (one head's D numbers) to 256 or 16 levels between its own
minimum and maximum (asymmetric, a step and an offset per row in bf16, as KIVI and transformers' quantized
caches quantize per token), int4 packing two codes in a byte. The fresh-sequence forms recall through the
same round trip (`round_trip`, straight-through gradient), so perplexity, training and decoding all see the
entries a decoding table holds. Library quantizers (quanto, HQQ) quantize whole tensors; the table is
written one row at a time in place, so the few lines below do it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import torch.nn.functional as F

FORMATS = ("auto", "bfloat16", "int8", "int4")
LEVELS = {"int8": 255, "int4": 15}
HASH_MULTIPLIER = 2654435761
FOLD = 1 << 31  # n-gram ids are folded modulo 2^31, so every product stays inside int64


def orders(ngram: int | Sequence[int]) -> tuple[int, ...]:
    """The n-gram orders of a memory: one key per query for each (an int is a single order)."""
    return (ngram,) if isinstance(ngram, int) else tuple(ngram)


@cache  # built once per set of orders and device, not at every decoding step
def fold_weights(grams_of: tuple[int, ...], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold of each order as sum_j id_j w[n, j] + shift[n] mod 2^31 over the last n_max ids: w [K, n_max] is
    HASH_MULTIPLIER^(n_max - 1 - j) mod 2^31 on the order's last n ids, 0 before them; shift [K] is the
    sum of its weights (the + 1 per id), 0 for a single token."""
    longest = max(grams_of)
    powers = [pow(HASH_MULTIPLIER, longest - 1 - j, FOLD) for j in range(longest)]
    weights = [[p if j >= longest - n else 0 for j, p in enumerate(powers)] for n in grams_of]
    shift = [sum(row) % FOLD if n > 1 else 0 for n, row in zip(grams_of, weights)]
    return torch.tensor(weights, dtype=torch.long, device=device), torch.tensor(shift, dtype=torch.long, device=device)


def encode(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., D] -> (codes [..., D] uint8, or [..., D / 2] for int4: two codes per byte, the even
    element's in the low half; params [..., 2] bf16: step and offset, x ~ code * step + offset)."""
    levels = LEVELS[fmt]
    x = x.float()
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    params = torch.cat([(high - low) / levels, low], dim=-1).to(torch.bfloat16)
    step, offset = params.float().unbind(-1)
    codes = ((x - offset[..., None]) / step.clamp(min=1e-30)[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    if fmt == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, params


def decode(codes: torch.Tensor, params: torch.Tensor, fmt: str) -> torch.Tensor:
    """`encode`'s rows back, float32 [..., D]."""
    if fmt == "int4":
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    step, offset = params.float().unbind(-1)
    return codes.float() * step[..., None] + offset[..., None]


def round_trip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x as a table in format `fmt` gives it back (x itself for "auto"); the gradient passes straight through."""
    if fmt == "auto":
        return x
    y = x.to(torch.bfloat16).to(x.dtype) if fmt == "bfloat16" else decode(*encode(x, fmt), fmt).to(x.dtype)
    return x + (y - x).detach() if x.requires_grad else y


def stored_format(table: torch.Tensor, params: torch.Tensor | None, head_dim: int) -> str:
    """The format of a decoding table: "auto" (entries as they are), "int8" or "int4" (codes + params)."""
    if params is None:
        return "auto"
    return "int4" if table.shape[-1] < head_dim else "int8"


def key_buckets(
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    sink_tokens: int,
    buckets: int,
    recent: torch.Tensor | None = None,
    ngram: int | Sequence[int] = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (query bucket [B, T, K]: the table row of the n-gram ending at each token, one per order; key
    bucket [B, T, K]: the row of the n-gram just before each key, -1 where the key is never stored under that
    order: padding, sinks, a key without n real tokens before it, so a window slot that is not a real token
    always holds -1; the last n_max ids [B, n_max], for the next call). `recent` [B, n_max]: the ids before
    this call's first token (-1: none, or padding), when continuing from a state. Every order at once: the
    same few ops for a decoding step whatever the orders."""
    grams_of = orders(ngram)
    longest = max(grams_of)
    if recent is None:
        recent = torch.full((token_ids.shape[0], longest), -1, dtype=torch.long, device=token_ids.device)
    context = torch.cat([recent.long(), torch.where(mask, token_ids.long(), -1)], dim=1)  # [B, n_max + T]
    before = context.unfold(1, longest, 1)  # [B, T + 1, n_max]: entry j holds the n_max ids before token j
    # traced by torch.compile, built in the graph (constants) rather than read from the functools cache
    fold = fold_weights.__wrapped__ if torch.compiler.is_compiling() else fold_weights
    weights, shift = fold(grams_of, context.device)
    folded = ((before[..., None, :] * weights).sum(-1) + shift) % FOLD  # [B, T + 1, K]
    offset = torch.arange(len(grams_of), device=context.device) * buckets  # order i owns rows i * buckets + ...
    bucket = (folded * HASH_MULTIPLIER) % buckets + offset
    real = (before >= 0).flip(-1).cumprod(-1)[..., [n - 1 for n in grams_of]].bool()  # its n ids all real
    storable = real[:, :-1] & (mask & (positions >= sink_tokens))[..., None]
    return bucket[:, 1:], torch.where(storable, bucket[:, :-1], -1), context[:, -longest:]


def first_of_equal(index: torch.Tensor, grams: Sequence[int] = ()) -> torch.Tensor:
    """[..., K] indices of recalled keys (-1: none) -> [..., K] bool: a key to use, each key once: where
    several orders recall one key, the longest order's entry (`grams`: each order's n; without them, the
    first entry), so a per-order `memory_bias` gives it the longest match's bias."""
    orders_ = index.shape[-1]
    if grams:
        size = torch.tensor(grams, device=index.device)
        preferred = size[None, :] > size[:, None]  # [i, j]: order j is longer than order i
    else:
        preferred = torch.ones(orders_, orders_, dtype=torch.bool, device=index.device).tril(-1)  # j < i
    repeated = ((index[..., :, None] == index[..., None, :]) & preferred).any(-1)
    return (index >= 0) & ~repeated


def bias_of(scores: torch.Tensor, memory_bias: Sequence[float], width: int | None = None) -> torch.Tensor:
    """`memory_bias` (one number per order) as a row to add to `scores` [..., width]: the orders' biases
    first, zeros after them (the window's keys, where a row holds both); width defaults to the orders'."""
    bias = torch.tensor(memory_bias, dtype=scores.dtype, device=scores.device)
    return bias if width is None else F.pad(bias, (0, width - len(memory_bias)))


RECALLS = ("all", "longest")


def recalled(index: torch.Tensor, grams: Sequence[int] = (), select: str = "all") -> torch.Tensor:
    """[..., K] indices of recalled keys per order (-1: none) -> [..., K] bool: the keys to use. "all": every
    order's key, each key once (`first_of_equal`); "longest": only the key recalled by the longest order
    that recalled one (`grams`: each order's n), as a back-off n-gram model uses its longest matching context."""
    if select == "all":
        return first_of_equal(index, grams)
    found = index >= 0
    size = torch.tensor(grams, device=index.device)
    best = torch.where(found, size, 0).argmax(-1, keepdim=True)
    return found & (torch.arange(index.shape[-1], device=index.device) == best)


def lookup(query_bucket: torch.Tensor, key_bucket: torch.Tensor, window: int, table_size: int,
           grams: Sequence[int] = (), select: str = "all") -> torch.Tensor:
    """For a fresh sequence: index [B, T, K] of query t's memory key per order (the most recent
    j <= t - window with key_bucket[j, k] == query_bucket[t, k]; -1: none, or not used: `recalled`). One sort
    and a binary search: O(K T log(K T))."""
    batch, t, orders_ = key_bucket.shape
    index = torch.arange(t, device=key_bucket.device)[:, None]  # [T, 1]
    slots = table_size + 1  # table row b sorts in slot b + 1 of its batch row
    row = torch.arange(batch, device=key_bucket.device)[:, None, None] * slots
    keys = ((row + key_bucket + 1) * t + index).flatten()  # bucket -1 (never stored) gets slot 0
    keys, _ = keys.sort()
    limit = index - window  # [T, 1]
    wanted = (row + query_bucket + 1) * t + limit.clamp(min=0)
    found = torch.searchsorted(keys, wanted.flatten(), right=True).view(batch, t, orders_) - 1
    candidate = keys[found.clamp(min=0)]
    ok = (found >= 0) & (candidate // t == wanted // t) & (limit >= 0)
    index = torch.where(ok, candidate % t, -1)
    return torch.where(recalled(index, grams, select), index, -1)


def final_table(k: torch.Tensor, v: torch.Tensor, key_bucket: torch.Tensor, positions: torch.Tensor, window: int,
                table_size: int, dtype: torch.dtype | None = None, fmt: str = "auto"):
    """The memory after a fresh sequence (for decoding on from it): per table row the most recent key that
    has left the window (j <= T - window). -> keys, values [B, Hk, M, D] (in `dtype`, default k's; bf16 for
    "bfloat16"; codes for "int8" / "int4"), position [B, M] (the stored key's real position in its row, -1:
    empty), key and value params [B, Hk, M, 2] (None unless quantized), M = `table_size`."""
    batch, kv_heads, t, head_dim = k.shape
    index = torch.arange(t, device=k.device)[None, :, None].expand_as(key_bucket)
    stored = (key_bucket >= 0) & (index <= t - window)
    slot = torch.where(stored, key_bucket, table_size).flatten(1)  # slot `table_size` collects the rest
    latest = torch.full((batch, table_size + 1), -1, dtype=torch.long, device=k.device)
    latest = latest.scatter_reduce(1, slot, index.flatten(1), reduce="amax")[:, :table_size]
    found = latest >= 0
    at = latest.clamp(min=0)
    gather = at[:, None, :, None].expand(batch, kv_heads, table_size, head_dim)
    keep = found[:, None, :, None]
    position = torch.where(found, positions.gather(1, at), -1)
    keys, values = k.gather(2, gather) * keep, v.gather(2, gather) * keep
    if fmt in LEVELS:
        (keys, key_params), (values, value_params) = encode(keys, fmt), encode(values, fmt)
        return keys, values, position, key_params, value_params
    dtype = torch.bfloat16 if fmt == "bfloat16" else dtype or k.dtype
    return keys.to(dtype), values.to(dtype), position, None, None


def empty_table(batch: int, kv_heads: int, table_size: int, head_dim: int, device=None, fmt: str = "auto"):
    """An empty memory: keys, values, position (-1), key and value params, as `final_table` returns them."""
    position = torch.full((batch, table_size), -1, dtype=torch.long, device=device)
    if fmt in LEVELS:
        width = head_dim // 2 if fmt == "int4" else head_dim
        keys = torch.zeros(batch, kv_heads, table_size, width, dtype=torch.uint8, device=device)
        params = torch.zeros(batch, kv_heads, table_size, 2, dtype=torch.bfloat16, device=device)
        return keys, keys.clone(), position, params, params.clone()
    dtype = torch.bfloat16 if fmt == "bfloat16" else torch.float32
    keys = torch.zeros(batch, kv_heads, table_size, head_dim, dtype=dtype, device=device)
    return keys, keys.clone(), position, None, None


def _rows(table: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The index of table [B, Hk, M, D] rows `slot` [B, K] of each batch row, for every KV head: table[index]
    is [B, Hk, K, D]. Advanced indexing, not gather / scatter_ with an expanded index: on a CPU, scatter_ into a
    bf16 tensor copies all of it (a 1.5 MiB table per layer and sequence, at every decoding step)."""
    batch, kv_heads = table.shape[:2]
    rows = torch.arange(batch, device=slot.device)[:, None, None]
    return rows, torch.arange(kv_heads, device=slot.device)[None, :, None], slot[:, None, :]


def read(keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, bucket: torch.Tensor,
         key_params: torch.Tensor | None = None, value_params: torch.Tensor | None = None, fmt: str = "auto",
         grams: Sequence[int] = (), select: str = "all"):
    """One query per row, its table rows `bucket` [B, K] -> keys, values [B, Hk, K, D] float32, use [B, K] (an
    entry that holds a key and is used: `recalled`). `fmt`: the table's `stored_format`."""
    index = _rows(keys, bucket)
    use = recalled(position[index[0][:, 0], bucket], grams, select)
    if fmt in LEVELS:
        return decode(keys[index], key_params[index], fmt), decode(values[index], value_params[index], fmt), use
    return keys[index].float(), values[index].float(), use


def write_(keys, values, position, bucket: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           key_position: torch.Tensor, key_params: torch.Tensor | None = None,
           value_params: torch.Tensor | None = None) -> None:
    """In place: one key, value [B, Hk, 1, D] at real position `key_position` [B] per row, stored at each of
    its table rows `bucket` [B, K] that is >= 0 (the other entries stay); quantized first when the table is
    (params given)."""
    table_size = keys.shape[2]
    store = bucket >= 0
    orders_ = bucket.shape[1]  # an order that stores nothing rewrites the first row of its own part, so no
    own = torch.arange(orders_, device=bucket.device) * (table_size // orders_)  # two writes share a row
    slot = torch.where(store, bucket, own)
    index, keep = _rows(keys, slot), store[:, None, :, None]
    pairs = [(keys, key), (values, value)]
    if key_params is not None:
        fmt = stored_format(keys, key_params, key.shape[-1])
        (key_codes, k_params), (value_codes, v_params) = encode(key, fmt), encode(value, fmt)
        pairs = [(keys, key_codes), (values, value_codes), (key_params, k_params), (value_params, v_params)]
    for table, row in pairs:
        table.index_put_(index, torch.where(keep, row.to(table.dtype), table[index]))
    at = (index[0][:, 0], slot)
    position.index_put_(at, torch.where(store, key_position[:, None], position[at]))
