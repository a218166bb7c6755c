"""`LinearizedForCausalLM`: a teacher's decoder with its attention layers swapped for linearized ones, as
an ordinary Hugging Face causal LM (`from_pretrained`, `generate()`, peft, lm-eval's HFLM).

The module tree and parameter names are the teacher's (`model.layers.N.self_attn.q_proj.weight`, ...)
plus each converted layer's mixer (`model.layers.N.self_attn.mixer.*`), so a full-weights directory is the
teacher's files plus the mixers. Two directory variants, both opened by
`AutoModelForCausalLM.from_pretrained(dir)` once `linearize` is imported:

- full weights (`config.weights == "full"`): self-contained `model.safetensors`, for sharing;
- adapter-only (`config.weights == "adapter"`): `linearize_adapter.safetensors` holds only what training
  made (mixer parameters and the LoRA adapter); loading reads the teacher (`config.teacher`) first.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from linearize.errors import LinearizeError
from linearize.layers.attention import TOKEN_IDS, LinearizedAttention, under_autocast
from linearize.methods import get_method, method_settings
from linearize.methods.base import shapes_from_config
from linearize.models.configuration import LinearizedConfig
from linearize.models.saving import (
    default_card,
    find_adapter,
    load_adapter_only,
    save_adapter,
    save_full,
)
from linearize.teacher.families import check_supported, layer_rotary, local_layers


class LinearizedPreTrainedModel(PreTrainedModel):
    config_class = LinearizedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _is_stateful = True  # no cache rollback: assisted decoding is refused by generate()


class LinearizedForCausalLM(LinearizedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearizedConfig):
        super().__init__(config)
        text_config = config.text_config
        check_supported(text_config.model_type)
        teacher = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)](text_config)
        self.model = teacher.model
        self.lm_head = teacher.lm_head
        swap_attention(self, config.method, config.attention)
        self._compiled_decoding = None  # `compile_decoding`
        self.post_init()

    @classmethod
    def from_teacher(
        cls, teacher: PreTrainedModel, method: str, settings: Any, initialise: bool = True,
        device: torch.device | None = None,
    ) -> LinearizedForCausalLM:
        """Wrap a loaded teacher (its modules reused by reference, never copied: the teacher object becomes
        the student) and convert its attention. Teacher weights are frozen; the mixers' own parameters are
        trainable. `initialise`: let the method re-initialise weights (XATL's `init: random`); loading a
        saved student passes False. `device`: where the mixers are built (default: beside the teacher's
        weights; a teacher whose weights are still on the meta device, to be streamed, gets them on the CPU)."""
        if isinstance(teacher, LinearizedForCausalLM):
            raise LinearizeError("this model is already linearized: convert the teacher, not the student")
        check_supported(getattr(teacher.config, "model_type", None))
        settings = method_settings(method, settings)
        config = LinearizedConfig(
            text_config=teacher.config, method=method, attention=dataclasses.asdict(settings),
            teacher=teacher_reference(teacher),
        )
        with torch.device("meta"):  # the structure only: its meta modules are replaced by the teacher's
            model = cls(config)
        model.model, model.lm_head = teacher.model, teacher.lm_head
        teacher.requires_grad_(False)
        if device is None:
            device = teacher.lm_head.weight.device
            device = torch.device("cpu") if device.type == "meta" else device
        swap_attention(model, method, settings, device=device)
        if initialise:
            get_method(method).initialise(model, settings)
        model.generation_config = teacher.generation_config
        model.eval()
        return model

    def compile_decoding(
        self, enable: bool = True, freeze: bool = True, rebuild: bool = False
    ) -> LinearizedForCausalLM:
        """Run single-token decoding steps as one torch.compile graph of the whole model
        (`linearize.models.compiled`; `enable=False` goes back to eager, `True` again reuses the graph).
        Same outputs; on a CPU a step dispatches a few fused kernels per layer instead of a few dozen ops
        (bench/decode.py measures it). `freeze`: inductor packs the weights for its matrix-vector products
        (faster on a CPU; the compiled step keeps its own copy of the weights, as they were when it compiled:
        `rebuild=True` compiles anew after changing them). The first step after this compiles (about a
        minute for a 135M model on 2 CPU cores); prefill and training stay eager."""
        from linearize.models.compiled import CompiledDecoding

        step = self._compiled_decoding
        if enable and (step is None or rebuild or step.freeze != freeze):
            self._compiled_decoding = CompiledDecoding(self, freeze)
        if self._compiled_decoding is not None:
            self._compiled_decoding.enabled = enable
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        step = self._compiled_decoding
        if step is not None and step.handles(input_ids, attention_mask, past_key_values, inputs_embeds, labels, kwargs):
            logits = step(input_ids, position_ids, past_key_values)
            return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
        if input_ids is not None:  # mixers that remember by token (a recall memory) read them
            kwargs[TOKEN_IDS] = input_ids
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        kwargs.pop(TOKEN_IDS, None)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.logits(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states [..., C]: in the weights' dtype, also under an autocast (exact
        logits for the losses and the held-out numbers; `linearize.layers.attention.under_autocast`)."""
        if under_autocast(hidden):
            with torch.autocast(hidden.device.type, enabled=False):
                return self.lm_head(hidden.to(self.lm_head.weight.dtype))
        return self.lm_head(hidden)

    # --- the two directory variants ----------------------------------------------------------------------

    def mixer_state_dict(self) -> dict[str, torch.Tensor]:
        """The converted layers' own parameters, by name: what conversion added to the teacher."""
        return {name: p for name, p in self.named_parameters() if ".mixer." in name}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Full weights or adapter-only, as `config.weights` says (see the module docstring)."""
        if self.config.weights == "full":
            return super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            raise LinearizeError("push an adapter-only model with model.push_to_hub(repo_id)")
        save_adapter(self, Path(save_directory), lora_tensors=getattr(self, "lora_tensors", None))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        tokenizer=None,
        card: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload linearized model",
        **kwargs,
    ):
        """Upload this model as a Hugging Face repo in its `config.weights` variant, with its tokenizer and
        a model card (`card`, else a short one naming the method and how to load it)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "model"
            card = card or default_card(self)
            if self.config.weights == "adapter":
                save_adapter(self, directory, lora_tensors=getattr(self, "lora_tensors", None), tokenizer=tokenizer,
                             card=card)
            else:
                save_full(self, directory, tokenizer=tokenizer, card=card)
            return api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        adapter = find_adapter(pretrained_model_name_or_path, kwargs)
        if adapter is not None:
            return load_adapter_only(cls, pretrained_model_name_or_path, adapter, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def teacher_reference(teacher: PreTrainedModel) -> str | None:
    """How a saved student names its teacher: the embedded default or a hub id as given, a local path
    made absolute (`load_teacher` reads all three)."""
    info = getattr(teacher, "teacher_info", None)
    if info is None:
        return getattr(teacher.config, "_name_or_path", None) or None
    path = Path(info.name).expanduser()
    return str(path.resolve()) if path.exists() else info.name


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (`model.model.layers`) of a Llama-family causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise LinearizeError(f"{type(base).__name__} has no decoder layers at model.layers; is it a causal LM?")
    return layers


def kept_layers(text_config, settings: Any) -> list[int]:
    """The teacher's layers a conversion keeps as they are: `softmax_layers`, and the teacher's own
    sliding-window layers unless `local_layers` is "convert"."""
    local = local_layers(text_config) if getattr(settings, "local_layers", "keep") == "keep" else []
    return sorted(set(settings.softmax_layers) | set(local))


def swap_attention(model: nn.Module, method: str, settings: Any, device: torch.device | None = None) -> None:
    """Replace every attention module except the kept ones (`kept_layers`) by a `LinearizedAttention` with
    the method's mixer; teacher projections are reused by reference."""
    impl = get_method(method)
    settings = method_settings(method, settings)
    layers = decoder_layers(model)
    bad = [i for i in settings.softmax_layers if not 0 <= i < len(layers)]
    if bad:
        raise LinearizeError(f"attention.softmax_layers {bad} out of range: the model has {len(layers)} layers")
    text_config = model.config.text_config if isinstance(model.config, LinearizedConfig) else model.config
    kept = kept_layers(text_config, settings)
    if len(kept) == len(layers):
        raise LinearizeError(f"every layer of this model is kept as softmax attention ({len(layers)} layers: "
                             "attention.softmax_layers and the teacher's local layers): nothing would be linearized; "
                             "list fewer softmax_layers, or set attention.local_layers: convert")
    shapes = shapes_from_config(text_config)
    for index, layer in enumerate(layers):
        if index in kept:
            continue
        mixer = impl.build_mixer(settings, dataclasses.replace(shapes, layer_index=index, num_layers=len(layers)))
        if device is not None:
            mixer.to(device=device)
        layer.self_attn = LinearizedAttention(layer.self_attn, mixer, index, layer_rotary(model, index))
