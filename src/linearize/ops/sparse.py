"""Sparse cache: exact keys kept beyond the window, the ones the linear state would recall worst (LoLA).

A window keeps the last `window` keys exactly; older keys are summed into the linear state, where keys
that collide in feature space blur together (LoLA's "memory collisions"): a passkey among thousands of
filler tokens is one such key. The sparse cache keeps a fixed number of (key, value) pairs per key/value
head out of that sum, chosen by a score, and queries attend to them exactly, in the one softmax of the
window, the sinks and the recall memory (LoLA, McDermott et al. 2025, arXiv 2505.23666: window + sparse
cache + linear state, no training).

Tokens that leave the window are taken in groups of `window` consecutive real positions (group m holds
positions [m W, (m + 1) W)). A group's tokens wait, as exact keys too ("pending"), until its last token has
left the window and been read once as pending (as window keys: with the window's, they set the maximum the
linear terms are weighed against); then the group and the cache compete: every candidate is
scored, the `size` best stay in the cache, the others enter the linear state, decayed from their own
position (an evicted key weighs what it would have weighed had it entered the state when it left the
window). A query therefore sees as exact keys: the window, the sinks, its group's tokens that left the
window (at most W), and `size` cached keys; the update cost is paid once per W tokens.

    update m, at the end of step (m + 2) W - 1:  candidates = cache ∪ group m
    keep the `size` highest scores; the rest:    S += exp(A_now - A_s) phi(k_s) [v_s, 1]

Scores (`SCORES`):
- "recall-error" (LoLA's self-recall error): || v_s - S phi(k_s) / z phi(k_s) ||, how far the linear state
  as it stands (without the cached keys) is from giving back the pair's own value; a key the state already
  holds in other words (repeated filler) scores low, a surprise (a number said once) high. Needs a linear
  state (key features).
- "recency": the position: the cache keeps the most recent groups, a longer window; the baseline every
  eviction policy must beat, and the one a method without a linear state can use.
Ties go to the older candidate (candidates are in position order), so every form keeps the same keys.

Groups follow real positions, so a left-padded row keeps what it keeps alone. Constant size per head:
(size + W) x (key, value, key features or their inputs, position, decay).
"""

from __future__ import annotations

import torch

from .linear import append_ones

SCORES = ("recall-error", "recency")
NEEDS_STATE = ("recall-error",)  # scores read the linear state: a method without one cannot use them


def heads_mask(kv_heads: int, heads: tuple[int, ...] | None, device=None) -> torch.Tensor:
    """[Hk] bool: the key/value heads with a sparse cache (`heads`: their indices; None: every head)."""
    return torch.tensor([heads is None or h in heads for h in range(kv_heads)], device=device)


def compact(x: torch.Tensor | None, heads: tuple[int, ...] | None) -> torch.Tensor | None:
    """[B, Hk, ...] -> [B, len(heads), ...]: what the state keeps, only the heads with a cache (None: all)."""
    return x if x is None or heads is None else x[:, list(heads)]


def expand(x: torch.Tensor | None, heads: tuple[int, ...] | None, kv_heads: int, fill) -> torch.Tensor | None:
    """`compact`'s inverse: [B, len(heads), ...] -> [B, Hk, ...], `fill` in the heads without a cache."""
    if x is None or heads is None:
        return x
    full = x.new_full((x.shape[0], kv_heads, *x.shape[2:]), fill)
    full[:, list(heads)] = x
    return full


def check_score(score: str, has_state: bool) -> None:
    if score not in SCORES:
        raise ValueError(f"sparse cache score must be one of {', '.join(SCORES)}, got {score!r}")
    if score in NEEDS_STATE and not has_state:
        raise ValueError(f"the sparse cache's '{score}' score reads a linear state, which this op has none of "
                         "(no key features): use 'recency'")


def scores(score: str, features: torch.Tensor | None, values: torch.Tensor, position: torch.Tensor,
           state: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Eviction scores [B, Hk, M] of M candidates (higher = kept): features [B, Hk, M, F] (their keys'
    features; None for "recency"), values [B, Hk, M, D], position [B, Hk, M] (-1: no candidate), state
    [B, Hk, F, D + 1] the linear state they would enter. An empty slot scores -inf."""
    if score == "recency":
        result = position.float()
    else:
        read = features.float() @ state  # [B, Hk, M, D + 1]
        result = (values.float() - read[..., :-1] / (read[..., -1:] + eps)).norm(dim=-1)
    return result.masked_fill(position < 0, float("-inf"))


def keep_best(score: torch.Tensor, position: torch.Tensor, size: int) -> torch.Tensor:
    """[B, Hk, M] scores and positions of candidates (in position order) -> pick [B, Hk, size]: the indices
    of the `size` highest scores (ties: the earlier candidate), in position order, empty picks (fewer
    candidates than `size`) last."""
    best = score.argsort(dim=-1, descending=True, stable=True)[..., :size]
    picked = position.gather(-1, best)
    order = torch.where(picked >= 0, picked, torch.iinfo(picked.dtype).max).argsort(dim=-1, stable=True)
    return best.gather(-1, order)


def picked_mask(pick: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[B, Hk, M] bool: the candidates `keep_best` picked that hold a key."""
    mask = torch.zeros(position.shape, dtype=torch.bool, device=position.device)
    return mask.scatter(-1, pick, True) & (position >= 0)


def evicted_state(features: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_s weight_s phi(k_s)^T [v_s, 1]: features [B, Hk, M, F], values [B, Hk, M, D], weight [B, Hk, M]
    (0 for a candidate that stays or is empty; else its decay since its position) -> [B, Hk, F, D + 1]."""
    return (features.float() * weight[..., None]).transpose(-1, -2) @ append_ones(values.float())


def rows_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, Hk, T, X] at index [B, Hk, ...] (into T; -1 reads row 0: mask it) -> [B, Hk, ..., X], by whole
    rows (index_select: a gather along T with an expanded index is several times slower)."""
    batch, kv_heads, length, width = x.shape
    base = torch.arange(batch * kv_heads, device=x.device).view(batch, kv_heads, *([1] * (index.dim() - 2)))
    rows = (base * length + index.clamp(min=0)).flatten()
    return x.reshape(-1, width).index_select(0, rows).view(*index.shape, width)


@torch.no_grad()
def chunk_updates(score: str, features: torch.Tensor | None, values: torch.Tensor, total: torch.Tensor | None,
                  eligible: torch.Tensor, window: int, size: int, eps: float = 1e-6) -> torch.Tensor:
    """Every update of a fresh sequence whose rows start at index 0 (real position = index; padding only at
    the end): kept [B, Hk, N, size], the cache after update m (indices into T, -1: empty), N = ceil(T / W).
    features [B, Hk, T, F] (the keys' features, zero where not real; None for "recency"), values [B, Hk, T,
    D], total [B, Hk, T] the cumulative log-gates (None: no decay), eligible [B, Hk, T] the tokens that may
    be cached (real, not sinks, a head with a cache). Selection only: no gradient flows through it (the forms
    gather what it picked)."""
    batch, kv_heads, length = eligible.shape
    n_groups = -(-length // window)
    state = None
    if score in NEEDS_STATE:
        state = features.new_zeros(batch, kv_heads, features.shape[-1], values.shape[-1] + 1).float()
    cache = torch.full((batch, kv_heads, size), -1, dtype=torch.long, device=values.device)
    before = None  # the end of the last update's step: its index (clamped to the sequence)
    kept = []
    for m in range(n_groups):
        now = min((m + 2) * window - 1, length - 1)
        group = torch.arange(m * window, min((m + 1) * window, length), device=values.device)
        group = torch.where(eligible[:, :, group], group, -1)
        candidates = torch.cat([cache, group], dim=-1)  # [B, Hk, size + W], in position order
        if state is not None and total is not None and before is not None:
            state = state * (total[..., now] - total[..., before]).exp()[..., None, None]
        cand_features = None if features is None else rows_at(features, candidates)
        cand_values = rows_at(values, candidates)
        pick = keep_best(scores(score, cand_features, cand_values, candidates, state, eps), candidates, size)
        if state is not None:
            weight = (candidates >= 0) & ~picked_mask(pick, candidates)
            decay = weight.float()
            if total is not None:
                decay = decay * (total[..., now, None] - total.gather(-1, candidates.clamp(min=0))).exp()
            state = state + evicted_state(cand_features, cand_values, decay)
        cache = candidates.gather(-1, pick)
        kept.append(cache)
        before = now
    return torch.stack(kept, dim=2)


def updates_done(length: torch.Tensor, window: int) -> torch.Tensor:
    """[B] real tokens of each row -> [B] updates done after them (update m ends step (m + 2) W - 1)."""
    return (length // window - 1).clamp(min=0)


def pending_positions(length: torch.Tensor, window: int) -> torch.Tensor:
    """After `length` [B] real tokens: the real positions [B, W] of the tokens that left the window since the
    last update (slot j holds position g W + j of the current group g; -1: none yet)."""
    position = updates_done(length, window)[:, None] * window + torch.arange(window, device=length.device)
    return torch.where(position <= (length - window)[:, None], position, -1)
