"""Text generation helpers shared by `linearize generate` and the report's sample generations, and the size of a
decode cache (what one sequence's state costs)."""

from __future__ import annotations

import torch

SAMPLE_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "In the beginning God created the heaven and the earth. And the earth was",
    "Explain in two sentences why the sky is blue.",
)


def prompt_text(tokenizer, prompt: str, raw: bool = False) -> str:
    """The chat template around a user prompt, when the tokenizer has one (and `raw` is off)."""
    if tokenizer.chat_template and not raw:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0,
                  seed: int = 0, raw: bool = False, stream: bool = False) -> str:
    """Greedy (temperature 0) or sampled continuation of a user prompt (inside the chat template unless
    `raw`); `stream` prints tokens as they come."""
    return continue_text(model, tokenizer, prompt_text(tokenizer, prompt, raw), max_new_tokens, temperature,
                         seed, stream)


def continue_text(model, tokenizer, text: str, max_new_tokens: int = 48, temperature: float = 0.0,
                  seed: int = 0, stream: bool = False) -> str:
    """The generated continuation of `text`, exactly as given (no template added)."""
    from transformers import TextStreamer

    inputs = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    torch.manual_seed(seed)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def sample_generations(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 40) -> list[str]:
    with torch.no_grad():
        return [generate_text(model, tokenizer, p, max_new_tokens=max_new_tokens) for p in prompts]


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor, or of the tensors inside a tensor subclass (a quanto packed tensor: codes, scales,
    shifts)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds: a linearized layer's state, a softmax layer's keys and values."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes") and callable(layer.nbytes):
            total += layer.nbytes()
        else:  # softmax keys and values, plus a quantized cache's packed part
            parts = (layer.keys, layer.values, getattr(layer, "_quantized_keys", None),
                     getattr(layer, "_quantized_values", None))
            total += sum(tensor_bytes(t) for t in parts)
    return total
