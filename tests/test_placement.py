"""Which heads get a sparse cache: the teacher's heads that read a few exact keys beyond the window."""

from types import SimpleNamespace

import pytest
import torch

from linearize import LinearizeError
from linearize.placement import PROBE_HALF, TOP_KEYS, describe, head_bytes, head_scores, place_sparse


class AttentionOf:
    """A stand-in teacher whose layers attend as given: kv head 0's query heads read one key half the probe
    back (a copying head), kv head 1's read the last few keys (a streaming head)."""

    def __init__(self, length: int):
        self.config = SimpleNamespace(num_key_value_heads=2, _attn_implementation="sdpa")
        self.length = length
        self.implementations = []

    def parameters(self):
        return iter([torch.zeros(1)])

    def set_attn_implementation(self, name):
        self.implementations.append(name)
        self.config._attn_implementation = name

    def __call__(self, input_ids, output_attentions, use_cache):
        assert output_attentions and self.config._attn_implementation == "eager"
        batch, length = input_ids.shape
        half = length // 2
        weights = torch.zeros(batch, 4, length, length)
        for t in range(length):
            recent = list(range(max(0, t - 2), t + 1))
            weights[:, 2:, t, recent] = 1.0 / len(recent)  # query heads 2, 3: kv head 1
            weights[:, :2, t, t - half if t >= half else t] = 1.0  # query heads 0, 1: kv head 0
        return SimpleNamespace(attentions=(weights, weights.flip(1)))


def test_a_copying_head_scores_high_and_a_streaming_head_zero():
    blocks = torch.randint(0, 50, (3, 2 * PROBE_HALF))
    model = AttentionOf(2 * PROBE_HALF)
    scores = head_scores(model, blocks, window=8, sink_tokens=2)
    copied = (PROBE_HALF - 2) / PROBE_HALF  # but where the earlier occurrence is one of the 2 sinks
    assert scores[0] == pytest.approx([copied, 0.0]) and scores[1] == pytest.approx([0.0, copied])
    assert model.implementations == ["eager", "sdpa"]  # put back as it was


def test_the_budget_buys_the_best_heads_of_the_converted_layers():
    scores = [[0.9, 0.1], [0.5, 0.95], [0.99, 0.8]]
    one = head_bytes(16, 8, 64)
    placed = place_sparse(scores, converted=[0, 1], sparse_keys=16, window=8, head_dim=64,
                          budget_mib=2.5 * one / 2**20)
    assert placed.heads == [[0, 0], [1, 1]]  # layer 2 is not converted: its 0.99 is not a candidate
    assert placed.candidates == 4 and placed.threshold == 0.9 and placed.next_best == 0.5
    line = describe(placed.summary())
    assert "2 of 4" in line and "0.1, 1.1" not in line and "0.0, 1.1" in line and f"{TOP_KEYS} heaviest" in line


def test_a_budget_that_pays_for_no_head_names_the_key_and_what_one_head_needs():
    with pytest.raises(LinearizeError, match=r"attention.sparse_budget \(0.001 MiB\).*at least 0.\d+"):
        place_sparse([[0.5]], [0], sparse_keys=64, window=60, head_dim=64, budget_mib=0.001)


def test_blocks_too_short_to_reach_beyond_the_window_are_refused():
    with pytest.raises(LinearizeError, match="data.seq_len"):
        head_scores(AttentionOf(16), torch.randint(0, 50, (2, 16)), window=8, sink_tokens=0)
