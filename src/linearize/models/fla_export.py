"""Export an XATL GLA student to flash-linear-attention's own model class (`fla.models.GLAForCausalLM`),
so GPU users run it on fla's Triton kernels.

The mapping is by role: the teacher family's names (Llama / Mistral layout) to fla's. Every tensor must
find its counterpart with the same shape, and every fla tensor must be filled: anything else is an error
that names both sides. What fla's GLA cannot express is refused before anything is written: q/k/v
biases (Qwen2), q/k norms (Qwen3), a softmax window branch, a decay projection other than fla's fixed
rank-16 / normaliser-16 one, RetNet (fla's retention applies its own RoPE with base 10000).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from linearize.errors import LinearizeError

RULES = [
    (r"model\.embed_tokens\.weight", r"model.embeddings.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"model.layers.\1.attn.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.mixer\.gk_proj\.(\d)\.(weight|bias)", r"model.layers.\1.attn.gk_proj.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.mixer\.g_proj\.weight", r"model.layers.\1.attn.g_proj.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.mixer\.g_norm", r"model.layers.\1.attn.g_norm_swish_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"model\.norm\.weight", r"model.norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
]


def fla_name(name: str) -> str:
    for pattern, target in RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise LinearizeError(f"student tensor {name} has no counterpart in flash-linear-attention's GLA model")


def check_exportable(model) -> None:
    config = model.config
    settings = config.attention
    if config.method != "xatl" or settings.get("mixer") != "gla":
        raise LinearizeError(
            f"only an XATL GLA student exports to flash-linear-attention (this one is method '{config.method}'"
            f"{', mixer ' + str(settings.get('mixer')) if config.method == 'xatl' else ''})"
        )
    if settings.get("window_size") or settings.get("softmax_layers"):
        raise LinearizeError(
            "fla's GLA is purely recurrent: export needs attention.window_size 0 and no softmax_layers"
        )
    if settings.get("gate_low_rank_dim") != 16 or settings.get("gate_normalizer") != 16:
        raise LinearizeError("fla's GLA fixes the decay projection at rank 16 and normaliser 16")


def fla_config(model) -> dict[str, Any]:
    """GLAConfig arguments describing the student's architecture."""
    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "hidden_size": text.hidden_size,
        "expand_k": heads * head_dim / text.hidden_size,
        "expand_v": heads * head_dim / text.hidden_size,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "intermediate_size": text.intermediate_size,
        "hidden_act": "swish",
        "norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size,
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "max_position_embeddings": text.max_position_embeddings,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": getattr(text, "pad_token_id", None),
        "use_short_conv": False,
        "use_output_gate": True,
        "attn_mode": "chunk",
    }


def fla_state_dict(model) -> dict[str, torch.Tensor]:
    """The student's tensors under fla's names (tied embeddings appear once, as fla's embeddings)."""
    check_exportable(model)
    return {fla_name(name): p.detach() for name, p in model.named_parameters()}


def to_fla(model):
    """fla's GLAForCausalLM holding the student's weights (strict: every tensor mapped, same shapes)."""
    try:
        from fla.models import GLAConfig, GLAForCausalLM
    except ImportError as error:
        raise LinearizeError(
            "exporting to flash-linear-attention needs it installed: pip install 'linearize[fla]'"
        ) from error
    tensors = fla_state_dict(model)
    config = GLAConfig(**fla_config(model))
    with torch.device("meta"):
        target = GLAForCausalLM(config)
    expected = dict(target.named_parameters())
    for name, tensor in tensors.items():
        if name not in expected:
            raise LinearizeError(f"student tensor maps to {name}, which fla's GLAForCausalLM does not have")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise LinearizeError(
                f"shape mismatch: student tensor {tuple(tensor.shape)} -> fla {name} {tuple(expected[name].shape)}"
            )
    unfilled = sorted(set(expected) - set(tensors))
    if unfilled:
        raise LinearizeError(f"fla tensors the student has nothing for: {', '.join(unfilled[:5])}")
    target.load_state_dict(tensors, strict=False, assign=True)
    target.tie_weights()
    return target.eval()


def export_fla(model, directory: Path, tokenizer=None) -> Path:
    """Write fla's own model directory (`GLAForCausalLM.from_pretrained` after `import fla`)."""
    target = to_fla(model)
    target.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return Path(directory)
