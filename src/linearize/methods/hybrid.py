"""The default method: exact softmax over a sliding window and sink tokens, plus a learned linear state
for every older key, grown from zero by attention transfer, then LoRA.

It takes what worked from LoLCATS (Hedgehog feature maps trained to reproduce each layer's softmax
output, one normaliser shared by window and linear terms) and from StreamingLLM (the first tokens stay
softmax keys: most of a small model's attention mass sits on them), and changes how the two meet:

- it starts as window + sinks: the linear terms enter with a small learned scale, so the untrained
  student is already the strongest training-free constant-memory model, and training can only add
  what the state carries (LoLCATS starts with old keys' linear mass swamping the window);
- the linear terms keep a magnitude: Hedgehog's features are softmax-normalised, which throws away how
  large exp(q.k) is for a given query and key; a learned log-magnitude per query and per key
  (linear in q and k) gives it back, so the weight of old keys relative to the window can follow the
  query instead of one factor per head;
- the feature maps read q and k before RoPE (as Liger's recurrence does): a rotated key's features
  change with its position, so maps trained on 1024-token blocks misjudge keys at 4096; without RoPE
  the linear terms carry content, the window carries position;
- a learned per-head decay on the linear terms (0.999 at the start) bounds their mass at long range;
- a recall memory (`linearize.ops.memory`) in the layers where it measurably carries the most
  (`memory_layers: measured`: for SmolLM2-135M layers 17, 18, 20 and 23 of 30, by bench/memory.py --gains;
  the upper half for a teacher not measured): four more softmax keys per query, the most recent keys (out
  of the window) that followed an earlier occurrence of the query's last token, of its last two, three and
  four tokens, kept in a table of 1024 buckets per n-gram order, each entry in int4 with a step and an
  offset per row. It is what the teacher's copying (induction) heads attend to, and what no feature map of
  the state's size singles out among hundreds of old keys (bench/recall.py); the window shrinks to 60 so a
  query still sees 68 softmax keys at most, as a 64-token window with 4 sinks;
- a sparse cache (`linearize.ops.sparse`, LoLA's): 128 exact keys beyond the window, those the linear state
  recalls worst, in the key/value heads the run measures reading far back on the teacher
  (`linearize.placement`), as many as `sparse_budget` MiB per sequence pays for. A query weighs them in the
  same softmax; the state holds every other old key.

    y_t = (sum_{window, sinks, memory and cached keys} exp(q_t.k_s / sqrt(d) - c_t) [v_s, 1]
           + sum_{older} a^{t-s} m_q(q_t) m_k(k_s) phi(q_t).phi(k_s) [v_s, 1])  -> num / den
    m_q(q) = exp(q.u_q + b), m_k(k) = exp(k.u_k); u = 0 and b = log(linear_scale_init) at the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from linearize.errors import LinearizeError
from linearize.layers.attention import Mixer
from linearize.layers.feature_maps import FEATURE_MAPS, build_feature_map
from linearize.methods.base import Method, SparseSettings, WindowSettings, check_choice, check_fraction
from linearize.ops import memory

MAX_LOG_MAGNITUDE = 20.0  # keeps exp() of the learned magnitudes finite in float32 and bfloat16


@dataclass
class Settings(SparseSettings, WindowSettings):
    window_size: int = 60  # + 4 sinks + 4 memory keys = the 68 softmax keys of a 64-token window + 4 sinks
    sink_tokens: int = 4
    feature_map: str = "hedgehog"  # hedgehog | t2r | elu | softmax
    feature_dim: int | None = None  # hedgehog/t2r projection size per sign; None = head_dim
    magnitude: bool = True  # learn per-query / per-key log-magnitudes of the linear terms
    linear_scale_init: float = 0.05  # initial weight of the linear terms (0 < x <= 1): near window + sinks
    decay: float | None = 0.999  # initial per-head decay of the linear terms, in (0, 1]; null = no decay
    linear_rope: bool = False  # feature maps read q and k after RoPE (as LoLCATS) or before it (as Liger)
    memory_buckets: int = 1024  # recall memory (linearize.ops.memory): buckets per n-gram order; 0 = none
    # layers with a memory: a list, "measured" (the teacher's measured list, else the upper half), "upper-half",
    # null = all
    memory_layers: list[int] | str | None = "measured"
    # the memory is keyed by the last n tokens (1: the token itself); a list: one recalled key per order
    memory_ngram: int | list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # how the table stores an entry: auto (the model's dtype) | bfloat16 | int8 | int4 (per-row step + offset)
    memory_format: str = "int4"
    # which recalled keys a query sees: all (one per order, each key once) | longest (only the longest order's)
    memory_recall: str = "all"
    # added to a recalled key's score (a prior for keys found by a long match): a number for every order of 2
    # or more tokens (a single token recurs too often to trust), or a list: one per memory_ngram order
    memory_bias: float | list[float] = 2.0
    sparse_keys: int = 128  # exact keys beyond the window (linearize.ops.sparse) in the measured heads ...
    sparse_budget: float = 2.0  # ... as many as 2 MiB per sequence pays for (SmolLM2-135M: 14 of 90)

    def validate(self) -> None:
        super().validate()
        self.validate_sparse()
        check_choice("feature_map", self.feature_map, [m for m in FEATURE_MAPS if m != "identity"])
        check_fraction("linear_scale_init", self.linear_scale_init)
        if self.decay is not None:
            check_fraction("decay", self.decay)
        if self.feature_dim is not None and self.feature_dim < 1:
            raise LinearizeError("attention.feature_dim must be >= 1 (or null for head_dim)")
        if not isinstance(self.memory_buckets, int) or self.memory_buckets < 0:
            raise LinearizeError(f"attention.memory_buckets must be an integer >= 0 (0 = no memory), got "
                                 f"{self.memory_buckets!r}")
        grams = memory.orders(self.memory_ngram) if isinstance(self.memory_ngram, (int, list, tuple)) else ()
        if not (grams and all(isinstance(n, int) and n >= 1 for n in grams) and len(set(grams)) == len(grams)):
            raise LinearizeError(f"attention.memory_ngram must be an integer >= 1 (the tokens a memory entry is "
                                 f"keyed by) or a list of distinct ones (one recalled key each), got "
                                 f"{self.memory_ngram!r}")
        if 0 < self.memory_buckets < len(grams):
            raise LinearizeError(f"attention.memory_buckets ({self.memory_buckets}) must be at least the number of "
                                 f"memory orders ({len(grams)}, attention.memory_ngram {self.memory_ngram})")
        check_choice("memory_format", self.memory_format, list(memory.FORMATS))
        check_choice("memory_recall", self.memory_recall, list(memory.RECALLS))
        self.order_biases(grams)
        layers = self.memory_layers
        if not (layers is None or layers in ("upper-half", "measured") or (
                isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers))):
            raise LinearizeError(f"attention.memory_layers must be a list of layer indices, \"measured\", "
                                 f"\"upper-half\" or null (every converted layer), got {layers!r}")

    def order_biases(self, grams: tuple[int, ...] | None = None) -> tuple[float, ...]:
        """`memory_bias` as one number per order (() where every one is 0: nothing to add). A number is every
        order's of 2 or more tokens; a single token's order gets 0."""
        grams = memory.orders(self.memory_ngram) if grams is None else grams
        bias = self.memory_bias
        if isinstance(bias, (int, float)) and not isinstance(bias, bool):
            bias_list = [0.0 if n == 1 else bias for n in grams]
        else:
            bias_list = bias if isinstance(bias, list) and len(bias) == len(grams) else None
        if bias_list is None or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                        for b in bias_list):
            raise LinearizeError(f"attention.memory_bias must be a number (the bias of every order of 2 or more "
                                 f"tokens) or a list of {len(grams)} numbers (one per attention.memory_ngram order "
                                 f"{list(grams)}), got {bias!r}")
        numbers = tuple(float(b) for b in bias_list)
        return numbers if any(numbers) else ()

    def memory_at(self, layer_index: int, num_layers: int) -> int:
        """The memory buckets of layer `layer_index` of `num_layers` (0: none). A listed layer the model does
        not have is an error (raised while the model is planned, before any weight loads)."""
        if isinstance(self.memory_layers, list) and self.memory_buckets:
            beyond = [i for i in self.memory_layers if i >= num_layers]
            if beyond:
                raise LinearizeError(
                    f"attention.memory_layers lists {beyond}, but the model has {num_layers} layers (0-"
                    f"{num_layers - 1}): list this model's layers, or set attention.memory_layers=measured (the "
                    "layers measured for an embedded teacher, else the upper half); bench/memory.py --gains "
                    "measures them")
        if self.memory_layers in ("upper-half", "measured"):  # measured, unresolved (no run config): upper half
            chosen = layer_index >= num_layers // 2
        else:
            chosen = self.memory_layers is None or layer_index in self.memory_layers
        return self.memory_buckets if chosen else 0


class HybridMixer(Mixer):
    def __init__(self, settings: Settings, num_heads: int, num_kv_heads: int, head_dim: int, memory_buckets: int = 0,
                 scale: float | None = None):
        super().__init__()
        self.memory_buckets = memory_buckets
        self.branches = ("linear", "sinks") + (("memory",) if memory_buckets else ())
        self.memory_ngram = memory.orders(settings.memory_ngram)  # a tuple, once: not at every decoding step
        self.memory_format = settings.memory_format
        self.memory_recall = settings.memory_recall
        self.memory_bias = settings.order_biases()
        self.window_size = settings.window_size
        self.sink_tokens = settings.sink_tokens
        self.sink_distance = settings.resolved_sink_distance()
        self.linear_rope = settings.linear_rope
        self.scale = head_dim**-0.5 if scale is None else scale
        self.feature_map_q = build_feature_map(settings.feature_map, num_heads, head_dim, settings.feature_dim)
        self.feature_map_k = build_feature_map(settings.feature_map, num_kv_heads, head_dim, settings.feature_dim)
        self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(settings.linear_scale_init)))
        if settings.magnitude:
            self.magnitude_q = nn.Parameter(torch.zeros(num_heads, head_dim))
            self.magnitude_k = nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        else:
            self.magnitude_q = self.magnitude_k = None
        if settings.decay is None or settings.decay == 1.0:
            self.decay_logit = None
        else:
            logit = math.log(settings.decay / (1 - settings.decay))
            self.decay_logit = nn.Parameter(torch.full((num_kv_heads,), logit))

    def linear_inputs(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """What the linear terms' feature maps read: q, k with RoPE (`linear_rope`) or without."""
        return (x.q, x.k) if self.linear_rope else (x.q_nope, x.k_nope)

    def linear_features(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear terms' query and key features, magnitudes included: fq [B, H, T, F], fk [B, Hk, T, F];
        an older key s weighs a^{t-s} fq_t.fk_s against the window's exp(q_t.k_s / sqrt(d) - c_t)."""
        q, k = self.linear_inputs(x)
        return self.query_features(q), self.key_features(k)

    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        fq = self.feature_map_q(q)
        log_q = self.log_scale[:, None].to(fq.dtype)  # [H, 1]
        if self.magnitude_q is not None:
            # per head a dot product with u: a product and a sum (fused when compiled; no matmul call)
            log_q = (q * self.magnitude_q[:, None].to(q.dtype)).sum(-1) + log_q
        return fq * log_q.clamp(max=MAX_LOG_MAGNITUDE).exp()[..., None]

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        """[B, Hk, T, D] -> [B, Hk, T, F]. The window op calls it on a key as it leaves the window: the window
        keeps k (D numbers per key), not its F features (2D for Hedgehog)."""
        fk = self.feature_map_k(k)
        if self.magnitude_k is not None:
            log_k = (k * self.magnitude_k[:, None].to(k.dtype)).sum(-1)
            fk = fk * log_k.clamp(max=MAX_LOG_MAGNITUDE).exp()[..., None]
        return fk

    def forward(self, x, state, output_state):
        q, k = self.linear_inputs(x)
        fq = self.query_features(q)
        if "linear" in self.off:  # no weight on any older key: the window, sinks and memory alone
            fq = torch.zeros_like(fq)
        log_gate = None
        if self.decay_logit is not None:
            batch, kv_heads, length = x.k.shape[:3]
            log_gate = F.logsigmoid(self.decay_logit)[None, :, None].expand(batch, kv_heads, length)
        return self.window_op(
            x.q, x.k, x.v, self.window_size, state, output_state,
            sink_tokens=0 if "sinks" in self.off else self.sink_tokens, fq=fq, fk=k, key_features=self.key_features,
            log_gate=log_gate, key_mask=x.key_mask, scale=self.scale, **self.memory_inputs(x),
            **self.sink_inputs(x, state), **self.sparse_inputs(),
        )

    def memory_inputs(self, x) -> dict:
        if not self.memory_buckets or "memory" in self.off:
            return {}
        if x.token_ids is None:
            raise LinearizeError(
                "this layer's recall memory is keyed by token ids: call the model with input_ids (not only "
                "inputs_embeds)"
            )
        return {"token_ids": x.token_ids, "memory_buckets": self.memory_buckets, "memory_ngram": self.memory_ngram,
                "memory_format": self.memory_format, "memory_recall": self.memory_recall,
                "memory_bias": self.memory_bias}


class Hybrid(Method):
    name = "hybrid"
    summary = "window + sink softmax, plus a learned linear state grown from zero (ours): transfer, then LoRA"
    Settings = Settings
    stages = ("transfer", "finetune")
    # a run's student reads its sinks from no farther than it trained (the Python API's default: true distances)
    stage_defaults = {"finetune": {"lora_alpha": 16.0}, "attention": {"sink_distance": "seq_len"}}

    def build_mixer(self, settings, shapes):
        mixer = HybridMixer(settings, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim,
                            settings.memory_at(shapes.layer_index, shapes.num_layers), scale=shapes.scale)
        mixer.keep_sparse(settings, settings.sparse_at(shapes.layer_index, shapes.num_layers, shapes.num_kv_heads))
        return mixer

    def softmax_keys(self, settings) -> int:
        return super().softmax_keys(settings) + (len(memory.orders(settings.memory_ngram))
                                                 if settings.memory_buckets else 0)
