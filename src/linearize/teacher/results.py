"""The teacher's evaluation results, kept across runs: they depend on the teacher, the exact inputs and how it
computes them, never on the student, so a later run of the same teacher on the same prompts reads them back.
The same holds of a run's baselines (the teacher swapped to a constant-memory method, trained by stage 2 and
evaluated: `linearize.pipeline`), kept here too under the fingerprint of all the package's code.

An entry is `<cache_dir>/teacher-results/<kind>-<key>.json`, with its tensors beside it as `.safetensors`. The
key is a SHA-256 over everything the result depends on:

- the teacher: its resolved directory and the name, size and modification time of every file in it (a
  converted GGUF teacher's directory is named by the GGUF's content hash);
- how it computes: dtype, device, thread count, the torch and transformers versions, and a fingerprint of
  the code that evaluates (the caller's: any change to it is a new key);
- the evaluation's kind and settings, and every input token id.

A changed file, prompt, setting or version is a new key, so an entry is what the computation gives on this
machine, to the last bit. An entry that cannot be read is computed again. Delete the directory to recompute
everything; nothing else uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from linearize.teacher.loading import default_cache_dir, teacher_directory

Computed = tuple[Any, dict[str, torch.Tensor]]  # a JSON value and named tensors


def teacher_fingerprint(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a teacher's weights and tokenizer without reading them: its resolved directory and every
    file in it by name, size and modification time."""
    directory = teacher_directory(name_or_path).resolve()
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return {"directory": str(directory),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def machine_fingerprint(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    import transformers

    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    fingerprint = {"dtype": str(dtype), "device": kind, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "transformers": transformers.__version__}
    if torch.is_autocast_enabled(device.type):  # products in a lower dtype: other results (a key only then, so
        fingerprint["autocast"] = str(torch.get_autocast_dtype(device.type))  # those kept without one still read)
    return fingerprint


class TeacherResults:
    """The cache of one teacher's results, computed the way `dtype` and `device` say, by code whose fingerprint is
    `code` (any string that changes when the evaluating code does)."""

    def __init__(self, teacher: str | os.PathLike[str], dtype: torch.dtype, device: torch.device, code: str,
                 root: Path | None = None):
        self.root = (root if root is not None else default_cache_dir()) / "teacher-results"
        self.identity = {"teacher": teacher_fingerprint(teacher), "machine": machine_fingerprint(dtype, device),
                         "code": code}

    def key(self, kind: str, inputs: Iterable[torch.Tensor], settings: Any) -> str:
        digest = hashlib.sha256(json.dumps([self.identity, kind, settings], sort_keys=True).encode())
        for tensor in inputs:
            tensor = tensor.detach().contiguous().cpu()
            digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]

    def get(self, kind: str, inputs: Iterable[torch.Tensor], compute: Callable[[], Computed],
            settings: Any = None) -> Computed:
        """(value, tensors) of `kind` on `inputs` with `settings` (JSON): read back, or computed by `compute()` and
        kept. Either way the value is as JSON reads it back (tuples become lists), so a read equals a compute."""
        from safetensors.torch import load_file, save_file

        stem = self.root / f"{kind}-{self.key(kind, inputs, settings)}"
        value_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
        if value_path.is_file():
            try:
                stored = json.loads(value_path.read_text())
                tensors = load_file(str(tensor_path)) if stored["tensors"] else {}
                return stored["value"], tensors
            except (OSError, ValueError, KeyError):  # unreadable: computed again below, and replaced
                pass
        value, tensors = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        if tensors:
            _atomic(tensor_path, lambda path: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                                        str(path)))
        text = json.dumps({"value": value, "tensors": bool(tensors)})
        _atomic(value_path, lambda path: path.write_text(text))  # last: it marks the entry complete
        return json.loads(text)["value"], tensors

    def value(self, kind: str, inputs: Iterable[torch.Tensor], compute: Callable[[], Any], settings: Any = None) -> Any:
        """`get` for a result without tensors."""
        return self.get(kind, inputs, lambda: (compute(), {}), settings)[0]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file of its own beside `path`, then rename: two runs writing the same entry at
    once leave one whole copy."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(handle)
    try:
        write(Path(name))
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.remove(name)
