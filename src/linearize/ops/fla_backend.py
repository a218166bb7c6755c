"""flash-linear-attention's Triton kernels behind our chunked linear-attention op, on CUDA.

`install()` registers `fla_linear_attention_chunked` for device "cuda" through the backend seam when the
`fla` package is importable (it is imported on the first call, not here). It covers what fla's
`chunk_simple_gla` (no gate, or one decay per head and token) and `chunk_gla` (one decay per feature)
compute, and hands every other call (a key-padding mask) back to the PyTorch form:

- our normaliser rides along as one more value column: the kernel's output for [v, 1] is
  [numerator, denominator], `readout` divides as the PyTorch form does, and the state keeps the column;
- grouped-query heads: keys, values and gates are repeated out to the query heads for the kernel; the G
  states of one group are then equal, and the group's state is kept once, as our `DecodeState` holds it;
- scale 1: the feature maps have already shaped fq and fk;
- float32 in and out of the kernel, as the PyTorch forms compute.

Tests hold it equal to the PyTorch form on a CUDA GPU, and check its plumbing on any machine by plugging
in fla's naive (PyTorch) reference recurrences in place of the kernels.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import backend, linear
from .linear import append_ones, readout
from .state import DecodeState, full_mask


@dataclass
class Kernels:
    """fla-style chunked kernels: (q, k, v, g, scale=, initial_state=, output_final_state=) -> (o, state),
    tensors [B, T, H, X]; `per_head` takes g [B, T, H], `per_feature` g [B, T, H, K]."""

    per_head: Callable
    per_feature: Callable


def fla_kernels() -> Kernels:
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    return Kernels(per_head=chunk_simple_gla, per_feature=chunk_gla)


def fla_linear_attention_chunked(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    key_mask: torch.Tensor | None = None,
    state: DecodeState | None = None,
    output_final_state: bool = False,
    kernels: Kernels | None = None,
) -> tuple[torch.Tensor, DecodeState | None]:
    """`linear.linear_attention_chunked`, computed by fla's kernels (same arguments, same result)."""
    if key_mask is not None and not bool(key_mask.all()):
        return linear.linear_attention_chunked(
            fq, fk, v, log_gate, normalize=normalize, eps=eps, chunk_size=chunk_size, key_mask=key_mask,
            state=state, output_final_state=output_final_state,
        )
    kernels = kernels or fla_kernels()
    out_dtype = v.dtype
    batch, heads, length, _ = fq.shape
    groups = heads // fk.shape[1]

    def to_heads(x: torch.Tensor) -> torch.Tensor:  # [B, Hk, ...] -> [B, H, ...]
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    def to_fla(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, ...] -> [B, T, H, ...]
        return x.transpose(1, 2).contiguous()

    values = append_ones(v.float())  # the state keeps the normaliser column, normalised or not
    initial = None
    if state is not None and state.recurrent is not None:
        initial = to_heads(state.recurrent.float())
    q, k, values = to_fla(fq.float()), to_fla(to_heads(fk.float())), to_fla(to_heads(values))
    common = {"scale": 1.0, "initial_state": initial, "output_final_state": output_final_state}
    if log_gate is None:
        gate = torch.zeros(batch, length, heads, device=fq.device)
        o, final = kernels.per_head(q, k, values, gate, **common)
    elif log_gate.dim() == 3:
        o, final = kernels.per_head(q, k, values, to_fla(to_heads(log_gate.float())), **common)
    else:
        o, final = kernels.per_feature(q, k, values, to_fla(to_heads(log_gate.float())), **common)
    o = readout(o.transpose(1, 2).float(), eps, normalize).to(out_dtype)
    if not output_final_state:
        return o, None
    final = final[:, ::groups].float()  # the G states of a group are equal: one per group
    return o, linear._state_out(final, full_mask(batch, length, fq.device), state)


def available() -> bool:
    return importlib.util.find_spec("fla") is not None and torch.cuda.is_available()


def install() -> bool:
    """Register the fla kernels for CUDA tensors when fla is importable and a CUDA device is present."""
    if not available():
        return False
    backend.register("linear_attention_chunked", "cuda", fla_linear_attention_chunked)
    return True
