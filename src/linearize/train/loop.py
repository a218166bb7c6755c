"""The one optimisation loop: AdamW, warmup + cosine decay, gradient clipping, progress bar with ETA,
NaN guard, and atomic resumable checkpoints every N steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from linearize.distributed import is_main
from linearize.errors import LinearizeError


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # one entry per step: step, loss, lr, tokens
    per_layer_loss: dict[int, float] = field(default_factory=dict)  # stage 1: final-epoch loss per layer

    @property
    def final_loss(self) -> float:
        tail = self.history[-max(1, len(self.history) // 10) :]
        return sum(h["loss"] for h in tail) / len(tail)


def run_steps(
    *,
    name: str,
    params: dict[str, torch.nn.Parameter],
    step_fn: Callable[[int], dict],
    total_steps: int,
    lr: float,
    min_lr_ratio: float,
    warmup_steps: int,
    state_dir: Path,
    checkpoint_every: int,
    grad_clip: float | None = None,
    hint: str = "",
    before_step: Callable[[list[dict]], None] | None = None,
    engine=None,
    model: torch.nn.Module | None = None,
) -> TrainResult:
    """Run `total_steps` optimizer steps; `step_fn(step)` does forward + backward and returns at least
    {"loss": float, "tokens": int} (this rank's loss: the logged one is the mean over ranks). Resumes from
    `state_dir` if a snapshot is there. `before_step(history)` sees the history so far (restored on resume)
    before every step; a parameter without a gradient is left alone by the optimizer (how progressive
    unfreezing holds weights). `engine` (`linearize.train.parallel`; default one process) says who writes
    and reads the snapshots of `model` (the module that trains, wrapped as the engine wraps it)."""
    if engine is None:
        from linearize.train.parallel import Local

        engine = Local()
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(warmup_steps, total_steps // 2), total_steps, min_lr_rate=min_lr_ratio
    )
    start, history, seconds = 0, [], 0.0
    progress = engine.load_state(state_dir, model, params, optimizer, scheduler)
    if progress is not None:
        start, history, seconds = progress["step"], progress["history"], progress["seconds"]
    bar = tqdm(total=total_steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
               disable=not is_main())
    began = time.perf_counter() - seconds
    for step in range(start, total_steps):
        optimizer.zero_grad(set_to_none=True)
        if before_step is not None:
            before_step(history)
        metrics = step_fn(step)
        metrics = {k: engine.mean(v) if isinstance(v, float) else v for k, v in metrics.items()}
        if not math.isfinite(metrics["loss"]):
            raise LinearizeError(
                f"{name}: loss is {metrics['loss']} at step {step + 1} (lr {scheduler.get_last_lr()[0]:.2e}); "
                f"the last checkpoint in {state_dir} is intact. Lower the learning rate{hint} and re-run to resume."
            )
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
        history.append({"step": step + 1, "lr": scheduler.get_last_lr()[0], **metrics})
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        bar.update()
        done = step + 1
        if done % checkpoint_every == 0 or done == total_steps:
            progress = {"step": done, "history": history, "seconds": time.perf_counter() - began}
            engine.save_state(state_dir, model, dict(params), optimizer, scheduler, progress)
    bar.close()
    return TrainResult(
        steps=total_steps,
        tokens=sum(h["tokens"] for h in history),
        seconds=time.perf_counter() - began,
        history=history,
    )

