"""Stage 2: LoRA (peft) on next-token loss, optionally with distillation from the teacher's logits.

The teacher is the same model with the adapter disabled and every converted layer in softmax mode, so
no second copy of the weights is needed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from linearize.config import FinetuneConfig
from linearize.layers.attention import attention_mode
from linearize.train.loop import TrainResult, run_steps
from linearize.train.targets import TeacherTargets, top_k_kl


def lora_config(config: FinetuneConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token over the whole vocabulary."""
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_student.flatten(0, -2), log_teacher.flatten(0, -2), log_target=True, reduction="batchmean")


def finetune(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    config: FinetuneConfig,
    work_dir: Path,
    checkpoint_every: int,
    seed: int = 0,
    targets: TeacherTargets | None = None,
) -> tuple[PeftModel, TrainResult]:
    """Wrap `model` with LoRA adapters and train them (and, with `config.train_mixers`, the mixers' own
    parameters) on `config.tokens` tokens of `blocks` ([N, T]). With `targets`, the teacher's top-k
    distributions are read from (or first written to) that store instead of re-running the teacher."""
    torch.manual_seed(seed)  # LoRA's random init, the same whether or not the run was resumed
    peft_model = get_peft_model(model, lora_config(config))
    if config.train_mixers:
        for name, param in peft_model.named_parameters():
            if ".mixer." in name:
                param.requires_grad_(True)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    seq_len = blocks.shape[1]
    steps = max(1, min(len(blocks), config.tokens // seq_len) // config.batch_size)
    ids = list(range(steps * config.batch_size))
    random.Random(seed).shuffle(ids)
    device = next(model.parameters()).device

    def teacher_logits(block_ids: list[int]) -> torch.Tensor:
        """The teacher is the same model with the adapter off and softmax attention on."""
        with torch.no_grad(), peft_model.disable_adapter(), attention_mode(model, "softmax"):
            return peft_model(input_ids=blocks[block_ids].to(device), use_cache=False).logits

    def step_fn(step: int) -> dict:
        batch = ids[step * config.batch_size : (step + 1) * config.batch_size]
        inputs = blocks[batch].to(device)
        out = peft_model(input_ids=inputs, labels=inputs, use_cache=False)
        metrics = {"ce": out.loss.item()}
        loss = out.loss
        if config.distill_weight > 0:
            if targets is None:
                kd = distillation_loss(out.logits, teacher_logits(batch))
            else:
                indices, logprobs = targets.get(batch, teacher_logits)
                kd = top_k_kl(out.logits, indices.to(device), logprobs.to(device))
            loss = loss + config.distill_weight * kd
            metrics["kd"] = kd.item()
        loss.backward()
        return {"loss": loss.item(), "tokens": inputs.numel(), **metrics}

    result = run_steps(
        name="stage 2: LoRA",
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
    )
    return peft_model, result
