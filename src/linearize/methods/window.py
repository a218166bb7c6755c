"""Sliding-window softmax attention alone, optionally with attention sinks: the baseline every
linearization must beat at the same budget.

Its decoding memory is constant too (the last window_size keys and the sinks), so a linear-attention
method earns its place only where its recurrent state carries what the window and the sinks cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from linearize.layers.attention import Mixer
from linearize.methods.base import Method, SparseSettings, WindowSettings


@dataclass
class Settings(SparseSettings, WindowSettings):
    sparse_score: str = "recency"  # no linear state to score keys against: the most recent ones stay

    def validate(self) -> None:
        super().validate()
        self.validate_sparse(has_state=False)


class WindowMixer(Mixer):
    def __init__(self, settings: Settings, head_dim: int, scale: float | None = None):
        super().__init__()
        self.window_size = settings.window_size
        self.sink_tokens = settings.sink_tokens
        self.sink_distance = settings.resolved_sink_distance()
        self.scale = head_dim**-0.5 if scale is None else scale

    def forward(self, x, state, output_state):
        return self.window_op(
            x.q, x.k, x.v, self.window_size, state, output_state,
            sink_tokens=self.sink_tokens, key_mask=x.key_mask, scale=self.scale, **self.sink_inputs(x, state),
            **self.sparse_inputs(),
        )


class Window(Method):
    name = "window"
    summary = "sliding-window softmax (+ optional sink tokens) alone: the constant-memory baseline"
    Settings = Settings
    stages = ("finetune",)

    def build_mixer(self, settings, shapes):
        mixer = WindowMixer(settings, shapes.head_dim, scale=shapes.scale)
        mixer.keep_sparse(settings, settings.sparse_at(shapes.layer_index, shapes.num_layers, shapes.num_kv_heads))
        return mixer
