"""Writing and reading the two directory variants of a linearized model (see `models.modeling`).

Adapter-only: config.json (model type "linearized", with `teacher` and `lora` set), the tokenizer, a
model card, and `linearize_adapter.safetensors` holding the mixers' parameters under their model names
and the LoRA tensors under peft's names. Loading reads the teacher named by the config, converts it,
loads the mixers strictly and merges the LoRA adapter. Full weights: transformers' own save, the LoRA
adapter merged first. Nothing is ever unpickled.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from linearize.checkpoint import atomic_replace_dir, load_params_strict, load_tensors
from linearize.errors import LinearizeError
from linearize.models.configuration import LinearizedConfig
from linearize.teacher import teacher_license

ADAPTER_FILE = "linearize_adapter.safetensors"
LORA_PREFIX = "lora::"  # adapter-file names of LoRA tensors, apart from the mixers' parameter names


def lora_config_dict(peft_config) -> dict[str, Any]:
    return {
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "target_modules": sorted(peft_config.target_modules),
    }


def unwrap(model) -> tuple[Any, Any]:
    """(the LinearizedForCausalLM, the PeftModel around it or None)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model(), model
    if not isinstance(getattr(model, "config", None), LinearizedConfig):
        raise LinearizeError(f"expected a linearized model, got {type(model).__name__}")
    return model, None


def save_adapter(model, directory: Path, teacher: str | None = None, lora_tensors=None, tokenizer=None,
                 card: str | None = None, trained: dict[str, torch.Tensor] | None = None) -> Path:
    """Adapter-only directory: what training made, and where the teacher comes from. `trained`: the model's
    mixer and LoRA tensors by their names in `model`, when the model itself holds only shards of them."""
    from peft import get_peft_model_state_dict

    base, peft_model = unwrap(model)
    teacher = teacher or base.config.teacher
    if not teacher:
        raise LinearizeError("an adapter-only save needs the teacher's name or path (config.teacher)")
    if trained is None:
        tensors = {name: p.detach() for name, p in base.mixer_state_dict().items()}
    else:
        prefix = "base_model.model." if peft_model is not None else ""
        tensors = {name.removeprefix(prefix): t for name, t in trained.items() if ".mixer." in name}
    lora = None
    if peft_model is not None:
        lora_tensors = get_peft_model_state_dict(peft_model, state_dict=trained)
        lora = lora_config_dict(peft_model.peft_config["default"])
    elif lora_tensors:
        lora = base.config.lora
    for name, tensor in (lora_tensors or {}).items():
        tensors[LORA_PREFIX + name] = tensor.detach()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = base.config.to_dict()
    config.update({"teacher": teacher, "weights": "adapter", "lora": lora})
    LinearizedConfig.from_dict(config).save_pretrained(tmp)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if card is not None:
        (tmp / "README.md").write_text(card)
    atomic_replace_dir(tmp, directory)
    return directory


def license_line(teacher: str | None) -> str:
    """A sentence naming the license of an embedded teacher's weights, which the student's weights inherit."""
    terms = teacher_license(teacher)
    return f" Its weights derive from {teacher}'s and are under the {terms}." if terms else ""


def default_card(model) -> str:
    return f"""---
library_name: transformers
tags: [linearize, linear-attention, {model.config.method}]
---

# A {model.config.method} linearization of {model.config.teacher or "a softmax-attention model"}

Made with linearize: every attention layer swapped for a constant-memory mixer (method
`{model.config.method}`).{license_line(model.config.teacher)} Load it with `import linearize` first, which registers
the model type:

```python
import linearize
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this repo>")
```
"""


def save_full(model, directory: Path, tokenizer=None, card: str | None = None) -> Path:
    """Self-contained directory: every weight (LoRA merged), loadable without the teacher."""
    base, peft_model = unwrap(model)
    if peft_model is not None:
        base = peft_model.merge_and_unload()
    weights, lora = base.config.weights, base.config.lora
    base.config.weights, base.config.lora = "full", None
    try:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        atomic_replace_dir(tmp, directory)
    finally:
        base.config.weights, base.config.lora = weights, lora
    return directory


def find_adapter(name_or_path, kwargs: dict) -> str | None:
    """The adapter file of a local directory or hub repo, or None (a full-weights directory)."""
    local = Path(name_or_path)
    if local.is_dir():
        path = local / ADAPTER_FILE
        return str(path) if path.is_file() else None
    from transformers.utils.hub import cached_file

    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    return cached_file(name_or_path, ADAPTER_FILE, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def load_adapter_only(cls, name_or_path, adapter_path: str, **kwargs):
    """Teacher (named by the config) + conversion + the adapter's tensors, loaded strictly; LoRA merged."""
    from linearize.teacher import load_teacher

    config = kwargs.pop("config", None)
    if not isinstance(config, LinearizedConfig):
        config = LinearizedConfig.from_pretrained(name_or_path)
    if not config.teacher:
        raise LinearizeError(f"'{name_or_path}' has an adapter file but its config names no teacher")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    teacher, _ = load_teacher(config.teacher, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
    model = cls.from_teacher(teacher, config.method, config.attention, initialise=False)
    tensors = load_tensors(Path(adapter_path))
    mixers = {k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)}
    load_params_strict(model.mixer_state_dict(), mixers, adapter_path)
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    if lora:
        model = merge_lora(model, config.lora, lora, adapter_path)
        model.lora_tensors = lora
    model.config.teacher, model.config.weights, model.config.lora = config.teacher, "adapter", config.lora
    device = kwargs.get("device_map")
    if isinstance(device, (str, torch.device)) and device != "auto":
        model.to(device)
    model.requires_grad_(False)
    return model.eval()


def merge_lora(model, lora: dict | None, tensors: dict, where: str):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    if not lora:
        raise LinearizeError(f"'{where}' holds LoRA tensors but its config.json has no 'lora' entry")
    peft_model = get_peft_model(
        model, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["target_modules"])
    )
    result = set_peft_model_state_dict(peft_model, tensors)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise LinearizeError(
            f"'{where}': the LoRA tensors do not match the model (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )
    return peft_model.merge_and_unload()
