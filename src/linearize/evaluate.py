"""Held-out evaluation: perplexity, top-1 agreement with the teacher, and the long-range diagnostics.

- `score`: next-token NLL and argmax predictions on blocks, several blocks per forward.
- `position_profile`: per-position NLL on long documents; `bucket_ratios` turns student and teacher
  profiles into perplexity ratios per position bucket ([0, 64), [64, 256), ...) and at 1024 and 4096
  tokens of context (the ratio over the first N positions: attention is causal, so the first 1024 positions
  of a 4096-token document are exactly a 1024-token evaluation).
- `copy_test`: random token sequences of length L, each repeated once; top-1 accuracy on the second copy
  (the tokens after its first), which only a model that recalls L tokens back can get right, and the
  copy gain: how much lower the loss is on the second copy than on the first, in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

POSITION_BUCKETS = ((0, 64), (64, 256), (256, 1024), (1024, 4096))
COPY_LENGTHS = (64, 256, 1024)


@dataclass
class Scores:
    nll: float  # summed negative log-likelihood over predicted tokens
    tokens: int
    predictions: torch.Tensor  # [N, T-1] top-1 next-token predictions (int32)
    block_nll: list[float] = field(default_factory=list)  # each block's summed NLL, in order (nll is their sum)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, block: torch.Tensor) -> torch.Tensor:
    """float32 logits [T - 1, V] predicting tokens 1 .. T - 1 of one block [T]."""
    return model(input_ids=block.unsqueeze(0).to(_device(model)), use_cache=False).logits[0, :-1].float()


def _nll_and_predictions(logits: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nll = F.cross_entropy(logits, block[1:].to(logits.device), reduction="none")
    return nll.cpu(), logits.argmax(dim=-1).to(torch.int32).cpu()


def token_nll(model: torch.nn.Module, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL [T - 1] of each next token, top-1 predictions [T - 1]) for one block [T]."""
    return _nll_and_predictions(next_token_logits(model, block), block)


# tokens per forward when scoring held-out blocks: four 1024-token blocks at once (their fp32 logits: 0.8 GB for
# a 49K vocabulary), about twice as fast on a CPU as one at a time, and the same numbers to the last bit there
# (measured on the default teacher and student; tests/test_evaluate.py holds it on tiny ones)
SCORE_TOKENS = 4096


@torch.no_grad()
def score(model: torch.nn.Module, blocks: torch.Tensor, desc: str = "eval", batch_tokens: int = SCORE_TOKENS
          ) -> Scores:
    """Next-token NLL and argmax predictions of `model` on `blocks` [N, T], as many blocks per forward as fit
    `batch_tokens` (at least one)."""
    rows = max(1, batch_tokens // blocks.shape[1])
    scored = []
    for start in tqdm(range(0, len(blocks), rows), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        batch = blocks[start : start + rows]
        logits = model(input_ids=batch.to(_device(model)), use_cache=False).logits[:, :-1].float()
        scored += [_nll_and_predictions(row, block) for row, block in zip(logits, batch)]
    return _scores(scored, blocks)


def score_with_teacher(
    student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor, desc: str = "eval"
) -> tuple[Scores, Scores, float]:
    """One pass per block through both models: the student's and the teacher's scores, and the mean
    KL(teacher || student) per predicted token over the whole vocabulary (nats)."""
    from linearize.train.targets import distillation_loss

    student_rows, teacher_rows, kl = [], [], 0.0
    for block in _progress(blocks, desc):
        student_logits = next_token_logits(student, block)
        teacher_logits = next_token_logits(teacher, block).to(student_logits.device)
        student_rows.append(_nll_and_predictions(student_logits, block))
        teacher_rows.append(_nll_and_predictions(teacher_logits, block))
        kl += distillation_loss(student_logits, teacher_logits).item()
    return _scores(student_rows, blocks), _scores(teacher_rows, blocks), kl / max(len(blocks), 1)


def _progress(blocks: torch.Tensor, desc: str):
    return tqdm(blocks, desc=desc, unit="block", leave=False, dynamic_ncols=True)


def _scores(rows: list[tuple[torch.Tensor, torch.Tensor]], blocks: torch.Tensor) -> Scores:
    block_nll = [nll.sum().item() for nll, _ in rows]
    return Scores(nll=sum(block_nll), tokens=blocks.shape[0] * (blocks.shape[1] - 1),
                  predictions=torch.stack([predictions for _, predictions in rows]), block_nll=block_nll)


def summarize(scores: Scores, reference: Scores | None = None) -> dict:
    """{"perplexity", "tokens"} plus "agreement" (fraction of equal top-1 predictions) given a reference."""
    out = {"perplexity": scores.perplexity, "tokens": scores.tokens}
    if reference is not None:
        out["agreement"] = (scores.predictions == reference.predictions).float().mean().item()
        out["ppl_ratio"] = scores.perplexity / reference.perplexity
    return out


def position_profile(model: torch.nn.Module, documents: torch.Tensor, desc: str = "positions") -> torch.Tensor:
    """Mean NLL over documents [N, L] at each predicted position: [L - 1] (entry i predicts token i + 1)."""
    rows = [token_nll(model, doc)[0] for doc in tqdm(documents, desc=desc, unit="doc", leave=False)]
    return torch.stack(rows).mean(0)


def bucket_ratios(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Perplexity ratio student / teacher per position bucket and over the first 1024 / 4096 positions,
    from two `position_profile`s (buckets past the documents' length are left out)."""
    length = student.shape[0]

    def ratio(start: int, end: int) -> float:
        return math.exp((student[start:end] - teacher[start:end]).mean().item())

    out = {f"[{a}, {b})": ratio(a, b) for a, b in POSITION_BUCKETS if a < length}
    for context in (1024, 4096):
        if context <= length + 1:
            out[f"ratio@{context}"] = ratio(0, context - 1)
    return out


def copy_sequences(
    vocab_size: int, lengths=COPY_LENGTHS, per_length: int = 2, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Random token sequences of each length, repeated once: {L: [n, 2L]} (ids drawn from the upper
    vocabulary, away from special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for length in lengths:
        n = per_length if length <= 256 else 1
        tokens = torch.randint(vocab_size // 8, vocab_size, (n, length), generator=generator)
        out[length] = torch.cat([tokens, tokens], dim=1)
    return out


def copy_test(model: torch.nn.Module, sequences: dict[int, torch.Tensor], desc: str = "copy") -> dict[str, float]:
    """Per length L: top-1 accuracy on the second copy of each sequence ("L=64": acc), and the copy gain
    ("gain L=64": mean next-token loss on the first copy minus that on the second, in nats), which still
    shows partial recall where top-1 accuracy is 0. The first token of each copy is left out (nothing
    predicts it)."""
    out, gains = {}, {}
    for length, batch in tqdm(sequences.items(), desc=desc, leave=False):
        hits, first, second = [], [], []
        for sequence in batch:
            nll, predictions = token_nll(model, sequence)  # entry i is about token i + 1
            hits.append((predictions[length:] == sequence[length + 1 :].to(torch.int32)).float())
            first.append(nll[: length - 1])
            second.append(nll[length:])
        out[f"L={length}"] = torch.cat(hits).mean().item()
        gains[f"gain L={length}"] = (torch.cat(first).mean() - torch.cat(second).mean()).item()
    return out | gains


@torch.no_grad()
def layer_errors(model: torch.nn.Module, blocks: torch.Tensor, desc: str = "layer errors") -> dict[int, dict]:
    """Per converted layer: the mixer's output against the teacher's softmax attention for the same layer
    input (the hidden states a softmax forward produces), per head before o_proj, on held-out blocks:
    {"mse": mean squared error, "cosine": mean cosine similarity over (token, head) vectors}."""
    from linearize.layers.attention import attention_mode
    from linearize.train.transfer import position_embeddings

    sums: dict[int, list[float]] = {}
    for block in tqdm(blocks, desc=desc, unit="block", leave=False, dynamic_ncols=True):
        token_ids = block.unsqueeze(0).to(_device(model))
        with attention_mode(model, "record") as layers:
            model(input_ids=token_ids, use_cache=False)
            rotary = None
            for layer in layers:
                hidden, teacher_out = layer.recorded
                if rotary is None:  # the same positions for every layer
                    rotary = position_embeddings(model, hidden)
                student_out = layer.mix(hidden, rotary[layer.layer_idx], token_ids).float()
                teacher_out = teacher_out.float()
                mse = F.mse_loss(student_out, teacher_out).item()
                cosine = F.cosine_similarity(student_out, teacher_out, dim=-1).mean().item()
                acc = sums.setdefault(layer.layer_idx, [0.0, 0.0])
                acc[0] += mse
                acc[1] += cosine
    n = max(len(blocks), 1)
    return {index: {"mse": mse / n, "cosine": cos / n} for index, (mse, cos) in sorted(sums.items())}
