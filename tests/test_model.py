"""Converted models: the invariants of DESIGN.md on tiny random models of every supported family."""

import pytest
import torch
from helpers import (
    FAMILIES,
    assert_decoding_matches_parallel,
    assert_left_padded_batch_generates_as_alone,
    make_tiny_model,
    tokens,
)
from transformers import DynamicCache

from linearize import LinearizeError, linearize
from linearize.layers.attention import LinearizedAttention, attention_mode
from linearize.layers.cache import LinearizedCacheLayer

# every method, with small windows so the linear / recurrent parts matter over 40 tokens (the hybrid's default
# sparse cache of 128 keys would hold all 40 exactly: its own entries give it 3)
METHODS = {
    "hybrid": {"window_size": 8, "sink_tokens": 2, "decay": 0.95, "sparse_keys": 0},
    "lolcats": {"window_size": 8},
    "liger": {"window_size": 8, "sink_tokens": 2},
    "window": {"window_size": 8, "sink_tokens": 2},
    "hybrid+rope": {"window_size": 8, "sink_tokens": 2, "decay": 0.95, "linear_rope": True, "sparse_keys": 0},
    "hybrid+memory": {"window_size": 8, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16, "sparse_keys": 0},
    "hybrid+far-sinks": {"window_size": 8, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16, "sink_distance": 12,
                         "sparse_keys": 0},
    "window+far-sinks": {"window_size": 8, "sink_tokens": 2, "sink_distance": 12},
    "hybrid+sparse": {"window_size": 4, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16, "sparse_keys": 3},
    "window+sparse": {"window_size": 4, "sink_tokens": 2, "sparse_keys": 3, "sparse_score": "recency"},
    "xatl": {"mixer": "gla", "chunk_size": 8, "output_norm_init": 1.0},
    "xatl+retnet": {"mixer": "retnet", "window_size": 8, "sink_tokens": 2, "output_norm_init": 1.0},
}


def convert(family: str, method: str, **attention):
    return linearize(make_tiny_model(family), method.split("+")[0], {**METHODS[method], **attention})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_prefill_then_decode_matches_one_parallel_forward(family, method):
    assert_decoding_matches_parallel(convert(family, method), tokens(), prefill=19)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("method", ["hybrid", "window", "lolcats", "liger"])
def test_sink_distance_changes_only_the_queries_farther_from_the_sinks(family, method):
    """sink_distance 12: the first 13 positions (a query at most 12 from the first sink) give the logits of
    true distances, every later one others; each query reads the sinks rotated to 12, as the teacher's
    rotary places a query at position 12."""
    attention = {**METHODS.get(method, {}), "window_size": 8}
    if method in ("lolcats", "liger") or "sink_tokens" not in attention:
        attention["sink_tokens"] = 2
    x = tokens()
    with torch.no_grad():
        plain = linearize(make_tiny_model(family), method, attention)(x).logits
        far_model = linearize(make_tiny_model(family), method, {**attention, "sink_distance": 12})
        far = far_model(x).logits
    torch.testing.assert_close(far[:, :13], plain[:, :13], rtol=0, atol=0)
    assert (far[:, 13:] - plain[:, 13:]).abs().amax(-1).min() > 1e-6, "every farther query must read the sinks anew"
    layer = next(m for m in far_model.modules() if isinstance(m, LinearizedAttention))
    q_nope = torch.randn(1, 4, 3, 16)
    rotary, args = layer.rotary
    cos, sin = rotary(q_nope, torch.arange(13)[None], *args)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    expected, _ = apply_rotary_pos_emb(q_nope, q_nope, cos[:, 12:13], sin[:, 12:13])
    torch.testing.assert_close(layer.sink_query(q_nope), expected)


@pytest.mark.parametrize("method", ["lolcats", "liger"])
def test_methods_without_a_window_decode_like_their_parallel_forward(method):
    model = convert("llama", method, window_size=0, sink_tokens=0) if method == "liger" else convert(
        "llama", method, window_size=0)
    assert_decoding_matches_parallel(model, tokens(), prefill=5)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_mode_reproduces_the_teacher_exactly(family):
    teacher = make_tiny_model(family)
    x = tokens()
    with torch.no_grad():
        expected = teacher(x).logits
        model = linearize(teacher, "hybrid", METHODS["hybrid"])
        with attention_mode(model, "softmax"):
            again = model(x).logits
        student = model(x).logits
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert not torch.allclose(student, expected, atol=1e-3), "an 8-token window over 40 tokens must change the output"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["hybrid", "lolcats", "window"])
def test_a_window_covering_the_sequence_equals_the_teacher(family, method):
    teacher = make_tiny_model(family)
    x = tokens(length=32)
    with torch.no_grad():
        expected = teacher(x).logits
        model = linearize(teacher, method, {"window_size": 64})
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_conversion_reuses_teacher_projections_and_keeps_them_frozen():
    teacher = make_tiny_model("llama")
    q_proj = teacher.model.layers[0].self_attn.q_proj
    model = linearize(teacher, "hybrid")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, LinearizedAttention) and attention.q_proj is q_proj
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mixer." in n for n in trainable)
    assert set(model.mixer_state_dict()) == trainable


def test_softmax_layers_stay_softmax_attention():
    model = linearize(make_tiny_model("llama"), "hybrid", {"softmax_layers": [1]})
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["LinearizedAttention", "LlamaAttention"]
    with pytest.raises(LinearizeError, match="out of range"):
        linearize(make_tiny_model("llama"), "hybrid", {"softmax_layers": [5]})


@pytest.mark.parametrize("method", ["hybrid", "lolcats", "liger"])
def test_gqa_stays_gqa_decode_state_is_per_kv_head(method):
    model = convert("llama", method, window_size=4)  # 4 query heads, 2 key/value heads
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(length=12), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert isinstance(layer, LinearizedCacheLayer)
    assert layer.state.recurrent.shape[1] == 2
    assert layer.state.window_keys.shape[1:3] == (2, 3)  # window - 1 cached keys per KV head


def test_per_query_head_key_maps_keep_states_per_query_head():
    model = convert("llama", "lolcats", window_size=4, key_maps="per_query_head")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(length=12), past_key_values=cache, use_cache=True)
    assert cache.layers[0].state.recurrent.shape[1] == 4


@pytest.mark.parametrize("method", list(METHODS))
def test_decode_state_does_not_grow_with_length(method):
    model = convert("llama", method, window_size=4)
    sizes = []
    for length in (16, 64):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(tokens(length=length), past_key_values=cache, use_cache=True)
            for _ in range(3):
                model(tokens(length=1, seed=length), past_key_values=cache, use_cache=True)
        sizes.append(sum(layer.nbytes() for layer in cache.layers))
    assert sizes[0] == sizes[1] > 0


def test_unsupported_model_type_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LinearizeError, match="model type 'gpt2' is not supported: supported are llama"):
        linearize(model, "hybrid")


def test_converting_twice_is_refused():
    model = linearize(make_tiny_model("llama"), "hybrid")
    with pytest.raises(LinearizeError, match="already linearized"):
        linearize(model, "hybrid")


@pytest.mark.parametrize("method", list(METHODS))
def test_a_left_padded_batch_generates_row_for_row_what_each_prompt_generates_alone(method):
    assert_left_padded_batch_generates_as_alone(convert("qwen2", method, window_size=4))


def test_right_padding_is_harmless():
    model = convert("llama", "hybrid", window_size=4)
    x = tokens(batch=2, length=12)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits
        single = model(x[1:, :8]).logits
    torch.testing.assert_close(padded[1, :8], single[0], rtol=1e-5, atol=1e-5)


# a recall memory alone is in both of the last two (with far sinks; with a sparse cache)
@pytest.mark.parametrize("method", ["hybrid", "xatl", "hybrid+far-sinks", "hybrid+sparse"])
def test_a_compiled_decoding_step_gives_the_eager_logits(method):
    model = convert("llama", method)
    x = tokens(length=41)
    with torch.no_grad():
        full = model(x[:, :40]).logits
        model.compile_decoding()
        step = model._compiled_decoding
        graph, calls = step.graph, []
        step.graph = lambda *a: calls.append(1) or graph(*a)
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :19], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(19, 40)]
        model.compile_decoding(False)
        eager = model(x[:, 40:41], past_key_values=cache, use_cache=True).logits  # goes on from the graph's states
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert len(calls) == 21  # every single-token step, no prefill
    with torch.no_grad():
        again = model(x).logits[:, -1:]
    torch.testing.assert_close(eager, again, rtol=1e-4, atol=1e-4)
    assert model.compile_decoding()._compiled_decoding is step  # enabled again: the same graph


def test_compiled_generation_with_left_padding_gives_the_eager_tokens():
    model = convert("llama", "hybrid+memory")
    x = tokens(batch=2, length=14)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(x, **kwargs)
        step = model.compile_decoding()._compiled_decoding
        graph, calls = step.graph, []
        step.graph = lambda *a: calls.append(1) or graph(*a)
        compiled = model.generate(x, **kwargs)
    assert torch.equal(compiled, eager)
    assert len(calls) == 11  # every step after the prompt's


def test_two_compiled_models_of_one_shape_each_decode_with_their_own_weights():
    x = tokens()

    def decoded(model, **compile_args):
        with torch.no_grad():
            model.compile_decoding(**compile_args)
            cache = DynamicCache(config=model.config)
            steps = [model(x[:, :30], past_key_values=cache, use_cache=True).logits]
            steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 40)]
            torch.testing.assert_close(torch.cat(steps, dim=1), model(x).logits, rtol=1e-4, atol=1e-4)
            return steps[-1]

    first, second = (linearize(make_tiny_model("llama", seed=seed), "hybrid", METHODS["hybrid+memory"])
                     for seed in (0, 1))
    before = decoded(first)
    assert not torch.allclose(decoded(second), before)
    with torch.no_grad():
        first.lm_head.weight.mul_(2)  # the graph holds the weights it compiled with; rebuilt, the new ones
    assert not torch.allclose(decoded(first, rebuild=True), before)


def test_a_bf16_model_keeps_its_memory_table_in_bf16_and_loses_nothing_by_it():
    model = convert("llama", "hybrid+memory", memory_format="auto").to(torch.bfloat16)  # the model's dtype
    x = tokens()
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(x[:, :30], past_key_values=cache, use_cache=True)
        states = [layer.state for layer in caches[1].layers if layer.state.memory_keys is not None]
        assert states and all(state.memory_keys.dtype == torch.bfloat16 for state in states)
        for state in states:  # the same table in float32
            state.memory_keys, state.memory_values = state.memory_keys.float(), state.memory_values.float()
        logits = [[model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 40)]
                  for cache in caches]
    assert torch.equal(torch.cat(logits[0], dim=1), torch.cat(logits[1], dim=1))


def test_compile_decoding_refuses_a_model_that_keeps_softmax_layers():
    model = convert("llama", "hybrid", softmax_layers=[1])
    with pytest.raises(LinearizeError, match="keep the teacher.s softmax attention"):
        model.compile_decoding()


def test_a_compiled_step_without_a_cpp_compiler_says_what_to_do():
    import torch._dynamo
    import torch._inductor.config

    # inductor's own patch restores its config; monkeypatch.setattr on it left `fx_graph_cache` unset
    # for every later compile in the process
    no_compiler = {"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}
    torch._dynamo.reset()
    model = convert("llama", "hybrid").compile_decoding()
    x = tokens()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), torch._inductor.config.patch(no_compiler):
        model(x[:, :10], past_key_values=cache, use_cache=True)  # prefill stays eager
        with pytest.raises(LinearizeError, match="needs a C\\+\\+ compiler"):
            model(x[:, 10:11], past_key_values=cache, use_cache=True)
    torch._dynamo.reset()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_memory_decodes_like_its_parallel_forward(fmt):
    """The table quantized: prefill + decoding steps through the model's cache = one parallel forward (which
    recalls through the same round trip), and the format changed the logits."""
    model = convert("llama", "hybrid+memory", memory_format=fmt)
    assert_decoding_matches_parallel(model, tokens(), prefill=19)
    full = convert("llama", "hybrid+memory", memory_format="auto")
    with torch.no_grad():
        assert not torch.equal(model(tokens()).logits, full(tokens()).logits)


def test_memory_layers_beyond_the_model_are_an_error_naming_the_key():
    with pytest.raises(LinearizeError, match=r"attention.memory_layers lists \[9\], but the model has 2 layers"):
        convert("llama", "hybrid+memory", memory_layers=[1, 9])


def test_a_memory_layer_needs_token_ids_and_says_so():
    model = convert("llama", "hybrid+memory")
    x = tokens()
    with torch.no_grad(), pytest.raises(LinearizeError, match="keyed by token ids: call the model with input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(x))


def test_memory_layers_choose_which_layers_remember():
    model = convert("llama", "hybrid+memory", memory_layers="upper-half")
    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    assert [layer.mixer.memory_buckets for layer in layers] == [
        16 if layer.layer_idx >= len(layers) // 2 else 0 for layer in layers]
    assert any(b == 0 for b in [layer.mixer.memory_buckets for layer in layers])


class OpShapes:
    """Every aten op a region runs, with the shapes of its tensor arguments (a TorchDispatchMode)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs))
                               if isinstance(a, torch.Tensor))
                ops.append((str(func), shapes))
                return func(*args, **(kwargs or {}))

        self.mode = Record()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_a_decoding_step_runs_the_same_ops_on_the_same_shapes_at_1k_and_16k():
    """Constant time per token as an invariant: the default student's parts (window, sinks read from afar,
    decayed linear state, recall memory, sparse cache) take a step at position 1,024 and at 16,384 with the same
    operations on the same shapes (both positions in the same phase of the sparse cache's 32-token groups)."""
    attention = {"window_size": 32, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16, "memory_ngram": [1, 2],
                 "sink_distance": 48, "sparse_keys": 4}
    model = linearize(make_tiny_model("llama", max_position_embeddings=32768, num_hidden_layers=1), "hybrid", attention)
    steps = []
    for length in (1024, 16384):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(tokens(length=length, seed=length), past_key_values=cache, use_cache=True)
            with OpShapes() as recorded:
                model(tokens(length=1, seed=1), past_key_values=cache, use_cache=True)
        steps.append(recorded.ops)
    assert len(steps[0]) > 100 and steps[0] == steps[1]
