"""LoLCATS (Zhang et al., 2024): learnable feature maps + sliding-window softmax hybrid, attention transfer,
then LoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from linearize.errors import LinearizeError
from linearize.layers.attention import Mixer
from linearize.layers.feature_maps import FEATURE_MAPS, build_feature_map
from linearize.methods.base import Method, SparseSettings, WindowSettings, check_choice, check_fraction


@dataclass
class Settings(SparseSettings, WindowSettings):
    feature_map: str = "hedgehog"  # hedgehog | t2r | elu | softmax (see layers/feature_maps.py)
    feature_dim: int | None = None  # hedgehog/t2r projection size per sign; None = head_dim
    window_factor_init: float = 0.1  # g = sigmoid(logit) weighs the window terms against the linear ones
    key_maps: str = "per_kv_head"  # per_kv_head keeps GQA's memory saving; per_query_head = the reference
    chunk_size: int = 64  # chunk length of the chunked form when window_size is 0

    def validate(self) -> None:
        if self.window_size == 0:  # no window: Hedgehog's plain linear attention
            if self.sink_tokens:
                raise LinearizeError("attention.sink_tokens needs a softmax window (attention.window_size > 0)")
            self.window_size = 1
            super().validate()
            self.window_size = 0
        else:
            super().validate()
        self.validate_sparse()
        if self.sparse_keys and self.window_size == 0:
            raise LinearizeError("attention.sparse_keys keeps keys beyond a softmax window: set attention.window_size "
                                 "> 0 (or attention.sparse_keys=0)")
        check_choice("feature_map", self.feature_map, [m for m in FEATURE_MAPS if m != "identity"])
        check_fraction("window_factor_init", self.window_factor_init, high_closed=False)
        check_choice("key_maps", self.key_maps, ("per_kv_head", "per_query_head"))
        if self.feature_dim is not None and self.feature_dim < 1:
            raise LinearizeError("attention.feature_dim must be >= 1 (or null for head_dim)")
        if self.chunk_size < 1:
            raise LinearizeError("attention.chunk_size must be >= 1")


class LolcatsMixer(Mixer):
    """y_t = (g sum_window exp(q.k/sqrt(d) - c) v + sum_older phi(q).phi(k) v) / (the same without v).

    window_size 0 gives plain linear attention (Hedgehog without a window). Key feature maps live per
    key/value head (GQA kept) unless `key_maps: per_query_head`, the reference's choice, where keys are
    expanded to every query head first. Dividing phi(q) by g is the same as weighting the window by g.
    """

    def __init__(self, settings: Settings, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None):
        super().__init__()
        self.window_size = settings.window_size
        self.sink_tokens = settings.sink_tokens
        self.sink_distance = settings.resolved_sink_distance()
        self.chunk_size = settings.chunk_size
        self.scale = head_dim**-0.5 if scale is None else scale
        self.groups = num_heads // num_kv_heads
        self.expand_keys = settings.key_maps == "per_query_head"
        key_heads = num_heads if self.expand_keys else num_kv_heads
        self.feature_map_q = build_feature_map(settings.feature_map, num_heads, head_dim, settings.feature_dim)
        self.feature_map_k = build_feature_map(settings.feature_map, key_heads, head_dim, settings.feature_dim)
        init = settings.window_factor_init
        self.window_factor_logit = nn.Parameter(torch.full((num_heads,), math.log(init / (1 - init))))

    def forward(self, x, state, output_state):
        k, v = x.k, x.v
        if self.expand_keys:
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        fq, fk = self.feature_map_q(x.q), self.feature_map_k(k)
        if self.window_size == 0:
            return self.linear_op(fq, fk, v, None, state, output_state, key_mask=x.key_mask, chunk_size=self.chunk_size)
        g = torch.sigmoid(self.window_factor_logit)
        return self.window_op(
            x.q, k, v, self.window_size, state, output_state, sink_tokens=self.sink_tokens,
            fq=fq / g[:, None, None].to(fq.dtype), fk=fk, key_mask=x.key_mask, scale=self.scale,
            **self.sink_inputs(x, state), **self.sparse_inputs(),
        )


class Lolcats(Method):
    name = "lolcats"
    summary = "Hedgehog feature maps + 64-token softmax window (LoLCATS): attention transfer, then LoRA"
    Settings = Settings
    stages = ("transfer", "finetune")
    stage_defaults = {"finetune": {"lora_alpha": 16.0}}

    def build_mixer(self, settings, shapes):
        mixer = LolcatsMixer(settings, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim, scale=shapes.scale)
        key_heads = shapes.num_heads if mixer.expand_keys else shapes.num_kv_heads
        mixer.keep_sparse(settings, settings.sparse_at(shapes.layer_index, shapes.num_layers, key_heads))
        return mixer


@dataclass
class LolaSettings(Settings):
    sparse_keys: int = 256  # LoLA's sparse cache, per key/value head
    sparse_heads: str | list = "all"  # every head, as LoLA
    sparse_training: bool = False  # trained as LoLCATS; the cache is added for inference only


class Lola(Lolcats):
    name = "lola"
    summary = ("LoLCATS trained as LoLCATS, then a sparse cache of the keys its state recalls worst at inference "
               "(LoLA, no training of its own)")
    Settings = LolaSettings
