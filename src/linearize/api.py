"""The public Python API.

    import linearize
    student = linearize.linearize(teacher_model, method="lolcats")   # converted, untrained
    report = linearize.run(linearize.load_config("configs/default.yaml"))  # the whole recipe
    model, tokenizer = linearize.load("runs/default/model")          # a saved student, ready to generate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from linearize.checkpoint import (
    CONFIG_FILE,
    LORA_FILE,
    MIXERS_FILE,
    atomic_replace_dir,
    atomic_save_tensors,
    load_params_strict,
    load_tensors,
)
from linearize.config import RunConfig, _from_dict, build_config, deep_merge
from linearize.convert import convert, mixer_parameters
from linearize.errors import LinearizeError
from linearize.methods import get_method
from linearize.teacher import load_teacher
from linearize.train.finetune import lora_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LinearizeError(f"dtype '{name}' is not supported: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def linearize(model: torch.nn.Module, method: str = "lolcats", **settings: Any) -> torch.nn.Module:
    """Convert a loaded Hugging Face causal LM in place and return it (untrained).

    `settings` are config sections, e.g. `attention={"window_size": 32, "softmax_layers": [0]}`.
    """
    config = build_config(deep_merge({"method": method}, settings))
    return convert(model, config.method, config.attention)


def config_from_saved(data: dict[str, Any]) -> RunConfig:
    """A complete saved config (all keys present) -> RunConfig, checked by its method."""
    config = _from_dict(RunConfig, data)
    get_method(config.method).check_config(config)
    return config


def save_student(model: torch.nn.Module, config: RunConfig, directory: str | Path) -> Path:
    """Save what training made: mixer parameters, the LoRA adapter (if any) and the run config."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_save_tensors(dict(mixer_parameters(base)), tmp / MIXERS_FILE, metadata={"format": "linearize"})
    if isinstance(model, PeftModel):
        atomic_save_tensors(get_peft_model_state_dict(model), tmp / LORA_FILE, metadata={"format": "linearize"})
    atomic_replace_dir(tmp, directory)
    return directory


def load(path: str | Path, device: str = "auto", merge: bool = True) -> tuple[torch.nn.Module, Any]:
    """Load a saved student (a run's `model/` dir, or an exported merged dir) -> (model, tokenizer).

    A student dir is rebuilt from its teacher (named in linearize.yaml) plus the trained tensors, all
    loaded strictly. With `merge`, the LoRA adapter is merged into the projections.
    """
    path = Path(path)
    if (path / "config.json").is_file() and (path / CONFIG_FILE).is_file() and not (path / MIXERS_FILE).is_file():
        return _load_exported(path, device)
    if not (path / CONFIG_FILE).is_file():
        raise LinearizeError(
            f"'{path}' is not a linearize model: it has no {CONFIG_FILE}. Point to a run's model/ directory "
            "(e.g. runs/default/model) or to a directory written by `linearize export`"
        )
    try:
        config = config_from_saved(yaml.safe_load((path / CONFIG_FILE).read_text()))
    except yaml.YAMLError as err:
        raise LinearizeError(f"'{path / CONFIG_FILE}' is corrupt ({err})") from err
    target = resolve_device(device if device != "auto" else config.device)
    model, tokenizer = load_teacher(config.model, dtype=resolve_dtype(config.dtype))
    model.to(target)
    convert(model, config.method, config.attention)
    load_params_strict(mixer_parameters(model), load_tensors(path / MIXERS_FILE), str(path / MIXERS_FILE))
    if (path / LORA_FILE).is_file():
        model = get_peft_model(model, lora_config(config.finetune))
        adapter = load_tensors(path / LORA_FILE)
        result = set_peft_model_state_dict(model, adapter)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing or result.unexpected_keys:
            raise LinearizeError(f"'{path / LORA_FILE}' does not match the model (missing {missing[:3]})")
        if merge:
            model = model.merge_and_unload()
    model.eval()
    model.linearize_config = config
    return model, tokenizer


def export(model: torch.nn.Module, tokenizer: Any, config: RunConfig, directory: str | Path) -> Path:
    """Write a standalone merged model directory (full weights, no teacher needed to load it)."""
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return directory


def _load_exported(path: Path, device: str) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = config_from_saved(yaml.safe_load((path / CONFIG_FILE).read_text()))
    hf_config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=resolve_dtype(config.dtype))
    convert(model, config.method, config.attention)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise LinearizeError(f"'{path}' has no .safetensors weights: re-export the model")
    state = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings are saved once; everything else must match exactly
    missing = [key for key in missing if not (hf_config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise LinearizeError(
            f"'{path}' weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    model.to(resolve_device(device if device != "auto" else config.device)).eval()
    model.requires_grad_(False)
    model.linearize_config = config
    return model, AutoTokenizer.from_pretrained(path)

