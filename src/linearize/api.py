"""The public Python API.

    import linearize
    student = linearize.linearize(teacher_model, "hybrid")            # converted, untrained
    report = linearize.run(linearize.load_config("my.yaml"))          # the whole recipe
    model, tokenizer = linearize.load("runs/default/model")           # a saved student, ready to generate
    linearize.export("runs/default/model", "shared/")                 # full weights, self-contained
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from linearize.config import RunConfig, deep_merge
from linearize.devices import resolve_device, resolve_dtype
from linearize.errors import LinearizeError
from linearize.models import LinearizedConfig, LinearizedForCausalLM


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file (or the built-in defaults) and `key.sub=value` overrides, validated."""
    from linearize.methods import load_config as load

    return load(path, overrides)


def linearize(model: torch.nn.Module, method: str = "hybrid", attention: dict[str, Any] | None = None
              ) -> LinearizedForCausalLM:
    """Convert a loaded Hugging Face causal LM (llama, mistral, qwen2, qwen3, gemma3_text) into a linearized
    one, untrained; its modules are reused, not copied. `attention` holds the method's settings (a Gemma 3's
    local layers are kept as they are unless `attention["local_layers"]` is "convert")."""
    from linearize.methods import get_method

    get_method(method)
    return LinearizedForCausalLM.from_teacher(model, method, attention or {})


def run(config: RunConfig, fresh: bool = False) -> dict:
    """Run the whole recipe (convert, train, evaluate, save, report); see `linearize.pipeline.run`."""
    from linearize.pipeline import run as run_pipeline

    return run_pipeline(config, fresh=fresh)


def find_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory holding one in `model/`."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "progress.json").is_file():
        raise LinearizeError(f"run '{path}' has no saved model yet: run it to the end (`linearize run` resumes)")
    raise LinearizeError(
        f"'{path}' is not a linearized model directory (no config.json): point to a run directory "
        "(e.g. runs/default), its model/ directory, or a directory written by `linearize export`"
    )


# attention settings a trained student can take without retraining: they add or change no weight
INFERENCE_SETTINGS = ("sparse_keys", "sparse_score", "sparse_heads", "memory_bias", "memory_recall", "sink_distance")


def with_inference_settings(method: str, saved: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A saved student's attention settings with `changes` (only `INFERENCE_SETTINGS`), checked."""
    from linearize.methods import method_settings, settings_dict

    fixed = sorted(set(changes) - set(INFERENCE_SETTINGS))
    if fixed:
        raise LinearizeError(f"attention {', '.join(fixed)} of a trained student cannot change without retraining: "
                             f"set only {', '.join(INFERENCE_SETTINGS)} on a saved model")
    return settings_dict(method_settings(method, {**saved, **changes}))


def load(path: str | Path, device: str = "auto", dtype: str | None = None, attention: dict[str, Any] | None = None
         ) -> tuple[LinearizedForCausalLM, Any]:
    """A saved student (adapter-only or full weights, or a run directory) -> (model, tokenizer), in eval mode.
    `attention`: settings that need no training (`INFERENCE_SETTINGS`), e.g. `{"sparse_keys": 64}` gives a
    trained student a sparse cache of exact keys beyond its window, as LoLA does."""
    from transformers import AutoTokenizer

    directory = find_model_dir(path)
    try:
        config = LinearizedConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        raise LinearizeError(f"'{directory / 'config.json'}' is not a readable linearized config ({err})") from err
    if config.model_type != LinearizedConfig.model_type:
        raise LinearizeError(f"'{directory}' holds a '{config.model_type}' model, not a linearized one")
    if attention:
        config.attention = with_inference_settings(config.method, config.attention, attention)
    kwargs = {} if dtype is None else {"dtype": resolve_dtype(dtype)}
    model = LinearizedForCausalLM.from_pretrained(directory, config=config, **kwargs)
    model.to(resolve_device(device)).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def export(model_dir: str | Path, out_dir: str | Path, format: str = "linearize") -> Path:
    """Write a self-contained full-weights directory (LoRA merged) from an adapter-only one; with
    format "fla", flash-linear-attention's own GLA model directory (XATL GLA students)."""
    from linearize.models.saving import save_full

    if format not in ("linearize", "fla"):
        raise LinearizeError(f"export format must be 'linearize' or 'fla', got '{format}'")
    model, tokenizer = load(model_dir, device="cpu")
    if format == "fla":
        from linearize.models.fla_export import export_fla

        return export_fla(model, Path(out_dir), tokenizer=tokenizer)
    card_path = find_model_dir(model_dir) / "README.md"
    card = card_path.read_text() if card_path.is_file() else None
    return save_full(model, Path(out_dir), tokenizer=tokenizer, card=card)


def config_with(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of a run config with some sections changed, re-validated."""
    from linearize.methods import build_config

    data = config.to_dict()
    return build_config(deep_merge(data, changes))
