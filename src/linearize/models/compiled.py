"""A compiled decoding step: one torch.compile graph for a whole single-token step of a linearized model.

On a CPU a decoding step of a small model is its weights' matrix-vector products plus the dispatch of a few
hundred small ops (norms, RoPE, feature maps, the window step, the recall memory). Compiled as one graph
from the embedding to the logits, the small ops fuse into a few kernels per layer and are dispatched once;
with `freeze` (the default) inductor also packs the weights for its matrix-vector products (MKL's packed
format, a copy of the weights held by the compiled step) and folds what does not change: the graph then
holds the model as it was when it compiled (`compile_decoding(rebuild=True)` after changing weights).

The graph runs the model's own decoder (`model.model`, so each family's layer code is its own), with the
layers' states handed in a list (`STEP_STATES`) instead of the cache; the recall memory's in-place table
write happens after the graph (`store_leaving`), since a write into a graph input copies the whole table.
Used by `LinearizedForCausalLM.forward` for single-token steps from a cache every layer of which holds a
state, without padding in the new token, outside autograd; everything else (prefill, padded prompts,
training) stays eager. A change of batch size compiles once more.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from linearize.errors import LinearizeError
from linearize.layers.attention import STEP_STATES, TOKEN_IDS, LinearizedAttention
from linearize.layers.cache import LinearizedCacheLayer
from linearize.ops import DecodeState
from linearize.ops.window import caller_writes_memory, store_leaving


class CompiledDecoding:
    def __init__(self, model: nn.Module, freeze: bool = True):
        layers = model.model.layers
        softmax = [i for i, layer in enumerate(layers) if not isinstance(layer.self_attn, LinearizedAttention)]
        if softmax:
            raise LinearizeError(
                f"compile_decoding compiles a step of linearized states; layers {softmax} keep the teacher's softmax "
                "attention (attention.softmax_layers, or a teacher's own local layers: attention.local_layers keep) "
                "and its key/value cache: decode this model without compile_decoding, or convert those layers"
            )
        self.freeze = freeze
        self.attentions = [layer.self_attn for layer in layers]
        # frozen, the graph holds the weights and layer settings as they were when it compiled: guards on the
        # modules would only cost time (a third of the step's dispatch), so they are dropped
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.7
        options = {"guard_filter_fn": skip} if freeze and skip is not None else None
        self.graph = torch.compile(_step_of(model), dynamic=False, options=options)
        self.enabled = True
        self._last: list[DecodeState] | None = None  # the states the graph returned last (its own layout)

    def handles(self, input_ids, attention_mask, past_key_values, inputs_embeds, labels, kwargs) -> bool:
        """Whether a forward call is a step this graph computes: one new real token per row, from a cache
        every layer of which holds a state, without autograd or extra outputs."""
        if not (self.enabled and input_ids is not None and input_ids.shape[1] == 1 and inputs_embeds is None
                and labels is None and not torch.is_grad_enabled()
                and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states")):
            return False
        if any(attention.mode != "linear" for attention in self.attentions):  # running as the teacher
            return False
        layers = getattr(past_key_values, "layers", None)
        if layers is None or len(layers) != len(self.attentions) or not all(
                isinstance(layer, LinearizedCacheLayer) and layer.state is not None for layer in layers):
            return False
        return attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask[:, -1].all()))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache) -> torch.Tensor:
        """One step: the logits [B, 1, V]; the cache's states advanced."""
        if position_ids is None:
            position_ids = torch.full_like(input_ids, cache.get_seq_length())
        states = [layer.state for layer in cache.layers]
        if self._last is None or any(a is not b for a, b in zip(states, self._last)):
            states = [state.map_batch(_standard) for state in states]  # from prefill: relaid once
        try:
            # freezing is read when the graph compiles; the memory's table is written below, after the graph
            with torch._inductor.config.patch(freezing=self.freeze), caller_writes_memory():
                logits, new = self.graph(input_ids, position_ids, states)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            raise LinearizeError(
                f"torch.compile could not build the decoding step ({str(err).splitlines()[0][:200]}); its CPU "
                "backend needs a C++ compiler (e.g. apt install g++): install one, or decode without "
                "compile_decoding / --compile"
            ) from err
        for state in states:
            if state.memory_keys is not None:
                store_leaving(state)
        for layer, state in zip(cache.layers, new):
            layer.advance(state, 1)
        self._last = new
        return logits


_steps = itertools.count()


def _step_of(model: nn.Module):
    """The step as a closure over the model (its weights are the graph's constants, so `freeze` can pack them)."""

    def step(input_ids: torch.Tensor, position_ids: torch.Tensor, states: list[DecodeState]):
        states = list(states)
        hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             **{TOKEN_IDS: input_ids, STEP_STATES: states}).last_hidden_state
        # states in the standard layout: the next step's inputs have the strides this graph was compiled for
        return model.lm_head(hidden), [state.map_batch(_standard) for state in states]

    # a code object of its own: torch.compile keeps its graphs per code object, and without guards on the
    # modules another model of the same shape (or this one rebuilt) would run this one's graph
    step.__code__ = step.__code__.replace(co_name=f"decoding_step_{next(_steps)}")
    return step


def _standard(t: torch.Tensor) -> torch.Tensor:
    """`t` with row-major strides, size-1 dimensions included (the compiled graph guards on exact strides)."""
    strides = [1] * t.dim()
    for i in range(t.dim() - 2, -1, -1):
        strides[i] = strides[i + 1] * t.shape[i + 1]
    return t if list(t.stride()) == strides else t.clone(memory_format=torch.contiguous_format)
