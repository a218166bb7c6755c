"""Liger (Lan et al., ICML 2025): gated linear recurrence built from the pretrained key projection, no new
parameters; Liger Attention mixes it with sliding-window softmax attention; LoRA only."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.nn.functional as F

from linearize.errors import LinearizeError
from linearize.layers.attention import Mixer
from linearize.methods.base import Method, WindowSettings, check_choice


@dataclass
class Settings(WindowSettings):
    gate: str = "gla"  # gla (per-dim gates = key features) | hgrn2 (tied input/forget) | none
    gate_normalizer: float = 16.0  # log a_t = logsigmoid(k_t) / 16 keeps the decay near 1 at the start
    mix: list[float] = field(default_factory=lambda: [0.5, 0.5])  # Liger Attention: [window, recurrence]
    normalize: bool = True  # divide the recurrence by phi(q).z (the reference Liger code does not)
    chunk_size: int = 64  # chunk length of the recurrence's chunked form

    def validate(self) -> None:
        if self.window_size == 0:  # the gated recurrence alone
            if self.sink_tokens:
                raise LinearizeError("attention.sink_tokens needs a softmax window (attention.window_size > 0)")
        else:
            super().validate()
        check_choice("gate", self.gate, ("gla", "hgrn2", "none"))
        if len(self.mix) != 2:
            raise LinearizeError("attention.mix must be two weights: [window, recurrence]")
        if self.gate_normalizer <= 0:
            raise LinearizeError(f"attention.gate_normalizer must be positive, got {self.gate_normalizer}")
        if self.chunk_size < 1:
            raise LinearizeError("attention.chunk_size must be >= 1")


class LigerMixer(Mixer):
    """o = mix[0] * SWA(q, k, v) + mix[1] * GatedRecurrence(softmax(q), softmax(k), v, gates from k).

    The recurrence uses q and k before RoPE; the window uses them after RoPE. Gates come from the key
    projection (for GLA the gate size equals the key size, so Liger's pooling is the identity):
    log a_t = logsigmoid(k_t) / gate_normalizer. HGRN2 ties the input key to the gate: k_t = 1 - a_t.
    Gates and states are per key/value head: exact, since k, v and the gates are all per KV head.
    """

    def __init__(self, settings: Settings, head_dim: int, scale: float | None = None):
        super().__init__()
        self.settings = settings
        self.sink_distance = settings.resolved_sink_distance()
        self.scale = head_dim**-0.5 if scale is None else scale

    def recurrence_inputs(self, q_nope, k_nope):
        fq = q_nope.float().softmax(dim=-1)
        if self.settings.gate == "none":
            return fq, k_nope.float().softmax(dim=-1), None
        log_gate = F.logsigmoid(k_nope.float()) / self.settings.gate_normalizer
        if self.settings.gate == "hgrn2":
            return fq, 1 - log_gate.exp(), log_gate
        return fq, k_nope.float().softmax(dim=-1), log_gate

    def forward(self, x, state, output_state):
        s = self.settings
        fq, fk, log_gate = self.recurrence_inputs(x.q_nope, x.k_nope)
        recurrent, recurrent_state = self.linear_op(
            fq, fk, x.v, log_gate, state, output_state,
            key_mask=x.key_mask, normalize=s.normalize, chunk_size=s.chunk_size,
        )
        if s.window_size == 0:
            return recurrent, recurrent_state
        # the window's state has no linear part; the recurrence's state travels in its `recurrent` slot
        window_state = None if state is None else replace(state, recurrent=None)
        window, window_state = self.window_op(
            x.q, x.k, x.v, s.window_size, window_state, output_state,
            sink_tokens=s.sink_tokens, key_mask=x.key_mask, scale=self.scale, **self.sink_inputs(x, state),
        )
        out = s.mix[0] * window + s.mix[1] * recurrent
        if window_state is not None:
            window_state.recurrent = recurrent_state.recurrent
        return out, window_state


class Liger(Method):
    name = "liger"
    summary = "gated recurrence from the key projection + Liger Attention (window + recurrence), LoRA only"
    Settings = Settings
    stages = ("finetune",)
    stage_defaults = {"finetune": {"lora_alpha": 8.0}}

    def build_mixer(self, settings, shapes):
        return LigerMixer(settings, shapes.head_dim, scale=shapes.scale)
