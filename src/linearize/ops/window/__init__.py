"""Sliding-window softmax attention with attention sinks, optionally plus linear terms for older keys.

One definition everywhere (every form, training, prefill and decode). Query t of a row sees

- as softmax terms: the keys s with t - window < s <= t (the window, by index), and the row's sinks:
  its first `sink_tokens` real tokens (StreamingLLM), wherever they lie;
- as linear terms (when key features are given): every older real key, s <= t - window, that is not a
  sink, weighted by fq_t . fk_s and, with gates, by the decay exp(A_t - A_s) (A = cumsum of log-gates):

    y_t = (sum_soft exp(q_t.k_s scale - c_t) [v_s, 1] + sum_older decay fq_t.fk_s [v_s, 1])   -> [num, den]
    o_t = num / (den + eps)

with c_t the max of the softmax scores only. Without features this is plain sliding-window attention
with sinks; with them, the LoLCATS hybrid (whose window factor g is the same as dividing fq by g).
With a recall memory (`token_ids` [B, T] and `memory_buckets` > 0; `linearize.ops.memory`) each query
has a few more softmax keys, the memory's entries for the n-grams ending at its own token, one per order in
`memory_ngram` (an int or a list), a key recalled twice counted once: each exp(q_t.k_mem scale - c_t)
[v_mem, 1] joins the sum, c_t still the window's and sinks' max (so a strong match outweighs the linear
terms as the teacher's softmax would; computed stably).
Padding: `key_mask` [B, T] (True = real token) takes padded keys out of every term; gates are ignored
at padding; a row's sinks are its first real tokens. Outputs at padded query positions are finite but
meaningless.

Shapes: q [B, H, T, D], k, v [B, Hk, T, D], fq [B, H, T, F], fk [B, Hk, T, F], log_gate [B, Hk, T]
(one decay per key/value head and token, <= 0), H % Hk == 0: query head h reads kv head h // (H // Hk).
With `key_features` (a function [B, Hk, T, X] -> [B, Hk, T, F]), fk holds what it reads instead (X numbers per
key): every form maps the keys itself, and the window keeps the inputs, not the features.

One module per form, as in `linearize.ops.linear`: `parallel` (the reference, every query against every
key), `chunked` (a fresh sequence: training and prefill), `recurrent` (decoding from a state); `common`
holds what they share.
"""

from .chunked import GROUP_TOKENS, window_attention_chunked
from .common import final_state
from .parallel import window_attention_parallel
from .recurrent import caller_writes_memory, empty_window_state, store_leaving, window_attention_recurrent

__all__ = [
    "GROUP_TOKENS", "caller_writes_memory", "empty_window_state", "final_state", "store_leaving",
    "window_attention_chunked", "window_attention_parallel", "window_attention_recurrent",
]
