"""Stage 1, attention transfer (LoLCATS), block by block.

Every converted layer's mixer learns to reproduce the teacher's softmax attention output (per head,
before o_proj) from the teacher's own input to that layer. The teacher's output is what flows downstream,
so layers are independent: the decoder layers are split into blocks of `layers_per_block` consecutive
layers (by default one block of all of them) and every block trains alone, with its own optimizer and
checkpoint, from the teacher's hidden state at the block's input:

1. collect: the teacher runs once over the training sequences, one block of layers at a time (a streamed
   teacher holds only that block's weights), and keeps what `store` says:
   - "layers": every layer's input and softmax output. Training then runs no teacher at all: the fastest
     choice, and the most disk ((hidden + heads x head_dim) x 2 bytes per token per layer);
   - "blocks": only the hidden state at each block's input (hidden x 2 bytes per token per boundary);
     training re-runs its block's teacher layers from it at every step;
   - "none": nothing; training re-runs the teacher from the embeddings through its block at every step
     (every layer up to the block's last resident at once).
   With teacher targets for stage 2, the last block's output also gives the teacher's next-token
   distributions (the teacher ran anyway).
2. transfer: each block's mixers train for `epochs` passes over the sequences (the first in order, later
   ones shuffled), resumable from the block's own checkpoint; with several ranks, each block goes to a rank
   by its estimated cost (`block_costs`, from the plan: a block whose layers keep a recall memory costs
   more), the costliest first to the least loaded rank.
3. stitch: every finished block's mixer weights are loaded into the student.

The loss of a block is its share of one joint loss (each layer's MSE, divided by the number of converted
layers in the whole model), and AdamW updates every parameter on its own, so the grouping changes what
is resident, not the result: one block or several, one rank or many, any store (up to the rounding of
stored activations) give the same mixer weights.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import linearize.distributed as distributed
from linearize.checkpoint import atomic_save_tensors, atomic_write_text, free_disk, load_params_strict, load_tensors
from linearize.config import TransferConfig
from linearize.errors import LinearizeError
from linearize.layers.attention import LinearizedAttention, attention_mode
from linearize.models.modeling import decoder_layers
from linearize.teacher.families import LayerRotary, local_mask, teacher_window
from linearize.teacher.streaming import InMemory
from linearize.train.loop import TrainResult, run_steps
from linearize.train.shards import ShardStore
from linearize.train.targets import TeacherTargets

STORES = ("layers", "blocks", "none")
SHARD_BYTES = 64 << 20  # at most this much per shard file (gathered in memory before it is written) ...
MAX_ROWS_PER_SHARD = 16  # ... and at most this many sequences: shards are also the ranks' unit of work
TARGET_POSITIONS = 128  # positions whose teacher logits are computed at once for the stage-2 targets


def block_ranges(num_layers: int, layers_per_block: int | None) -> list[range]:
    """The decoder layers in blocks of `layers_per_block` consecutive layers (None: one block of all)."""
    size = layers_per_block or num_layers
    return [range(start, min(start + size, num_layers)) for start in range(0, num_layers, size)]


def assign_blocks(costs: list[float], world: int) -> list[int]:
    """The rank that trains each block, given each block's estimated cost: the costliest block first, each to
    the rank with the least work so far (longest processing time first: within 4/3 of the best possible
    busiest rank). Equal costs go round-robin; every rank computes the same answer from the same costs."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for block in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[block] = rank
        load[rank] += costs[block]
    return owners


def shard_rows(row_bytes: int, rows: int, world: int) -> int:
    """Rows per shard: at most SHARD_BYTES and MAX_ROWS_PER_SHARD, and few enough that every rank gets work."""
    return max(1, min(MAX_ROWS_PER_SHARD, SHARD_BYTES // max(row_bytes, 1), -(-rows // world)))


def position_embeddings(model: torch.nn.Module, hidden: torch.Tensor) -> LayerRotary:
    """The teacher's rotary (cos, sin) for positions 0 .. T - 1 (training sequences start fresh), per layer:
    `position_embeddings(model, hidden)[layer_index]`."""
    return LayerRotary(model, hidden)


def transfer_loss(layer, x: torch.Tensor, y: torch.Tensor, rotary: LayerRotary, token_ids: torch.Tensor | None = None):
    """MSE between the mixer's output and the teacher's softmax output, per head before o_proj."""
    return F.mse_loss(layer.mix(x, rotary[layer.layer_idx], token_ids).float(), y)


def run_teacher_layers(model, hidden: torch.Tensor, layers: range, rotary: LayerRotary, record: bool = True):
    """The teacher's decoder layers `layers` on `hidden` [B, T, C] (softmax attention, causal, no padding;
    a layer the teacher attends locally keeps its window). Returns the output hidden state and, with
    `record`, {layer: (attention input, softmax output per head)} for every converted layer."""
    decoder = decoder_layers(model)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    recorded = {}
    with attention_mode(model, "record" if record else "softmax"):
        for index in layers:
            window = teacher_window(rotary.config, index)
            kept_local = window is not None and not isinstance(decoder[index].self_attn, LinearizedAttention)
            # a converted layer applies its teacher's window itself; a layer kept as the teacher's is given it
            mask = local_mask(hidden.shape[1], window, hidden.device) if kept_local else None
            hidden = decoder[index](hidden, attention_mask=mask, position_ids=positions,
                                    position_embeddings=rotary[index], use_cache=False)
            attention = decoder[index].self_attn
            if record and isinstance(attention, LinearizedAttention):
                recorded[index], attention.recorded = attention.recorded, None
    return hidden, recorded


@dataclass
class Layout:
    """How stage 1 splits its work: the blocks of layers, the stored rows (training sequences) and their
    shards. Written once to `layout.json`; a resumed run keeps the shard size it started with."""

    blocks: list[range]
    store: str
    rows: int
    rows_per_shard: int

    def to_dict(self) -> dict:
        return {"blocks": [[b.start, b.stop] for b in self.blocks], "store": self.store, "rows": self.rows,
                "rows_per_shard": self.rows_per_shard}


class AttentionTransfer:
    """Stage 1 on one rank: `run()` collects, trains this rank's blocks, waits for the others, stitches."""

    def __init__(self, model, sequences: torch.Tensor, config: TransferConfig, work_dir: Path, checkpoint_every: int,
                 seed: int = 0, targets: TeacherTargets | None = None, weights=None,
                 block_costs: list[float] | None = None):
        if config.store not in STORES + ("auto",):
            raise LinearizeError(f"transfer.store must be auto or one of {', '.join(STORES)}, got '{config.store}'")
        self.model, self.config, self.work_dir = model, config, work_dir
        self.checkpoint_every, self.seed, self.targets = checkpoint_every, seed, targets
        self.weights = weights or InMemory()
        self.layers = decoder_layers(model)
        self.converted = {m.layer_idx: m for m in self.layers.modules() if isinstance(m, LinearizedAttention)}
        rows = max(config.batch_size, min(len(sequences), config.tokens // sequences.shape[1]))
        self.steps_per_epoch = rows // config.batch_size
        self.sequences = sequences[: self.steps_per_epoch * config.batch_size]
        self.layout = self._layout(block_ranges(len(self.layers), config.layers_per_block))
        costs = block_costs if block_costs is not None else [1.0] * len(self.layout.blocks)
        if len(costs) != len(self.layout.blocks):
            raise ValueError(f"{len(costs)} block costs for {len(self.layout.blocks)} blocks")
        self.owners = assign_blocks(costs, distributed.world())
        self.device = next(p for p in model.parameters() if not p.is_meta).device
        self.dtype = model.dtype

    # --- layout and stores ---------------------------------------------------------------------------------

    def _layout(self, blocks: list[range]) -> Layout:
        seq_len, config = self.sequences.shape[1], self.model.config.text_config
        heads = config.num_attention_heads * self.converted_head_dim()
        per_token = max(config.hidden_size, max((len(b) * (config.hidden_size + heads) for b in blocks), default=0))
        row_bytes = per_token * seq_len * torch.finfo(getattr(torch, self.config.cache_dtype)).bits // 8
        rows_per_shard = shard_rows(row_bytes, len(self.sequences), distributed.world())
        store = self.config.store
        if store == "auto":  # the fastest that fits half the free disk (the recipe decides through linearize.plan)
            cache = torch.finfo(getattr(torch, self.config.cache_dtype)).bits // 8
            tokens = len(self.sequences) * seq_len
            needed = {"layers": tokens * len(self.converted) * (config.hidden_size + heads) * cache,
                      "blocks": tokens * (len(blocks) - 1) * config.hidden_size * cache}
            budget = 0.5 * free_disk(self.work_dir)
            store = next((s for s in ("layers", "blocks") if needed[s] <= budget), "none")
        layout = Layout(blocks, store, len(self.sequences), rows_per_shard)
        path = self.work_dir / "layout.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and {**saved, "rows_per_shard": rows_per_shard} == layout.to_dict():
            layout.rows_per_shard = saved["rows_per_shard"]  # resumed, maybe with another number of ranks
        elif distributed.is_main():
            if saved is not None:  # another split or store: what was stored and trained no longer applies
                for stale in ("inputs", "activations", "blocks"):
                    shutil.rmtree(self.work_dir / stale, ignore_errors=True)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(layout.to_dict(), indent=1))
        return layout

    def converted_head_dim(self) -> int:
        return next((m.head_dim for m in self.converted.values()), 0)

    def inputs(self, block: int) -> ShardStore:
        """The teacher's hidden state at block `block`'s input (block 0's is the embedding: not stored)."""
        return ShardStore(self.work_dir / "inputs" / f"block_{block:02d}", self.layout.rows,
                          self.layout.rows_per_shard, self.config.cache_dtype, {"tensors": ["hidden"]})

    def activations(self, block: int) -> ShardStore:
        """Every converted layer's input and softmax output in block `block` (store "layers")."""
        names = [f"{i}.{t}" for i in self.layout.blocks[block] if i in self.converted for t in ("x", "y")]
        return ShardStore(self.work_dir / "activations" / f"block_{block:02d}", self.layout.rows,
                          self.layout.rows_per_shard, self.config.cache_dtype, {"tensors": names})

    def block_dir(self, block: int) -> Path:
        return self.work_dir / "blocks" / f"block_{block:02d}"

    def owner(self, block: int) -> int:
        return self.owners[block]

    def prefixes(self, layers: range, attention_only: bool = False) -> list[str]:
        part = ".self_attn." if attention_only else "."
        return [f"model.layers.{i}{part}" for i in layers]

    # --- 1. collect ----------------------------------------------------------------------------------------

    def outputs_of(self, block: int) -> tuple[ShardStore | None, ShardStore | None, bool]:
        """What collecting block `block` writes: the next block's inputs, this block's layers, teacher targets."""
        last = block == len(self.layout.blocks) - 1
        store = self.layout.store
        following = None if last or store == "none" else self.inputs(block + 1)
        layers = self.activations(block) if store == "layers" else None
        targets = last and store != "none" and self.targets is not None
        return following, layers, targets

    def collect(self) -> float:
        """Run the teacher over this rank's shards of the training sequences, block after block."""
        started = time.perf_counter()
        blocks = self.layout.blocks
        if distributed.is_main():
            for block in range(len(blocks)):
                for store in self.outputs_of(block)[:2]:
                    if store is not None:
                        store.open()
        distributed.barrier()
        shards = distributed.mine(list(range(self.inputs(0).shards)))
        for block, layers in enumerate(blocks):
            following, recorded, targets = self.outputs_of(block)

            def done(shard, following=following, recorded=recorded, targets=targets):
                rows = list(self.inputs(0).rows_of(shard))
                return ((following is None or following.has(shard)) and (recorded is None or recorded.has(shard))
                        and not (targets and self.targets.wanted(rows)))

            todo = [shard for shard in shards if not done(shard)]
            if not todo:
                continue
            held = self.prefixes(layers) + (["model.embed_tokens."] if block == 0 else [])
            held += ["model.norm.", "lm_head."] if targets else []
            with self.weights.hold(self.model, held), torch.no_grad():
                for shard in todo:
                    self._collect_shard(block, shard, following, recorded, targets)
        distributed.barrier()
        return time.perf_counter() - started

    def _collect_shard(self, block: int, shard: int, following, recorded, targets: bool) -> None:
        rows = list(self.inputs(0).rows_of(shard))
        hidden = self.block_input(block, rows)
        outputs, pairs = [], {}
        for start in range(0, len(rows), self.config.batch_size):  # the batch shapes training uses
            part = hidden[start : start + self.config.batch_size]
            out, recorded_part = run_teacher_layers(self.model, part, self.layout.blocks[block],
                                                    position_embeddings(self.model, part), record=recorded is not None)
            outputs.append(out)
            for index, (x, y) in recorded_part.items():  # in the stored dtype at once: half the memory in bf16
                pairs.setdefault(f"{index}.x", []).append(x.to(recorded.dtype))
                pairs.setdefault(f"{index}.y", []).append(y.to(recorded.dtype))
        if recorded is not None:
            recorded.write(shard, {name: torch.cat(parts) for name, parts in pairs.items()})
        if following is not None:
            following.write(shard, {"hidden": torch.cat(outputs)})
        if targets:  # a few positions at a time: the logits of a whole sequence are T x vocabulary floats
            base = self.model.model
            for row, out in zip(rows, torch.cat(outputs)):
                if self.targets.wanted([row]):
                    tops = [self.targets.top(self.model.logits(base.norm(part[None]))[0])
                            for part in out.split(TARGET_POSITIONS)]
                    self.targets.write(row, torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops]))

    def block_input(self, block: int, rows: list[int]) -> torch.Tensor:
        """The teacher's hidden state entering block `block` for the given rows (no gradient)."""
        if block == 0 or self.layout.store == "none":
            with torch.no_grad():
                hidden = self.model.model.embed_tokens(self.sequences[rows].to(self.device))
                if block > 0:  # store "none": through every earlier layer again
                    start = self.layout.blocks[block].start
                    hidden, _ = run_teacher_layers(self.model, hidden, range(start),
                                                   position_embeddings(self.model, hidden), record=False)
            return hidden
        return self.inputs(block).read(rows)["hidden"].to(device=self.device, dtype=self.dtype)

    # --- 2. transfer ---------------------------------------------------------------------------------------

    def order(self, epoch: int) -> list[int]:
        ids = list(range(self.layout.rows))
        if epoch > 0:  # the first epoch in order
            random.Random(self.seed * 1000 + epoch).shuffle(ids)
        return ids

    def block_params_all(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable mixer parameter, by model name: what stage 1 trains."""
        return {n: p for b in range(len(self.layout.blocks)) for n, p in self.block_params(b).items()}

    def block_params(self, block: int) -> dict[str, torch.nn.Parameter]:
        return {f"model.layers.{i}.self_attn.mixer.{name}": p
                for i in self.layout.blocks[block] if i in self.converted
                for name, p in self.converted[i].mixer.named_parameters() if p.requires_grad}

    def train_block(self, block: int) -> None:
        """Train block `block`'s mixers to the end (resuming from its checkpoint) and keep them."""
        directory = self.block_dir(block)
        if (directory / "result.json").is_file():
            return
        params = self.block_params(block)
        layers = self.layout.blocks[block]
        config, store = self.config, self.layout.store
        converted = [i for i in layers if i in self.converted]
        per_layer: dict[int, list[float]] = {}
        total_layers = len(self.converted)

        def step_fn(step: int) -> dict:
            epoch, index = divmod(step, self.steps_per_epoch)
            ids = self.order(epoch)[index * config.batch_size : (index + 1) * config.batch_size]
            token_ids = self.sequences[ids].to(self.device)  # for mixers that remember by token
            if store == "layers":
                stored = self.activations(block).read(ids)
                pairs = {i: (stored[f"{i}.x"], stored[f"{i}.y"]) for i in converted}
            else:
                with torch.no_grad():
                    hidden = self.block_input(block, ids)
                    _, pairs = run_teacher_layers(self.model, hidden, layers, position_embeddings(self.model, hidden))
            rotary, total = None, 0.0
            for i in converted:
                x = pairs[i][0].to(device=self.device, dtype=self.dtype)
                y = pairs[i][1].to(device=self.device, dtype=torch.float32)
                if rotary is None:
                    rotary = position_embeddings(self.model, x)
                # one backward per layer: layers are independent, and this keeps one layer's graph in memory
                loss = transfer_loss(self.converted[i], x, y, rotary, token_ids)
                (loss * config.loss_weight / total_layers).backward()
                if epoch == config.epochs - 1:
                    per_layer.setdefault(i, []).append(loss.item())
                total += loss.item()
            return {"loss": total * config.loss_weight / total_layers, "tokens": len(ids) * self.sequences.shape[1]}

        if store == "layers":  # only the projections feeding the mixers
            held = self.prefixes(layers, attention_only=True)
        else:
            held = self.prefixes(layers if store == "blocks" else range(layers.stop))
            held += ["model.embed_tokens."] if block == 0 or store == "none" else []
        blocks = len(self.layout.blocks)
        name = "stage 1: attention transfer" + (f", block {block + 1}/{blocks}" if blocks > 1 else "")
        with self.weights.hold(self.model, held if params else []):
            result = run_steps(
                name=name, params=params, step_fn=step_fn, total_steps=self.steps_per_epoch * config.epochs,
                lr=config.lr, min_lr_ratio=config.min_lr_ratio, warmup_steps=config.warmup_steps,
                state_dir=directory / "state", checkpoint_every=self.checkpoint_every, hint=" (transfer.lr)",
            ) if params else TrainResult(steps=0, tokens=0, seconds=0.0)
        directory.mkdir(parents=True, exist_ok=True)  # a block of kept layers only trained nothing: still done
        atomic_save_tensors({n: p.detach() for n, p in params.items()}, directory / "mixers.safetensors")
        losses = {str(i): config.loss_weight * sum(v) / len(v) for i, v in sorted(per_layer.items())}
        summary = {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                   "history": result.history, "per_layer_loss": losses, "rank": distributed.rank()}
        atomic_write_text(directory / "result.json", json.dumps(summary))  # last: the block is done

    # --- 3. stitch -----------------------------------------------------------------------------------------

    def stitch(self) -> TrainResult:
        """Load every block's trained mixers into the model; the stage's result, summed over blocks."""
        history: dict[int, dict] = {}
        steps = tokens = 0
        seconds = 0.0
        per_layer: dict[int, float] = {}
        for block in range(len(self.layout.blocks)):
            directory = self.block_dir(block)
            if not (directory / "result.json").is_file():
                raise LinearizeError(f"stage 1 block {block} has no result in {directory}: its rank did not finish; "
                                     "re-run to resume it")
            params = self.block_params(block)
            load_params_strict(params, load_tensors(directory / "mixers.safetensors"), f"stage 1 block {block}")
            summary = json.loads((directory / "result.json").read_text())
            if not summary["steps"]:
                continue
            steps, tokens = summary["steps"], summary["tokens"]
            seconds += summary["seconds"]
            per_layer.update({int(i): loss for i, loss in summary["per_layer_loss"].items()})
            for entry in summary["history"]:
                merged = history.setdefault(entry["step"], {**entry, "loss": 0.0})
                merged["loss"] += entry["loss"]
        return TrainResult(steps=steps, tokens=tokens, seconds=seconds,
                           history=[history[s] for s in sorted(history)], per_layer_loss=per_layer)

    def run(self) -> TrainResult:
        collect_seconds = self.collect()
        for block in distributed.mine(list(range(len(self.layout.blocks))), owner=self.owner):
            self.train_block(block)
        distributed.barrier()
        result = self.stitch()
        result.seconds += collect_seconds
        return result

    def remove_stored(self) -> None:
        """Delete the stored activations and block inputs (disk, not results: rebuilt on demand)."""
        for stored in ("activations", "inputs"):
            shutil.rmtree(self.work_dir / stored, ignore_errors=True)


def attention_transfer(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    config: TransferConfig,
    work_dir: Path,
    checkpoint_every: int,
    seed: int = 0,
    targets: TeacherTargets | None = None,
    weights=None,
) -> TrainResult:
    """Train the mixers of every converted layer on `config.tokens` tokens of `sequences` ([N, T]), block by
    block as `config.layers_per_block` and `config.store` say (see the module docstring). `weights`: where
    the teacher's weights come from (`linearize.teacher.FileWeights` streams them; default: the model
    holds them). With `targets`, the collection pass also stores the teacher's next-token distributions."""
    return AttentionTransfer(model, sequences, config, work_dir, checkpoint_every, seed, targets, weights).run()
