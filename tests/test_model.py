"""Converted models: the invariants of DESIGN.md on tiny random models of every supported family."""

import pytest
import torch
from transformers import DynamicCache

from linearize import LinearizeError, linearize
from linearize.attention import LinearizedAttention, attention_mode
from linearize.teacher import make_tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
METHODS = ["lolcats", "liger", "window"]


def tokens(batch=2, length=40, seed=0):
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_prefill_then_decode_matches_one_parallel_forward(family, method):
    model = make_tiny_model(family)
    linearize(model, method, attention={"window_size": 8})
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :19], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(19, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_mode_reproduces_the_teacher_exactly(family):
    model = make_tiny_model(family)
    x = tokens()
    with torch.no_grad():
        teacher = model(x).logits
        linearize(model, "lolcats", attention={"window_size": 8})
        with attention_mode(model, "softmax"):
            again = model(x).logits
        student = model(x).logits
    torch.testing.assert_close(again, teacher, rtol=0, atol=0)
    assert not torch.allclose(student, teacher, atol=1e-3), "a 8-token window over 40 tokens must change the output"


@pytest.mark.parametrize("family", FAMILIES)
def test_lolcats_with_a_window_covering_the_sequence_equals_the_teacher(family):
    model = make_tiny_model(family)
    x = tokens(length=32)
    with torch.no_grad():
        teacher = model(x).logits
        linearize(model, "lolcats", attention={"window_size": 64})
        student = model(x).logits
    torch.testing.assert_close(student, teacher, rtol=1e-4, atol=1e-4)


def test_conversion_reuses_teacher_projections_and_keeps_them_frozen():
    model = make_tiny_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    linearize(model, "lolcats")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, LinearizedAttention)
    assert attention.q_proj is q_proj
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mixer." in n for n in trainable)


def test_softmax_layers_stay_softmax_attention():
    model = make_tiny_model("llama")
    linearize(model, "lolcats", attention={"softmax_layers": [1]})
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["LinearizedAttention", "LlamaAttention"]
    with pytest.raises(LinearizeError, match="out of range"):
        linearize(make_tiny_model("llama"), "lolcats", attention={"softmax_layers": [5]})


@pytest.mark.parametrize("method,state_heads", [("lolcats", 2), ("liger", 2)])
def test_gqa_stays_gqa_decode_state_is_per_kv_head(method, state_heads):
    model = make_tiny_model("llama")  # 4 query heads, 2 key/value heads
    linearize(model, method, attention={"window_size": 4})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(length=12), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.recurrent_states[0].shape[1] == state_heads
    assert layer.keys.shape[1] == state_heads and layer.keys.shape[2] == 3  # window - 1 cached keys


def test_per_query_head_key_maps_keep_states_per_query_head():
    model = make_tiny_model("llama")
    linearize(model, "lolcats", attention={"window_size": 4, "key_maps": "per_query_head"})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(length=12), past_key_values=cache, use_cache=True)
    assert cache.layers[0].recurrent_states[0].shape[1] == 4


def test_decode_state_does_not_grow_with_length():
    model = make_tiny_model("llama")
    linearize(model, "lolcats", attention={"window_size": 4})
    sizes = []
    for length in (16, 64):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(tokens(length=length), past_key_values=cache, use_cache=True)
        sizes.append(sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.recurrent_states[0])))
    assert sizes[0] == sizes[1]


def test_generate_runs_with_the_constant_memory_cache():
    model = make_tiny_model("qwen3")
    linearize(model, "lolcats", attention={"window_size": 4})
    x = tokens(batch=1, length=10)
    out = model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        greedy = x
        for _ in range(12):
            next_token = model(greedy).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, next_token], dim=1)
    assert torch.equal(out, greedy)


def test_unsupported_model_type_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LinearizeError, match="model type 'gpt2' is not supported: supported are llama"):
        linearize(model, "lolcats")


def test_right_padding_is_harmless_and_left_padding_is_refused():
    model = make_tiny_model("llama")
    linearize(model, "lolcats", attention={"window_size": 4})
    x = tokens(batch=2, length=12)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits
        single = model(x[1:, :8]).logits
    torch.testing.assert_close(padded[1, :8], single[0], rtol=1e-5, atol=1e-5)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding
    with pytest.raises(LinearizeError, match="left-padded batches are not supported"):
        model(x, attention_mask=mask)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prefill", [2, 19])
def test_sink_tokens_decode_matches_parallel(method, prefill):
    model = make_tiny_model("qwen2")
    linearize(model, method, attention={"window_size": 4, "sink_tokens": 3})
    x = tokens(length=30)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :prefill], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(prefill, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_window_with_sinks_covering_the_sequence_equals_the_teacher():
    model = make_tiny_model("llama")
    x = tokens(length=20)
    with torch.no_grad():
        teacher = model(x).logits
        linearize(model, "window", attention={"window_size": 4, "sink_tokens": 20})
        torch.testing.assert_close(model(x).logits, teacher, rtol=1e-4, atol=1e-4)
