"""A teacher read from its safetensors files a few modules at a time ("sequential onloading").

A model of any size has the structure of its modules built without weights (every parameter on the
meta device; buffers such as the rotary frequencies real, since they are computed, not stored), and the
tensors of the modules a step needs are read from the checkpoint's files when it needs them:

    weights = FileWeights(directory, dtype=torch.bfloat16, device="cuda")
    with weights.hold(model, ["model.layers.8.", "model.layers.9."]):
        ...  # those layers' weights are resident; everything else is still on the meta device

Leaving `hold` puts the tensors back on the meta device, so at most the held modules' weights are ever
in memory. safetensors reads each tensor on its own (the file is mapped, not read whole). `InMemory` is
the same interface for a model already loaded whole (holding is then a no-op).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from linearize.errors import LinearizeError

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class InMemory:
    """The weights of a model loaded whole: always resident."""

    @contextmanager
    def hold(self, model: nn.Module, prefixes: Iterable[str]) -> Iterator[None]:
        yield


class FileWeights:
    """Weights read from a Hugging Face checkpoint directory (`model.safetensors`, or the shards listed in
    `model.safetensors.index.json`) when `hold` asks for them. `resident_bytes` and `peak_bytes` count the
    teacher weights in memory now and at most so far (what the streaming tests and bench/scale.py check)."""

    def __init__(self, directory: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
                 tied: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.dtype = dtype
        self.device = torch.device(device)
        self.files = weight_files(self.directory)
        self.tied = tied or {}  # parameter name -> the stored tensor it is tied to (lm_head -> embeddings)
        self.resident_bytes = 0
        self.peak_bytes = 0

    def stored_name(self, name: str) -> str:
        if name in self.files:
            return name
        if self.tied.get(name) in self.files:
            return self.tied[name]
        raise LinearizeError(
            f"the teacher's weight files in '{self.directory}' have no tensor '{name}': the checkpoint does not "
            "match its config.json (re-save it with save_pretrained, or pass the directory it came from)"
        )

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored tensors of parameters `names`, by stored name (tied parameters share one), read one file
        at a time and cast to `dtype`."""
        by_file: dict[str, set[str]] = {}
        for name in names:
            stored = self.stored_name(name)
            by_file.setdefault(self.files[stored], set()).add(stored)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with weight_file(self.directory / file) as handle:
                for stored in sorted(wanted):
                    out[stored] = handle.get_tensor(stored).to(self.dtype)
        return out

    def stored(self, name: str) -> str | None:
        """The stored tensor of a parameter named as in a converted student, with or without its LoRA wrapper
        (`base_model.model.` in front, `.base_layer` inside), or None: not the teacher's (a mixer, an adapter)."""
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if plain in self.files:
            return plain
        return self.tied[plain] if self.tied.get(plain) in self.files else None

    def read_rows(self, stored: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of stored tensor `stored` (its first dimension), cast to `dtype`: only those
        bytes are read from the file (safetensors' `get_slice`)."""
        with weight_file(self.directory / self.files[stored]) as handle:
            return handle.get_slice(stored)[start:stop].to(self.dtype)

    @contextmanager
    def hold(self, model: nn.Module, prefixes: Iterable[str]) -> Iterator[None]:
        """Make resident every parameter whose name starts with one of `prefixes` and is not resident yet;
        put them back on the meta device on leaving."""
        prefixes = tuple(prefixes)
        names = [n for n, p in model.named_parameters(remove_duplicate=False)
                 if n.startswith(prefixes) and p.is_meta]
        tensors = self.read(names)
        shared = {stored: nn.Parameter(t.to(self.device), requires_grad=False) for stored, t in tensors.items()}
        del tensors
        for name in names:
            set_parameter(model, name, shared[self.stored_name(name)])
        size = sum(p.numel() * p.element_size() for p in shared.values())
        del shared
        self.resident_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        try:
            yield
        finally:
            for name in names:
                set_parameter(model, name, None)
            self.resident_bytes -= size


@contextmanager
def weight_file(path: Path) -> Iterator:
    """safetensors' handle on one weight file (mapped, each tensor read on its own); a file it cannot read is
    an error that says what to do."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise LinearizeError(f"teacher weight file '{path}' could not be read ({err}): it is corrupt or "
                             "truncated; download or convert the teacher again") from err


def weight_files(directory: Path) -> dict[str, str]:
    """Tensor name -> file name (relative to `directory`) of a safetensors checkpoint."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise LinearizeError(f"'{index}' is not a readable safetensors index ({err})") from err
    single = directory / WEIGHTS_FILE
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as handle:
                return {name: WEIGHTS_FILE for name in handle.keys()}
        except Exception as err:  # safetensors' own error types
            raise LinearizeError(f"'{single}' is not a readable safetensors file ({err})") from err
    raise LinearizeError(
        f"'{directory}' has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}: reading a teacher block by block needs its "
        "weights as safetensors (load it and save_pretrained it once, which writes them)"
    )


def set_parameter(model: nn.Module, name: str, value: nn.Parameter | None) -> None:
    """Replace parameter `name` by `value`, or by an empty meta tensor of its shape when None."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[attr]
    if value is None:
        value = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)
    elif value.shape != old.shape:
        raise LinearizeError(f"teacher tensor '{name}' has shape {tuple(value.shape)}, its config says "
                             f"{tuple(old.shape)}: the weight files do not match config.json")
    owner._parameters[attr] = value


def empty_teacher(config, dtype: torch.dtype) -> nn.Module:
    """The teacher's module structure from its config, every parameter on the meta device (no memory),
    buffers (rotary frequencies) real: accelerate's `init_empty_weights`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from linearize.teacher.loading import ATTN_IMPLEMENTATION

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    model.tie_weights()  # not done for meta weights by from_config: the output embeddings are the input ones
    model.eval()
    model.requires_grad_(False)
    return model


def without_storage(model: nn.Module) -> nn.Module:
    """Every meta parameter replaced by one of its shape, dtype and requires_grad on the CPU that holds a single
    element (a zero seen through a stride-0 view: no memory). Code that wants a real device beside a weight
    (peft builds an adapter where its layer's weight lives) then runs, and keeps what it builds; the values
    are not the teacher's, and writing to them is an error. Ties stay ties."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in replaced:
                empty = torch.zeros((), dtype=param.dtype).expand(param.shape)
                replaced[id(param)] = nn.Parameter(empty, requires_grad=param.requires_grad)
            module._parameters[key] = replaced[id(param)]
    return model


def tied_names(config) -> dict[str, str]:
    """Parameters stored under another name when the input and output embeddings are tied."""
    tie = getattr(config, "tie_word_embeddings", False)
    return {"lm_head.weight": "model.embed_tokens.weight"} if tie else {}
