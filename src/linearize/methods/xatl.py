"""XATL (Choi, 2024): cross-architecture transfer into a linear-cost architecture of its own.

Not an attention swap that imitates the teacher: a different model, a stack of (norm, token mixer,
norm, MLP) with the teacher's shapes, whose token mixer is a gated linear recurrence, initialised by
copying every component it shares with the pretrained Transformer (token embeddings, LM head, every
norm, the MLPs, the q/k/v/o projections, Qwen's q/k biases and Qwen3's q/k norms) and then trained as a
whole. What the teacher has no counterpart for starts from the architecture's own init (normal(0,
initializer_range) weights, zero biases, unit norms). `output_norm_init: 0` starts the per-head output
norm at zero instead: the recurrence is silent at first, so a model with a softmax window starts exactly
as the teacher's window (+ sinks) and training grows the recurrence in. (Without a window it does not
help: the teacher's MLP stack alone is as far from the teacher as a random mixer output.)

- `mixer: gla`: Gated Linear Attention (Yang et al. 2023), as flash-linear-attention builds it: a
  data-dependent per-feature decay from a low-rank projection of the layer input,
  log a_t = logsigmoid(W2 W1 x_t + b) / gate_normalizer (per key/value head: GQA kept), no RoPE, no
  normaliser, then a per-head RMSNorm and a swish output gate:
      S_t = diag(a_t) S_{t-1} + k_t^T v_t,   o_t = RMSNorm(q_t S_t / sqrt(d)) * swish(W_g x_t)
- `mixer: retnet`: retention (Sun et al. 2023): the same with a fixed decay per query head,
  gamma_h = 1 - 2^(-5 - h), on RoPE'd q and k, and the same norm and output gate;
- `window_size > 0` adds a sliding-window softmax branch (with optional sink tokens) over the RoPE'd
  q, k, v, summed with the recurrence; `window_size: 0` is purely recurrent (and exports to fla).

`init: random` builds the very same architecture with every weight from its own init: the control arm
of XATL's claim (bench/xatl.py trains both on the same data and tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from linearize.errors import LinearizeError
from linearize.layers.attention import Mixer
from linearize.methods.base import Method, SwapSettings, check_choice, shapes_from_config


@dataclass
class Settings(SwapSettings):
    mixer: str = "gla"  # gla (data-dependent per-feature decay) | retnet (fixed per-head decay)
    window_size: int = 0  # 0: purely recurrent; > 0: plus a sliding-window softmax branch
    sink_tokens: int = 0  # sink tokens of the window branch
    gate_low_rank_dim: int = 16  # GLA: rank of the decay projection
    gate_normalizer: float = 16.0  # GLA: log a = logsigmoid(.) / gate_normalizer keeps decays near 1 at init
    init: str = "transfer"  # transfer (XATL: copy what the teacher shares) | random (the same model from scratch)
    # the per-head output norm's weight at init: 1 = fla's; 0 = the recurrence starts silent, so a model with a
    # softmax window starts as the teacher's window (+ sinks) and grows the recurrence in training
    output_norm_init: float = 1.0
    chunk_size: int = 16  # chunk length of the recurrence's chunked form (GLA's [C, C, D] decays grow with C)

    def validate(self) -> None:
        super().validate()
        check_choice("mixer", self.mixer, ("gla", "retnet"))
        check_choice("init", self.init, ("transfer", "random"))
        if self.window_size < 0 or self.sink_tokens < 0:
            raise LinearizeError("attention.window_size and attention.sink_tokens must be >= 0")
        if self.sink_tokens and not self.window_size:
            raise LinearizeError("attention.sink_tokens needs a softmax window (attention.window_size > 0)")
        if self.gate_low_rank_dim < 1 or self.chunk_size < 1:
            raise LinearizeError("attention.gate_low_rank_dim and attention.chunk_size must be >= 1")
        if self.gate_normalizer <= 0:
            raise LinearizeError(f"attention.gate_normalizer must be positive, got {self.gate_normalizer}")
        if self.output_norm_init < 0:
            raise LinearizeError(f"attention.output_norm_init must be >= 0, got {self.output_norm_init}")


def retention_decays(num_heads: int) -> torch.Tensor:
    """RetNet's fixed per-head decays gamma_h = 1 - 2^(-5 - h)."""
    return 1 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))


class XatlMixer(Mixer):
    """GLA or retention over the layer's heads, per-head RMSNorm and swish output gate, plus an optional
    sliding-window softmax branch. Its own parameters: the GLA decay projection (gk_proj), the output
    gate (g_proj) and the norm's weight (g_norm); q/k/v/o are the layer's (copied from the teacher)."""

    def __init__(self, settings: Settings, shapes, initializer_range: float):
        super().__init__()
        self.settings = settings
        self.num_heads, self.num_kv_heads, self.head_dim = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim
        self.eps = shapes.norm_eps
        self.scale = self.head_dim**-0.5 if shapes.scale is None else shapes.scale
        hidden = shapes.hidden_size
        if settings.mixer == "gla":
            self.gk_proj = nn.Sequential(
                nn.Linear(hidden, settings.gate_low_rank_dim, bias=False),
                nn.Linear(settings.gate_low_rank_dim, self.num_kv_heads * self.head_dim, bias=True),
            )
        else:
            self.register_buffer("log_decay", retention_decays(self.num_heads).log().float(), persistent=False)
        self.g_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.g_norm = nn.Parameter(torch.ones(self.head_dim))
        self.initializer_range = initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.g_norm, self.settings.output_norm_init)

    def heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, T, heads * D] -> [B, heads, T, D]."""
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)

    def recurrence(self, x, state, output_state):
        s = self.settings
        if s.mixer == "gla":
            log_gate = F.logsigmoid(self.heads(self.gk_proj(x.hidden), self.num_kv_heads).float()) / s.gate_normalizer
            return self.linear_op(
                x.q_nope * self.scale, x.k_nope, x.v, log_gate, state, output_state,
                key_mask=x.key_mask, normalize=False, chunk_size=s.chunk_size,
            )
        # retention: one decay per query head, so keys and values are shared out to every query head
        groups = self.num_heads // self.num_kv_heads
        k, v = x.k.repeat_interleave(groups, dim=1), x.v.repeat_interleave(groups, dim=1)
        batch, _, length, _ = k.shape
        log_gate = self.log_decay.to(k.device)[None, :, None].expand(batch, -1, length)
        return self.linear_op(
            x.q * self.scale, k, v, log_gate, state, output_state,
            key_mask=x.key_mask, normalize=False, chunk_size=s.chunk_size,
        )

    def forward(self, x, state, output_state):
        s = self.settings
        o, recurrent_state = self.recurrence(x, state, output_state)  # reads the state's `recurrent` part only
        o = F.rms_norm(o.float(), (self.head_dim,), self.g_norm.float(), self.eps)
        o = (o * F.silu(self.heads(self.g_proj(x.hidden), self.num_heads).float())).to(x.v.dtype)
        if not s.window_size:
            return o, recurrent_state
        window_state = None if state is None else replace(state, recurrent=None)
        window, window_state = self.window_op(
            x.q, x.k, x.v, s.window_size, window_state, output_state,
            sink_tokens=s.sink_tokens, key_mask=x.key_mask, scale=self.scale,
        )
        if window_state is not None:
            window_state.recurrent = recurrent_state.recurrent
        return o + window, window_state


class Xatl(Method):
    name = "xatl"
    summary = "a gated linear-recurrence architecture (GLA / RetNet) initialised from the teacher, then trained whole"
    Settings = Settings
    stages = ("finetune",)
    stage_defaults = {"finetune": {"full": True, "lr": 3e-4, "min_lr_ratio": 0.1, "train_mixers": True}}

    def build_mixer(self, settings, shapes):
        return XatlMixer(settings, shapes, shapes.initializer_range)

    def softmax_keys(self, settings) -> int:
        return settings.window_size + settings.sink_tokens

    def initialise(self, model: nn.Module, settings: Settings) -> None:
        """`init: random`: every weight from the architecture's own init instead of the teacher's."""
        if settings.init != "random":
            return
        std = shapes_of(model).initializer_range
        with torch.no_grad():
            for name, module in model.named_modules():
                if ".mixer" in name:  # the mixers' own parameters are fresh from their init already
                    continue
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)


def shapes_of(model: nn.Module):
    return shapes_from_config(getattr(model.config, "text_config", model.config))


__all__ = ["Settings", "Xatl", "XatlMixer", "retention_decays"]
