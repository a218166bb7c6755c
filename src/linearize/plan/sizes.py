"""What a run needs, before it loads a weight: memory and disk, from the teacher's config.json alone.

The teacher's module structure is built on the meta device (no memory, any size) and converted by the
chosen method, so every count is the real one: the teacher's parameters per layer, the mixers' and the
LoRA adapter's. From them and the run config:

- stage 1 (attention transfer, block by block): the disk each `transfer.store` needs for the token
  budget, and the memory of one process training one block (the block's weights, streamed, plus its
  activations);
- stage 2 (LoRA): the memory per process replicated (DDP) and sharded over N processes (FSDP2).

`linearize.plan.layout` puts them together with the time each layout takes.

Weights, stored activations and optimizer state are exact counts. Activation memory and the runtime's own
share are estimates: constants measured on SmolLM2-135M on a CPU (bench/scale.py prints the plan beside
what it measures); treat them as +-20%.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from linearize.checkpoint import free_disk
from linearize.errors import LinearizeError

GiB = float(1 << 30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Estimated constants (fitted on SmolLM2-135M, fp32, 2-core CPU, torch 2.13: bench/scale.py):
# the process itself: Python, torch and transformers (~0.5 GiB on a CPU), its data, the allocator's slack
RUNTIME_BYTES = {"cpu": 0.7 * GiB, "cuda": 0.6 * GiB}
MIXER_FLOATS = 24  # per token, query head and head dim: one layer's mixer graph in stage 1 (chunked window op)
TEACHER_LAYER_FLOATS = 6  # per token and (hidden + intermediate): one teacher layer's transient activations
STAGE2_LAYER_FLOATS = 11  # per token and (hidden + intermediate + heads x head_dim): a layer's saved activations
LOGIT_COPIES = 4  # per token and vocabulary entry, fp32: logits, log-softmax, their gradient, the loss's
ADAM_BYTES = 16  # per trainable parameter: fp32 value, gradient and AdamW's two moments
STORES = ("layers", "blocks", "none")


@dataclass(frozen=True)
class ModelShape:
    """The teacher's sizes and parameter counts, and what conversion and LoRA add."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embed_params: int
    head_params: int  # 0 when tied to the embeddings
    final_params: int  # the final norm
    layer_params: tuple[int, ...]  # per decoder layer, the teacher's
    attention_params: tuple[int, ...]  # per decoder layer, its attention's projections and norms
    mixer_params: tuple[int, ...]  # per decoder layer, what the method adds (0: kept as softmax)
    lora_params: int  # the LoRA adapter on `finetune.target_modules`

    @property
    def teacher_params(self) -> int:
        return self.embed_params + self.head_params + self.final_params + sum(self.layer_params)

    @property
    def converted(self) -> list[int]:
        return [i for i, n in enumerate(self.mixer_params) if n]


def model_shape(text_config, method: str, attention: Any, target_modules: list[str], lora_r: int) -> ModelShape:
    """Count everything on a meta-device copy of the teacher converted by `method` (no memory used)."""
    from linearize.methods.base import head_dim_of
    from linearize.models import LinearizedForCausalLM
    from linearize.models.modeling import decoder_layers
    from linearize.placement import planned
    from linearize.teacher.families import check_supported
    from linearize.teacher.streaming import empty_teacher

    check_supported(getattr(text_config, "model_type", None))
    teacher = empty_teacher(text_config, torch.float32)
    tied = teacher.lm_head.weight is teacher.model.embed_tokens.weight
    embed = teacher.model.embed_tokens.weight.numel()
    layers = [sum(p.numel() for p in layer.parameters()) for layer in teacher.model.layers]
    attention_params = [sum(p.numel() for p in layer.self_attn.parameters()) for layer in teacher.model.layers]
    lora = sum(lora_r * (m.in_features + m.out_features) for name, m in teacher.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules)
    student = LinearizedForCausalLM.from_teacher(teacher, method, planned(attention, text_config),
                                                 device=torch.device("meta"))
    mixers = []
    for layer in decoder_layers(student):
        mixer = getattr(layer.self_attn, "mixer", None)
        mixers.append(0 if mixer is None else sum(p.numel() for p in mixer.parameters()))
    return ModelShape(
        model_type=text_config.model_type, layers=len(layers), hidden=text_config.hidden_size,
        intermediate=getattr(text_config, "intermediate_size", 4 * text_config.hidden_size),
        heads=text_config.num_attention_heads, kv_heads=text_config.num_key_value_heads,
        head_dim=head_dim_of(text_config), vocab=text_config.vocab_size, embed_params=embed,
        head_params=0 if tied else teacher.lm_head.weight.numel(),
        final_params=sum(p.numel() for p in teacher.model.norm.parameters()),
        layer_params=tuple(layers), attention_params=tuple(attention_params), mixer_params=tuple(mixers),
        lora_params=lora,
    )


@dataclass
class Stage1Plan:
    blocks: list[range]
    rows: int  # training sequences
    tokens: int
    disk: dict[str, float]  # store -> bytes stored
    memory: dict[str, float]  # store -> bytes per process, at the largest block
    weights: dict[str, float]  # store -> teacher weight bytes resident at once
    targets_disk: float  # the teacher's top-k distributions kept for stage 2
    store: str = ""  # the chosen store
    budget: float = 0.0  # the disk budget it was chosen under


@dataclass
class Stage2Plan:
    trainable: int
    ddp: float  # bytes per process, the whole model in each
    fsdp: dict[int, float] = field(default_factory=dict)  # processes -> bytes per process


@dataclass
class Plan:
    shape: ModelShape
    dtype: str
    stage1: Stage1Plan | None
    stage2: Stage2Plan | None
    device: str = "cpu"

    @property
    def weight_bytes(self) -> float:
        return self.shape.teacher_params * DTYPE_BYTES[self.dtype]


def rows_of(tokens: int, seq_len: int, batch_size: int) -> int:
    """Training sequences a stage uses for a token budget (as the stages count them)."""
    rows = max(batch_size, tokens // seq_len)
    return rows // batch_size * batch_size


def stage1_plan(shape: ModelShape, config, device: str = "cpu") -> Stage1Plan:
    """Disk per store and memory per process for `config.transfer` (a RunConfig)."""
    from linearize.train.transfer import TARGET_POSITIONS, block_ranges, shard_rows

    transfer, tune, seq_len = config.transfer, config.finetune, config.data.seq_len
    check_layers_per_block(transfer.layers_per_block, shape.layers)
    blocks = block_ranges(shape.layers, transfer.layers_per_block)
    rows = rows_of(transfer.tokens, seq_len, transfer.batch_size)
    tokens = rows * seq_len
    cache = DTYPE_BYTES[transfer.cache_dtype]
    weight = DTYPE_BYTES[config.dtype]
    pair = shape.hidden + shape.heads * shape.head_dim  # a layer's stored input and output, per token
    boundaries = tokens * (len(blocks) - 1) * shape.hidden * cache
    disk = {"layers": tokens * len(shape.converted) * pair * cache + boundaries, "blocks": boundaries, "none": 0.0}
    targets = 0.0
    if tune.enabled and tune.distill_weight > 0 and tune.distill_top_k > 0:
        stage2_tokens = rows_of(tune.tokens, seq_len, tune.batch_size or 1) * seq_len
        targets = max(tokens, stage2_tokens) * tune.distill_top_k * 8  # int32 index + fp32 log-probability
    head = (shape.final_params + (shape.head_params or shape.embed_params)) * weight
    memory, weights = {}, {}
    batch = transfer.batch_size
    for store in STORES:
        held = []
        for b, block in enumerate(blocks):
            layers = range(block.stop) if store == "none" else block
            size = sum(shape.layer_params[i] for i in layers) * weight
            size += shape.embed_params * weight if b == 0 or store == "none" else 0
            size += head if b == len(blocks) - 1 and targets and store != "none" else 0
            held.append(size)
        weights[store] = max(held)
        largest = max(len(b) for b in blocks)
        mixers = sum(shape.mixer_params) * 4 + max(
            sum(shape.mixer_params[i] for i in b) for b in blocks) * (ADAM_BYTES - 4)
        kept = batch * seq_len * largest * pair * 4  # a step's layer inputs and outputs, in fp32
        if store == "layers":  # and the collection's shard of them, before it is written
            shard = shard_rows(seq_len * largest * pair * cache, rows, 1)
            kept = max(kept, shard * seq_len * largest * pair * (weight + cache))
        graph = batch * seq_len * shape.heads * shape.head_dim * MIXER_FLOATS * 4
        teacher = batch * seq_len * (shape.hidden + shape.intermediate) * TEACHER_LAYER_FLOATS * weight
        positions = min(seq_len, TARGET_POSITIONS)  # the stage-2 targets' logits, a few positions at a time
        logits = positions * shape.vocab * 4 * 3 if targets and store != "none" else 0
        memory[store] = RUNTIME_BYTES[device] + weights[store] + mixers + kept + max(graph, teacher, logits)
    return Stage1Plan(blocks, rows, tokens, disk, memory, weights, targets)


def stage2_plan(shape: ModelShape, config, device: str = "cpu", processes: tuple[int, ...] = (2, 4, 8, 16, 32, 64),
                per_process_batch: int | None = None) -> Stage2Plan:
    """Memory per process of stage 2, replicated (DDP) and sharded over each number of `processes` (FSDP2)."""
    tune, seq_len = config.finetune, config.data.seq_len
    weight = DTYPE_BYTES[config.dtype]
    mixers = sum(shape.mixer_params) if tune.train_mixers or tune.full else 0
    trainable = shape.teacher_params + mixers if tune.full else shape.lora_params + mixers
    batch = per_process_batch or tune.batch_size or 1  # null: one sequence per process
    per_layer = shape.hidden + shape.intermediate + shape.heads * shape.head_dim
    if tune.gradient_checkpointing:
        saved = batch * seq_len * (shape.layers * shape.hidden + per_layer * STAGE2_LAYER_FLOATS) * weight
    else:
        saved = batch * seq_len * shape.layers * per_layer * STAGE2_LAYER_FLOATS * weight
    logits = batch * seq_len * shape.vocab * 4 * LOGIT_COPIES
    activations = saved + logits
    teacher = shape.teacher_params * weight
    ddp = RUNTIME_BYTES[device] + teacher + trainable * ADAM_BYTES + activations
    largest_unit = max(max(shape.layer_params), shape.embed_params, shape.head_params) * weight
    fsdp = {n: RUNTIME_BYTES[device] + teacher / n + 2 * largest_unit + trainable * ADAM_BYTES / n + activations
            for n in processes}
    return Stage2Plan(trainable, ddp, fsdp)


def check_layers_per_block(layers_per_block: int | None, layers: int) -> None:
    if layers_per_block is not None and not 1 <= layers_per_block <= layers:
        raise LinearizeError(f"transfer.layers_per_block must lie in [1, {layers}] (the model has {layers} decoder "
                             f"layers; null = one block of all of them), got {layers_per_block}")


def device_memory(device: torch.device) -> float:
    """Bytes of memory of one device: a GPU's, or this machine's RAM."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def choose_store(stage1: Stage1Plan, wanted: str, budget: float) -> str:
    """The store to use: `wanted`, or with "auto" the fastest whose disk fits `budget` (layers, then blocks,
    then none). A store that does not fit is an error naming the sizes."""
    sizes = ", ".join(f"{s} {gib(stage1.disk[s] + (stage1.targets_disk if s != 'none' else 0))}" for s in STORES)
    if wanted == "auto":
        for store in STORES:
            if stage1.disk[store] + (stage1.targets_disk if store != "none" else 0) <= budget:
                return store
        return "none"
    if wanted not in STORES:
        raise LinearizeError(f"transfer.store must be auto, {', '.join(STORES)}; got '{wanted}'")
    needed = stage1.disk[wanted] + (stage1.targets_disk if wanted != "none" else 0)
    if needed > budget:
        raise LinearizeError(
            f"transfer.store={wanted} stores {gib(needed)} for {stage1.tokens:,} tokens, more than the disk budget of "
            f"{gib(budget)} (transfer.disk_budget; null = half the free space): needed by store: {sizes}. Choose "
            "another store, fewer transfer.tokens, or raise transfer.disk_budget"
        )
    if len(stage1.blocks) > 1 and stage1.disk["blocks"] and wanted != "none":
        one_block = stage1.disk["blocks"] / (len(stage1.blocks) - 1)
        if one_block > budget:
            raise LinearizeError(f"one block's inputs need {gib(one_block)}, more than the disk budget {gib(budget)}")
    return wanted


def disk_budget(config) -> float:
    """`transfer.disk_budget` GiB, or half the free space where the run writes."""
    if config.transfer.disk_budget is not None:
        if config.transfer.disk_budget <= 0:
            raise LinearizeError(f"transfer.disk_budget must be > 0 GiB (or null), got {config.transfer.disk_budget}")
        return config.transfer.disk_budget * GiB
    return 0.5 * free_disk(config.output_dir)


def gib(value: float) -> str:
    """A size for people: MiB below 1 GiB, GiB, TiB from 1000 GiB."""
    if value < GiB:
        return f"{value / (1 << 20):.1f} MiB"
    if value >= 1000 * GiB:
        return f"{value / GiB / 1024:.1f} TiB"
    return f"{value / GiB:.2f} GiB" if value < 10 * GiB else f"{value / GiB:.0f} GiB"


def format_plan(plan: Plan) -> str:
    """The plan as a few readable lines and tables (what `linearize plan` and the start of a run print)."""
    s = plan.shape
    lines = [
        f"teacher: {s.model_type}, {s.layers} layers, hidden {s.hidden}, {s.heads} heads / {s.kv_heads} kv heads of "
        f"{s.head_dim}, vocabulary {s.vocab:,}",
        f"parameters: {s.teacher_params / 1e9:.2f} B ({gib(plan.weight_bytes)} in {plan.dtype}); per layer "
        f"{gib(s.layer_params[0] * DTYPE_BYTES[plan.dtype])}; mixers {sum(s.mixer_params):,}; "
        f"LoRA {s.lora_params:,}",
    ]
    if plan.stage1 is not None:
        p = plan.stage1
        lines += [
            "",
            f"stage 1: {p.tokens:,} tokens ({p.rows} sequences), {len(p.blocks)} block(s) of "
            f"{max(len(b) for b in p.blocks)} layer(s)" + (f"; store chosen: {p.store}" if p.store else ""),
            "| store | disk | teacher weights resident | memory per process |",
            "|---|---:|---:|---:|",
        ]
        for store in STORES:
            mark = " (chosen)" if store == p.store else ""
            lines.append(f"| {store}{mark} | {gib(p.disk[store])} | {gib(p.weights[store])} | {gib(p.memory[store])} |")
        if p.targets_disk:
            lines.append(f"teacher targets for stage 2 (top-k distributions): {gib(p.targets_disk)} "
                         "(with layers or blocks; with none, stage 2 computes them)")
        if p.budget:
            lines.append(f"disk budget: {gib(p.budget)}")
    if plan.stage2 is not None:
        p2 = plan.stage2
        lines += ["", f"stage 2: {p2.trainable:,} trainable parameters; memory per process: DDP {gib(p2.ddp)}; "
                      + ", ".join(f"FSDP x{n} {gib(m)}" for n, m in sorted(p2.fsdp.items()))]
    return "\n".join(lines)
