"""The probes bench/recall.py measures the state with: each checked where the answer is known."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from recall import delta_rule_reads, kmeans, positive_random_features  # noqa: E402


def test_delta_rule_recalls_orthogonal_keys_exactly_and_only_after_they_leave_the_window():
    torch.manual_seed(0)
    T, d, window, sinks = 24, 32, 4, 2
    keys = torch.linalg.qr(torch.randn(d, d))[0][:T]  # orthonormal rows
    values = torch.randn(T, 8)
    queries = torch.tensor([10, 20, 23])
    stored = [5, 15, 3]  # 10 - 4 = 6 > 5; 20 - 4 = 16 > 15; 23 - 4 = 19 > 3
    reads = delta_rule_reads(keys, values, window, sinks, queries, keys[stored])
    torch.testing.assert_close(reads, values[stored], atol=1e-5, rtol=1e-5)
    # a key still inside the window, or a sink, is not in the state
    reads = delta_rule_reads(keys, values, window, sinks, torch.tensor([10, 10]), keys[[8, 1]])
    assert reads.abs().max() < 1e-5


def test_delta_rule_overwrites_a_repeated_key():
    keys = torch.eye(4)[[0, 1, 0, 2, 3, 3, 3]]
    values = torch.arange(7.0)[:, None].repeat(1, 2)
    reads = delta_rule_reads(keys, values, 1, 0, torch.tensor([6]), torch.eye(4)[[0]])
    torch.testing.assert_close(reads, torch.tensor([[2.0, 2.0]]))  # the later write of key 0 wins


def test_positive_random_features_estimate_the_exponential_kernel():
    torch.manual_seed(0)
    q, k = torch.randn(5, 8) * 0.4, torch.randn(6, 8) * 0.4
    projection = torch.randn(200_000, 8)
    phi_q, phi_k = positive_random_features(q, projection), positive_random_features(k, projection)
    estimate = phi_q @ phi_k.T
    exact = (q @ k.T).exp()
    ratio = (estimate / estimate.mean()) / (exact / exact.mean())
    assert (ratio - 1).abs().max() < 0.05


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    codes = kmeans(points, 3)
    assert torch.cdist(centres, codes).min(-1).values.max() < 0.1
