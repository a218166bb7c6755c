"""`linearize run`: teacher -> convert -> stage 1 -> stage 2 -> evaluate -> save -> report, resumable.

Every finished phase is recorded in OUTPUT_DIR/progress.json; a killed run started again with the same
config picks up at the last finished phase, and inside a stage at its last checkpoint.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from linearize.api import resolve_device, resolve_dtype, settings_dict
from linearize.checkpoint import CONFIG_FILE, atomic_save_tensors, atomic_write_text, load_tensors
from linearize.config import RunConfig
from linearize.data import build_blocks
from linearize.errors import LinearizeError
from linearize.evaluate import (
    Scores,
    bucket_ratios,
    copy_sequences,
    copy_test,
    layer_errors,
    position_profile,
    score,
    summarize,
)
from linearize.generation import SAMPLE_PROMPTS, sample_generations
from linearize.methods import get_method, method_settings
from linearize.models import LinearizedForCausalLM
from linearize.models.modeling import decoder_layers
from linearize.models.saving import save_adapter, save_full
from linearize.models.transfer import format_transfer_table, teacher_shapes, transfer_counts, transfer_table
from linearize.report import model_card, write_report
from linearize.teacher import load_teacher
from linearize.train import attention_transfer, finetune
from linearize.train.finetune import training_blocks
from linearize.train.targets import TeacherTargets


class Progress:
    """Results of finished phases, persisted atomically after each one."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return value

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        return self.data[key] if key in self.data else self.put(key, compute())


def prepare_output_dir(config: RunConfig, fresh: bool) -> Path:
    out = Path(config.output_dir)
    saved = out / CONFIG_FILE
    if fresh and out.exists():
        shutil.rmtree(out)
    if saved.is_file() and yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(config.to_dict())):
        raise LinearizeError(
            f"'{out}' holds a run with a different config: pass --fresh to start over there, "
            "or choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def run(config: RunConfig, fresh: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole recipe described by `config`; returns the report dict (also written to disk)."""
    started = time.perf_counter()
    out = prepare_output_dir(config, fresh)
    progress = Progress(out / "progress.json")
    torch.manual_seed(config.seed)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)

    log(f"loading teacher '{config.model}'")
    model, tokenizer = load_teacher(config.model, dtype=dtype)
    model.to(device)
    stage_tokens = [s.tokens for s in (config.transfer, config.finetune) if s.enabled]
    data = build_blocks(
        tokenizer,
        config.data.source,
        seq_len=config.data.seq_len,
        train_tokens=max(stage_tokens, default=0),
        eval_tokens_per_domain=config.data.eval_blocks * config.data.eval_seq_len,
        seed=config.seed,
        eval_seq_len=config.data.eval_seq_len,
        text_field=config.data.text_field,
        long_tokens=config.data.long_context,
        long_documents_per_domain=config.data.long_documents,
    )
    log(f"data: {data_summary(data)}")

    teacher = teacher_scores(model, data.eval, out / "teacher_predictions.safetensors", progress)
    probes = LongRange(config, data, model, progress)

    def evaluate(key: str, student: torch.nn.Module) -> dict:
        return progress.once(f"eval.{key}", lambda: evaluate_domains(student, data.eval, teacher, key))

    targets = teacher_targets(config, out)
    tune = config.finetune
    random_init = getattr(config.attention, "init", "transfer") == "random"
    if targets is not None and tune.enabled and (tune.full or random_init):
        # training will change (or has replaced) the teacher's own weights: keep its targets first
        blocks = data.train

        def logits(ids):
            return model(input_ids=blocks[ids].to(device), use_cache=False).logits

        targets.fill(training_blocks(tune, blocks, config.seed), logits, "teacher targets")
    prompts = SAMPLE_PROMPTS
    teacher_samples = progress.once("samples.teacher", lambda: sample_generations(model, tokenizer, prompts))
    shapes = teacher_shapes(model)
    model = LinearizedForCausalLM.from_teacher(model, config.method, config.attention)
    table = transfer_table(shapes, model, copied=not random_init)
    atomic_write_text(out / "transfer_table.md", format_transfer_table(table))
    log(f"transfer: {transfer_counts(table)} (table: {out / 'transfer_table.md'})")
    layers = len(decoder_layers(model))
    report: dict[str, Any] = {
        "method": config.method,
        "teacher": config.model,
        "machine": machine_description(device),
        "model": {
            "layers": layers,
            "converted_layers": layers - len(config.attention.softmax_layers),
            "softmax_keys": get_method(config.method).softmax_keys(config.attention),
            "parameters": count_parameters(model)["total"],
        },
        "data": data_summary(data),
        "transfer": transfer_counts(table),
        "eval": {"teacher": {d: summarize(s) for d, s in teacher.items()}},
        "stages": {},
        "config": config.to_dict(),
    }
    report["eval"]["untrained"] = evaluate("untrained", model)

    mixer_params = {n: p for n, p in model.mixer_state_dict().items() if p.requires_grad}
    if config.transfer.enabled and mixer_params:
        stage_dir = out / "stage1"
        trainable = sum(p.numel() for p in mixer_params.values())
        result = attention_transfer(
            model, data.train, config.transfer, stage_dir, config.checkpoint_every, config.seed, targets
        )
        report["stages"]["transfer"] = progress.once(
            "stage.transfer", lambda: stage_summary(result, trainable, distinct=config.transfer.tokens)
        )
        model.requires_grad_(False)
        report["eval"]["transfer"] = evaluate("transfer", model)
        shutil.rmtree(stage_dir / "activations", ignore_errors=True)  # disk, not results: rebuilt on demand
    if config.finetune.enabled:
        model, result = finetune(
            model, data.train, config.finetune, out / "stage2", config.checkpoint_every, config.seed, targets
        )
        trainable = count_parameters(model)["trainable"]
        report["stages"]["finetune"] = progress.once(
            "stage.finetune", lambda: stage_summary(result, trainable, distinct=config.finetune.tokens)
        )
        model.eval()
        report["eval"]["finetune"] = evaluate("finetune", model)
    layer_blocks = torch.stack([blocks[0] for blocks in data.eval.values() if len(blocks)]) if data.eval else None
    if layer_blocks is not None:
        errors = progress.once("layers.student", lambda: layer_errors(base_model(model), layer_blocks))
        report["layer_errors"] = errors
    student_samples = progress.once("samples.student", lambda: sample_generations(model, tokenizer, prompts))
    report["samples"] = [{"prompt": p, "teacher": t, "student": s}
                         for p, t, s in zip(prompts, teacher_samples, student_samples)]
    if probes.enabled:
        report["long_range"] = {
            "teacher": probes.teacher_summary(),
            config.method: progress.once("long_range.student", lambda: probes.measure(model, "student")),
        }
    if tune.full or random_init:  # the teacher's weights changed: only a self-contained directory holds them
        save_full(model, out / "model", tokenizer=tokenizer)
    else:
        save_adapter(model, out / "model", tokenizer=tokenizer)
    for name, baseline in config.baselines.items():
        def train_baseline(name=name, baseline=baseline):
            return run_baseline(config, name, baseline, out, device, dtype, data, teacher, probes)

        report.setdefault("baselines", {})[name] = progress.once(f"baseline.{name}", train_baseline)
    elapsed = (progress.get("seconds") or 0) + time.perf_counter() - started
    report["seconds_total"] = progress.put("seconds", elapsed)
    write_report(report, out)
    atomic_write_text(out / "model" / "README.md", model_card(report))
    log(f"report: {out / 'report.md'}")
    return report


class LongRange:
    """The long-range diagnostics of a run: per-position ratios on long held-out documents and the copy
    test, the teacher's side computed once (and kept in progress.json)."""

    def __init__(self, config: RunConfig, data, teacher_model, progress: Progress):
        self.documents = data.long
        lengths = config.data.copy_lengths
        self.sequences = copy_sequences(teacher_model.config.vocab_size, lengths, seed=config.seed) if lengths else {}
        self.enabled = bool(self.sequences) or any(len(docs) for docs in self.documents.values())
        saved = progress.get("long_range.teacher")
        if saved is None and self.enabled:
            saved = progress.put("long_range.teacher", {
                "profiles": {d: position_profile(teacher_model, docs, f"positions teacher ({d})").tolist()
                             for d, docs in self.documents.items()},
                "copy": copy_test(teacher_model, self.sequences, "copy teacher"),
            })
        self.teacher = saved

    def teacher_summary(self) -> dict[str, Any]:
        return {"copy": self.teacher["copy"], "documents": {d: len(x) for d, x in self.documents.items()}}

    def measure(self, model, label: str) -> dict[str, Any]:
        buckets = {}
        for domain, docs in self.documents.items():
            profile = position_profile(model, docs, f"positions {label} ({domain})")
            buckets[domain] = bucket_ratios(profile, torch.tensor(self.teacher["profiles"][domain]))
        return {"buckets": buckets, "copy": copy_test(model, self.sequences, f"copy {label}")}


def evaluate_domains(model, eval_blocks: dict, teacher: dict[str, Scores], label: str) -> dict[str, dict]:
    return {d: summarize(score(model, b, desc=f"eval {label} ({d})"), teacher[d]) for d, b in eval_blocks.items()}


def teacher_scores(model, eval_blocks: dict, path: Path, progress: Progress) -> dict[str, Scores]:
    """The teacher's scores per domain, computed once and kept (its predictions as safetensors)."""
    saved = progress.get("eval.teacher_raw")
    if saved is not None and path.is_file():
        predictions = load_tensors(path)
        return {d: Scores(nll=s["nll"], tokens=s["tokens"], predictions=predictions[d]) for d, s in saved.items()}
    scores = {d: score(model, blocks, desc=f"eval teacher ({d})") for d, blocks in eval_blocks.items()}
    atomic_save_tensors({d: s.predictions for d, s in scores.items()}, path)
    progress.put("eval.teacher_raw", {d: {"nll": s.nll, "tokens": s.tokens} for d, s in scores.items()})
    return scores


def data_summary(data) -> dict[str, Any]:
    return {
        "train_tokens": data.train_tokens,
        "train_documents": {d: len(ids) for d, ids in data.train_documents.items()},
        "eval_tokens": {d: int(b.numel()) for d, b in data.eval.items()},
        "eval_documents": {d: len(ids) for d, ids in data.eval_documents.items()},
    }


def stage_summary(result, trainable: int, distinct: int) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "tokens": result.tokens,  # tokens processed, counting repeated epochs
        "distinct_tokens": min(distinct, result.tokens),
        "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
        "trainable_parameters": trainable,
        "final_loss": result.final_loss,
        "loss_curve": [(h["step"], h["loss"]) for h in result.history],
        "per_layer_loss": result.per_layer_loss,
    }


def run_baseline(
    config: RunConfig, name: str, baseline: dict, out: Path, device, dtype, data, teacher, probes: LongRange
) -> dict[str, Any]:
    """A constant-memory baseline, untrained and after the same budget of stage 2 as the student."""
    settings = method_settings(baseline["method"], baseline.get("attention") or {})
    teacher_model, _ = load_teacher(config.model, dtype=dtype)
    model = LinearizedForCausalLM.from_teacher(teacher_model.to(device), baseline["method"], settings)
    summary: dict[str, Any] = {"method": baseline["method"], "attention": settings_dict(settings), "eval": {},
                               "softmax_keys": get_method(baseline["method"]).softmax_keys(settings)}
    summary["eval"]["untrained"] = evaluate_domains(model, data.eval, teacher, f"{name} untrained")
    if probes.enabled:
        summary["long_range"] = {"untrained": probes.measure(model, f"{name} untrained")}
    if config.finetune.enabled and "finetune" in get_method(baseline["method"]).stages:
        work = out / "baselines" / slug(name)
        model, result = finetune(
            model, data.train, config.finetune, work, config.checkpoint_every, config.seed, teacher_targets(config, out)
        )
        summary["finetune"] = stage_summary(result, count_parameters(model)["trainable"], config.finetune.tokens)
        model.eval()
        summary["eval"]["finetune"] = evaluate_domains(model, data.eval, teacher, name)
        if probes.enabled:
            summary["long_range"]["finetune"] = probes.measure(model, name)
    return summary


def teacher_targets(config: RunConfig, out: Path) -> TeacherTargets | None:
    """The run's store of teacher distributions for distillation, shared by the student and the baselines."""
    if config.finetune.distill_weight > 0 and config.finetune.distill_top_k > 0:
        return TeacherTargets(out / "teacher_targets", config.finetune.distill_top_k)
    return None


def base_model(model):
    """The LinearizedForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"

