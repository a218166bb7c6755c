"""Test helpers: tiny random models of every supported family and a byte-level tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def make_tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random model of one supported family; frozen and in eval mode like a teacher.

    Two layers, hidden size 64, 4 query heads and 2 key/value heads of size 16 (so GQA is exercised),
    vocabulary 260. The family's own quirks come with its config class: qwen2 has q/k/v biases, qwen3
    has q/k RMS norms, gemma3_text has q/k norms, its own query scale, scaled embeddings, a rotary embedding
    per layer type and a local layer (window 8) before a global one. `overrides` replace any config field.
    The global torch RNG is left untouched.
    """
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    config_classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                      "gemma3_text": Gemma3TextConfig}
    fields: dict[str, Any] = {
        "vocab_size": 260,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
    }
    if model_type == "mistral":
        fields["sliding_window"] = None  # full attention, like the other families
    if model_type == "gemma3_text":
        fields.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12)
    fields.update(overrides)
    config = config_classes[model_type](**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.to(torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def make_byte_tokenizer():
    """One token per UTF-8 byte (ids 0-255) plus "<eos>" (id 256): fits `make_tiny_model`'s vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def tokens(batch: int = 2, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_decoding_matches_parallel(model, x: torch.Tensor, prefill: int) -> None:
    """Prefill `x[:, :prefill]` through the model's own cache, then one token at a time: the logits equal one
    parallel forward over `x` (the invariant every method keeps)."""
    from transformers import DynamicCache

    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :prefill], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                  for t in range(prefill, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def assert_left_padded_batch_generates_as_alone(model, lengths=(13, 6, 9)) -> None:
    """Prompts of `lengths` tokens left-padded into one batch generate, row for row, what each generates alone."""
    prompts = [tokens(batch=1, length=n, seed=n)[0] for n in lengths]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        assert torch.equal(together[row, width:], alone[0, len(prompt):]), f"row {row}"
