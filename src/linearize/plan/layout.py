"""Every layout of a run on given hardware, timed: the fastest that fits memory and disk is suggested, and
each other one is named with why it loses (slower, does not fit memory, does not fit disk).

A layout is: stage 1's store and block size (`transfer.store`, `transfer.layers_per_block`), the number of
processes (every device of the hardware: one torchrun launch), stage 2's engine (`finetune.parallel`) and
`finetune.gradient_checkpointing`. Its time, per stage:

- stage 1, the teacher's pass (`transfer.store` layers / blocks): every sequence through every teacher layer
  once (and the output head where stage 2's targets are kept), shards of sequences spread over the
  processes, plus writing what it stores;
- stage 1, training, per block: `transfer.epochs` passes of each converted layer's transfer step, plus what
  the store makes it recompute (blocks: the block's teacher layers; none: every teacher layer up to the
  block's last) and read back; blocks go to processes by their estimated time (`assign_blocks`), and the
  stage takes as long as its busiest process;
- stage 2: every step's student forward and backward (with the recomputation gradient checkpointing adds)
  and the head's losses, on each process's share of the batch; DDP exchanges the trained gradients, FSDP
  gathers every layer's weights in the forward and the backward, both overlapped with the arithmetic; and,
  where stage 1 kept no teacher targets, a teacher forward of every training sequence.

Each piece of work is timed by `linearize.plan.costs` from its ops; memory and disk come from
`linearize.plan.sizes`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from linearize.errors import LinearizeError
from linearize.plan.costs import ModelCosts, OpCounts
from linearize.plan.hardware import DISK_BYTES, Hardware
from linearize.plan.sizes import DTYPE_BYTES, STORES, ModelShape, gib, rows_of, stage1_plan, stage2_plan
from linearize.train.transfer import MAX_ROWS_PER_SHARD, SHARD_BYTES, assign_blocks, block_ranges

HOUR = 3600.0


@dataclass
class Stage1Option:
    store: str
    layers_per_block: int
    blocks: int
    memory: float  # bytes per process, at the largest block
    disk: float  # bytes stored, teacher targets included
    collect_seconds: float  # the teacher's pass, wall time over the processes
    block_seconds: list[float]  # each block's training on one process
    train_seconds: float  # wall time: the busiest process's blocks
    flops: float = 0.0  # every process's, the teacher's pass and the training
    problem: str = ""  # why it cannot run here ("" = it fits)

    @property
    def seconds(self) -> float:
        return self.collect_seconds + self.train_seconds

    @property
    def settings(self) -> str:
        return f"transfer.store={self.store} transfer.layers_per_block={self.layers_per_block}"

    def describe(self) -> str:
        stored = f"{gib(self.disk)} stored" if self.disk else "nothing stored"
        return f"{self.settings} ({self.blocks} block(s), {gib(self.memory)} per process, {stored})"


@dataclass
class Stage2Option:
    parallel: str  # local (one process) | ddp | fsdp
    processes: int
    batch_per_process: int
    checkpointing: bool
    memory: float
    train_seconds: float
    targets_seconds: float  # the teacher forwards for targets stage 1 did not keep
    flops: float = 0.0  # every process's
    problem: str = ""

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.targets_seconds

    @property
    def settings(self) -> str:
        parts = [] if self.parallel == "local" else [f"finetune.parallel={self.parallel}",
                                                     f"finetune.batch_size={self.batch_per_process * self.processes}"]
        return " ".join(parts + [f"finetune.gradient_checkpointing={str(self.checkpointing).lower()}"])

    def describe(self) -> str:
        engine = "one process" if self.parallel == "local" else f"{self.parallel.upper()} on {self.processes} processes"
        return f"{engine}, gradient checkpointing {'on' if self.checkpointing else 'off'} ({gib(self.memory)} per " \
               "process)"


@dataclass
class Estimate:
    """A layout and its time: stage 1 and stage 2 (None where the run has no such stage)."""

    stage1: Stage1Option | None
    stage2: Stage2Option | None
    processes: int

    @property
    def seconds(self) -> float:
        return (self.stage1.seconds if self.stage1 else 0.0) + (self.stage2.seconds if self.stage2 else 0.0)

    @property
    def disk(self) -> float:
        return self.stage1.disk if self.stage1 else 0.0

    @property
    def fits(self) -> bool:
        return not any(part is not None and part.problem for part in (self.stage1, self.stage2))

    def stages(self) -> dict[str, float]:
        """Seconds by stage: `transfer` (its pass and training) and `finetune`."""
        out = {}
        if self.stage1 is not None:
            out["transfer"] = self.stage1.seconds
        if self.stage2 is not None:
            out["finetune"] = self.stage2.seconds
        return out


@dataclass
class Suggestion:
    best: Estimate
    others: list[str] = field(default_factory=list)  # one line per layout that loses, and why


@dataclass(frozen=True)
class Work:
    """Seconds on one device, and the floating-point operations done in them."""

    seconds: float = 0.0
    flops: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.seconds + other.seconds, self.flops + other.flops)

    def __mul__(self, factor: float) -> Work:
        return Work(self.seconds * factor, self.flops * factor)


def total(works) -> Work:
    return sum(works, Work())


class Timing:
    """Each piece of work's seconds on one device of `hardware` (computed once per piece) and its FLOPs."""

    def __init__(self, costs: dict[int, ModelCosts], hardware: Hardware):
        self.costs, self.hardware = costs, hardware
        self._cache: dict[int, Work] = {}

    def of(self, ops: OpCounts) -> Work:
        if id(ops) not in self._cache:
            self._cache[id(ops)] = Work(ops.seconds(self.hardware.device), ops.total_flops)
        return self._cache[id(ops)]

    def layer(self, batch: int, piece: str, index: int) -> Work:
        return self.of(getattr(self.costs[batch].layers[index], piece))

    def layers(self, batch: int, piece: str, indices) -> Work:
        return total(self.layer(batch, piece, i) for i in indices)

    def head(self, batch: int, piece: str) -> Work:
        return self.of(getattr(self.costs[batch], piece))


def targets_kept(config) -> bool:
    tune = config.finetune
    return tune.enabled and tune.distill_weight > 0 and tune.distill_top_k > 0


def stage1_option(shape: ModelShape, timing: Timing, config, store: str, layers_per_block: int, processes: int,
                  device_type: str) -> Stage1Option:
    """Stage 1 with `store` and blocks of `layers_per_block` on `processes` processes: memory, disk, time."""
    transfer, seq_len = config.transfer, config.data.seq_len
    run = dataclasses.replace(config, transfer=dataclasses.replace(transfer, layers_per_block=layers_per_block))
    sizes = stage1_plan(shape, run, device_type)
    blocks = block_ranges(shape.layers, layers_per_block)
    batch, rows = transfer.batch_size, sizes.rows
    steps = rows // batch
    targets = targets_kept(config) and store != "none"
    disk = sizes.disk[store] + (sizes.targets_disk if store != "none" else 0.0)
    cache = DTYPE_BYTES[transfer.cache_dtype]
    pair = shape.hidden + shape.heads * shape.head_dim
    collect = Work()
    if store != "none":
        passed = timing.layers(batch, "teacher", range(shape.layers))
        passed += timing.head(batch, "head_forward") if targets else Work()
        # every stored byte written once, and each block's input read back for the next block's pass
        io = Work((disk + sizes.disk["blocks"]) / DISK_BYTES)
        row_bytes = max(shape.hidden, max(len(b) * pair for b in blocks)) * seq_len * cache
        per_shard = max(1, min(MAX_ROWS_PER_SHARD, SHARD_BYTES // row_bytes, -(-rows // processes)))
        shards = -(-rows // per_shard)
        collect = passed * steps + io
        collect = Work(collect.seconds * -(-shards // processes) / shards, collect.flops)  # the busiest's share
    blocks_work = []
    for b, block in enumerate(blocks):
        step = timing.layers(batch, "transfer", block)
        if store == "blocks":
            step += timing.layers(batch, "teacher", block)
            step += Work(batch * seq_len * shape.hidden * cache / DISK_BYTES if b else 0.0)
        elif store == "none":
            step += timing.layers(batch, "teacher", range(block.stop))
        else:
            step += Work(batch * seq_len * pair * cache * sum(i in shape.converted for i in block) / DISK_BYTES)
        trains = any(shape.mixer_params[i] for i in block)
        blocks_work.append(step * (steps * transfer.epochs) if trains else Work())
    block_seconds = [w.seconds for w in blocks_work]
    owners = assign_blocks(block_seconds, processes)
    busiest = max(sum(s for s, o in zip(block_seconds, owners) if o == r) for r in range(processes))
    return Stage1Option(store, layers_per_block, len(blocks), sizes.memory[store], disk, collect.seconds,
                        block_seconds, busiest, flops=collect.flops + total(blocks_work).flops)


def stage2_option(shape: ModelShape, timing: Timing, config, parallel: str, processes: int, checkpointing: bool,
                  targets_stored: bool, device_type: str) -> Stage2Option:
    """Stage 2 on `parallel` (local, ddp, fsdp) over `processes`: memory per process and time."""
    tune, seq_len = config.finetune, config.data.seq_len
    batch = per_process_batch(config, processes)
    run = dataclasses.replace(config, finetune=dataclasses.replace(tune, gradient_checkpointing=checkpointing))
    sizes = stage2_plan(shape, run, device_type, (processes,), per_process_batch=batch)
    memory = sizes.fsdp[processes] if parallel == "fsdp" else sizes.ddp
    steps = rows_of(tune.tokens, seq_len, batch * processes) // (batch * processes)
    compute = timing.layers(batch, "student", range(shape.layers)) + timing.head(batch, "head")
    if checkpointing:
        compute += timing.layers(batch, "student_forward", range(shape.layers))
    spread = (processes - 1) / processes
    link = timing.hardware.link_between(processes)
    gradients = 2 * sizes.trainable * 4 * spread / link if processes > 1 else 0.0
    weights = shape.teacher_params * DTYPE_BYTES[config.dtype]
    if parallel == "fsdp":  # every layer's weights gathered in the forward, the backward and any recompute
        exchange = (3 if checkpointing else 2) * weights * spread / link + gradients
    else:
        exchange = gradients
    train = steps * max(compute.seconds, exchange)
    teacher = forward = Work()
    if tune.distill_weight > 0 and not targets_stored:
        forward = timing.layers(batch, "teacher", range(shape.layers)) + timing.head(batch, "head_forward")
        gathers = weights * spread / link if parallel == "fsdp" else 0.0
        teacher = Work(steps * max(forward.seconds, gathers))
    flops = (compute.flops + forward.flops) * steps * processes
    return Stage2Option(parallel, processes, batch, checkpointing, memory, train, teacher.seconds, flops=flops)


def stage1_options(shape: ModelShape, timing: Timing, config, processes: int, device_type: str) -> list[Stage1Option]:
    transfer = config.transfer
    stores = STORES if transfer.store == "auto" else (transfer.store,)
    sizes = [transfer.layers_per_block] if transfer.layers_per_block else range(shape.layers, 0, -1)
    return [stage1_option(shape, timing, config, store, size, processes, device_type)
            for store in stores for size in sizes]


def stage2_options(shape: ModelShape, timing: Timing, config, processes: int, targets_stored: bool,
                   device_type: str) -> list[Stage2Option]:
    tune = config.finetune
    if processes == 1:
        engines = ["local"]
    elif tune.parallel != "auto":
        engines = [tune.parallel]
    else:
        engines = ["ddp"] if tune.full else ["ddp", "fsdp"]
    return [stage2_option(shape, timing, config, engine, processes, checkpointing, targets_stored, device_type)
            for engine in engines for checkpointing in dict.fromkeys((tune.gradient_checkpointing, True))]


def check_fit(option, hardware: Hardware, disk: float = 0.0) -> None:
    if option.memory > hardware.memory:
        option.problem = f"does not fit memory: {gib(option.memory)} per process, {gib(hardware.memory)} per device"
    elif disk > hardware.disk:
        option.problem = f"does not fit disk: stores {gib(disk)}, {gib(hardware.disk)} free"


def suggest(shape: ModelShape, costs: dict[int, ModelCosts], config, hardware: Hardware,
            stage1_enabled: bool = True) -> Suggestion:
    """The fastest layout that fits `hardware` (every device one process), and a line for each other kind of
    layout with why it loses. A run that fits nowhere is refused, naming the smallest hardware that fits."""
    timing = Timing(costs, hardware)
    processes = hardware.devices
    kind = "cpu" if hardware.kind == "cpu" else "cuda"
    ones = stage1_options(shape, timing, config, processes, kind) if stage1_enabled else []
    for option in ones:
        check_fit(option, hardware, option.disk)
    twos: dict[bool, list[Stage2Option]] = {}
    if config.finetune.enabled:
        for stored in {stores_targets(o, config) for o in ones} or {False}:
            twos[stored] = stage2_options(shape, timing, config, processes, stored, kind)
            for option in twos[stored]:
                check_fit(option, hardware)
    pairs = [Estimate(one, two, processes) for one in ones or [None]
             for two in twos.get(stores_targets(one, config), [None])]
    fitting = [p for p in pairs if p.fits]
    if not fitting:
        raise LinearizeError(nowhere(shape, config, hardware, ones, [o for v in twos.values() for o in v]))
    best = min(fitting, key=lambda p: (p.seconds, p.disk))
    return Suggestion(best, reasons(best, pairs))


def stores_targets(option: Stage1Option | None, config) -> bool:
    return option is not None and option.store != "none" and targets_kept(config)


def reasons(best: Estimate, pairs: list[Estimate]) -> list[str]:
    """One line per other kind of layout, with its best time or, where none of its kind fits, why: each other
    stage-1 store, the chosen store in other block sizes, each other stage-2 engine and checkpointing."""
    groups: dict[str, tuple[str, list[Estimate]]] = {}
    for pair in pairs:
        one, two = pair.stage1, pair.stage2
        if one is not None and one.store != best.stage1.store:
            groups.setdefault(f"transfer.store={one.store}", ("stage1", []))[1].append(pair)
        elif one is not None and one.layers_per_block != best.stage1.layers_per_block:
            groups.setdefault(f"transfer.store={one.store} in other blocks", ("stage1", []))[1].append(pair)
        if two is not None and (two.parallel, two.checkpointing) != (best.stage2.parallel, best.stage2.checkpointing):
            groups.setdefault(two.settings, ("stage2", []))[1].append(pair)
    lines = []
    for label, (part, members) in groups.items():
        fits = [p for p in members if p.fits]
        if fits:
            pair = min(fits, key=lambda p: p.seconds)
            lines.append(f"{label}: slower, {hours(pair.seconds)} h against {hours(best.seconds)} h (+"
                         f"{duration(pair.seconds - best.seconds)}; {getattr(pair, part).describe()})")
        else:  # the nearest miss: the least disk among those that fit memory, else the least memory
            options = [getattr(p, part) for p in members]
            within = [o for o in options if not o.problem.startswith("does not fit memory")]
            option = min(within, key=lambda o: getattr(o, "disk", 0.0)) if within else min(options,
                                                                                        key=lambda o: o.memory)
            problem = option.problem or "goes only with stage-1 layouts that do not fit"
            lines.append(f"{label}: {problem} ({option.describe()})")
    return lines


def duration(seconds: float) -> str:
    """A difference of time for people: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 2 * HOUR else f"{hours(seconds)} h"


def hours(seconds: float) -> str:
    """Hours to three significant digits (0.0123, 1.23, 12.3, 123)."""
    value = seconds / HOUR
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def nowhere(shape: ModelShape, config, hardware: Hardware, ones: list[Stage1Option], twos: list[Stage2Option]) -> str:
    """Why nothing fits, and the smallest hardware that would: memory per device at this many devices,
    devices at this memory, disk."""
    problems = []
    if ones:
        least_memory = min(ones, key=lambda o: o.memory)
        within = [o for o in ones if o.memory <= hardware.memory]
        least_disk = min(within or ones, key=lambda o: o.disk)
        if least_memory.memory > hardware.memory:
            problems.append(f"stage 1 needs at least {gib(least_memory.memory)} per device "
                            f"({least_memory.describe()}), {gib(hardware.memory)} given (--memory)")
        elif least_disk.disk > hardware.disk:
            problems.append(f"stage 1 needs at least {gib(least_disk.disk)} of disk where it fits memory "
                            f"({least_disk.describe()}), {gib(hardware.disk)} free (--disk)")
    if twos:
        least = min(twos, key=lambda o: o.memory)
        if least.memory > hardware.memory:
            problems.append(f"stage 2 needs at least {gib(least.memory)} per device on {hardware.devices} "
                            f"device(s) ({least.describe()}), {gib(hardware.memory)} given (--memory)")
    smallest = smallest_hardware(shape, config, hardware, ones, twos)
    return (f"the run does not fit {hardware.devices} x {gib(hardware.memory)} with {gib(hardware.disk)} of disk: "
            + "; ".join(problems) + f". The smallest hardware that fits: {smallest}")


def smallest_hardware(shape: ModelShape, config, hardware: Hardware, ones: list[Stage1Option],
                      twos: list[Stage2Option]) -> str:
    """At this many devices, the memory each needs (and the disk); at this memory, the devices needed."""
    kind = "cpu" if hardware.kind == "cpu" else "cuda"
    stage1_memory = min((o.memory for o in ones), default=0.0)
    disk = min((o.disk for o in ones if o.memory <= max(hardware.memory, stage1_memory)), default=0.0)
    stage2_memory = min((o.memory for o in twos), default=0.0)
    options = [f"{hardware.devices} device(s) of {gib(max(stage1_memory, stage2_memory) * 1.0)} "
               f"with {gib(disk)} of disk"]
    if twos and stage1_memory <= hardware.memory and stage2_memory > hardware.memory and not config.finetune.full:
        per_node = hardware.per_node if hardware.devices > 1 else 8
        fits = [(count, need, checkpointing) for checkpointing in (False, True) for count in node_counts(per_node)
                for need in [fsdp_memory(shape, config, kind, count, checkpointing)] if need <= hardware.memory]
        if fits:
            count, need, checkpointing = min(fits)
            nodes = f"{math.ceil(count / per_node)} node(s) of {per_node}, " if count > per_node else ""
            options.append(f"{count} devices of {gib(hardware.memory)} ({nodes}FSDP {gib(need)} each"
                           + (" with gradient checkpointing" if checkpointing else "") + f") with {gib(disk)} of disk")
    return " or ".join(options)


def fsdp_memory(shape: ModelShape, config, kind: str, processes: int, checkpointing: bool) -> float:
    tune = dataclasses.replace(config.finetune, gradient_checkpointing=checkpointing)
    run = dataclasses.replace(config, finetune=tune)
    return stage2_plan(shape, run, kind, (processes,), per_process_batch=1).fsdp[processes]


def node_counts(per_node: int, limit: int = 1024) -> list[int]:
    """Process counts worth naming: up to a node, then whole nodes."""
    return [n for n in range(2, limit + 1) if n <= per_node or n % per_node == 0]


def format_suggestion(suggestion: Suggestion, hardware: Hardware) -> str:
    best = suggestion.best
    lines = [f"hardware: {hardware.describe()}", "", "suggested layout:"]
    if best.processes > 1:
        lines.append(f"  {best.processes} processes (torchrun --nnodes {hardware.nodes} --nproc-per-node "
                     f"{min(best.processes, hardware.per_node)})")
    else:
        lines.append("  one process")
    if best.stage1 is not None:
        lines.append(f"  stage 1: {best.stage1.describe()}")
    if best.stage2 is not None:
        lines.append(f"  stage 2: {best.stage2.settings}: {best.stage2.describe()}")
    lines += ["", format_estimate(best, hardware), "", "other layouts:"]
    lines += [f"- {line}" for line in suggestion.others] or ["- none: the settings given leave one layout"]
    return "\n".join(lines)


def format_estimate(estimate: Estimate, hardware: Hardware) -> str:
    """Hours per stage and in all, as a small table, with the FLOPs counted and the rates assumed."""
    rows = []
    if estimate.stage1 is not None:
        s1 = estimate.stage1
        if s1.collect_seconds:
            rows.append(("stage 1: the teacher's pass", s1.collect_seconds, None))
        rows.append((f"stage 1: training ({len(s1.block_seconds)} block(s), the busiest process)", s1.train_seconds,
                     None))
        rows.append(("stage 1", s1.seconds, s1.flops))
    if estimate.stage2 is not None:
        s2 = estimate.stage2
        if s2.targets_seconds:
            rows.append(("stage 2: teacher targets", s2.targets_seconds, None))
            rows.append(("stage 2: training", s2.train_seconds, None))
        rows.append(("stage 2", s2.seconds, s2.flops))
    rows.append(("in all", estimate.seconds, sum(part.flops for part in (estimate.stage1, estimate.stage2) if part)))
    out = ["| step | hours | seconds | FLOPs counted |", "|---|---:|---:|---:|"]
    out += [f"| {name} | {hours(seconds)} | {seconds:,.0f} | {'' if flops is None else f'{flops:.3g}'} |"
            for name, seconds, flops in rows]
    return "\n".join(out + [f"(time model: {hardware.rates()})"])


def per_process_batch(config, processes: int) -> int:
    """Stage 2's sequences per process and step (`finetune.batch_size` null: one)."""
    return max(1, (config.finetune.batch_size or processes) // processes)


def batches(config, processes: int) -> set[int]:
    """The batch sizes a run's pieces of work run at: stage 1's, and stage 2's per process."""
    return {config.transfer.batch_size, per_process_batch(config, processes)}


def count_costs(text_config, config, processes: int) -> dict[int, ModelCosts]:
    from linearize.plan.costs import model_costs

    return {batch: model_costs(text_config, config, batch) for batch in batches(config, processes)}


@dataclass
class RunEstimate:
    """What the plan step of a run knows of its time: the estimate on this hardware (None where the device
    is not in the table), and each stage-1 block's cost on a reference device (for assigning blocks)."""

    estimate: Estimate | None
    hardware: Hardware | None
    block_costs: list[float] | None


def estimate_run(text_config, config, shape: ModelShape, store: str, processes: int, parallel: str,
                 hardware: Hardware | None, reference: Hardware, stage1_enabled: bool = True) -> RunEstimate:
    """The run's own layout (its store, blocks, processes and engine) timed on `hardware`, and its blocks'
    costs on `reference` (the same on every rank)."""
    costs = count_costs(text_config, config, processes)
    kind = "cpu" if reference.kind == "cpu" else "cuda"
    size = config.transfer.layers_per_block or shape.layers
    block_costs = None
    if stage1_enabled:
        block_costs = stage1_option(shape, Timing(costs, reference), config, store, size, processes, kind).block_seconds
    if hardware is None:
        return RunEstimate(None, None, block_costs)
    timing = Timing(costs, hardware)
    one = stage1_option(shape, timing, config, store, size, processes, kind) if stage1_enabled else None
    two = None
    if config.finetune.enabled:
        two = stage2_option(shape, timing, config, parallel if processes > 1 else "local", processes,
                            config.finetune.gradient_checkpointing, stores_targets(one, config), kind)
    return RunEstimate(Estimate(one, two, processes), hardware, block_costs)
