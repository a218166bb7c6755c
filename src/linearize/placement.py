"""Which key/value heads keep exact keys beyond the window: measured on the teacher, in each run.

Most heads of a pretrained model read recent tokens and the first few, which a window and sinks serve; a
few read single tokens far back (retrieval and copying heads: DuoAttention, arXiv 2410.10819;
RazorAttention). The probe: blocks of the run's own training text, the first half of each said twice, so
that in the second half a copying head finds the token after the earlier occurrence, half a block back.
A query head's score is the attention its second-half queries put on their `TOP_KEYS` heaviest keys
beyond the window (the sinks left out), averaged over queries: how much of what it reads a few exact far
keys would give back. A key/value head takes the highest score of the query heads that read it. The sparse
cache goes to the highest-scoring heads of the converted layers, as many as `sparse_budget` MiB per
sequence pays for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from linearize.errors import LinearizeError

TOP_KEYS = 4  # a head that needs exact far keys puts its mass on a few of them
PROBE_BLOCKS = 2
PROBE_HALF = 256  # tokens said twice: the second copy reads the first from 256 positions back
MiB = float(1 << 20)


@torch.no_grad()
def head_scores(model: torch.nn.Module, blocks: torch.Tensor, window: int, sink_tokens: int) -> list[list[float]]:
    """[layer][kv_head] scores of a teacher (a Hugging Face causal LM) on `blocks` [N, T] of its own tokens:
    each block's first PROBE_HALF tokens said twice (the first PROBE_BLOCKS blocks)."""
    if blocks.shape[0] == 0:
        raise LinearizeError("placing the sparse cache measures the teacher on training blocks, and the corpus gave "
                             "none: give data.source more text, or name the heads (attention.sparse_heads)")
    half = min(PROBE_HALF, blocks.shape[1] // 2)
    if half <= window:
        raise LinearizeError(f"placing the sparse cache needs training blocks of more than {2 * window} tokens "
                             f"(data.seq_len), to see which heads read beyond the {window}-token window")
    first = blocks[:PROBE_BLOCKS, :half]
    probe = torch.cat([first, first], dim=1).to(next(model.parameters()).device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the attention weights themselves
    try:
        attentions = model(input_ids=probe, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(previous)
    length = probe.shape[1]
    query = torch.arange(length, device=probe.device)[:, None]
    key = torch.arange(length, device=probe.device)[None, :]
    far = (key <= query - window) & (key >= sink_tokens) & (query >= half)  # [T, T]
    kv_heads = model.config.num_key_value_heads
    scores = []
    for weights in attentions:  # [N, H, T, T]
        top = weights.float().masked_fill(~far, 0.0).topk(TOP_KEYS, dim=-1).values.sum(-1)  # [N, H, T]
        per_head = top[..., half:].mean(dim=(0, 2))  # [H]
        scores.append(per_head.view(kv_heads, -1).amax(-1).tolist())
    return scores


def head_bytes(sparse_keys: int, window: int, head_dim: int) -> int:
    """A head's sparse cache per sequence, fp32: `sparse_keys` + `window` slots of a key, a value and what the
    linear state reads of the key (the hybrid keeps its D inputs), a position and a decay."""
    return (sparse_keys + window) * (3 * head_dim * 4 + 8 + 4)


@dataclass
class Placement:
    """The heads chosen, why, and what they cost."""

    heads: list[list[int]]  # [layer, kv_head] pairs, sorted
    scores: list[list[float]]  # [layer][kv_head], every layer (non-converted ones too)
    candidates: int  # heads of converted layers
    head_bytes: int
    budget_mib: float
    threshold: float  # the lowest chosen score
    next_best: float | None  # the highest score left out

    def summary(self) -> dict:
        return {"heads": self.heads, "scores": [[round(x, 4) for x in row] for row in self.scores],
                "candidates": self.candidates, "head_bytes": self.head_bytes, "budget_mib": self.budget_mib,
                "threshold": round(self.threshold, 4),
                "next_best": None if self.next_best is None else round(self.next_best, 4)}


def describe(summary: dict) -> str:
    """One line: which heads got a sparse cache, and why (a `Placement.summary()`)."""
    left = "" if summary["next_best"] is None else f"; the best left out: {summary['next_best']:.3f}"
    return (f"sparse cache in {len(summary['heads'])} of {summary['candidates']} key/value heads "
            f"({summary['head_bytes'] / MiB:.2f} MiB each per sequence; budget {summary['budget_mib']:g} MiB), those "
            f"whose queries read most from their {TOP_KEYS} heaviest keys beyond the window (>= "
            f"{summary['threshold']:.3f}{left}): {', '.join(f'{layer}.{head}' for layer, head in summary['heads'])} "
            "(layer.head)")


def heads_paid(sparse_keys: int, window: int, head_dim: int, budget_mib: float) -> int:
    """How many heads' caches `budget_mib` MiB per sequence pays for; an error when not one (a run checks it
    while it plans, before any weight loads)."""
    size = head_bytes(sparse_keys, window, head_dim)
    count = math.floor(budget_mib * MiB / size)
    if count < 1:
        raise LinearizeError(f"attention.sparse_budget ({budget_mib:g} MiB) does not pay for one head's sparse cache "
                             f"({size / MiB:.2f} MiB for sparse_keys {sparse_keys} + a {window}-token pending "
                             f"group): raise attention.sparse_budget to at least {math.ceil(size / MiB * 100) / 100} "
                             "or lower attention.sparse_keys")
    return count


def converted_layers(text_config, settings) -> list[int]:
    """The layers a conversion with `settings` replaces (not kept as softmax, not a teacher's local layer kept)."""
    from linearize.teacher.families import teacher_window

    return [i for i in range(text_config.num_hidden_layers) if i not in settings.softmax_layers and (
        teacher_window(text_config, i) is None or settings.local_layers == "convert")]


def measured(settings) -> bool:
    """Whether `settings` (a method's attention settings) ask for a sparse cache in heads the run measures."""
    return bool(getattr(settings, "sparse_keys", 0)) and settings.sparse_heads == "measured"


def planned(settings, text_config):
    """`settings` with the heads a plan counts in place of `sparse_heads: measured` (`planned_heads`; an error
    when the budget pays for no head); as they are otherwise."""
    if not measured(settings):
        return settings
    return replace(settings, sparse_heads=planned_heads(settings, text_config, converted_layers(text_config, settings)))


def planned_heads(settings, text_config, layers: list[int]) -> list[list[int]]:
    """The heads a plan counts before the run has measured any (`sparse_heads: measured`): as many as the
    budget pays for, one per layer of `layers` (the converted ones, spread evenly while fewer), then a second
    head in each, and so on: the cost at its highest, as a layer's op pays for its cache whether one of its
    heads has one or all do."""
    from linearize.methods.base import head_dim_of

    count = heads_paid(settings.sparse_keys, settings.window_size, head_dim_of(text_config), settings.sparse_budget)
    count = min(count, len(layers) * text_config.num_key_value_heads)
    if count < len(layers):
        layers = [layers[(i * len(layers)) // count] for i in range(count)]
    return sorted([layers[i % len(layers)], i // len(layers)] for i in range(count))


def place_sparse(scores: list[list[float]], converted: list[int], sparse_keys: int, window: int, head_dim: int,
                 budget_mib: float) -> Placement:
    """The highest-scoring heads of the `converted` layers that `budget_mib` MiB per sequence pays for."""
    size = head_bytes(sparse_keys, window, head_dim)
    count = heads_paid(sparse_keys, window, head_dim, budget_mib)
    ranked = sorted(((scores[layer][head], layer, head) for layer in converted for head in range(len(scores[layer]))),
                    key=lambda entry: (-entry[0], entry[1], entry[2]))
    chosen, rest = ranked[:count], ranked[count:]
    return Placement(heads=sorted([layer, head] for _, layer, head in chosen), scores=scores,
                     candidates=len(ranked), head_bytes=size, budget_mib=budget_mib,
                     threshold=chosen[-1][0] if chosen else 0.0, next_best=rest[0][0] if rest else None)
