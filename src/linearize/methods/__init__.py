"""Linearization methods, one module each, and the registry that names them.

Adding a method is its module here and one line in `METHODS`. `build_config` applies the chosen
method's defaults and schema to a user's config and validates every setting before anything loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from linearize.config import RunConfig, deep_merge, from_dict
from linearize.devices import AUTOCASTS
from linearize.errors import LinearizeError
from linearize.methods.base import SEQ_LEN, Method, Shapes
from linearize.methods.hybrid import Hybrid
from linearize.methods.liger import Liger
from linearize.methods.lolcats import Lola, Lolcats
from linearize.methods.window import Window
from linearize.methods.xatl import Xatl

METHODS: dict[str, Method] = {m.name: m for m in (Hybrid(), Lolcats(), Lola(), Liger(), Window(), Xatl())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LinearizeError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_settings(method: str, attention: dict[str, Any] | Any, prefix: str = "attention.") -> Any:
    """The method's Settings from a mapping (unknown keys are errors naming them), validated."""
    impl = get_method(method)
    if dataclasses.is_dataclass(attention):
        attention = dataclasses.asdict(attention)
    settings = from_dict(impl.Settings, attention or {}, prefix)
    settings.validate()
    return settings


def settings_dict(settings: Any) -> dict[str, Any]:
    """A method's settings as a plain mapping."""
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)


def measured_memory_layers(model: str) -> list[int] | str:
    """What `memory_layers: measured` means for this teacher: the layers measured for an embedded teacher
    (its registry entry), else the upper half."""
    from linearize.teacher.loading import EMBEDDED_TEACHERS

    teacher = EMBEDDED_TEACHERS.get(model)
    return list(teacher.memory_layers) if teacher is not None and teacher.memory_layers else "upper-half"


def build_config(user: dict[str, Any]) -> RunConfig:
    """Base defaults <- the method's stage defaults <- user settings; every section checked."""
    method_name = user.get("method", RunConfig.method)
    impl = get_method(method_name)
    merged = deep_merge(impl.stage_defaults, user)
    config = from_dict(RunConfig, merged)
    config.attention = method_settings(method_name, config.attention)
    if getattr(config.attention, "memory_layers", None) == "measured":
        config.attention.memory_layers = measured_memory_layers(config.model)
    if getattr(config.attention, "sink_distance", None) == SEQ_LEN:  # never inside the window
        config.attention.sink_distance = max(config.data.seq_len, config.attention.window_size)
    for stage in ("transfer", "finetune"):
        if stage not in impl.stages:
            if (user.get(stage) or {}).get("enabled"):
                raise LinearizeError(
                    f"{stage}.enabled does not apply to method '{method_name}': it runs {', '.join(impl.stages)}"
                )
            getattr(config, stage).enabled = False
    for name, baseline in config.baselines.items():
        if not isinstance(baseline, dict) or "method" not in baseline:
            raise LinearizeError(f"baselines.{name} must be a mapping with a 'method' (and optional 'attention')")
        unknown = set(baseline) - {"method", "attention"}
        if unknown:
            raise LinearizeError(f"baselines.{name} has unknown keys {sorted(unknown)}: use 'method' and 'attention'")
        attention = baseline.get("attention") or {}
        settings = method_settings(baseline["method"], attention, f"baselines.{name}.attention.")
        if getattr(settings, "sink_distance", None) == SEQ_LEN:  # as the student's: never inside the window
            baseline["attention"] = {**attention, "sink_distance": max(config.data.seq_len, settings.window_size)}
    _check_run(config)
    return config


def _check_run(config: RunConfig) -> None:
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise LinearizeError(f"dtype must be float32, bfloat16 or float16, got '{config.dtype}'")
    if config.autocast not in AUTOCASTS:
        raise LinearizeError(f"autocast must be auto, bfloat16 or null (none), got '{config.autocast}'")
    if config.checkpoint_every < 1:
        raise LinearizeError("checkpoint_every must be >= 1")
    for stage in (config.transfer, config.finetune):
        if stage.enabled and (stage.tokens < 1 or stage.lr <= 0 or (stage.batch_size or 1) < 1):
            raise LinearizeError("transfer/finetune tokens, lr and batch_size must be positive")
        if not 0 < stage.min_lr_ratio <= 1:
            raise LinearizeError("transfer/finetune min_lr_ratio must lie in (0, 1]")
    transfer, tune = config.transfer, config.finetune
    if transfer.store not in ("auto", "layers", "blocks", "none"):
        raise LinearizeError(f"transfer.store must be auto, layers, blocks or none, got '{transfer.store}'")
    if transfer.layers_per_block is not None and transfer.layers_per_block < 1:
        raise LinearizeError(f"transfer.layers_per_block must be >= 1 (null: as many blocks as processes), "
                             f"got {transfer.layers_per_block}")
    if transfer.disk_budget is not None and transfer.disk_budget <= 0:
        raise LinearizeError(f"transfer.disk_budget must be > 0 GiB (or null), got {transfer.disk_budget}")
    if tune.parallel not in ("auto", "ddp", "fsdp"):
        raise LinearizeError(f"finetune.parallel must be auto, ddp or fsdp, got '{tune.parallel}'")
    if tune.unfreeze_threshold is not None and not 0 < tune.unfreeze_threshold < 1:
        raise LinearizeError(f"finetune.unfreeze_threshold must lie in (0, 1), got {tune.unfreeze_threshold}")
    if tune.unfreeze_window < 1:
        raise LinearizeError("finetune.unfreeze_window must be >= 1")
    if tune.enabled and tune.full and tune.distill_weight > 0 and tune.distill_top_k < 1:
        raise LinearizeError(
            "finetune.full trains the teacher's own weights, so the teacher's logits must be kept before training: "
            "set finetune.distill_top_k > 0 (or finetune.distill_weight: 0)"
        )
    if config.data.seq_len < 1 or config.data.eval_seq_len < 1 or config.data.eval_blocks < 0:
        raise LinearizeError("data.seq_len and data.eval_seq_len must be >= 1, data.eval_blocks >= 0")
    if tune.answer_weight < 0:
        raise LinearizeError(f"finetune.answer_weight must be >= 0, got {tune.answer_weight}")
    if not 0 <= config.data.recall_fraction <= 1:
        raise LinearizeError(f"data.recall_fraction must be a fraction in [0, 1], got {config.data.recall_fraction}")
    _check_evaluate(config.evaluate)


def _check_evaluate(evaluate) -> None:
    from linearize.layers.attention import BRANCHES
    from linearize.retrieval import check_settings

    check_settings(evaluate.retrieval, evaluate.retrieval_lengths, evaluate.retrieval_depths,
                   where=" (evaluate.retrieval*)", variants=evaluate.retrieval_variants)
    if evaluate.retrieval_samples < 1:
        raise LinearizeError(f"evaluate.retrieval_samples must be >= 1, got {evaluate.retrieval_samples}")
    unknown = [b for b in evaluate.ablate if b not in BRANCHES]
    if unknown:
        raise LinearizeError(f"evaluate.ablate: unknown branch(es) {unknown}; choose from {', '.join(BRANCHES)}")
    if evaluate.ablation_blocks < 1:
        raise LinearizeError(f"evaluate.ablation_blocks must be >= 1, got {evaluate.ablation_blocks}")


def load_config(path=None, overrides: list[str] | None = None) -> RunConfig:
    from linearize.config import load_user_config

    return build_config(load_user_config(path, overrides))


__all__ = ["METHODS", "Method", "Shapes", "build_config", "get_method", "load_config", "method_settings",
           "settings_dict"]
