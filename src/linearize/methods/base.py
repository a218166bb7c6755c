"""What a method provides: its own config section, its mixer, its stages.

A method is one module in this package plus one line in `linearize.methods.METHODS`. It owns
- `Settings`: a dataclass, the schema of the run config's `attention:` section when this method is chosen
  (a key it does not declare is an error naming the key); `Settings.validate()` checks values, before
  any model is loaded;
- `build_mixer(settings, shapes)`: the token mixer that replaces one softmax attention layer, reusing
  the teacher's projections (the default `convert` swaps every layer not in `settings.softmax_layers`);
- `stages`: the training stages it runs, in order ("transfer" = attention transfer of the mixers' own
  parameters, "finetune" = LoRA); a stage the method does not run may not be enabled in the config.
What a method saves is what its conversion added (the mixers' parameters) plus the LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from linearize.errors import LinearizeError
from linearize.layers.attention import Mixer

LOCAL_LAYERS = ("keep", "convert")


@dataclass(frozen=True)
class Shapes:
    """The attention shapes of one teacher layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int = 0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    layer_index: int = 0  # which decoder layer this mixer replaces
    num_layers: int = 1
    scale: float | None = None  # the teacher's query scale (None: head_dim ** -0.5; Gemma: its own)


@dataclass
class SwapSettings:
    """Settings every attention-swapping method shares."""

    softmax_layers: list[int] = field(default_factory=list)  # layer indices kept as full softmax attention
    # a teacher's own sliding-window layers (Gemma 3's local layers): kept as they are (constant memory
    # already) or converted like the others
    local_layers: str = "keep"

    def validate(self) -> None:
        if any(not isinstance(i, int) or i < 0 for i in self.softmax_layers):
            raise LinearizeError("attention.softmax_layers must list layer indices (integers >= 0)")
        check_choice("local_layers", self.local_layers, LOCAL_LAYERS)


SEQ_LEN = "seq_len"  # sink_distance: the run's data.seq_len


@dataclass
class WindowSettings(SwapSettings):
    """A softmax window with attention sinks: the part every hybrid shares."""

    window_size: int = 64  # softmax keys per query (itself included)
    sink_tokens: int = 0  # the first N real tokens of a row stay softmax keys for every query
    # a query farther than this from the sinks scores them as if from this distance (the positions it trained
    # on): null = their true distance; "seq_len" = data.seq_len (resolved by the run's config)
    sink_distance: int | str | None = None

    def validate(self) -> None:
        super().validate()
        if self.window_size < 1:
            raise LinearizeError(f"attention.window_size must be >= 1, got {self.window_size}")
        if self.sink_tokens < 0:
            raise LinearizeError(f"attention.sink_tokens must be >= 0, got {self.sink_tokens}")
        distance = self.sink_distance
        if not (distance is None or distance == SEQ_LEN or (
                isinstance(distance, int) and not isinstance(distance, bool) and distance >= self.window_size)):
            raise LinearizeError(f"attention.sink_distance must be null (the sinks' true distance), \"{SEQ_LEN}\" "
                                 f"(data.seq_len) or a number of positions >= attention.window_size "
                                 f"({self.window_size}), got {distance!r}")

    def resolved_sink_distance(self) -> int | None:
        """`sink_distance` as the layers take it: "seq_len" left unresolved (no run config) is an error."""
        if self.sink_distance == SEQ_LEN:
            raise LinearizeError("attention.sink_distance: seq_len means the run's data.seq_len; outside a run "
                                 "config give a number of positions (e.g. the length the student trains on)")
        return self.sink_distance


def check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise LinearizeError(f"attention.{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_fraction(key: str, value: float, low_open: bool = True, high_closed: bool = True) -> None:
    """value in (0, 1] (or (0, 1) with high_closed False)."""
    ok = (value > 0 if low_open else value >= 0) and (value <= 1 if high_closed else value < 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise LinearizeError(f"attention.{key} must lie in {interval}, got {value}")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shapes_from_config(text_config) -> Shapes:
    """The attention shapes of a teacher's config (a transformers PretrainedConfig)."""
    return Shapes(
        text_config.num_attention_heads, text_config.num_key_value_heads, head_dim_of(text_config),
        hidden_size=text_config.hidden_size, norm_eps=getattr(text_config, "rms_norm_eps", 1e-6),
        initializer_range=getattr(text_config, "initializer_range", 0.02),
        scale=query_scale(text_config),
    )


def query_scale(text_config) -> float:
    """The factor of the teacher's attention scores: head_dim ** -0.5, or query_pre_attn_scalar ** -0.5
    (Gemma)."""
    scalar = getattr(text_config, "query_pre_attn_scalar", None)
    return (scalar or head_dim_of(text_config)) ** -0.5


class Method:
    name: str = ""
    summary: str = ""
    Settings: type = SwapSettings
    stages: tuple[str, ...] = ("finetune",)
    # settings of the finetune / transfer sections that differ from the generic defaults, for this method
    stage_defaults: dict[str, dict[str, Any]] = {}

    def build_mixer(self, settings: Any, shapes: Shapes) -> Mixer:
        raise NotImplementedError

    def initialise(self, model: Any, settings: Any) -> None:
        """Called once after a teacher is converted (not when a saved student loads): a method that
        re-initialises weights does it here."""

    def softmax_keys(self, settings: Any) -> int:
        """Softmax keys a query sees at most (window + sinks): what recovery compares at equal cost."""
        return getattr(settings, "window_size", 0) + getattr(settings, "sink_tokens", 0)
