"""Held-out evaluation: perplexity and top-1 next-token agreement with the teacher."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Scores:
    nll: float  # summed negative log-likelihood over predicted tokens
    tokens: int
    predictions: torch.Tensor  # [N, T-1] top-1 next-token predictions (int32)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


@torch.no_grad()
def score(model: torch.nn.Module, blocks: torch.Tensor, desc: str = "eval") -> Scores:
    """Next-token NLL and argmax predictions of `model` on `blocks` [N, T], one block at a time."""
    device = next(model.parameters()).device
    nll, predictions = 0.0, []
    for block in tqdm(blocks, desc=desc, unit="block", leave=False, dynamic_ncols=True):
        inputs = block.unsqueeze(0).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits[0, :-1].float()
        targets = inputs[0, 1:]
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).to(torch.int32).cpu())
    return Scores(nll=nll, tokens=blocks.shape[0] * (blocks.shape[1] - 1), predictions=torch.stack(predictions))


def summarize(scores: Scores, reference: Scores | None = None) -> dict:
    """{"perplexity", "tokens"} plus "agreement" (fraction of equal top-1 predictions) given a reference."""
    out = {"perplexity": scores.perplexity, "tokens": scores.tokens}
    if reference is not None:
        out["agreement"] = (scores.predictions == reference.predictions).float().mean().item()
        out["ppl_ratio"] = scores.perplexity / reference.perplexity
    return out
