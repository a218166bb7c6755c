"""The long-range diagnostics on models whose answers are known: a perfect copier, a model that has no
memory, and synthetic per-position losses."""

import math
from types import SimpleNamespace

import torch
from torch import nn

from linearize.evaluate import bucket_ratios, copy_sequences, copy_test

VOCAB = 64


class Copier(nn.Module):
    """Predicts token t + 1 as token t + 1 - L (the sequence's first copy) from the second copy on,
    uniformly before: it recalls exactly L tokens back."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length
        self.anchor = nn.Parameter(torch.zeros(()))  # so the model has a device

    def forward(self, input_ids, **kwargs):
        batch, t = input_ids.shape
        logits = torch.zeros(batch, t, VOCAB)
        for i in range(self.length - 1, t):  # logits at i predict token i + 1
            logits[:, i].scatter_(1, input_ids[:, i + 1 - self.length, None], 20.0)
        return SimpleNamespace(logits=logits)


class Forgetful(Copier):
    """Uniform at every position: no recall at all."""

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_copy_test_scores_recall_by_accuracy_and_gain():
    sequences = copy_sequences(VOCAB, lengths=(8, 16), seed=0)
    recall = copy_test(Copier(16), {16: sequences[16]})
    assert recall["L=16"] == 1.0
    assert math.isclose(recall["gain L=16"], math.log(VOCAB), rel_tol=1e-3)  # uniform first copy, sure second
    none = copy_test(Forgetful(16), sequences)
    assert none["L=8"] < 0.2 and none["L=16"] < 0.2
    assert abs(none["gain L=8"]) < 1e-6 and abs(none["gain L=16"]) < 1e-6
    wrong_distance = copy_test(Copier(8), {16: sequences[16]})  # recalls from the wrong place
    assert wrong_distance["L=16"] < 0.2 and wrong_distance["gain L=16"] < 0


def test_bucket_ratios_read_positions_and_contexts():
    teacher = torch.full((4095,), 2.0)
    student = teacher.clone()
    student[64:256] += math.log(2.0)  # twice the teacher's perplexity on positions 64 .. 255 only
    ratios = bucket_ratios(student, teacher)
    assert ratios["[0, 64)"] == 1.0 and ratios["[256, 1024)"] == 1.0 and ratios["[1024, 4096)"] == 1.0
    assert math.isclose(ratios["[64, 256)"], 2.0, rel_tol=1e-6)
    assert math.isclose(ratios["ratio@1024"], 2.0 ** (192 / 1023), rel_tol=1e-6)
    assert math.isclose(ratios["ratio@4096"], 2.0 ** (192 / 4095), rel_tol=1e-6)


def test_scoring_blocks_several_per_forward_gives_the_numbers_of_one_at_a_time():
    """The held-out score in forwards of several blocks (the default) equals block by block to the last bit:
    every NLL, per-block sum and prediction, for a teacher and a hybrid student."""
    from helpers import make_tiny_model, tokens

    from linearize import linearize
    from linearize.evaluate import score

    blocks = tokens(batch=5, length=64, seed=3)
    teacher = make_tiny_model("llama")
    for model in (teacher, linearize(make_tiny_model("llama"), "hybrid", {"window_size": 8, "sink_tokens": 2})):
        alone, together = score(model, blocks, batch_tokens=64), score(model, blocks, batch_tokens=3 * 64)
        assert together.block_nll == alone.block_nll and together.nll == alone.nll
        assert torch.equal(together.predictions, alone.predictions)
