"""A run's autocast: which dtype `autocast` resolves to, what runs inside it (the MLPs' products: training and
the students' evaluation) and what outside it, in the model's own dtype (each converted attention layer, the
output head, the teacher's evaluation)."""

import json

import pytest
import torch
from helpers import make_tiny_model, tokens
from test_pipeline import teacher_dir, tiny_settings  # noqa: F401 (a fixture)

import linearize.devices as devices
import linearize.pipeline as pipeline
from linearize import LinearizeError, linearize
from linearize.devices import autocast, resolve_autocast
from linearize.layers.attention import linearized_attentions
from linearize.methods import build_config
from linearize.pipeline import run
from linearize.teacher.results import machine_fingerprint

CPU = torch.device("cpu")


@pytest.mark.parametrize("amx", [True, False])
def test_auto_multiplies_in_bf16_only_on_a_cpu_with_amx_for_a_float32_model(monkeypatch, amx):
    monkeypatch.setattr(devices, "amx_available", lambda: amx)
    assert resolve_autocast("auto", CPU, torch.float32) == (torch.bfloat16 if amx else None)
    assert resolve_autocast("auto", CPU, torch.bfloat16) is None  # already in a low dtype: nothing to cast
    assert resolve_autocast("auto", torch.device("cuda"), torch.float32) is None  # a GPU run sets dtype instead
    assert resolve_autocast("bfloat16", CPU, torch.float32) == torch.bfloat16  # asked for: even without AMX
    assert resolve_autocast(None, CPU, torch.float32) is None
    with pytest.raises(LinearizeError, match="autocast must be auto, bfloat16 or null"):
        resolve_autocast("fp8", CPU, torch.float32)


def test_a_config_with_an_unknown_autocast_is_refused_before_any_work(tmp_path):
    with pytest.raises(LinearizeError, match="autocast must be auto, bfloat16 or null"):
        build_config({"output_dir": str(tmp_path), "autocast": "float8"})
    assert not any(tmp_path.iterdir())


def test_under_autocast_attention_and_the_head_run_in_float32_and_the_mlps_in_bf16():
    """Inside an autocast a converted model's MLPs multiply in bf16, while each attention layer (its projections,
    which stage 2's adapter joins, and its mixer) and the output head run in float32 with autocast off; the logits
    stay close to the float32 model's. Outside one, nothing changes: the same logits to the bit."""
    model = linearize(make_tiny_model("llama"), "hybrid", {"window_size": 8, "sink_tokens": 2, "decay": 0.95,
                                                            "memory_buckets": 16, "sparse_keys": 3})
    x = tokens(2, 40)
    seen = {"mixer": [], "o_proj": [], "mlp": []}

    def record(name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[name].append((out.dtype, torch.is_autocast_enabled("cpu")))
        return hook

    layers = linearized_attentions(model)
    hooks = [m.register_forward_hook(record(name)) for layer in layers
             for name, m in (("mixer", layer.mixer), ("o_proj", layer.o_proj))]
    hooks += [layer.mlp.down_proj.register_forward_hook(record("mlp")) for layer in model.model.layers]
    with torch.no_grad():
        plain = model(x).logits
        with autocast(CPU, torch.bfloat16):
            mixed = model(x).logits
        again = model(x).logits
    for hook in hooks:
        hook.remove()
    count = len(layers)
    assert seen["mixer"] == seen["o_proj"] == [(torch.float32, False)] * (3 * count)  # autocast off in there
    assert seen["mlp"] == [(torch.float32, False)] * count + [(torch.bfloat16, True)] * count \
        + [(torch.float32, False)] * count
    assert mixed.dtype == torch.float32  # the head outside the autocast too
    assert torch.equal(again, plain)  # nothing left behind
    assert not torch.equal(mixed, plain)
    torch.testing.assert_close(mixed.softmax(-1), plain.softmax(-1), atol=2e-2, rtol=0)


def test_a_run_under_autocast_says_so_evaluates_its_teacher_without_it_and_keys_its_results_apart(
        teacher_dir, tmp_path, monkeypatch):  # noqa: F811
    """A run with `autocast: bfloat16` evaluates its students under it and its teacher without it (the teacher's
    numbers are float32's), names it in the report's machine, and what it keeps under it (a baseline's results)
    has another key than the same kept without it."""
    under = {"teacher": [], "students": []}

    def recording(name, original):
        def call(*args, **kwargs):
            under[name].append(torch.is_autocast_enabled("cpu"))
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(pipeline, "teacher_scores", recording("teacher", pipeline.teacher_scores))
    monkeypatch.setattr(pipeline, "domain_scores", recording("students", pipeline.domain_scores))
    report = run(build_config(tiny_settings(teacher_dir, tmp_path / "run", autocast="bfloat16",
                                            transfer={"enabled": False}, finetune={"tokens": 64},
                                            evaluate={"retrieval": [], "ablate": [], "samples": False})),
                 log=lambda msg: None)
    assert under == {"teacher": [False], "students": [True, True]}  # untrained, after stage 2
    assert report["machine"].endswith("bfloat16 autocast")
    assert report["eval"]["finetune"]["code"]["ppl_ratio"] > 0
    plain = machine_fingerprint(torch.float32, CPU)
    with autocast(CPU, torch.bfloat16):
        mixed = machine_fingerprint(torch.float32, CPU)
    assert "autocast" not in plain and mixed == {**plain, "autocast": "torch.bfloat16"}
    assert json.dumps(plain) != json.dumps(mixed)
