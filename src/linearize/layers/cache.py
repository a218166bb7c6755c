"""The decode cache of a linearized layer: one transformers cache layer holding the layer's `DecodeState`.

`generate()` builds a `DynamicCache`; a linearized attention layer adopts its slot on first use (an empty
softmax slot becomes a `LinearizedCacheLayer`), so the rest of transformers (masks, beam search, batch
selection) sees an ordinary cache. Everything the layer remembers (window, sinks, linear state, per-row
positions) lives in the one state object, so beam reordering and batch selection move all of it alike.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from linearize.errors import LinearizeError
from linearize.ops import DecodeState


class LinearizedCacheLayer(CacheLayerMixin):
    """Constant-size decoding state of one linearized layer (`state`), plus the number of token positions
    seen (`get_seq_length`, what transformers builds position and mask sizes from)."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: DecodeState | None = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise LinearizeError("a linearized layer's cache holds a recurrent state, not softmax keys and values")

    def advance(self, state: DecodeState | None, new_tokens: int) -> None:
        self.state = state
        self.seen_tokens += new_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1  # no sequence dimension: the state has the same size at any length

    def reset(self) -> None:
        self.state, self.seen_tokens, self.is_initialized = None, 0, False

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise LinearizeError(
            "a linearized model's cache cannot be rolled back (its state has absorbed the tokens): "
            "assisted / speculative decoding is not supported"
        )

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()


def adopt_cache_layer(cache: Cache, layer_idx: int) -> LinearizedCacheLayer:
    """This layer's slot in `cache`, made a `LinearizedCacheLayer` if it is still an empty softmax slot."""
    while len(cache.layers) <= layer_idx:  # a DynamicCache built without a config grows lazily
        cache.layers.append(LinearizedCacheLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, LinearizedCacheLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise LinearizeError(
            f"cache layer {layer_idx} already holds softmax keys and values: a linearized layer cannot "
            "continue from them; start generation with an empty cache"
        )
    cache.layers[layer_idx] = LinearizedCacheLayer()
    return cache.layers[layer_idx]
