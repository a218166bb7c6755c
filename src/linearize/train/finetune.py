"""Stage 2: LoRA (peft) or full fine-tuning on next-token loss, optionally with distillation from the
teacher's logits, optionally with progressive unfreezing (XATL).

The teacher is the same model with the adapter disabled and every converted layer in softmax mode, so
no second copy of the weights is needed.
"""

from __future__ import annotations

import dataclasses
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import linearize.distributed as distributed
from linearize.config import FinetuneConfig
from linearize.errors import LinearizeError
from linearize.layers.attention import attention_mode
from linearize.train.loop import TrainResult, run_steps
from linearize.train.targets import TeacherTargets, distillation_loss, top_k_kl


def lora_config(config: FinetuneConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def with_lora(model: torch.nn.Module, config: FinetuneConfig):
    """The model wrapped by peft with a fresh LoRA adapter; with `config.train_mixers` the mixers train too."""
    peft_model = get_peft_model(model, lora_config(config))
    if config.train_mixers:
        for name, param in peft_model.named_parameters():
            if ".mixer." in name:
                param.requires_grad_(True)
    return peft_model


def fill_targets_in_step(targets: TeacherTargets, ids: list[int], teacher_logits) -> None:
    """Store every missing teacher target before a sharded stage 2, all ranks in step: a sharded forward
    needs every rank, so no rank may skip a teacher pass another one makes. Each round, rank r computes
    the r-th missing block (the last one again where a round is short) and keeps it."""
    distributed.barrier()
    missing = targets.missing(ids)  # the same list everywhere: nobody writes between the two barriers
    distributed.barrier()
    world, rank = distributed.world(), distributed.rank()
    for start in range(0, len(missing), world):
        chunk = missing[start : start + world]
        block = chunk[min(rank, len(chunk) - 1)]
        logits = teacher_logits([block])
        if rank < len(chunk):
            targets.put(block, logits[0])
    distributed.barrier()


def answer_weights(answers: torch.Tensor | None, rows: list[int], weight: float, device) -> torch.Tensor | None:
    """[B, T] weight of each position's prediction (of the next token): `weight` where the next token is an
    answer's, else 1; None where no weighting applies (the model's own loss is used then)."""
    if answers is None or weight == 1.0:
        return None
    marked = answers[rows]
    if not bool(marked.any()):
        return None
    predicts = torch.zeros_like(marked)
    predicts[:, :-1] = marked[:, 1:]
    return torch.where(predicts, weight, 1.0).to(device)


def training_blocks(config: FinetuneConfig, blocks: torch.Tensor, seed: int) -> list[int]:
    """The block indices stage 2 trains on, in order (the same on every resume)."""
    steps = max(1, min(len(blocks), config.tokens // blocks.shape[1]) // config.batch_size)
    ids = list(range(steps * config.batch_size))
    random.Random(seed).shuffle(ids)
    return ids


class Unfreezer:
    """Progressive unfreezing (XATL): `held` parameters get no gradient until the mean loss over the last
    `window` steps improves on the `window` steps before by less than `threshold` (a fraction), then they
    train too. The decision is recorded in the history, so a resumed run picks up where it was."""

    def __init__(self, held: list[torch.nn.Parameter], threshold: float, window: int):
        self.held, self.threshold, self.window = held, threshold, window
        self.unfrozen = False
        for p in held:
            p.requires_grad_(False)

    def __call__(self, history: list[dict]) -> None:
        if self.unfrozen:
            return
        losses = [h["loss"] for h in history]
        resumed = bool(history) and history[-1].get("unfrozen", 0) == 1
        if resumed or self.plateaued(losses):
            self.unfrozen = True
            for p in self.held:
                p.requires_grad_(True)

    def plateaued(self, losses: list[float]) -> bool:
        w = self.window
        if len(losses) < 2 * w:
            return False
        before, last = sum(losses[-2 * w : -w]) / w, sum(losses[-w:]) / w
        return (before - last) / abs(before) < self.threshold


def finetune(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    config: FinetuneConfig,
    work_dir: Path,
    checkpoint_every: int,
    seed: int = 0,
    targets: TeacherTargets | None = None,
    engine=None,
    answers: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train on `config.tokens` tokens of `blocks` ([N, T]): LoRA adapters (and, with `config.train_mixers`,
    the mixers' own parameters), or with `config.full` every weight. With `targets`, the teacher's top-k
    distributions are read from (or first written to) that store instead of re-running the teacher; full
    fine-tuning changes the teacher's own weights, so its targets must all be stored before it starts.
    `engine` (`linearize.train.parallel`): how the work spreads over processes (default: one); each global
    batch of `config.batch_size` sequences is split over the ranks. A model already wrapped by peft (the
    sharded path builds it so) is trained as it is. `answers` [N, T] bool: tokens whose prediction counts
    `config.answer_weight` times in both losses (recall blocks' answers)."""
    from peft import PeftModel

    from linearize.train.parallel import Local

    engine = engine or Local()
    if config.batch_size is None:  # one sequence per process
        config = dataclasses.replace(config, batch_size=distributed.world())
    torch.manual_seed(seed)  # LoRA's random init, the same whether or not the run was resumed
    ids = training_blocks(config, blocks, seed)
    device = next(model.parameters()).device
    if config.gradient_checkpointing:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if isinstance(model, PeftModel):
        peft_model = model
    elif config.full:
        if config.distill_weight > 0 and targets is None:
            raise LinearizeError("full fine-tuning distils from stored teacher targets: set finetune.distill_top_k > 0")
        missing = targets.missing(ids) if targets is not None and config.distill_weight > 0 else []
        if missing:
            raise LinearizeError(
                f"{len(missing)} training blocks have no stored teacher targets in {targets.directory}; "
                "full fine-tuning needs them computed before training (linearize.pipeline does so)"
            )
        peft_model = model
        model.requires_grad_(True)
    else:
        peft_model = with_lora(model, config)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    unfreezer = None
    if config.unfreeze_threshold is not None:
        held = [p for name, p in params.items() if ".mixer." not in name]
        unfreezer = Unfreezer(held, config.unfreeze_threshold, config.unfreeze_window)
    steps = len(ids) // config.batch_size
    trained = engine.wrap(peft_model)

    def teacher_logits(block_ids: list[int]) -> torch.Tensor:
        """The teacher is the same model with the adapter off and softmax attention on."""
        adapter_off = nullcontext() if config.full else peft_model.disable_adapter()
        with torch.no_grad(), adapter_off, attention_mode(model, "softmax"):
            return peft_model(input_ids=blocks[block_ids].to(device), use_cache=False).logits

    if engine.sharded and targets is not None and config.distill_weight > 0:
        fill_targets_in_step(targets, ids, teacher_logits)

    def step_fn(step: int) -> dict:
        whole = ids[step * config.batch_size : (step + 1) * config.batch_size]
        batch = engine.share(whole)  # this rank's rows of the global batch
        inputs = blocks[batch].to(device)
        weights = answer_weights(answers, batch, config.answer_weight, device)
        if weights is None:
            out = trained(input_ids=inputs, labels=inputs, use_cache=False)
            loss = out.loss
        else:  # the next-token loss per position, weighted
            out = trained(input_ids=inputs, use_cache=False)
            ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), inputs[:, 1:].flatten(), reduction="none")
            loss = (ce * weights[:, :-1].flatten()).mean()
        metrics = {"ce": loss.item()}
        if config.distill_weight > 0:
            if targets is None:
                kd = distillation_loss(out.logits, teacher_logits(batch), weights)
            else:
                indices, logprobs = targets.get(batch, teacher_logits)
                kd = top_k_kl(out.logits, indices.to(device), logprobs.to(device), weights)
            loss = loss + config.distill_weight * kd
            metrics["kd"] = kd.item()
        loss.backward()
        if unfreezer is not None:
            metrics["unfrozen"] = int(unfreezer.unfrozen)
        return {"loss": loss.item(), "tokens": len(whole) * blocks.shape[1], **metrics}

    result = run_steps(
        name="stage 2: full fine-tuning" if config.full else "stage 2: LoRA",
        params=params,
        step_fn=step_fn,
        total_steps=steps,
        lr=config.lr,
        min_lr_ratio=config.min_lr_ratio,
        warmup_steps=config.warmup_steps,
        state_dir=work_dir / "state",
        checkpoint_every=checkpoint_every,
        grad_clip=config.grad_clip,
        hint=" (finetune.lr)",
        before_step=unfreezer,
        engine=engine,
        model=trained,
    )
    if config.gradient_checkpointing:
        base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
        base.gradient_checkpointing_disable()
    return peft_model, result
