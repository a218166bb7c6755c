"""Gemma 3 teachers: local layers kept or converted, the teacher's windows in every teacher pass, bounded
decode state, stage 1 on a teacher of two layer types, the HF format. (Every family's common invariants run
on gemma3_text too: helpers.FAMILIES.)"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_decoding_matches_parallel,
    assert_left_padded_batch_generates_as_alone,
    make_tiny_model,
    tokens,
)
from transformers import AutoModelForCausalLM, DynamicCache

from linearize import LinearizeError, linearize
from linearize.config import TransferConfig
from linearize.layers.attention import LinearizedAttention, attention_mode
from linearize.layers.cache import LinearizedCacheLayer
from linearize.teacher.families import check_supported, local_layers
from linearize.train.transfer import attention_transfer, position_embeddings, run_teacher_layers

ATTENTION = {"window_size": 4, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16}
LOCAL, GLOBAL = "sliding_attention", "full_attention"


def teacher(layer_types=(LOCAL, GLOBAL), **overrides):
    return make_tiny_model("gemma3_text", layer_types=list(layer_types), num_hidden_layers=len(layer_types),
                           **overrides)


def kinds(model) -> list[str]:
    return [type(layer.self_attn).__name__ for layer in model.model.layers]


def test_local_layers_are_kept_by_default_and_converted_on_request():
    original = teacher()
    kept_module = original.model.layers[0].self_attn
    assert local_layers(original.config) == [0]
    model = linearize(original, "hybrid", ATTENTION)
    assert kinds(model) == ["Gemma3Attention", "LinearizedAttention"]
    assert model.model.layers[0].self_attn is kept_module
    converted = linearize(teacher(), "hybrid", {**ATTENTION, "local_layers": "convert"})
    assert kinds(converted) == ["LinearizedAttention"] * 2
    with pytest.raises(LinearizeError, match="nothing would be linearized"):
        linearize(teacher(), "hybrid", {"softmax_layers": [1]})
    with pytest.raises(LinearizeError, match="local_layers must be one of keep, convert"):
        linearize(teacher(), "hybrid", {"local_layers": "drop"})


@pytest.mark.parametrize("local", ["keep", "convert"])
def test_every_teacher_pass_keeps_the_teachers_local_window(local):
    """Over 40 tokens (window 8) the softmax mode of the model and the layer-by-layer teacher pass of stage 1
    both give the teacher's hidden states: a converted local layer applies its teacher's window itself."""
    original = teacher()
    x = tokens(length=40)
    with torch.no_grad():
        expected = original(x, output_hidden_states=True)
        model = linearize(original, "hybrid", {**ATTENTION, "local_layers": local})
        with attention_mode(model, "softmax"):
            torch.testing.assert_close(model(x).logits, expected.logits, rtol=0, atol=0)
        hidden = model.model.embed_tokens(x)
        for index in range(2):
            hidden, recorded = run_teacher_layers(model, hidden, range(index, index + 1),
                                                  position_embeddings(model, hidden))
            reached = hidden if index == 0 else model.model.norm(hidden)  # the last entry is after the final norm
            torch.testing.assert_close(reached, expected.hidden_states[index + 1], rtol=1e-5, atol=1e-5)
            assert list(recorded) == ([index] if local == "convert" or index == 1 else [])
        # a full window in a local layer is not the teacher: the window matters at this length
        wide = teacher()
        wide.config.layer_types = [GLOBAL, GLOBAL]
        wide.model.layers[0].self_attn.sliding_window = None
        assert not torch.allclose(wide(x).logits, expected.logits, atol=1e-4)


@pytest.mark.parametrize("local", ["keep", "convert"])
@pytest.mark.parametrize("method", ["hybrid", "lolcats", "liger"])
def test_prefill_then_decode_matches_one_parallel_forward(local, method):
    model = linearize(teacher(), method, {**(ATTENTION if method == "hybrid" else {"window_size": 4}),
                                          "local_layers": local})
    assert_decoding_matches_parallel(model, tokens(length=40), prefill=19)


def test_decode_state_is_bounded_with_local_layers_kept():
    model = linearize(teacher(), "hybrid", ATTENTION)
    sizes = []
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(length=12), past_key_values=cache, use_cache=True)
        for step in range(60):
            model(tokens(length=1, seed=step), past_key_values=cache, use_cache=True)
            if step in (20, 59):
                sizes.append(cache.layers[0].keys.shape[-2])
                assert isinstance(cache.layers[1], LinearizedCacheLayer)
    assert sizes == [7, 7]  # the kept local layer holds its last window - 1 keys (window 8), at any length


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone():
    # the 13-token prompt outgrows the kept local layer's window (8) while the batch decodes
    assert_left_padded_batch_generates_as_alone(linearize(teacher(), "hybrid", ATTENTION), lengths=(13, 6, 10))


@pytest.mark.parametrize("local", ["keep", "convert"])
def test_stage1_trains_the_same_mixers_with_any_store(tmp_path, local):
    """Three layers (local, global, local): the teacher re-run layer by layer (store none / blocks) gives the
    targets the stored activations give, so the mixers come out the same."""
    types = (LOCAL, GLOBAL, LOCAL)
    sequences = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    config = {"tokens": 80, "epochs": 2, "lr": 0.05, "warmup_steps": 1, "cache_dtype": "float32"}
    trained = []
    for store in ("layers", "none"):
        model = linearize(teacher(types, initializer_range=0.2), "hybrid", {**ATTENTION, "local_layers": local})
        attention_transfer(model, sequences, TransferConfig(**config, store=store, layers_per_block=1),
                           tmp_path / store, 100)
        trained.append({n: p.detach().clone() for n, p in model.mixer_state_dict().items()})
    converted = sorted({int(name.split(".")[2]) for name in trained[0]})
    assert converted == ([1] if local == "keep" else [0, 1, 2])
    for name, value in trained[1].items():
        torch.testing.assert_close(value, trained[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_saved_student_loads_as_an_ordinary_hf_model(tmp_path):
    model = linearize(teacher(), "hybrid", ATTENTION)
    with torch.no_grad():
        for p in model.mixer_state_dict().values():
            p.add_(0.1)
        expected = model(tokens()).logits
    model.config.weights = "full"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert kinds(loaded) == ["Gemma3Attention", "LinearizedAttention"]
    assert isinstance(loaded.model.layers[1].self_attn, LinearizedAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, expected, rtol=1e-5, atol=1e-5)


def test_gemma3_with_its_vision_tower_is_refused_with_the_text_model_named():
    with pytest.raises(LinearizeError, match="gemma3_text"):
        check_supported("gemma3", "google/gemma-3-4b-it")


def test_compiled_decoding_is_refused_while_local_layers_keep_their_cache():
    with pytest.raises(LinearizeError, match="local_layers"):
        linearize(teacher(), "hybrid", ATTENTION).compile_decoding()


def test_the_model_card_names_the_teachers_license():
    from linearize.models.saving import default_card

    model = linearize(teacher(), "hybrid", ATTENTION)
    model.config.teacher = "gemma3-270m"
    assert "under the Gemma Terms of Use (https://ai.google.dev/gemma/terms)" in default_card(model)
    model.config.teacher = "/some/local/teacher"
    assert "Terms" not in default_card(model)
