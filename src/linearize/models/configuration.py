"""`LinearizedConfig`: a Hugging Face config of our own model type, "linearized".

It carries the teacher's architecture config whole (`text_config`, e.g. a LlamaConfig) plus the
linearization: the method, its attention settings, where the teacher comes from (`teacher`), which
directory variant this is (`weights`: "adapter" = only the trained tensors, the teacher read at load
time; "full" = self-contained) and the shape of the LoRA adapter an adapter directory holds (`lora`).
Registered with `AutoConfig` when `linearize` is imported; transformers without linearize refuses the
model type instead of loading a softmax model. Architecture attributes (vocab_size, hidden_size,
num_hidden_layers, ...) read through to the teacher's config, so generation, peft and lm-eval see the
usual fields.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

MODEL_TYPE = "linearized"


@strict
class LinearizedConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    method: str = "hybrid"
    attention: dict | None = None  # the method's settings (its `attention:` config section)
    teacher: str | None = None  # the teacher: hub id, local path, or the embedded default's name
    weights: str = "full"  # "full": every weight in this directory; "adapter": trained tensors + the teacher
    lora: dict | None = None  # adapter directories holding LoRA tensors: r, lora_alpha, target_modules
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.attention is None:
            self.attention = {}
        if self.method == "hybrid" and "memory_ngram" in self.attention and "memory_bias" not in self.attention:
            # a hybrid's whole settings, saved before memory_bias existed: served as it was trained, without
            self.attention["memory_bias"] = 0.0
        if getattr(self.text_config, "_attn_implementation", None) is None:
            self.text_config._attn_implementation = "sdpa"

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: architecture fields live on the teacher's config
        if name.startswith("__") or name == "text_config":
            raise AttributeError(name)
        text_config = self.__dict__.get("text_config")
        if text_config is not None and not isinstance(text_config, dict) and hasattr(text_config, name):
            return getattr(text_config, name)
        raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}'")
