"""The hybrid on a CUDA GPU: its op's three forms and a whole model's decoding, fp32 and bf16, against the CPU.

Marked `cuda`: skipped without a GPU (tests/conftest.py); `pytest -m cuda` or bench/gpu.sh runs them on one.
"""

import pytest
import torch
from helpers import make_tiny_model, tokens
from test_ops import FEAT, B, D, T, left_padding, relative_error, sliced, window_args
from transformers import DynamicCache

from linearize import linearize
from linearize.ops import (
    empty_window_state,
    window_attention_chunked,
    window_attention_parallel,
    window_attention_recurrent,
)

DEVICE = "cuda"
# relative to the largest entry: fp32 on the GPU sums in another order than on the CPU; bf16 keeps 8 bits of
# mantissa; logits carry a whole model's rounding
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 8e-2}  # bf16 on a CPU: 0.026
HYBRID = {"window_size": 8, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16}


def hybrid_op_forms(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The hybrid op (window + sinks + gated linear terms + a recall memory of two orders), GQA, one row
    left-padded, on `device` in `dtype`: {"parallel", "chunked", "recurrent", "continued"} outputs [B, H, T, D]
    in fp32 on the CPU, padded queries zeroed. "recurrent" runs from the empty state, "continued" is a chunked
    prefill of 20 tokens continued one token per call."""
    torch.manual_seed(30)
    args = {name: x.to(device, dtype) for name, x in window_args("gated", 6, 2).items()}
    mask = left_padding([0, 13]).to(device)
    token_ids = torch.randint(0, 3, (B, T)).to(device)
    common = {"window": 5, "sink_tokens": 3, "memory_buckets": 5, "memory_ngram": (2, 1)}
    out = {
        "parallel": window_attention_parallel(**args, **common, key_mask=mask, token_ids=token_ids)[0],
        "chunked": window_attention_chunked(**args, **common, key_mask=mask, token_ids=token_ids)[0],
    }
    empty = empty_window_state(B, 2, D, 5, 3, FEAT, gated=True, device=device, memory_buckets=5, memory_ngram=(2, 1))
    out["recurrent"] = window_attention_recurrent(**args, **common, key_mask=mask, token_ids=token_ids,
                                                  state=empty)[0]
    _, state = window_attention_chunked(**sliced(args, slice(0, 20), mask), **common, token_ids=token_ids[:, :20],
                                        output_final_state=True)
    steps = [out["parallel"][:, :, :20]]
    for i in range(20, T):
        o, state = window_attention_recurrent(**sliced(args, slice(i, i + 1), mask), **common,
                                              token_ids=token_ids[:, i : i + 1], state=state)
        steps.append(o)
    out["continued"] = torch.cat(steps, dim=2)
    return {name: (o * mask[:, None, :, None]).float().cpu() for name, o in out.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_hybrid_ops_three_forms_agree_on_cuda(dtype):
    """On the GPU every form equals the CPU's parallel form in fp32, to fp32's or bf16's rounding."""
    expected = hybrid_op_forms("cpu", torch.float32)["parallel"]
    for name, output in hybrid_op_forms(DEVICE, dtype).items():
        assert relative_error(output, expected) < TOLERANCE[dtype], name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_hybrid_model_decodes_on_cuda_as_on_the_cpu(dtype):
    """A tiny hybrid with a recall memory on the GPU: one parallel forward equals the CPU's fp32 logits, and a
    prefill continued one token at a time through its cache equals that forward; in fp32 also the compiled
    decoding step."""
    x = tokens(length=41)
    model = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    with torch.no_grad():
        expected = model(x).logits
    model, x = model.to(DEVICE, dtype), x.to(DEVICE)

    def decoded() -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :19], past_key_values=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(19, 41)]
        return torch.cat(steps, dim=1).float().cpu()

    with torch.no_grad():
        parallel = model(x).logits.float().cpu()
        assert relative_error(parallel, expected) < LOGITS_TOLERANCE[dtype]
        assert relative_error(decoded(), parallel) < LOGITS_TOLERANCE[dtype]
        if dtype == torch.float32:
            step = model.compile_decoding()._compiled_decoding
            graph, calls = step.graph, []
            step.graph = lambda *a: calls.append(1) or graph(*a)
            assert relative_error(decoded(), parallel) < LOGITS_TOLERANCE[dtype]
            assert len(calls) == 22  # every single-token step ran compiled
