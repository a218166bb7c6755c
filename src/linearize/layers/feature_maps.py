"""Feature maps phi for linear attention: x [B, h, T, D] -> phi(x) [B, h, T, F], one map per head.

A registry maps names to classes; a new map is one class and one line in `FEATURE_MAPS`.
Learnable maps start as close to their parameter-free shape as possible (identity projections).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linearize.errors import LinearizeError


class FeatureMap(nn.Module):
    """Base class: one map per head; `feature_dim` sizes the learnable projections."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.feature_dim = feature_dim or head_dim


def per_head_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, h, T, D] times each head's weight [h, D, F] -> [B, h, T, F]. One token (a decoding step) as a
    product and a sum, which a compiled step fuses with the softmax around it (a batched matmul would be
    a library call of its own, one per map and layer); longer inputs as a batched matmul."""
    if x.shape[-2] == 1:
        return (x.transpose(-1, -2) * weight).sum(-2, keepdim=True)
    return torch.einsum("bhtd,hdf->bhtf", x, weight)


def _identity_projection(num_heads: int, head_dim: int, feature_dim: int) -> torch.Tensor:
    """Per-head [D, F] (rectangular) identity, so a fresh map starts from the raw query/key features."""
    return torch.eye(head_dim, feature_dim).unsqueeze(0).repeat(num_heads, 1, 1)


class Hedgehog(FeatureMap):
    """phi(x) = [softmax(x W), softmax(-x W)] over the feature dim (Zhang et al., ICLR 2024; LoLCATS)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__(num_heads, head_dim, feature_dim)
        self.weight = nn.Parameter(_identity_projection(num_heads, head_dim, self.feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = per_head_projection(x, self.weight.to(x.dtype))
        return torch.cat([proj.softmax(dim=-1), (-proj).softmax(dim=-1)], dim=-1)


class T2R(FeatureMap):
    """phi(x) = relu(x W + b) (Kasai et al., 2021)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__(num_heads, head_dim, feature_dim)
        self.weight = nn.Parameter(_identity_projection(num_heads, head_dim, self.feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, self.feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(per_head_projection(x, self.weight.to(x.dtype)) + self.bias.to(x.dtype))


class EluPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1


class SoftmaxOverDim(FeatureMap):
    """phi(x) = softmax(x) over the head dim: Liger's parameter-free map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=-1)


class Identity(FeatureMap):
    """phi(x) = x. Not non-negative: use only without normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "hedgehog": Hedgehog,
    "t2r": T2R,
    "elu": EluPlusOne,
    "softmax": SoftmaxOverDim,
    "identity": Identity,
}


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int | None = None) -> FeatureMap:
    if name not in FEATURE_MAPS:
        raise LinearizeError(f"unknown feature map '{name}': choose one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim)
