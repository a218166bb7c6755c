"""Run configuration schema: typed dataclasses, YAML files and `key.sub=value` command-line overrides.

One config describes one run. Unknown keys are errors that name the key (with a suggestion), so a typo
never silently falls back to a default. The `attention:` section belongs to the chosen method: its
schema is the method's own `Settings` dataclass, applied by `linearize.methods.build_config` (this
module knows no method).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from linearize.errors import LinearizeError

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# StreamingLLM's constant-memory model: a 64-token window plus the first 4 tokens, no linear state
WINDOW_SINKS_BASELINE = {"method": "window",
                         "attention": {"window_size": 64, "sink_tokens": 4, "sink_distance": "seq_len"}}


@dataclass
class DataConfig:
    source: str = "default"  # default | code | prose | path to .txt/.jsonl/dir | hf:NAME[:split]
    text_field: str = "text"  # field of .jsonl / HF records
    seq_len: int = 1024  # training block length
    eval_seq_len: int = 1024  # held-out evaluation block length
    eval_blocks: int = 4  # held-out blocks per domain (code, prose, and their unseen sources)
    long_context: int = 4096  # long-range diagnostics: held-out documents of this many tokens; 0 = none
    long_documents: int = 3  # such documents per domain (ratios pooled over them)
    copy_lengths: list[int] = field(default_factory=lambda: [64, 256, 1024])  # copy test lengths; [] = none
    # this fraction of the training blocks gets facts stated in its text and asked for at its end
    # (data/recall.py); 0 = the corpus as it is
    recall_fraction: float = 0.0


@dataclass
class TransferConfig:
    """Stage 1, attention transfer: train feature maps and window factors to match softmax outputs."""

    enabled: bool = True
    tokens: int = 65536  # distinct training tokens passed through the teacher
    epochs: int = 3  # passes over them; later passes read teacher activations back from disk
    lr: float = 1e-2
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 4
    batch_size: int = 1
    loss_weight: float = 1000.0  # MSE scale, as in the reference
    cache_dtype: str = "bfloat16"  # dtype of stored teacher activations on disk
    # what the teacher's pass keeps on disk for later epochs (train/transfer.py): layers (every layer's input
    # and output: fastest, most disk) | blocks (each block's input hidden state; its layers re-run) | none
    # (re-run the teacher every step) | auto (the fastest that fits disk_budget)
    store: str = "auto"
    # decoder layers per block, each trained alone; null = as many blocks as processes (one block of all layers
    # on one process)
    layers_per_block: int | None = None
    disk_budget: float | None = None  # GiB stage 1 may store; null = half the free space under output_dir


@dataclass
class FinetuneConfig:
    """Stage 2: LoRA on next-token loss, optionally distilling the teacher's logits."""

    enabled: bool = True
    tokens: int = 32768
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    batch_size: int | None = None  # the global batch, split over the processes; null = one sequence per process
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    distill_weight: float = 1.0  # weight of KL(teacher || student) next to the next-token loss
    distill_top_k: int = 64  # teacher targets kept per position (computed once); 0 = full logits each step
    train_mixers: bool = True  # also train the mixers' own parameters (feature maps, scales) in stage 2
    full: bool = False  # train every weight instead of LoRA adapters (XATL); the student is saved in full
    unfreeze_threshold: float | None = None  # progressive unfreezing: only the mixers' own parameters train
    # until the mean loss of the last `unfreeze_window` steps improves on the window before by less than this
    # fraction, then everything else unfreezes too; null = everything trains from the start
    unfreeze_window: int = 8
    grad_clip: float = 1.0
    # the loss at the answers of recall blocks (data.recall_fraction) counts this many times a token's
    answer_weight: float = 1.0
    # with several processes (torchrun): ddp (a whole model per process) | fsdp (PyTorch FSDP2: weights,
    # gradients and optimizer state sharded over the processes) | auto (ddp when the model fits one device)
    parallel: str = "auto"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass


@dataclass
class EvaluateConfig:
    """What the run measures beyond held-out perplexity (linearize.retrieval, linearize.evaluate)."""

    # generation-based retrieval, exact match, for the teacher, the student and every baseline:
    # passkey | multikey | multivalue | quote; [] = none
    # (the default is a short version, one prompt per task at 4K: `linearize eval --retrieval` runs the grid)
    retrieval: list[str] = field(default_factory=lambda: ["passkey", "multikey", "quote"])
    retrieval_lengths: list[int] = field(default_factory=lambda: [4096])  # prompt lengths in tokens
    retrieval_depths: list[float] = field(default_factory=lambda: [0.5])  # where the needle sits, 0 = first
    retrieval_samples: int = 1  # prompts per (task, length, depth)
    # fillers and phrasings of the needle tasks, filler/phrasing (linearize.retrieval.VARIANTS), reported apart
    retrieval_variants: list[str] = field(default_factory=lambda: ["repeated/a", "prose/b"])
    # branches of the student switched off one at a time at inference (held-out ratios and retrieval without
    # each): linear | memory | sinks; [] = no ablation
    ablate: list[str] = field(default_factory=lambda: ["linear", "memory", "sparse", "sinks"])
    ablation_blocks: int = 1  # held-out blocks per domain for the ablation's ratios (the first of data.eval_blocks)
    samples: bool = True  # the report's sample generations, teacher and student side by side; false = none
    # the teacher's results (held-out, long range, retrieval, samples) kept across runs under the cache directory
    # and read back by a run of the same teacher on the same inputs (linearize.teacher.results); false = computed
    teacher_cache: bool = True


@dataclass
class RunConfig:
    model: str = "smollm2-135m-instruct"  # hub id | local dir | .gguf file | an embedded teacher (or gemma3-270m)
    method: str = "hybrid"  # a name from linearize.methods.METHODS
    output_dir: str = "runs/default"
    seed: int = 0
    dtype: str = "float32"
    # the MLPs' products in training and the students' evaluation under torch.autocast: auto (bfloat16 on a CPU
    # with AMX, for a float32 model; none elsewhere) | bfloat16 | null (none); attention, the output head and
    # the teacher's evaluation always run in dtype
    autocast: str | None = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 25  # optimizer steps between resumable checkpoints
    # constant-memory baselines, evaluated untrained and after the same stage-2 budget:
    # name -> {method: NAME, attention: {...}}
    baselines: dict[str, Any] = field(default_factory=lambda: {"window+sinks": dict(WINDOW_SINKS_BASELINE)})
    attention: Any = field(default_factory=dict)  # the method's Settings (a mapping in YAML)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def for_processes(config: RunConfig, processes: int, layers: int) -> RunConfig:
    """`config` with the defaults that depend on the number of processes resolved: `finetune.batch_size` null =
    one sequence per process; `transfer.layers_per_block` null = blocks enough for every process to train one
    (the most even split that gives at least `processes` blocks of `layers` decoder layers; one block of all
    on one process)."""
    tune, transfer = config.finetune, config.transfer
    if tune.batch_size is None:
        tune = dataclasses.replace(tune, batch_size=processes)
    if transfer.layers_per_block is None and processes > 1:
        size = -(-layers // processes)
        if -(-layers // size) < processes:  # e.g. 30 layers on 7 processes: blocks of 5 make only 6
            size = max(1, layers // processes)
        transfer = dataclasses.replace(transfer, layers_per_block=size)
    return dataclasses.replace(config, finetune=tune, transfer=transfer)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise a LinearizeError naming them."""
    if not isinstance(data, dict):
        raise LinearizeError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise LinearizeError(
                f"unknown config key '{prefix}{key}'{suggestion}; valid keys here: {', '.join(known)}"
            )
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(type(default), value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, known[key].type, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, name: str) -> Any:
    """Check a scalar against its field's type; accept YAML's "1e-3" (a string in YAML 1.1) as a float."""
    expected = {"float": float, "int": int, "bool": bool, "str": str, "dict[str, Any]": dict, "list[int]": list,
                "list[str]": list, "list[float]": list}.get(annotation.replace(" | None", ""))
    if expected is None or (value is None and "None" in annotation):
        return value
    if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise LinearizeError(f"config key '{name}' must be a {annotation}, got {value!r}")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["transfer.lr=1e-3", "attention.softmax_layers=[0,1]"]` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise LinearizeError(f"override '{item}' must look like key.sub=value (e.g. transfer.tokens=8192)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_user_config(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The user's settings only (file, then overrides), before any defaults are applied."""
    user: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LinearizeError(f"config file '{path}' not found")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise LinearizeError(f"config file '{path}' is not valid YAML: {err}") from err
        if not isinstance(user, dict):
            raise LinearizeError(f"config file '{path}' must hold a mapping of keys to values")
    return deep_merge(user, parse_overrides(overrides or []))
