"""Stage 1, attention transfer (LoLCATS): train each converted layer's mixer to reproduce the teacher's
softmax attention output for the same inputs.

Every layer sees the teacher's own layer input and is scored against the teacher's output (per head,
before o_proj); the teacher's output is what flows downstream, so layers train independently and one
teacher forward (no LM head) serves all of them. The recorded activations (layer input and teacher
output per layer, bf16) are written to disk as safetensors shards during the first epoch; later epochs
read them back instead of re-running the teacher, and recompute q, k, v with the frozen projections.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.checkpoint import DTYPES, atomic_save_tensors, load_tensors
from linearize.config import TransferConfig
from linearize.layers.attention import attention_mode, linearized_attentions
from linearize.train.loop import TrainResult, run_steps
from linearize.train.targets import TeacherTargets


class ActivationCache:
    """Teacher activations per training block: `block_00012.safetensors` holds `{layer}.x` (the layer's
    attention input [1, T, C]) and `{layer}.y` (the teacher's attention output [1, H, T, D])."""

    def __init__(self, model: torch.nn.Module, directory: Path, dtype: str, targets: TeacherTargets | None = None):
        self.model = model
        self.targets = targets
        self.directory = directory
        self.dtype = DTYPES[dtype]
        self.layers = linearized_attentions(model)
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, block: int) -> Path:
        return self.directory / f"block_{block:05d}.safetensors"

    def get(self, blocks: torch.Tensor, ids: list[int]) -> dict[str, torch.Tensor]:
        """{"{layer}.x", "{layer}.y"} for the given blocks (batched on dim 0), from disk or the teacher."""
        todo = [i for i in ids if not self.path(i).is_file()]
        if todo:
            self._record(blocks, todo)
        shards = [load_tensors(self.path(i)) for i in ids]
        return {name: torch.cat([shard[name] for shard in shards]) for name in shards[0]}

    @torch.no_grad()
    def _record(self, blocks: torch.Tensor, ids: list[int]) -> None:
        device = next(self.model.parameters()).device
        inputs = blocks[ids].to(device)
        with attention_mode(self.model, "record"):
            hidden = self.model.model(input_ids=inputs, use_cache=False).last_hidden_state
            recorded = {layer.layer_idx: layer.recorded for layer in self.layers}
        if self.targets is not None:  # the teacher ran anyway: keep its next-token distributions for stage 2
            for block, logits in zip(ids, self.model.lm_head(hidden)):
                self.targets.put(block, logits)
        for row, block in enumerate(ids):
            tensors = {
                f"{index}.{name}": tensor[row : row + 1].to(self.dtype)
                for index, values in recorded.items()
                for name, tensor in zip(("x", "y"), values)
            }
            atomic_save_tensors(tensors, self.path(block))


def position_embeddings(model: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's rotary (cos, sin) for positions 0 .. T - 1 (training blocks start fresh)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    return model.model.rotary_emb(hidden, positions)


def transfer_loss(layer, x: torch.Tensor, y: torch.Tensor, rotary, token_ids: torch.Tensor | None = None):
    """MSE between the mixer's output and the teacher's softmax output, per head before o_proj."""
    return F.mse_loss(layer.mix(x, rotary, token_ids).float(), y)


def attention_transfer(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    config: TransferConfig,
    work_dir: Path,
    checkpoint_every: int,
    seed: int = 0,
    targets: TeacherTargets | None = None,
) -> TrainResult:
    """Train the mixers of every converted layer on `config.tokens` tokens of `blocks` ([N, T]). With
    `targets`, the recording pass also stores the teacher's next-token distributions for stage 2."""
    params = {name: p for name, p in model.mixer_state_dict().items() if p.requires_grad}
    seq_len = blocks.shape[1]
    num_blocks = max(config.batch_size, min(len(blocks), config.tokens // seq_len))
    steps_per_epoch = num_blocks // config.batch_size
    cache = ActivationCache(model, work_dir / "activations", config.cache_dtype, targets)
    layers = cache.layers
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    per_layer: dict[int, list[float]] = {}  # last epoch's losses, per layer

    def order(epoch: int) -> list[int]:
        ids = list(range(steps_per_epoch * config.batch_size))
        if epoch > 0:  # the first epoch runs in order, so the cache fills front to back
            random.Random(seed * 1000 + epoch).shuffle(ids)
        return ids

    def step_fn(step: int) -> dict:
        epoch, index = divmod(step, steps_per_epoch)
        ids = order(epoch)[index * config.batch_size : (index + 1) * config.batch_size]
        activations = cache.get(blocks, ids)
        token_ids = blocks[ids].to(device)  # for mixers that remember by token
        rotary = None
        total = 0.0
        for layer in layers:
            x = activations[f"{layer.layer_idx}.x"].to(device=device, dtype=dtype)
            y = activations[f"{layer.layer_idx}.y"].to(device=device, dtype=torch.float32)
            if rotary is None:
                rotary = position_embeddings(model, x)
            # one backward per layer: layers are independent, and this keeps one layer's graph in memory
            loss = transfer_loss(layer, x, y, rotary, token_ids)
            (loss * config.loss_weight / len(layers)).backward()
            if epoch == config.epochs - 1:
                per_layer.setdefault(layer.layer_idx, []).append(loss.item())
            total += loss.item()
        return {"loss": total * config.loss_weight / len(layers), "tokens": len(ids) * seq_len}

    result = run_steps(
        name="stage 1: attention transfer",
        params=params,
        step_fn=step_fn,
        total_steps=steps_per_epoch * config.epochs,
        lr=config.lr,
        min_lr_ratio=config.min_lr_ratio,
        warmup_steps=config.warmup_steps,
        state_dir=work_dir / "state",
        checkpoint_every=checkpoint_every,
        hint=" (transfer.lr)",
    )
    if per_layer:  # empty when a finished stage is only being resumed
        result.per_layer_loss = {i: config.loss_weight * sum(v) / len(v) for i, v in sorted(per_layer.items())}
    return result
