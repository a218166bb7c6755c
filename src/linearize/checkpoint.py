"""One checkpoint format: safetensors for tensors, JSON/YAML for everything else, written atomically.

Models are saved as Hugging Face directories (`linearize.models.saving`); training state for resuming
(`save_train_state`) holds the trained parameters, the optimizer, the scheduler and the step. Nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linearize.errors import LinearizeError

CONFIG_FILE = "linearize.yaml"  # a run's resolved config, in its output directory
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LinearizeError(f"checkpoint file '{path}' is missing: re-run training or point to a complete run")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise LinearizeError(
            f"checkpoint file '{path}' is corrupt ({err}); delete it and re-run, or resume from an earlier save"
        ) from err


def free_disk(path: str | Path) -> float:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return float(shutil.disk_usage(path).free)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; the old one is removed only after the new one exists."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_train_state(
    directory: Path,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
) -> None:
    """Write a resumable snapshot to `directory` atomically (a kill leaves the previous one intact)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    opt_tensors, opt_rest = flatten_optimizer_state(optimizer.state_dict())
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "params.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    state = {"optimizer": opt_rest, "scheduler": scheduler.state_dict(), "progress": progress}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    atomic_replace_dir(tmp, directory)


def load_train_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict, dict] | None:
    """(params, optimizer state_dict, scheduler state_dict, progress), or None if nothing was saved."""
    if not (directory / "state.json").is_file():
        return None
    try:
        state = json.loads((directory / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise LinearizeError(f"resume state '{directory}/state.json' is corrupt ({err}); delete {directory}") from err
    params = load_tensors(directory / "params.safetensors")
    optimizer = unflatten_optimizer_state(load_tensors(directory / "optimizer.safetensors"), state["optimizer"])
    return params, optimizer, state["scheduler"], state["progress"]


def load_params_strict(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy `tensors` into the parameters of the same names; every name must match both ways."""
    unknown, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
    if unknown or missing:
        raise LinearizeError(
            f"{what} does not match the model (unexpected {unknown[:3]}, missing {missing[:3]}): "
            "it was saved for another model or config"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise LinearizeError(
                    f"{what}: '{name}' has shape {tuple(value.shape)}, the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
