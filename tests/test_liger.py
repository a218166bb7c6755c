"""Liger: a gated recurrence built from the teacher's own key projection (no new parameters), mixed with
sliding-window softmax attention (Liger Attention). Tiny random models and mixer-level tensors only."""

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_model, tokens
from transformers import DynamicCache

from linearize import LinearizeError, linearize
from linearize.layers.attention import MixerInput, linearized_attentions
from linearize.methods import build_config, method_settings
from linearize.methods.liger import LigerMixer
from linearize.ops import linear_attention_parallel, window_attention_parallel

# make_tiny_model: 4 query heads, 2 key/value heads of size 16, hidden size 64
B, H, HK, D, HIDDEN = 2, 4, 2, 16, 64
T = 40
GATES = ["gla", "hgrn2", "none"]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1.0))


def make_mixer(**attention) -> LigerMixer:
    """A LigerMixer for the tiny models' head layout, configured through the public config path."""
    return LigerMixer(method_settings("liger", {"chunk_size": 16, **attention}), D)


def heads(t: int = T, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q [B, H, t, D], k, v [B, Hk, t, D] (after RoPE) and q_nope, k_nope (before): independent tensors,
    so a mixer that read the wrong pair would be caught. Scaled up so softmax features are not flat."""
    g = torch.Generator().manual_seed(seed)
    q, q_nope = (2 * torch.randn(B, H, t, D, generator=g) for _ in range(2))
    k, v, k_nope = (2 * torch.randn(B, HK, t, D, generator=g) for _ in range(3))
    return q, k, v, q_nope, k_nope


def run(mixer: LigerMixer, q, k, v, q_nope, k_nope, state=None, output_state=False):
    hidden = torch.zeros(q.shape[0], q.shape[2], HIDDEN)
    return mixer(MixerInput(q, k, v, q_nope, k_nope, hidden), state, output_state)


def piecewise(mixer: LigerMixer, q, k, v, q_nope, k_nope, pieces: list[int]) -> torch.Tensor:
    """Run the mixer as prefill (first piece) then continuations (the rest) from its decode state."""
    outs, start, state = [], 0, None
    for n in pieces:
        part = slice(start, start + n)
        out, state = run(mixer, q[:, :, part], k[:, :, part], v[:, :, part], q_nope[:, :, part],
                         k_nope[:, :, part], state, output_state=True)
        outs.append(out)
        start += n
    assert start == q.shape[2]
    return torch.cat(outs, dim=2)


def recurrence_reference(mixer: LigerMixer, q_nope, k_nope, v) -> torch.Tensor:
    """The gated recurrence alone, by the quadratic reference op, from the mixer's own inputs."""
    fq, fk, log_gate = mixer.recurrence_inputs(q_nope, k_nope)
    return linear_attention_parallel(fq, fk, v, log_gate, normalize=mixer.settings.normalize)[0]


# ---------------------------------------------------------------- no new parameters


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_liger_adds_no_parameters_and_nothing_is_trainable_before_lora(family):
    teacher = make_tiny_model(family)
    before = {name: param for name, param in teacher.named_parameters()}
    model = linearize(teacher, "liger")
    after = {name: param for name, param in model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before), "the teacher's tensors are reused, not copied"
    assert model.mixer_state_dict() == {}
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- gates from the key projection


@pytest.mark.parametrize("gate", GATES)
def test_gates_and_features_are_built_from_the_key_projection(gate):
    model = linearize(make_tiny_model("llama"), "liger", {"gate": gate})
    layer = linearized_attentions(model)[0]
    hidden = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(T)[None].expand(B, -1)
    with torch.no_grad():
        _, _, _, q_nope, k_nope = layer.project(hidden, model.model.rotary_emb(hidden, position_ids))
        fq, fk, log_gate = layer.mixer.recurrence_inputs(q_nope, k_nope)
        k_heads = layer.k_proj(hidden).view(B, T, HK, D).transpose(1, 2)  # [B, Hk, T, D], before RoPE
        q_heads = layer.q_proj(hidden).view(B, T, H, D).transpose(1, 2)
    close(k_nope, k_heads, tol=0)
    close(fq, q_heads.softmax(-1))
    if gate == "none":
        assert log_gate is None
        close(fk, k_heads.softmax(-1))
        return
    assert layer.mixer.settings.gate_normalizer == 16.0  # Liger's "gate logit normalizer"
    assert log_gate.shape == (B, HK, T, D), "one decay per key feature, per key/value head (GLA)"
    close(log_gate, F.logsigmoid(k_heads) / 16)
    assert (log_gate < 0).all() and torch.isfinite(log_gate).all()
    if gate == "gla":
        close(fk, k_heads.softmax(-1))
    else:  # hgrn2: input key tied to the forget gate
        close(fk, 1 - log_gate.exp())


@pytest.mark.parametrize("normalizer", [16.0, 4.0])
def test_gate_normalizer_divides_the_log_gate(normalizer):
    mixer = make_mixer(gate_normalizer=normalizer)
    _, _, _, q_nope, k_nope = heads(t=8)
    _, _, log_gate = mixer.recurrence_inputs(q_nope, k_nope)
    close(log_gate, F.logsigmoid(k_nope) / normalizer)


# ---------------------------------------------------------------- GQA: states per key/value head


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", [0, 8])
def test_per_kv_head_states_equal_the_computation_expanded_to_query_heads(gate, window):
    """Keys, values and gates are all per KV head, so keeping the state per KV head is exact: the
    reference's repeat_kv (every KV head copied to its query heads first) gives the same outputs."""
    mixer = make_mixer(gate=gate, window_size=window)
    q, k, v, q_nope, k_nope = heads()
    groups = H // HK
    k_x, v_x, k_nope_x = (x.repeat_interleave(groups, dim=1) for x in (k, v, k_nope))
    grouped, grouped_state = run(mixer, q, k, v, q_nope, k_nope, output_state=True)
    expanded, expanded_state = run(mixer, q, k_x, v_x, q_nope, k_nope_x, output_state=True)
    close(grouped, expanded)
    state, state_x = grouped_state.recurrent, expanded_state.recurrent
    assert state.shape == (B, HK, D, D + 1) and state_x.shape == (B, H, D, D + 1)
    close(state.repeat_interleave(groups, dim=1), state_x)


# ---------------------------------------------------------------- Liger Attention: window + recurrence


@pytest.mark.parametrize("window", [4, 8])
def test_mix_one_zero_is_exactly_sliding_window_attention_in_prefill_and_decode(window):
    mixer = make_mixer(window_size=window, mix=[1.0, 0.0])
    q, k, v, q_nope, k_nope = heads()
    expected, _ = window_attention_parallel(q, k, v, window, scale=D**-0.5)
    close(run(mixer, q, k, v, q_nope, k_nope)[0], expected)
    close(piecewise(mixer, q, k, v, q_nope, k_nope, [19] + [1] * 21), expected)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("normalize", [True, False])
def test_window_zero_is_the_gated_recurrence_alone_whatever_the_mix(gate, normalize):
    mixer = make_mixer(gate=gate, normalize=normalize, window_size=0, mix=[0.5, 0.5])
    q, k, v, q_nope, k_nope = heads()
    expected = recurrence_reference(mixer, q_nope, k_nope, v)
    close(run(mixer, q, k, v, q_nope, k_nope)[0], expected)
    close(piecewise(mixer, q, k, v, q_nope, k_nope, [19] + [1] * 21), expected)


@pytest.mark.parametrize("mix", [[0.5, 0.5], [0.3, 0.7]])
def test_liger_attention_is_the_mix_of_window_on_rope_heads_and_recurrence_on_raw_heads(mix):
    mixer = make_mixer(window_size=8, mix=mix)
    q, k, v, q_nope, k_nope = heads()
    window, _ = window_attention_parallel(q, k, v, 8, scale=D**-0.5)
    expected = mix[0] * window + mix[1] * recurrence_reference(mixer, q_nope, k_nope, v)
    close(run(mixer, q, k, v, q_nope, k_nope)[0], expected)
    # decode continues the same sum, also when a step brings several tokens
    close(piecewise(mixer, q, k, v, q_nope, k_nope, [19, 3, 1, 1, 16]), expected)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("window", [0, 8])
def test_prefill_then_decode_matches_one_parallel_forward(gate, normalize, window):
    model = linearize(make_tiny_model("llama"), "liger",
                      {"gate": gate, "normalize": normalize, "window_size": window, "chunk_size": 16})
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :19], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(19, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- decode memory


def prefill_cache(model, length: int, decode_steps: int = 3) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    x = tokens(batch=1, length=length + decode_steps)
    with torch.no_grad():
        model(x[:, :length], past_key_values=cache, use_cache=True)
        for t in range(length, length + decode_steps):
            model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("window", [0, 8])
def test_decode_state_is_per_kv_head_and_does_not_grow_with_length(window):
    model = linearize(make_tiny_model("llama"), "liger", {"window_size": window})
    sizes = []
    for length in (16, 64):
        cache = prefill_cache(model, length)
        for layer in cache.layers:
            assert layer.state.recurrent.shape == (1, HK, D, D + 1)
            if window:
                assert layer.state.window_keys.shape == layer.state.window_values.shape == (1, HK, window - 1, D)
        sizes.append([layer.nbytes() for layer in cache.layers])
    assert sizes[0] == sizes[1]


def test_liger_decode_memory_is_half_of_lolcats_hedgehog_at_the_same_window():
    """Per layer, fp32, batch 1, window w:
    Liger:   state [Hk, D, D + 1]   + (w - 1) x (key D + value D)
    LoLCATS: state [Hk, 2D, D + 1]  + (w - 1) x (key D + Hedgehog features 2D + value D)
    Hedgehog's features are twice the head dim (softmax of +xW and -xW), so every term doubles.
    Both also keep per row: the token count (int64) and, per window slot, validity (bool) and position (int64)."""
    window = 8
    sizes = {}
    for method in ("liger", "lolcats"):
        model = linearize(make_tiny_model("llama"), method, {"window_size": window})
        sizes[method] = {layer.nbytes() for layer in prefill_cache(model, 32).layers}
    bookkeeping = 8 + (window - 1) * (1 + 8)
    liger = 4 * HK * (D * (D + 1) + (window - 1) * 2 * D)
    lolcats = 4 * HK * (2 * D * (D + 1) + (window - 1) * (D + 2 * D + D))
    assert sizes == {"liger": {liger + bookkeeping}, "lolcats": {lolcats + bookkeeping}}
    assert 2 * liger == lolcats


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("key", ["feature_map", "feature_dim", "window_factor_init", "key_maps"])
def test_options_of_other_methods_are_unknown_keys_naming_the_key(key):
    with pytest.raises(LinearizeError, match=re.escape(f"unknown config key 'attention.{key}'")):
        build_config({"method": "liger", "attention": {key: 1}})


def test_enabling_a_stage_liger_does_not_run_is_refused():
    with pytest.raises(LinearizeError, match="transfer.enabled does not apply to method 'liger'"):
        build_config({"method": "liger", "transfer": {"enabled": True}})


@pytest.mark.parametrize(
    "attention,message",
    [
        ({"gate": "mamba"}, "attention.gate must be one of gla, hgrn2, none"),
        ({"mix": [0.5, 0.25, 0.25]}, "attention.mix must be two weights"),
        ({"gate_normalizer": 0.0}, "attention.gate_normalizer must be positive"),
    ],
)
def test_bad_liger_settings_are_rejected(attention, message):
    with pytest.raises(LinearizeError, match=re.escape(message)):
        build_config({"method": "liger", "attention": attention})


def test_liger_defaults_need_no_transfer():
    config = build_config({"method": "liger"})
    assert config.attention.gate == "gla" and config.finetune.lora_alpha == 8.0
    assert config.attention.window_size == 64 and config.attention.mix == [0.5, 0.5]
    assert config.attention.normalize and not config.transfer.enabled


# ---------------------------------------------------------------- why the recurrence is normalised


@pytest.mark.parametrize("gate", GATES)
def test_unnormalised_recurrence_is_the_normalised_one_times_the_normaliser(gate):
    """The reference's unnormalised output is ours times phi(q).z_t, z_t the decayed sum of key features:
    the normaliser is what the magnitude of the reference branch scales with."""
    q, k, v, q_nope, k_nope = heads()
    normed = make_mixer(gate=gate, window_size=0)
    raw = make_mixer(gate=gate, window_size=0, normalize=False)
    fq, fk, log_gate = normed.recurrence_inputs(q_nope, k_nope)
    normaliser = linear_attention_parallel(fq, fk, torch.ones_like(v[..., :1]), log_gate, normalize=False)
    normaliser = normaliser[0]
    close(run(raw, q, k, v, q_nope, k_nope)[0], run(normed, q, k, v, q_nope, k_nope)[0] * (normaliser + 1e-6))


def gla_branch_magnitude(normalize: bool, dominant_channel: float) -> float:
    """Median |output| of layer 0's GLA branch (no window) on a tiny qwen2, whose q/k biases put
    `dominant_channel` on feature 0 of every head (0 = the random init)."""
    model = linearize(make_tiny_model("qwen2"), "liger", {"window_size": 0, "normalize": normalize})
    layer = linearized_attentions(model)[0]
    with torch.no_grad():
        for proj in (layer.q_proj, layer.k_proj):
            proj.bias.view(-1, D)[:, 0] = dominant_channel
    captured = {}
    layer.mixer.register_forward_hook(lambda module, args, out: captured.update(out=out[0]))
    with torch.no_grad():
        model(tokens(length=64))
    return captured["out"].abs().median().item()


def test_unnormalised_gla_branch_is_much_larger_when_features_share_a_dominant_channel():
    """Why `normalize: true` is the default. Pretrained q/k carry a few large channels shared by all
    tokens, so softmax features overlap (phi(q).phi(k) near 1) and the unnormalised branch grows to about
    the gate horizon (1 / (1 - 2**(-1/16)) ~ 24 tokens at Liger's init): measured ~20x on SmolLM2. A
    q/k bias of 4 on one channel stands in for that here (ratio ~16). On a plain random tiny model the
    features are nearly flat (phi(q).phi(k) ~ 1/D) and the two branches are of similar size (~0.9x):
    the ratio is a property of the features, not of the gates alone."""
    flat = gla_branch_magnitude(False, 0.0) / gla_branch_magnitude(True, 0.0)
    dominant = gla_branch_magnitude(False, 4.0) / gla_branch_magnitude(True, 4.0)
    assert dominant > 2
    assert flat < 2 < dominant
