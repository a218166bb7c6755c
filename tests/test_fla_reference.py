"""Our gated linear-attention ops against flash-linear-attention's naive PyTorch references.

fla (`pip install fla-core==0.6.0`, which needs only torch and einops) is the library Liger's reference
code runs on. Its naive references are plain PyTorch loops: GLA (one decay per key feature), simple GLA
(one decay per head and token) and linear attention. They take [B, T, H, K] inputs, scale q by K**-0.5
inside, keep one state [B, H, K, V] per query head and do not normalise. Ours takes [B, H, T, F] inputs,
no scale, keeps the state [B, Hk, F, D + 1] per key/value head with the normaliser as last column. So:
ours is fed fq * F**-0.5 (F = fla's K, the feature dim), the state is compared on [..., :D], and the
whole state including the normaliser column equals fla's state for the values [v, 1].

`import fla.ops...` pulls in Triton kernels, so on a CPU-only machine the naive files are loaded by path.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fla", reason="flash-linear-attention references need `pip install fla-core==0.6.0`")
pytest.importorskip("einops", reason="fla's naive references import einops")

from linearize.ops import (  # noqa: E402
    DecodeState,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)

B, T, D, FEAT = 2, 45, 16, 8
CHUNK = 16  # T = 45 crosses two chunk boundaries and ends in a partial chunk
HEADS = [(4, 4), (6, 2)]  # (query heads, key/value heads): MHA and GQA
FORMS = ["parallel", "chunked", "recurrent"]
TOL = 1e-5  # relative to the largest entry of the reference, fp32


def load_naive(op: str):
    """fla.ops.<op>.naive, imported normally if that works, else loaded by path (no Triton needed)."""
    name = f"fla.ops.{op}.naive"
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    spec = importlib.util.find_spec("fla")
    for root in spec.submodule_search_locations:
        path = Path(root) / "ops" / op / "naive.py"
        if path.is_file():
            module_name = f"_fla_naive_{op}"
            file_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[module_name] = module
            file_spec.loader.exec_module(module)
            return module
    pytest.fail(f"fla is installed but has no ops/{op}/naive.py: its layout changed; pin fla-core==0.6.0")


gla_naive = load_naive("gla")
simple_gla_naive = load_naive("simple_gla")
linear_attn_naive = load_naive("linear_attn")


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """Equal up to fp32 rounding of long sums, measured against the scale of the result."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def to_fla(x: torch.Tensor) -> torch.Tensor:
    """Ours [B, H, T, ...] -> fla's [B, T, H, ...]."""
    return x.transpose(1, 2).contiguous()


def from_fla(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def expand(x: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """Key/value-head tensors repeated to one copy per query head (what fla, without GQA, needs)."""
    return None if x is None else x.repeat_interleave(groups, dim=1)


def append_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def inputs(heads: int, kv_heads: int, gate: str, seed: int = 0, liger: bool = False):
    """fq [B, H, T, F], fk [B, Hk, T, F] (softmax features, as Liger's), v [B, Hk, T, D], log-gates
    [B, Hk, T, F] ("feature") or [B, Hk, T] ("scalar"). `liger` makes Liger's own gates,
    logsigmoid(k) / 16, from the same keys the features come from; otherwise logsigmoid(x + 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, T, FEAT, generator=g)
    k = torch.randn(B, kv_heads, T, FEAT, generator=g)
    v = torch.randn(B, kv_heads, T, D, generator=g)
    if liger:
        log_gate = F.logsigmoid(k) / 16
    else:
        log_gate = F.logsigmoid(torch.randn(B, kv_heads, T, FEAT, generator=g) + 1.0)
    if gate == "scalar":
        log_gate = log_gate.mean(-1)
    return q.softmax(-1), k.softmax(-1), v, log_gate


def random_state(kv_heads: int, seed: int = 1) -> torch.Tensor:
    """A state [B, Hk, F, D + 1] as a previous segment would leave it: any values, a positive normaliser."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(B, kv_heads, FEAT, D + 1, generator=g)
    state[..., D] = torch.rand(B, kv_heads, FEAT, generator=g) * 5
    return state


def ours(form, fq, fk, v, log_gate, *, normalize=False, initial_state=None, eps=1e-6):
    """One of our three forms -> (o [B, H, T, D], final state [B, Hk, F, D + 1])."""
    state = None
    if initial_state is not None:
        state = DecodeState(seen=torch.zeros(fk.shape[0], dtype=torch.long), recurrent=initial_state)
    if form == "parallel":
        assert state is None
        o, final = linear_attention_parallel(fq, fk, v, log_gate, normalize=normalize, eps=eps, output_final_state=True)
    elif form == "chunked":
        o, final = linear_attention_chunked(
            fq, fk, v, log_gate, normalize=normalize, eps=eps, chunk_size=CHUNK, state=state, output_final_state=True
        )
    else:
        o, final = linear_attention_recurrent(fq, fk, v, log_gate, normalize=normalize, eps=eps, state=state)
    return o, final.recurrent


def fla_gla(fq, fk, v, log_gate, groups, initial_state=None):
    """fla's naive GLA recurrence with keys/values/gates expanded to every query head: (o, state) in our
    [B, H, T, .] layout. Scalar gates are broadcast over the features (a scalar gate is a GLA gate)."""
    if log_gate.dim() == 3:
        log_gate = log_gate[..., None].expand_as(fk)
    o, state = gla_naive.naive_recurrent_gla(
        to_fla(fq),
        to_fla(expand(fk, groups)),
        to_fla(expand(v, groups)),
        to_fla(expand(log_gate, groups)),
        initial_state=expand(initial_state, groups),
        output_final_state=True,
    )
    return from_fla(o), state


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("liger", [False, True], ids=["strong_gates", "liger_gates"])
def test_per_feature_gates_match_fla_naive_recurrent_gla(heads, kv_heads, form, liger):
    groups = heads // kv_heads
    fq, fk, v, log_gate = inputs(heads, kv_heads, "feature", liger=liger)
    o, state = ours(form, fq * FEAT**-0.5, fk, v, log_gate)
    o_ref, state_ref = fla_gla(fq, fk, v, log_gate, groups)
    close(o, o_ref)
    close(expand(state, groups)[..., :D], state_ref)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("gate", ["feature", "scalar"])
def test_initial_state_continues_like_fla(heads, kv_heads, form, gate):
    groups = heads // kv_heads
    fq, fk, v, log_gate = inputs(heads, kv_heads, gate, seed=2)
    initial = random_state(kv_heads)
    o, state = ours(form, fq * FEAT**-0.5, fk, v, log_gate, initial_state=initial)
    o_ref, state_ref = fla_gla(fq, fk, v, log_gate, groups, initial_state=initial[..., :D])
    close(o, o_ref)
    close(expand(state, groups)[..., :D], state_ref)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("form", FORMS)
def test_scalar_gates_match_fla_naive_simple_gla(heads, kv_heads, form):
    groups = heads // kv_heads
    fq, fk, v, log_gate = inputs(heads, kv_heads, "scalar", seed=3)
    o, state = ours(form, fq * FEAT**-0.5, fk, v, log_gate)
    args = (to_fla(fq), to_fla(expand(fk, groups)), to_fla(expand(v, groups)), to_fla(expand(log_gate, groups)))
    o_rec, state_rec = simple_gla_naive.naive_recurrent_simple_gla(*args, output_final_state=True)
    o_chunk, state_chunk = simple_gla_naive.naive_chunk_simple_gla(*args, output_final_state=True, chunk_size=CHUNK)
    o_par, _ = simple_gla_naive.naive_parallel_simple_gla(*args)
    for o_ref in (o_rec, o_chunk, o_par):
        close(o, from_fla(o_ref))
    for state_ref in (state_rec, state_chunk):
        close(expand(state, groups)[..., :D], state_ref)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_normaliser_column_is_fla_state_of_values_with_a_ones_column(heads, kv_heads, gate, form):
    """Our state [.., :D] is fla's state and [.., D] is fla's state for a constant value 1, and our
    normalised output is fla's output divided by its ones-column output (the scale cancels)."""
    groups = heads // kv_heads
    fq, fk, v, log_gate = inputs(heads, kv_heads, gate, seed=4)
    initial = random_state(kv_heads)
    o, state = ours(form, fq * FEAT**-0.5, fk, v, log_gate, normalize=True, initial_state=initial)
    o_ref, state_ref = fla_gla(fq, fk, append_ones(v), log_gate, groups, initial_state=initial)
    close(expand(state, groups), state_ref)
    close(o, o_ref[..., :D] / (o_ref[..., D:] + 1e-6))


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("normalize", [False, True])
def test_ungated_matches_fla_naive_linear_attention(heads, kv_heads, form, normalize):
    """No gate: fla's naive linear attention, normalised by q.k_cum (its eps 1e-10) or not; the
    initial state, if any (the parallel form takes none), goes to fla as S, or as (S, z) when normalised."""
    groups = heads // kv_heads
    fq, fk, v, _ = inputs(heads, kv_heads, "feature", seed=5)
    initial = None if form == "parallel" else random_state(kv_heads)
    o, state = ours(form, fq * FEAT**-0.5, fk, v, None, normalize=normalize, initial_state=initial, eps=1e-10)
    init = None
    if initial is not None:
        s_init = expand(initial, groups)
        init = (s_init[..., :D], s_init[..., D][:, None]) if normalize else s_init[..., :D]
    o_ref, final = linear_attn_naive.naive_recurrent_linear_attn(
        to_fla(fq),
        to_fla(expand(fk, groups)),
        to_fla(expand(v, groups)),
        initial_state=init,
        output_final_state=True,
        normalize=normalize,
    )
    close(o, from_fla(o_ref))
    s_ref, z_ref = final if normalize else (final, None)
    close(expand(state, groups)[..., :D], s_ref)
    if normalize:
        close(expand(state, groups)[..., D], z_ref[:, 0])


# ---- the fla backend: our op computed by fla-style kernels -------------------------------------------

from linearize.ops import backend, fla_backend  # noqa: E402


def naive_kernels() -> fla_backend.Kernels:
    """fla's naive recurrences in the place of its Triton kernels (same [B, T, H, X] calling convention):
    the backend's plumbing (GQA, normaliser column, states, gate layouts) is then checked on any machine."""

    def per_feature(q, k, v, g, scale, initial_state=None, output_final_state=False):
        q = q * scale * q.shape[-1] ** 0.5  # the naive GLA always scales by K**-0.5
        return gla_naive.naive_recurrent_gla(q, k, v, g, initial_state=initial_state,
                                             output_final_state=output_final_state)

    def per_head(q, k, v, g, scale, initial_state=None, output_final_state=False):
        return simple_gla_naive.naive_recurrent_simple_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                                           output_final_state=output_final_state)

    return fla_backend.Kernels(per_head=per_head, per_feature=per_feature)


def backend_case(heads, kv_heads, gate, normalize, continued, device="cpu", kernels=None):
    fq, fk, v, log_gate = (x.to(device) for x in inputs(heads, kv_heads, "feature" if gate == "none" else gate, seed=5))
    log_gate = None if gate == "none" else log_gate
    state = None
    if continued:
        state = DecodeState(seen=torch.full((B,), 7, device=device), recurrent=random_state(kv_heads).to(device))
    common = {"normalize": normalize, "chunk_size": CHUNK, "state": state, "output_final_state": True}
    o, final = linear_attention_chunked(fq, fk, v, log_gate, **common)
    o_fla, final_fla = fla_backend.fla_linear_attention_chunked(fq, fk, v, log_gate, kernels=kernels, **common)
    close(o_fla, o, 1e-4)
    close(final_fla.recurrent, final.recurrent, 1e-4)
    assert torch.equal(final_fla.seen, final.seen)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("gate", ["none", "scalar", "feature"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("continued", [False, True])
def test_fla_backend_plumbing_equals_our_op(heads, kv_heads, gate, normalize, continued):
    backend_case(heads, kv_heads, gate, normalize, continued, kernels=naive_kernels())


def test_fla_backend_hands_padded_batches_back():
    fq, fk, v, log_gate = inputs(6, 2, "scalar", seed=6)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False

    def refuse(*args, **kwargs):
        raise AssertionError("a padded batch must not reach the kernels")

    o, _ = fla_backend.fla_linear_attention_chunked(fq, fk, v, log_gate, key_mask=mask, chunk_size=CHUNK,
                                                    kernels=fla_backend.Kernels(refuse, refuse))
    close(o, linear_attention_chunked(fq, fk, v, log_gate, key_mask=mask, chunk_size=CHUNK)[0])


def test_fla_backend_registers_for_cuda_only_where_it_can_run(monkeypatch):
    monkeypatch.setattr(backend, "_REGISTERED", {})
    monkeypatch.setattr(fla_backend, "available", lambda: False)
    assert not fla_backend.install() and backend.get("linear_attention_chunked", "cuda") is linear_attention_chunked
    monkeypatch.setattr(fla_backend, "available", lambda: True)
    assert fla_backend.install()
    assert backend.get("linear_attention_chunked", "cuda") is fla_backend.fla_linear_attention_chunked
    assert backend.get("linear_attention_chunked", "cpu") is linear_attention_chunked


@pytest.mark.cuda  # fla's Triton kernels run on a CUDA GPU only
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("gate", ["none", "scalar", "feature"])
@pytest.mark.parametrize("continued", [False, True])
def test_fla_kernels_on_cuda_equal_our_op(heads, kv_heads, gate, continued):
    backend_case(heads, kv_heads, gate, True, continued, device="cuda")
