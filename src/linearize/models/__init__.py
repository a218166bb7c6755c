"""Hugging Face model classes of ours, registered with the Auto classes when `linearize` is imported."""

from transformers import AutoConfig, AutoModelForCausalLM

from linearize.models.configuration import MODEL_TYPE, LinearizedConfig
from linearize.models.modeling import LinearizedForCausalLM
from linearize.models.saving import ADAPTER_FILE

AutoConfig.register(MODEL_TYPE, LinearizedConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizedConfig, LinearizedForCausalLM, exist_ok=True)

__all__ = ["ADAPTER_FILE", "LinearizedConfig", "LinearizedForCausalLM"]
