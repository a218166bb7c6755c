"""What every method provides."""

from __future__ import annotations

from typing import Any

from linearize.attention import Mixer
from linearize.config import AttentionConfig, RunConfig, deep_merge
from linearize.errors import LinearizeError


class Method:
    name: str = ""
    # settings that differ from the base defaults in config.py, as a nested dict
    defaults: dict[str, Any] = {}
    # attention keys the user may not set for this method, with the reason
    foreign_attention_keys: dict[str, str] = {}

    def build_mixer(self, config: AttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int) -> Mixer:
        raise NotImplementedError

    def check_user_config(self, user: dict[str, Any]) -> None:
        """Reject options the user set, to a value other than this method's own, that only make sense for
        another method. (A full config as `linearize config` prints it carries every key at its default.)"""
        own = deep_merge(RunConfig().to_dict(), self.defaults)["attention"]
        for key, why in self.foreign_attention_keys.items():
            attention = user.get("attention") or {}
            if key in attention and attention[key] != own[key]:
                raise LinearizeError(f"attention.{key} does not apply to method '{self.name}': {why}")

    def check_config(self, config: RunConfig) -> None:
        attention = config.attention
        if attention.window_size < 0:
            raise LinearizeError("attention.window_size must be >= 0 (0 means no softmax window)")
        if attention.sink_tokens < 0 or (attention.sink_tokens and attention.window_size == 0):
            raise LinearizeError("attention.sink_tokens must be >= 0 and needs a softmax window (window_size > 0)")
        if attention.key_maps not in ("per_kv_head", "per_query_head"):
            raise LinearizeError("attention.key_maps must be 'per_kv_head' or 'per_query_head'")
