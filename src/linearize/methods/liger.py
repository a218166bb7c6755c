"""Liger (Lan et al., ICML 2025): gated linear recurrence built from the pretrained key projection, no new
parameters; Liger Attention mixes it with sliding-window softmax attention; LoRA only."""

from __future__ import annotations

import torch.nn.functional as F

from linearize.attention import Mixer
from linearize.config import AttentionConfig, RunConfig
from linearize.errors import LinearizeError
from linearize.methods.base import Method
from linearize.methods.window import sliding_window_softmax
from linearize.ops import linear_attention_chunked, linear_attention_recurrent

GATES = ("gla", "hgrn2", "none")


class LigerMixer(Mixer):
    """o = mix[0] * SWA(q, k, v) + mix[1] * GatedRecurrence(softmax(q), softmax(k), v, gates from k).

    The recurrence uses q and k before RoPE; the window uses them after RoPE. Gates come from the key
    projection (for GLA the gate size equals the key size, so Liger's pooling is the identity):
    log a_t = logsigmoid(k_t) / gate_normalizer. HGRN2 ties the input key to the gate: k_t = 1 - a_t.
    Gates and states are per key/value head: exact, since k, v and the gates are all per KV head.
    """

    def __init__(self, config: AttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.window_size = config.window_size
        self.sink_tokens = config.sink_tokens
        self.chunk_size = config.chunk_size
        self.scale = head_dim**-0.5
        self.gate = config.gate
        self.gate_normalizer = config.gate_normalizer
        self.mix = tuple(config.mix)
        self.normalize = config.normalize

    def recurrence_inputs(self, q_nope, k_nope):
        fq = q_nope.float().softmax(dim=-1)
        if self.gate == "none":
            return fq, k_nope.float().softmax(dim=-1), None
        log_gate = F.logsigmoid(k_nope.float()) / self.gate_normalizer
        if self.gate == "hgrn2":
            return fq, 1 - log_gate.exp(), log_gate
        return fq, k_nope.float().softmax(dim=-1), log_gate

    def forward(self, q, k, v, q_nope, k_nope, cache):
        fq, fk, log_gate = self.recurrence_inputs(q_nope, k_nope)
        kwargs = {"normalize": self.normalize}
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            recurrent = linear_attention_chunked(
                fq, fk, v, log_gate, chunk_size=self.chunk_size, output_final_state=cache is not None, **kwargs
            )
        else:
            state = cache.recurrent_states[0]
            recurrent = linear_attention_recurrent(fq, fk, v, log_gate, initial_state=state, **kwargs)
        if cache is not None:
            recurrent, state = recurrent
            cache.update_recurrent_state(state)
        recurrent = recurrent.to(v.dtype)
        if self.window_size == 0:
            if cache is not None:
                cache.cumulative_length += q.shape[-2]
            return recurrent
        window = sliding_window_softmax(q, k, v, self.window_size, self.scale, cache, self.sink_tokens)
        return self.mix[0] * window + self.mix[1] * recurrent


class Liger(Method):
    name = "liger"
    defaults = {
        "attention": {"feature_map": "softmax", "window_size": 64},
        "transfer": {"enabled": False},
        "finetune": {"lr": 1e-3, "lora_alpha": 8.0},
    }
    foreign_attention_keys = {
        "feature_map": "Liger's feature map is the parameter-free softmax over the head dim",
        "feature_dim": "Liger adds no parameters, so there is no feature projection to size",
        "window_factor_init": "Liger Attention mixes window and recurrence with fixed weights ('mix')",
        "key_maps": "Liger's states are per key/value head (exact: keys and gates are per KV head)",
    }

    def check_user_config(self, user):
        super().check_user_config(user)
        if (user.get("transfer") or {}).get("enabled"):
            raise LinearizeError(
                "transfer.enabled does not apply to method 'liger': Liger has no attention-transfer stage "
                "(no new parameters to transfer into); it trains LoRA only"
            )

    def build_mixer(self, config, num_heads, num_kv_heads, head_dim):
        return LigerMixer(config, num_heads, num_kv_heads, head_dim)

    def check_config(self, config: RunConfig) -> None:
        super().check_config(config)
        if config.attention.gate not in GATES:
            raise LinearizeError(f"attention.gate must be one of {', '.join(GATES)}, got '{config.attention.gate}'")
        if len(config.attention.mix) != 2:
            raise LinearizeError("attention.mix must be two weights: [window, recurrence]")
        if config.attention.gate_normalizer <= 0:
            raise LinearizeError("attention.gate_normalizer must be positive")
