"""`linearize run`: the recipe as a list of steps, each resumable on its own, each on its share of the ranks.

    prepare -> plan -> read data -> attention transfer (collect block inputs, train each block, stitch) ->
    load the teacher -> evaluate the teacher -> convert -> finetune -> evaluate the student -> save ->
    baselines -> report

Every finished step's result is recorded in OUTPUT_DIR/progress.json; a killed run started again with the
same config (and any number of processes) picks up at the last finished step, and inside a stage at its
last checkpoint. Under torchrun every rank runs the steps in the same order: stage 1 spreads its sequences
and blocks over the ranks, stage 2 trains on all of them (DDP, or FSDP2 when the model is sharded), and
evaluation, saving and the report are rank 0's (every rank's when the model is sharded, since each holds
only part of it). Rank 0 writes progress.json and every file outside the stages' own directories.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

import linearize.distributed as distributed
from linearize import placement
from linearize.checkpoint import (
    CONFIG_FILE,
    atomic_save_tensors,
    atomic_write_text,
    free_disk,
    load_params_strict,
    load_tensors,
)
from linearize.config import RunConfig, for_processes
from linearize.data import build_blocks
from linearize.devices import autocast, resolve_autocast, resolve_device, resolve_dtype
from linearize.errors import LinearizeError
from linearize.evaluate import Scores, layer_errors, score, summarize
from linearize.generation import SAMPLE_PROMPTS, sample_generations
from linearize.layers.attention import attention_mode, linearized_attentions
from linearize.methods import get_method, method_settings, settings_dict
from linearize.methods.base import head_dim_of
from linearize.models import LinearizedForCausalLM
from linearize.models.modeling import decoder_layers
from linearize.models.saving import save_adapter, save_full
from linearize.models.transfer import format_transfer_table, teacher_shapes, transfer_counts, transfer_table
from linearize.plan import (
    Plan,
    choose_store,
    device_memory,
    disk_budget,
    estimate_run,
    format_estimate,
    format_plan,
    model_shape,
    reference_hardware,
    run_hardware,
    stage1_plan,
    stage2_plan,
)
from linearize.probes import (
    Ablation,
    LongRange,
    Retrieval,
    evaluation_code,
    package_code,
    remembered,
    teacher_held_out,
)
from linearize.report import model_card, write_report
from linearize.retrieval import check_settings as check_retrieval
from linearize.teacher import (
    FileWeights,
    TeacherInfo,
    load_teacher,
    load_teacher_config,
    load_tokenizer,
    teacher_directory,
    teacher_license,
)
from linearize.teacher.results import TeacherResults
from linearize.teacher.streaming import empty_teacher, tied_names, without_storage
from linearize.train import finetune
from linearize.train.finetune import training_blocks, with_lora
from linearize.train.parallel import engine_for
from linearize.train.targets import TeacherTargets
from linearize.train.transfer import AttentionTransfer

STITCHED = "mixers.safetensors"  # stage 1's trained mixers, all blocks, in OUTPUT_DIR/stage1


class Progress:
    """Results of finished steps, persisted atomically after each one by rank 0. Every rank reads the file
    once, at the start, so all ranks skip the same finished steps."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        if distributed.is_main():
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return value

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        return self.data[key] if key in self.data else self.put(key, compute())


def prepare_output_dir(config: RunConfig, fresh: bool) -> Path:
    out = Path(config.output_dir)
    saved = out / CONFIG_FILE
    if distributed.is_main():
        if fresh and out.exists():
            shutil.rmtree(out)
        changed = changed_keys(yaml.safe_load(saved.read_text()) or {},
                               yaml.safe_load(yaml.safe_dump(config.to_dict()))) if saved.is_file() else []
        if changed:
            raise LinearizeError(
                f"'{out}' holds a run with a different config ({', '.join(changed)}): pass --fresh to start over "
                "there, or choose another output_dir"
            )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, yaml.safe_dump(config.to_dict(), sort_keys=False))
    distributed.barrier()
    return out


def changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of a saved run config whose values differ from the current config's. A key the saved config
    lacks is not a change: it came with a later version, and the run resumes with its default."""
    changed = []
    for key, value in saved.items():
        if key not in current:
            changed.append(prefix + key)
        elif isinstance(value, dict) and isinstance(current[key], dict) and key not in ("baselines", "attention"):
            changed += changed_keys(value, current[key], f"{prefix}{key}.")
        elif value != current[key]:
            changed.append(prefix + key)
    return changed


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def run(config: RunConfig, fresh: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole recipe described by `config`; returns the report dict (also written to disk). Under
    torchrun, every rank calls this; rank 0 returns the report, the others what they computed."""
    device = distributed.device_of_rank(resolve_device(config.device))
    distributed.init(device)
    recipe = Recipe(config, device, log, fresh)
    steps = (recipe.prepare, recipe.plan, recipe.read_data, recipe.place, recipe.transfer, recipe.load_teacher,
             recipe.evaluate_teacher, recipe.convert, recipe.finetune, recipe.evaluate_student, recipe.save,
             recipe.baselines, recipe.report)
    with autocast(device, recipe.autocast):  # training and the students' evaluation (not the teacher's)
        for step in steps:
            recipe.timed(step)
    return recipe.result


class Recipe:
    """The state the steps share: config, data, models, the report being built."""

    def __init__(self, config: RunConfig, device: torch.device, log: Callable[[str], None], fresh: bool = False):
        self.config, self.device, self.dtype = config, device, resolve_dtype(config.dtype)
        self.autocast = resolve_autocast(config.autocast, device, self.dtype)
        self.log = log if distributed.is_main() else (lambda msg: None)
        self.started = time.perf_counter()
        self.fresh = fresh
        self.result: dict[str, Any] = {}
        self.model = self.teacher_model = self.tokenizer = None
        self.table: list[dict] = []
        self.last_evaluated: str | None = None  # the step whose model the held-out pass saw last

    def timed(self, step: Callable[[], None]) -> None:
        """Run one step and add its wall time to the run's record (summed over resumed runs): the report's
        `seconds_by_step` says where a whole run's time went."""
        began = time.perf_counter()
        step()
        if not hasattr(self, "progress"):  # `prepare` makes the record it is kept in
            return
        name = step.__name__
        self.progress.put(f"time.{name}", (self.progress.get(f"time.{name}") or 0.0) + time.perf_counter() - began)

    # --- prepare and plan ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        config = self.config
        self.out = prepare_output_dir(config, self.fresh)
        self.progress = Progress(self.out / "progress.json")
        torch.manual_seed(config.seed)
        if distributed.world() > 1:
            self.log(f"{distributed.world()} processes (torchrun); rank 0 writes the results")

    def read_data(self) -> None:
        """Tokenized training and held-out blocks (every rank builds the same, deterministically)."""
        config = self.config
        if distributed.is_main():  # a GGUF teacher is converted once, by one rank, before the others read it
            teacher_directory(config.model)
        distributed.barrier()
        self.tokenizer = load_tokenizer(config.model)
        stage_tokens = [s.tokens for s in (config.transfer, config.finetune) if s.enabled]
        if placement.measured(config.attention):
            stage_tokens.append(placement.PROBE_BLOCKS * config.data.seq_len)  # the placement probe's text
        self.data = build_blocks(
            self.tokenizer, config.data.source, seq_len=config.data.seq_len,
            train_tokens=max(stage_tokens, default=0),
            eval_tokens_per_domain=config.data.eval_blocks * config.data.eval_seq_len, seed=config.seed,
            eval_seq_len=config.data.eval_seq_len, text_field=config.data.text_field,
            long_tokens=config.data.long_context, long_documents_per_domain=config.data.long_documents,
            recall_fraction=config.data.recall_fraction,
        )
        self.data.eval = {d: blocks for d, blocks in self.data.eval.items() if len(blocks)}  # eval_blocks: 0
        self.log(f"data: {data_summary(self.data)}")
        self.targets = teacher_targets(config, self.out, self.data.train)
        tune = config.finetune
        self.random_init = getattr(config.attention, "init", "transfer") == "random"
        self.keeps_teacher_weights = not (tune.full or self.random_init)

    def plan(self) -> None:
        """What the run needs, printed before any weight loads; the stage-1 store chosen; what cannot fit refused."""
        config = self.config
        self.text_config = load_teacher_config(config.model)
        if config.evaluate.retrieval:
            check_retrieval(config.evaluate.retrieval, config.evaluate.retrieval_lengths,
                            config.evaluate.retrieval_depths,
                            getattr(self.text_config, "max_position_embeddings", None), " (evaluate.retrieval_lengths)")
        # (model_shape counts a measured sparse cache in the heads its budget pays for: none is an error here)
        shape = model_shape(self.text_config, config.method, config.attention, config.finetune.target_modules,
                            config.finetune.lora_r)
        # the defaults that follow the number of processes, as the run first chose them: resumed on another
        # number, it keeps its stage-1 blocks and its global batch
        processes = self.progress.put("plan.processes", self.progress.get("plan.processes") or distributed.world())
        config = self.config = for_processes(config, processes, shape.layers)
        kind = self.device.type if self.device.type in ("cpu", "cuda") else "cpu"
        stage1 = stage1_plan(shape, config, kind) if config.transfer.enabled else None
        if stage1 is not None:
            stage1.budget = disk_budget(config)
            # a resumed run keeps its first choice: what it stored since takes free space, not budget
            chosen = self.progress.get("plan.store")
            stage1.store = chosen or choose_store(stage1, config.transfer.store, stage1.budget)
            self.progress.put("plan.store", stage1.store)
            if len(stage1.blocks) < distributed.world():
                self.log(f"stage 1 has {len(stage1.blocks)} block(s) for {distributed.world()} processes: all share "
                         "its teacher pass, the extra ones wait while blocks train (transfer.layers_per_block "
                         "smaller gives them blocks)")
        stage2 = stage2_plan(shape, config, kind) if config.finetune.enabled else None
        if stage2 is not None and config.finetune.batch_size % distributed.world():
            fix = (f"set finetune.batch_size to a multiple of {distributed.world()}" if processes == distributed.world()
                   else f"resume on a number of processes that divides {processes} (finetune.batch_size null: one "
                   f"sequence per process of the {processes} this run started on)")
            raise LinearizeError(
                f"finetune.batch_size is the global batch, split over the processes: {config.finetune.batch_size} "
                f"sequences do not split over {distributed.world()}; {fix}", every_rank=True)
        self.store = stage1.store if stage1 is not None else "none"
        self.engine = engine_for(config.finetune, stage2 is None or stage2.ddp <= device_memory(self.device),
                                 self.device)
        plan = Plan(shape, config.dtype, stage1, stage2, kind)
        world = distributed.world()
        timing = estimate_run(self.text_config, config, shape, self.store, world,
                              "fsdp" if self.engine.sharded else "ddp",
                              run_hardware(self.device, world, config.dtype, free_disk(self.out)),
                              reference_hardware(kind, world),
                              stage1 is not None and "transfer" in get_method(config.method).stages)
        self.block_costs = timing.block_costs  # stage 1 gives its blocks to ranks by them
        text = format_plan(plan)
        if timing.estimate is not None:
            self.progress.put("plan.estimate", {"estimate_seconds": timing.estimate.stages(),
                                                "hardware": timing.hardware.describe()})
            text += (f"\n\ntime estimate on {timing.hardware.describe()}:\n"
                     + format_estimate(timing.estimate, timing.hardware))
        if distributed.is_main():
            atomic_write_text(self.out / "plan.md", text + "\n")
        self.log("plan:\n" + text)

    def place(self) -> None:
        """Which heads keep a sparse cache, when `attention.sparse_heads` is "measured": the teacher's heads whose
        queries read most from a few keys beyond the window, on the run's own text (`linearize.placement`), as
        many as `attention.sparse_budget` pays for; written into the run's attention settings, so the student
        and its saved config name them."""
        settings = self.config.attention
        if not placement.measured(settings):
            return
        summary = self.progress.once("placement", self.measure_placement)
        settings.sparse_heads = [list(pair) for pair in summary["heads"]]
        line = placement.describe(summary)
        self.log(line)
        if distributed.is_main():
            plan_file = self.out / "plan.md"
            atomic_write_text(plan_file, (plan_file.read_text() if plan_file.is_file() else "") + line + "\n")

    def measure_placement(self) -> dict:
        config, settings = self.config, self.config.attention
        model, _ = load_teacher(config.model, dtype=self.dtype)
        scores = placement.head_scores(model.to(self.device), self.data.train, settings.window_size,
                                       settings.sink_tokens)
        converted = placement.converted_layers(self.text_config, settings)
        return placement.place_sparse(scores, converted, settings.sparse_keys, settings.window_size,
                                      head_dim_of(self.text_config), settings.sparse_budget).summary()

    # --- stage 1 -------------------------------------------------------------------------------------------

    def transfer(self) -> None:
        """Attention transfer block by block, the teacher streamed from its files: before the whole teacher
        is loaded, so a process holds one block of it at a time."""
        config = self.config
        stage_dir = self.out / "stage1"
        if not config.transfer.enabled or "transfer" not in get_method(config.method).stages:
            return
        if self.progress.get("stage.transfer") is not None and (stage_dir / STITCHED).is_file():
            return
        stage = self.stage1()
        params = stage.block_params_all()
        if not params:
            return
        result = stage.run()
        if distributed.is_main():
            atomic_save_tensors({n: p.detach() for n, p in params.items()}, stage_dir / STITCHED)
        self.progress.put("stage.transfer", {
            **stage_summary(result, sum(p.numel() for p in params.values()), distinct=config.transfer.tokens),
            "store": self.store, "blocks": len(stage.layout.blocks), "processes": distributed.world(),
            "peak_teacher_weights_bytes": stage.weights.peak_bytes,
        })
        distributed.barrier()
        if distributed.is_main():
            stage.remove_stored()  # disk, not results: rebuilt on demand

    def stage1(self) -> AttentionTransfer:
        """Stage 1 on a student whose teacher weights stay in their files (on the meta device) until a block
        needs them."""
        from transformers import AutoConfig

        config = self.config
        directory = teacher_directory(config.model)
        files_config = AutoConfig.from_pretrained(directory)  # the config its weight files were written with
        with torch.random.fork_rng(devices=[]):
            skeleton = empty_teacher(files_config, self.dtype)
            skeleton.model.rotary_emb.to(self.device)
            student = LinearizedForCausalLM.from_teacher(skeleton, config.method, config.attention, device=self.device)
        weights = FileWeights(directory, self.dtype, self.device, tied=tied_names(files_config))
        transfer = dataclass_replace(config.transfer, store=self.store)
        return AttentionTransfer(student, self.data.train, transfer, self.out / "stage1", config.checkpoint_every,
                                 config.seed, self.targets, weights, self.block_costs)

    # --- the teacher -----------------------------------------------------------------------------------------

    def load_teacher(self) -> None:
        config = self.config
        self.evaluates = distributed.is_main() or self.engine.sharded
        if self.engine.sharded:  # the student is built, with its adapter, and sharded at once
            self.log(f"reading teacher '{config.model}' sharded over {distributed.world()} processes (FSDP2): each "
                     "its own rows of every weight")
            self.model, self.table = self.sharded_student(config.method, config.attention)
            return
        self.log(f"loading teacher '{config.model}'")
        model, _ = load_teacher(config.model, dtype=self.dtype)
        self.teacher_model = model.to(self.device)

    def sharded_student(self, method: str, settings: Any) -> tuple[torch.nn.Module, list[dict]]:
        """The converted student with its LoRA adapter, sharded over the ranks (FSDP2): every rank builds its
        structure without weights and reads its own rows of each teacher tensor from the files, so no process
        holds the whole teacher (but under XATL's `init: random`, whose weights rank 0 draws whole). Returns
        it and its transfer table."""
        from transformers import AutoConfig

        config = self.config
        directory = teacher_directory(config.model)
        weights = None
        if self.random_init and distributed.is_main():
            teacher, _ = load_teacher(config.model, dtype=self.dtype)
        else:
            files_config = AutoConfig.from_pretrained(directory)  # the config its weight files were written with
            teacher = empty_teacher(files_config, self.dtype)
            teacher.generation_config = generation_config(directory, self.text_config)
            teacher.teacher_info = TeacherInfo(config.model, str(directory), files_config.model_type,
                                               teacher_license(config.model))
            if not self.random_init:  # storage-free stand-ins, so the adapter is built real, beside them
                teacher = without_storage(teacher)
                weights = FileWeights(directory, self.dtype, tied=tied_names(files_config))
        shapes = teacher_shapes(teacher)
        model = LinearizedForCausalLM.from_teacher(teacher, method, settings)
        table = transfer_table(shapes, model, copied=not self.random_init)
        torch.manual_seed(config.seed)  # the adapter's initial values, as one process draws them in stage 2
        model = with_lora(model, config.finetune)
        return self.engine.shard(model, weights), table

    @contextmanager
    def teacher_view(self):
        """The teacher: loaded on its own, or (sharded) the student with its adapter off and softmax attention."""
        if self.teacher_model is not None:
            yield self.teacher_model
            return
        with self.model.disable_adapter(), attention_mode(self.model, "softmax"):
            yield self.model

    def evaluate_teacher(self) -> None:
        # in the model's own dtype, without the run's autocast: the teacher's numbers are its exact ones (and kept
        # across runs, whatever their autocast); any precision the students' bf16 MLPs lose counts against them
        with self.teacher_view() as model, autocast(self.device, None):
            self.evaluate_teacher_model(model)

    def evaluate_teacher_model(self, model) -> None:
        config, data = self.config, self.data
        # kept across runs, but not where the teacher is the sharded student's softmax view (its own arithmetic)
        results = (TeacherResults(config.model, self.dtype, self.device, evaluation_code())
                   if config.evaluate.teacher_cache and not self.engine.sharded else None)
        self.teacher = teacher_scores(model, data.eval, self.out / "teacher_predictions.safetensors", self.progress,
                                      self.evaluates, results)
        self.probes = LongRange(config, data, model, self.progress, self.evaluates, results)
        self.retrieval = Retrieval(config, data, self.tokenizer, model, self.progress, self.evaluates, results)
        self.ablation = Ablation(config, data, model, self.progress, self.evaluates, results,
                                 {d: s.block_nll for d, s in self.teacher.items()} if self.teacher else None)
        tune = config.finetune
        if self.targets is not None and tune.enabled and not self.keeps_teacher_weights:
            # training will change (or has replaced) the teacher's own weights: keep its targets first
            def logits(ids):
                return model(input_ids=data.train[ids].to(self.device), use_cache=False).logits

            ids = distributed.mine(training_blocks(tune, data.train, config.seed))
            self.targets.fill(ids, logits, "teacher targets")
            distributed.barrier()
        self.teacher_samples = None if not config.evaluate.samples else self.progress.once(
            "samples.teacher", self.main_only(lambda: remembered(
                results, "samples", [], lambda: sample_generations(model, self.tokenizer, SAMPLE_PROMPTS),
                list(SAMPLE_PROMPTS))))

    # --- convert, finetune ---------------------------------------------------------------------------------

    def convert(self) -> None:
        config = self.config
        if self.engine.sharded:
            model, table = self.model, self.table
        else:
            shapes = teacher_shapes(self.teacher_model)
            model = LinearizedForCausalLM.from_teacher(self.teacher_model, config.method, config.attention)
            table = transfer_table(shapes, model, copied=not self.random_init)
        if distributed.is_main():
            atomic_write_text(self.out / "transfer_table.md", format_transfer_table(table))
        self.log(f"transfer: {transfer_counts(table)} (table: {self.out / 'transfer_table.md'})")
        layers = len(decoder_layers(model))
        self.result = {
            "method": config.method,
            "teacher": config.model,
            "teacher_license": teacher_license(config.model),
            "machine": machine_description(self.device, self.autocast),
            "model": {
                "layers": layers,
                "converted_layers": len(linearized_attentions(model)),
                "softmax_keys": get_method(config.method).softmax_keys(config.attention),
                "parameters": count_parameters(model)["total"],
            },
            "data": data_summary(self.data),
            "transfer": transfer_counts(table),
            **({"placement": self.progress.get("placement")} if self.progress.get("placement") else {}),
            "eval": {"teacher": {d: summarize(s) for d, s in (self.teacher or {}).items()}},
            "stages": {},
            "config": config.to_dict(),
        }
        self.result["eval"]["untrained"] = self.evaluate("untrained", model)
        stitched = self.out / "stage1" / STITCHED
        if self.progress.get("stage.transfer") is not None:
            tensors = load_tensors(stitched, self.device)
            if self.engine.sharded:
                self.engine.load_full(model, {"base_model.model." + name: t for name, t in tensors.items()})
            else:
                params = {n: p for n, p in model.mixer_state_dict().items() if p.requires_grad}
                load_params_strict(params, tensors, f"stage 1's mixers in {stitched}")
                model.requires_grad_(False)
            self.result["stages"]["transfer"] = self.progress.get("stage.transfer")
            self.result["eval"]["transfer"] = self.evaluate("transfer", model)
        self.model = model

    def finetune(self) -> None:
        config = self.config
        if not config.finetune.enabled:
            return
        model, result = finetune(self.model, self.data.train, config.finetune, self.out / "stage2",
                                 config.checkpoint_every, config.seed, self.targets, engine=self.engine,
                                 answers=self.data.answers)
        trainable = count_parameters(model)["trainable"]
        self.result["stages"]["finetune"] = self.progress.once(
            "stage.finetune", lambda: stage_summary(result, trainable, distinct=config.finetune.tokens))
        model.eval()
        self.model = model
        self.result["eval"]["finetune"] = self.evaluate("finetune", model)

    # --- evaluate, save, baselines, report -----------------------------------------------------------------

    def evaluate(self, key: str, student: torch.nn.Module) -> dict | None:
        """Held-out ratios of `student` (the model as it is after step `key`), each block's NLL kept beside them
        in progress ("blocks.KEY"): the ablation's whole-student row reads the last model's from there."""
        def compute():
            scores = domain_scores(student, self.data.eval, key)
            self.progress.put(f"blocks.{key}", {d: s.block_nll for d, s in scores.items()})
            return {d: summarize(s, self.teacher[d]) for d, s in scores.items()}

        self.last_evaluated = key
        return self.progress.once(f"eval.{key}", self.main_only(compute))

    def main_only(self, compute: Callable[[], Any]) -> Callable[[], Any]:
        """`compute` where this rank evaluates (rank 0, or every rank of a sharded model), else nothing."""
        return compute if self.evaluates else (lambda: None)

    def evaluate_student(self) -> None:
        model, data, report = self.model, self.data, self.result
        if not self.evaluates:
            return
        layer_blocks = torch.stack([b[0] for b in data.eval.values() if len(b)]) if data.eval else None
        if layer_blocks is not None and not self.engine.sharded:  # a sharded layer is whole only in its forward
            report["layer_errors"] = self.progress.once("layers.student", self.main_only(
                lambda: layer_errors(base_model(model), layer_blocks)))
        student_samples = None if self.teacher_samples is None else self.progress.once(
            "samples.student", self.main_only(lambda: sample_generations(model, self.tokenizer, SAMPLE_PROMPTS)))
        if student_samples is not None:
            report["samples"] = [{"prompt": p, "teacher": t, "student": s}
                                 for p, t, s in zip(SAMPLE_PROMPTS, self.teacher_samples, student_samples)]
        if self.probes.enabled:
            report["long_range"] = {
                "teacher": self.probes.teacher_summary(),
                self.config.method: self.progress.once("long_range.student", self.main_only(
                    lambda: self.probes.measure(model, "student"))),
            }
        records = None
        if self.retrieval.enabled:
            records = self.progress.once("retrieval.student", self.main_only(
                lambda: self.retrieval.measure(model, "student")))
            report["retrieval"] = {"teacher": self.retrieval.teacher, self.config.method: records}
        if self.ablation.enabled:
            ablation = self.progress.once("ablation.student", self.main_only(lambda: self.ablation.measure(
                model, self.retrieval, records, self.progress.get(f"blocks.{self.last_evaluated}"))))
            if ablation is not None:
                report["ablation"] = ablation

    def save(self) -> None:
        model = self.model
        trained = self.engine.trained_tensors(model)  # a sharded model's, gathered to rank 0
        if distributed.is_main():
            if trained is not None:
                save_adapter(model, self.out / "model", tokenizer=self.tokenizer, trained=trained)
            elif self.keeps_teacher_weights:
                save_adapter(model, self.out / "model", tokenizer=self.tokenizer)
            else:  # the teacher's weights changed: only a self-contained directory holds them
                save_full(model, self.out / "model", tokenizer=self.tokenizer)
        distributed.barrier()

    def baselines(self) -> None:
        config = self.config
        # like the teacher's results, kept across runs (one process: more split the arithmetic otherwise): what a
        # baseline gives depends on the teacher, the run's data, stage 2 and evaluation settings and the code
        # (all of it: the package's fingerprint), never on the student
        results = (TeacherResults(config.model, self.dtype, self.device, package_code())
                   if config.evaluate.teacher_cache and distributed.world() == 1 else None)
        for name, baseline in config.baselines.items():
            def train_baseline(name=name, baseline=baseline):
                if results is None:
                    return run_baseline(self, name, baseline)
                evaluate = {k: v for k, v in asdict(config.evaluate).items() if k not in STUDENT_ONLY}
                settings = {"baseline": baseline, "seed": config.seed, "data": asdict(config.data),
                            "finetune": asdict(config.finetune), "evaluate": evaluate,
                            "domains": sorted(self.data.eval), "checkpoint_every": config.checkpoint_every}
                return remembered(results, f"baseline-{slug(name)}", self.baseline_inputs(),
                                  lambda: run_baseline(self, name, baseline), settings)

            key = f"baseline.{name}"
            saved = self.progress.get(key)
            if saved is not None and self.retrieval.enabled and "retrieval" not in saved:
                self.progress.data.pop(key)  # measured before retrieval existed: measure it again (it resumes)
            self.result.setdefault("baselines", {})[name] = self.progress.once(key, train_baseline)

    def baseline_inputs(self) -> list[torch.Tensor]:
        """Every token a baseline trains on or is evaluated on (its results' key: `baselines`)."""
        data = self.data
        inputs = [data.train, *(data.eval[d] for d in sorted(data.eval)), *(data.long[d] for d in sorted(data.long))]
        inputs += [] if data.answers is None else [data.answers]
        return inputs + [p.input_ids for p in self.retrieval.prompts]

    def report(self) -> None:
        elapsed = (self.progress.get("seconds") or 0) + time.perf_counter() - self.started
        self.result["seconds_total"] = self.progress.put("seconds", elapsed)
        self.result["seconds_by_step"] = {key.removeprefix("time."): value  # as measured: the report rounds them
                                          for key, value in self.progress.data.items() if key.startswith("time.")}
        if self.progress.get("plan.estimate") is not None:  # the plan's time estimate, beside the stages' seconds
            self.result["plan"] = self.progress.get("plan.estimate")
        if distributed.is_main():
            try:
                write_report(self.result, self.out)
                atomic_write_text(self.out / "model" / "README.md", model_card(self.result))
            except Exception as err:  # the results are safe: say where, and how to render them again
                raise LinearizeError(
                    f"the run finished but its report could not be rendered ({type(err).__name__}: {err}). "
                    f"Every result is in {self.out / 'report.json'} and the model in {self.out / 'model'}; once "
                    f"the cause is fixed, `linearize report {self.out}` writes report.md and report.html"
                ) from err
            self.log(f"report: {self.out / 'report.md'}")
        distributed.barrier()


def domain_scores(model, eval_blocks: dict, label: str) -> dict[str, Scores]:
    return {d: score(model, b, desc=f"eval {label} ({d})") for d, b in eval_blocks.items()}


def evaluate_domains(model, eval_blocks: dict, teacher: dict[str, Scores], label: str) -> dict[str, dict]:
    return {d: summarize(s, teacher[d]) for d, s in domain_scores(model, eval_blocks, label).items()}


def teacher_scores(model, eval_blocks: dict, path: Path, progress: Progress, evaluates: bool = True,
                   results: TeacherResults | None = None) -> dict[str, Scores] | None:
    """The teacher's scores per domain, computed once and kept (its predictions as safetensors); given
    `results`, read back from an earlier run of the same teacher on the same blocks."""
    saved = progress.get("eval.teacher_raw")
    if saved is not None and path.is_file():
        predictions = load_tensors(path)
        return {d: Scores(nll=s["nll"], tokens=s["tokens"], predictions=predictions[d],
                          block_nll=s.get("block_nll", [])) for d, s in saved.items()}
    if not evaluates:
        return None
    scores = {d: teacher_held_out(model, blocks, d, results) for d, blocks in eval_blocks.items()}
    if distributed.is_main():
        atomic_save_tensors({d: s.predictions for d, s in scores.items()}, path)
    progress.put("eval.teacher_raw", {d: {"nll": s.nll, "tokens": s.tokens, "block_nll": s.block_nll}
                                      for d, s in scores.items()})
    return scores


def data_summary(data) -> dict[str, Any]:
    return {
        "train_tokens": data.train_tokens,
        "train_documents": {d: len(ids) for d, ids in data.train_documents.items()},
        "eval_tokens": {d: int(b.numel()) for d, b in data.eval.items()},
        "eval_documents": {d: len(ids) for d, ids in data.eval_documents.items()},
        **({"recall_blocks": data.recall_blocks} if data.recall_blocks else {}),
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


# evaluate settings no baseline reads (the student's ablation and samples; whether results are kept at all)
STUDENT_ONLY = ("ablate", "ablation_blocks", "samples", "teacher_cache")


def run_baseline(recipe: Recipe, name: str, baseline: dict) -> dict[str, Any] | None:
    """A constant-memory baseline, untrained and after the same budget of stage 2 as the student: held-out
    ratios at both, the long-range and retrieval probes once, on the baseline as it ends (the trained one
    where it trains: its window bounds what either can recall, and the probes are a run's costliest
    evaluations)."""
    config, data, probes, evaluates = recipe.config, recipe.data, recipe.probes, recipe.evaluates
    trains = config.finetune.enabled and "finetune" in get_method(baseline["method"]).stages
    settings = method_settings(baseline["method"], baseline.get("attention") or {})
    if recipe.engine.sharded:
        model, _ = recipe.sharded_student(baseline["method"], settings)
    else:
        teacher_model, _ = load_teacher(config.model, dtype=recipe.dtype)
        model = LinearizedForCausalLM.from_teacher(teacher_model.to(recipe.device), baseline["method"], settings)
    summary: dict[str, Any] = {"method": baseline["method"], "attention": settings_dict(settings), "eval": {},
                               "softmax_keys": get_method(baseline["method"]).softmax_keys(settings)}
    if evaluates:
        summary["eval"]["untrained"] = evaluate_domains(model, data.eval, recipe.teacher, f"{name} untrained")
        if probes.enabled and not trains:
            summary["long_range"] = {"untrained": probes.measure(model, f"{name} untrained")}
        if recipe.retrieval.enabled and not trains:
            summary["retrieval"] = {"untrained": recipe.retrieval.measure(model, f"{name} untrained")}
    if trains:
        work = recipe.out / "baselines" / slug(name)
        model, result = finetune(model, data.train, config.finetune, work, config.checkpoint_every, config.seed,
                                 recipe.targets, engine=recipe.engine, answers=data.answers)
        summary["finetune"] = stage_summary(result, count_parameters(model)["trainable"], config.finetune.tokens)
        model.eval()
        if evaluates:
            summary["eval"]["finetune"] = evaluate_domains(model, data.eval, recipe.teacher, name)
            if probes.enabled:
                summary["long_range"] = {"finetune": probes.measure(model, name)}
            if recipe.retrieval.enabled:
                summary["retrieval"] = {"finetune": recipe.retrieval.measure(model, name)}
    return summary if distributed.is_main() else None


def teacher_targets(config: RunConfig, out: Path, train: torch.Tensor) -> TeacherTargets | None:
    """The run's store of teacher distributions for distillation, shared by the student and the baselines
    (which stage 2 trains on the same blocks): kept for the blocks stage 2 reads."""
    tune = config.finetune
    if tune.distill_weight > 0 and tune.distill_top_k > 0:
        return TeacherTargets(out / "teacher_targets", tune.distill_top_k, training_blocks(tune, train, config.seed))
    return None


def generation_config(directory: Path, text_config):
    """The teacher's generation config, read without its weights."""
    from transformers import GenerationConfig

    if (directory / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(directory)
    return GenerationConfig.from_model_config(text_config)


def base_model(model):
    """The LinearizedForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def dataclass_replace(instance, **changes):
    import dataclasses

    return dataclasses.replace(instance, **changes)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def machine_description(device: torch.device, autocast: torch.dtype | None = None) -> str:
    products = "" if autocast is None else f", {str(autocast).removeprefix('torch.')} autocast"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) + products
    processes = f", {distributed.world()} processes" if distributed.world() > 1 else ""
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads{processes}, " \
           f"torch {torch.__version__}{products}"
