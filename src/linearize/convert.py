"""Swap a teacher's softmax attention modules for linearized ones, in place."""

from __future__ import annotations

from torch import nn

from linearize.attention import LinearizedAttention, linearized_attentions
from linearize.config import AttentionConfig
from linearize.errors import LinearizeError
from linearize.methods import get_method
from linearize.teacher import SUPPORTED_MODEL_TYPES


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (`model.model.layers`), peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LinearizeError(f"{type(base).__name__} has no decoder layers at model.layers; is it a causal LM?")
    return layers


def check_supported(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LinearizeError(
            f"model type '{model_type}' is not supported: supported are {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(any model whose attention has q/k/v/o projections with RoPE)"
        )


def convert(model: nn.Module, method: str, attention: AttentionConfig) -> nn.Module:
    """Replace every attention module (except `attention.softmax_layers`) by a `LinearizedAttention`.

    The teacher's projections are reused by reference; all teacher weights are frozen, and only the
    mixers' own parameters (learnable feature maps, window factors) are left trainable.
    """
    check_supported(model)
    if linearized_attentions(model):
        raise LinearizeError("this model is already linearized")
    layers = decoder_layers(model)
    bad = [i for i in attention.softmax_layers if not 0 <= i < len(layers)]
    if bad:
        raise LinearizeError(f"attention.softmax_layers {bad} out of range: the model has {len(layers)} layers")
    model.requires_grad_(False)
    impl = get_method(method)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(layers):
        if index in attention.softmax_layers:
            continue
        mixer = impl.build_mixer(attention, config.num_attention_heads, config.num_key_value_heads, head_dim)
        mixer.to(device=layer.self_attn.o_proj.weight.device)
        layer.self_attn = LinearizedAttention(layer.self_attn, mixer, index)
    return model


def mixer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The converted layers' own parameters, by name (what attention transfer trains)."""
    return {name: param for name, param in model.named_parameters() if ".mixer." in name}
