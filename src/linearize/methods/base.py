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


SPARSE_SCORES = ("recall-error", "recency")  # linearize.ops.sparse.SCORES, named here for the config's checks
SPARSE_HEADS = ("measured", "all")


@dataclass
class SparseSettings:
    """A sparse cache (`linearize.ops.sparse`): exact keys kept beyond the window in chosen key/value heads.
    No parameters: it can be set on a trained student (LoLA) as well as trained with."""

    sparse_keys: int = 0  # exact keys kept per chosen key/value head (+ the window's worth pending); 0 = none
    sparse_score: str = "recall-error"  # which keys stay: recall-error (the linear state's, LoLA) | recency
    # which key/value heads keep them: "measured" (the run measures the teacher's heads that read far keys;
    # without a run's measurement, every head) | "all" | a list of [layer, kv_head] pairs
    sparse_heads: str | list = "measured"
    sparse_budget: float = 4.0  # MiB per sequence (fp32) the measured heads' caches may take, best heads first
    sparse_training: bool = True  # the training stages see the cache (false: only inference, as LoLA)

    def validate_sparse(self, has_state: bool = True) -> None:
        keys = self.sparse_keys
        if not isinstance(keys, int) or isinstance(keys, bool) or keys < 0:
            raise LinearizeError(f"attention.sparse_keys must be an integer >= 0 (0 = no sparse cache), got {keys!r}")
        check_choice("sparse_score", self.sparse_score, SPARSE_SCORES)
        if keys and self.sparse_score == "recall-error" and not has_state:
            raise LinearizeError("attention.sparse_score recall-error scores keys by the linear state's recall, "
                                 "and this method has no linear state: set attention.sparse_score=recency")
        heads = self.sparse_heads
        if not (heads in SPARSE_HEADS or (isinstance(heads, list) and all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair) for pair in heads))):
            raise LinearizeError(f"attention.sparse_heads must be \"measured\", \"all\" or a list of [layer, kv_head] "
                                 f"pairs, got {heads!r}")
        if not (isinstance(self.sparse_budget, (int, float)) and self.sparse_budget > 0):
            raise LinearizeError(f"attention.sparse_budget must be a number of MiB > 0, got {self.sparse_budget!r}")

    def sparse_at(self, layer_index: int, num_layers: int, kv_heads: int) -> list[bool] | None:
        """Which key/value heads of layer `layer_index` keep a sparse cache (None: none of them). A listed layer
        or head the model does not have is an error (raised while the model is planned, before any weight
        loads)."""
        if not self.sparse_keys:
            return None
        if isinstance(self.sparse_heads, list):
            missing = [list(p) for p in self.sparse_heads if p[0] >= num_layers or p[1] >= kv_heads]
            if missing:
                raise LinearizeError(
                    f"attention.sparse_heads lists {missing}, but the model has {num_layers} layers of {kv_heads} "
                    f"key/value heads: list [layer, kv_head] pairs it has, or set attention.sparse_heads=measured")
            chosen = [any(p[0] == layer_index and p[1] == h for p in self.sparse_heads) for h in range(kv_heads)]
            return chosen if any(chosen) else None
        return [True] * kv_heads  # "all", or "measured" with no measurement to resolve it


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
        """Softmax keys a query sees at most (window + sinks; a sparse cache's keys and pending group where a
        head has one): what recovery compares at equal cost."""
        window = getattr(settings, "window_size", 0)
        sparse = getattr(settings, "sparse_keys", 0)
        return window + getattr(settings, "sink_tokens", 0) + (sparse + window if sparse else 0)
