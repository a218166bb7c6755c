"""The teacher's next-token distributions for distillation, computed once per training block and kept.

Stage 2 distils the teacher's logits into the student. Running the teacher at every step costs a forward
of the whole model; instead its top-k log-probabilities per position are stored on disk
(`block_00012.safetensors`: indices [T, k] int32, log-probabilities [T, k] float32), written during stage 1's
recording pass (which runs the teacher anyway) or on first use, and read back by the student's stage 2
and by every baseline trained on the same blocks.

The loss is the KL divergence between teacher and student over k + 1 outcomes: the teacher's top k tokens
and "any other token". It is exact when k covers the vocabulary, and a lower bound of the full KL
otherwise (merging outcomes never increases a KL divergence).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.checkpoint import atomic_save_tensors, load_tensors


class TeacherTargets:
    """`blocks`: the blocks training will read (None: any), the ones stage 1's recording pass keeps targets
    for; `get` still computes any other block asked for."""

    def __init__(self, directory: Path, top_k: int, blocks: list[int] | None = None):
        self.directory = directory
        self.top_k = top_k
        self.blocks = None if blocks is None else frozenset(blocks)
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, block: int) -> Path:
        return self.directory / f"block_{block:05d}.safetensors"

    def top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int32, log-probabilities) of the top k of teacher logits [..., V]."""
        logprobs = F.log_softmax(logits.float(), dim=-1)
        values, indices = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        return indices.to(torch.int32), values

    def put(self, block: int, logits: torch.Tensor) -> None:
        """Keep the top-k log-probabilities of one block's teacher logits [T, V]."""
        self.write(block, *self.top(logits))

    def write(self, block: int, indices: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Keep one block's top-k (indices [T, k], log-probabilities [T, k])."""
        atomic_save_tensors({"indices": indices.to(torch.int32), "logprobs": logprobs.float()}, self.path(block))

    def missing(self, ids: list[int]) -> list[int]:
        return [i for i in ids if not self.path(i).is_file()]

    def wanted(self, ids: list[int]) -> list[int]:
        """The blocks of `ids` that training will read and that are not stored yet."""
        return [i for i in self.missing(ids) if self.blocks is None or i in self.blocks]

    def fill(self, ids: list[int], teacher_logits: Callable[[list[int]], torch.Tensor], desc: str = "") -> None:
        """Store the targets of every block in `ids` not stored yet, one block at a time."""
        from tqdm.auto import tqdm

        missing = self.missing(ids)
        if len(missing) > 1:
            missing = tqdm(missing, desc=desc or "teacher targets", unit="block", leave=False)
        with torch.no_grad():
            for i in missing:
                self.put(i, teacher_logits([i])[0])

    def get(
        self, ids: list[int], teacher_logits: Callable[[list[int]], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B, T, k] long, log-probabilities [B, T, k]) for the given blocks; blocks not stored yet
        are computed with `teacher_logits(ids) -> [len(ids), T, V]` and stored."""
        todo = self.missing(ids)
        if todo:  # one teacher call for the batch's missing blocks (`fill` goes block by block, for memory)
            with torch.no_grad():
                for block, logits in zip(todo, teacher_logits(todo)):
                    self.put(block, logits)
        stored = [load_tensors(self.path(i)) for i in ids]
        return torch.stack([s["indices"].long() for s in stored]), torch.stack([s["logprobs"] for s in stored])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per token over the whole vocabulary, averaged over positions (`weights` [B, T]:
    each position's weight in that mean)."""
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    if weights is None:
        return F.kl_div(log_student.flatten(0, -2), log_teacher.flatten(0, -2), log_target=True,
                        reduction="batchmean")
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return (kl * weights).mean()


def top_k_kl(student_logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one outcome for all others, averaged
    over positions (`weights` [B, T]: each position's weight in that mean). student_logits [B, T, V];
    indices, teacher_logprobs [B, T, k]."""
    student = F.log_softmax(student_logits.float(), dim=-1).gather(-1, indices)  # [B, T, k]
    teacher = teacher_logprobs.float()
    p = teacher.exp()
    kl = (p * (teacher - student)).sum(-1)
    rest_teacher = (1 - p.sum(-1)).clamp(min=1e-12)
    rest_student = (1 - student.exp().sum(-1)).clamp(min=1e-12)
    kl = kl + rest_teacher * (rest_teacher.log() - rest_student.log())
    return kl.mean() if weights is None else (kl * weights).mean()
