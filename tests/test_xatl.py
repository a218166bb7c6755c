"""XATL: the GLA / retention architecture, the transfer from every teacher family, full fine-tuning with
progressive unfreezing, the pipeline, and the export to flash-linear-attention's own model class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, make_byte_tokenizer, make_tiny_model, tokens
from test_fla_reference import load_naive

from linearize import LinearizeError, linearize
from linearize.config import FinetuneConfig
from linearize.layers.attention import linearized_attentions
from linearize.methods import build_config
from linearize.methods.xatl import XatlMixer, retention_decays
from linearize.models.transfer import teacher_shapes, transfer_counts, transfer_table
from linearize.train.finetune import Unfreezer, finetune

NEW_PER_LAYER = {"gla": ("gk_proj.0.weight", "gk_proj.1.weight", "gk_proj.1.bias", "g_proj.weight", "g_norm"),
                 "retnet": ("g_proj.weight", "g_norm")}


def layer_inputs(model, length: int = 24):
    """Layer 0's attention module, its input hidden states and position embeddings."""
    layer = model.model.layers[0]
    ids = tokens(length=length)
    hidden = layer.input_layernorm(model.model.embed_tokens(ids))
    positions = torch.arange(length)[None].expand(ids.shape[0], -1)
    return layer.self_attn, hidden, model.model.rotary_emb(hidden, positions)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", ["gla", "retnet"])
def test_transfer_copies_every_teacher_tensor_and_adds_only_the_new_mixer_parts(family, mixer):
    teacher = make_tiny_model(family)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    shapes = teacher_shapes(teacher)
    model = linearize(teacher, "xatl", {"mixer": mixer})
    rows = transfer_table(shapes, model)
    params = dict(model.named_parameters())
    copied = {r["name"] for r in rows if r["source"] != "new"}
    assert copied == set(before)  # every teacher tensor, Qwen2's biases and Qwen3's q/k norms included
    for name in copied:
        assert torch.equal(params[name], before[name]), name
    new = sorted(r["name"] for r in rows if r["source"] == "new")
    converted = [layer.layer_idx for layer in linearized_attentions(model)]  # gemma3_text keeps its local layer 0
    assert converted == ([1] if family == "gemma3_text" else [0, 1])
    expected = sorted(f"model.layers.{i}.self_attn.mixer.{p}" for i in converted for p in NEW_PER_LAYER[mixer])
    assert new == expected
    counts = transfer_counts(rows)
    assert counts["copied_parameters"] == sum(t.numel() for t in before.values())


def test_random_init_is_the_same_architecture_with_nothing_from_the_teacher():
    teacher = make_tiny_model("qwen3")
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    shapes = teacher_shapes(teacher)
    model = linearize(teacher, "xatl", {"init": "random"})
    rows = transfer_table(shapes, model, copied=False)
    assert all(r["source"] == "new" for r in rows)
    params = dict(model.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items() if ".mixer." not in n} == shapes
    for name, old in before.items():
        if "norm" in name:
            assert torch.equal(params[name], torch.ones_like(old)), name
        else:
            assert not torch.allclose(params[name], old), name


def test_a_target_that_cannot_take_a_teacher_tensor_names_both():
    teacher = make_tiny_model("llama")
    shapes = teacher_shapes(teacher)
    shapes["model.layers.0.mlp.up_proj.weight"] = (7, 7)
    model = linearize(teacher, "xatl")
    with pytest.raises(LinearizeError, match=r"model.layers.0.mlp.up_proj.weight \(128, 64\).*\(7, 7\)"):
        transfer_table(shapes, model)


def test_the_gla_mixer_is_fla_gla_with_its_norm_and_output_gate():
    """Layer output per head = RMSNorm(naive_recurrent_gla(q, k, v, gk)) * w * swish(g): fla's layer math."""
    naive = load_naive("gla").naive_recurrent_gla
    model = linearize(make_tiny_model("llama"), "xatl", {"mixer": "gla", "chunk_size": 8})
    attention, hidden, rope = layer_inputs(model)
    mixer: XatlMixer = attention.mixer
    torch.nn.init.normal_(mixer.g_norm, 1.0, 0.1)
    with torch.no_grad():
        ours = attention.mix(hidden, rope)  # [B, H, T, D]
        _, _, v, q, k = attention.project(hidden, rope)
        groups = q.shape[1] // k.shape[1]
        gk = F.logsigmoid(mixer.heads(mixer.gk_proj(hidden), k.shape[1])) / 16
        expand = [x.repeat_interleave(groups, dim=1).transpose(1, 2) for x in (k, v, gk)]
        o, _ = naive(q.transpose(1, 2), *expand)
        o = o.transpose(1, 2)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.eps) * mixer.g_norm
        reference = o * F.silu(mixer.heads(mixer.g_proj(hidden), q.shape[1]))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_retention_decays_per_query_head_on_rope_keys():
    naive = load_naive("simple_gla").naive_recurrent_simple_gla
    model = linearize(make_tiny_model("mistral"), "xatl", {"mixer": "retnet", "output_norm_init": 1.0})
    attention, hidden, rope = layer_inputs(model)
    mixer = attention.mixer
    expected = torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8], dtype=torch.float64)
    assert torch.allclose(retention_decays(4), expected)
    with torch.no_grad():
        ours = attention.mix(hidden, rope)
        q, k, v, _, _ = attention.project(hidden, rope)
        groups = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        g = mixer.log_decay[None, None, :].expand(q.shape[0], q.shape[2], -1)  # [B, T, H]
        o, _ = naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g)
        o = o.transpose(1, 2)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.eps)
        reference = o * F.silu(mixer.heads(mixer.g_proj(hidden), q.shape[1]))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_silent_output_norm_and_a_window_covering_the_sequence_start_at_the_teacher(family):
    """output_norm_init 0: the recurrence adds nothing at init, so with a softmax window over the whole
    sequence the transferred model is exactly the teacher."""
    teacher = make_tiny_model(family)
    x = tokens(length=32)
    with torch.no_grad():
        expected = teacher(x).logits
        student = linearize(teacher, "xatl", {"window_size": 64, "output_norm_init": 0.0})(x).logits
    torch.testing.assert_close(student, expected, rtol=1e-4, atol=1e-5)


def test_bad_xatl_settings_fail_at_config_time():
    with pytest.raises(LinearizeError, match="attention.mixer"):
        build_config({"method": "xatl", "attention": {"mixer": "mamba"}})
    with pytest.raises(LinearizeError, match="unfreeze_threshold"):
        build_config({"method": "xatl", "finetune": {"unfreeze_threshold": 1.5}})
    with pytest.raises(LinearizeError, match="distill_top_k"):
        build_config({"method": "xatl", "finetune": {"distill_top_k": 0}})
    with pytest.raises(LinearizeError, match="sink_tokens"):
        build_config({"method": "xatl", "attention": {"sink_tokens": 4}})
    with pytest.raises(LinearizeError, match="transfer.enabled"):
        build_config({"method": "xatl", "transfer": {"enabled": True}})
    config = build_config({"method": "xatl"})
    assert config.finetune.full and not config.transfer.enabled


def test_unfreezer_holds_weights_until_the_loss_stalls_and_remembers_on_resume():
    held = [torch.nn.Parameter(torch.zeros(2))]
    unfreezer = Unfreezer(held, threshold=0.05, window=2)
    assert not held[0].requires_grad
    history = [{"loss": x} for x in (10.0, 8.0, 6.0, 5.0)]  # (9 - 5.5) / 9 = 39% better: keep holding
    unfreezer(history)
    assert not unfreezer.unfrozen
    history += [{"loss": x} for x in (5.0, 4.9)]  # (5.5 - 4.95) / 5.5 = 10%
    unfreezer(history)
    assert not unfreezer.unfrozen
    history += [{"loss": x} for x in (4.9, 4.85)]  # (4.95 - 4.875) / 4.95 = 1.5% < 5%: plateau
    unfreezer(history)
    assert unfreezer.unfrozen and held[0].requires_grad
    resumed = [torch.nn.Parameter(torch.zeros(2))]
    again = Unfreezer(resumed, threshold=0.05, window=100)
    again([{"loss": 1.0, "unfrozen": 1}])
    assert again.unfrozen and resumed[0].requires_grad


def test_full_fine_tuning_with_progressive_unfreezing_trains_new_parts_first(tmp_path):
    teacher = make_tiny_model("llama", initializer_range=0.2)
    model = linearize(teacher, "xatl")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = tokens(batch=8, length=32, seed=1)
    config = FinetuneConfig(tokens=8 * 32, full=True, lr=1e-2, warmup_steps=0, distill_weight=0.0,
                            unfreeze_threshold=0.5, unfreeze_window=2)
    model, result = finetune(model, blocks, config, tmp_path, checkpoint_every=100)
    flags = [h["unfrozen"] for h in result.history]
    assert flags[0] == 0 and flags[-1] == 1 and flags == sorted(flags)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in before)  # every weight trained in the end
    # while held, only the new parts moved: re-run the held steps alone and compare
    held_steps = flags.index(1)
    model2 = linearize(make_tiny_model("llama", initializer_range=0.2), "xatl")
    config2 = FinetuneConfig(**{**config.__dict__, "tokens": held_steps * 32, "unfreeze_threshold": 0.999999,
                                "unfreeze_window": 100})
    model2, _ = finetune(model2, blocks[: held_steps], config2, tmp_path / "held", checkpoint_every=100)
    for name, p in model2.named_parameters():
        assert torch.equal(p, before[name]) == (".mixer." not in name), name


def test_xatl_runs_end_to_end_saves_full_weights_and_reloads(tmp_path):
    from test_pipeline import tiny_settings

    from linearize import load
    from linearize.pipeline import run

    teacher_dir = tmp_path / "teacher"
    make_tiny_model("llama", initializer_range=0.2).save_pretrained(teacher_dir)
    make_byte_tokenizer().save_pretrained(teacher_dir)
    settings = tiny_settings(teacher_dir, tmp_path / "run", method="xatl")
    settings.pop("transfer")
    settings["attention"] = {"mixer": "gla"}
    report = run(build_config(settings), log=lambda _: None)
    assert report["transfer"]["new_tensors"] == 2 * 5 and report["transfer"]["copied_tensors"] > 0
    assert (tmp_path / "run" / "transfer_table.md").is_file()
    assert report["eval"]["finetune"]["code"]["ppl_ratio"] < report["eval"]["untrained"]["code"]["ppl_ratio"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()  # full weights, not an adapter
    model, _ = load(tmp_path / "run" / "model")
    assert model.config.method == "xatl" and model.config.weights == "full"


def has_fla_models() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("fla.models") is not None
    except ImportError:
        return False


needs_fla = pytest.mark.skipif(not has_fla_models(), reason="the fla export needs flash-linear-attention (dev extra)")


@needs_fla
def test_fla_export_maps_every_tensor_by_name_and_shape():
    from linearize.models.fla_export import to_fla

    model = linearize(make_tiny_model("llama", tie_word_embeddings=True), "xatl")
    target = to_fla(model)
    ours = dict(model.named_parameters())
    theirs = dict(target.named_parameters())
    assert len(theirs) == len(ours)
    pairs = {
        "model.embeddings.weight": "model.embed_tokens.weight",
        "model.layers.1.attn.gk_proj.1.bias": "model.layers.1.self_attn.mixer.gk_proj.1.bias",
        "model.layers.0.attn.g_norm_swish_gate.weight": "model.layers.0.self_attn.mixer.g_norm",
        "model.layers.0.mlp_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.attn.k_proj.weight": "model.layers.1.self_attn.k_proj.weight",
    }
    for fla_name, name in pairs.items():
        assert torch.equal(theirs[fla_name], ours[name]), fla_name
    assert target.config.num_kv_heads == 2 and target.config.tie_word_embeddings


@pytest.mark.parametrize(
    ("family", "attention", "message"),
    [
        ("qwen2", {}, r"q_proj\.bias has no counterpart"),
        ("qwen3", {}, r"q_norm\.weight has no counterpart"),
        ("gemma3_text", {"window_size": 0, "local_layers": "convert"}, r"norm\.weight has no counterpart"),
        ("llama", {"window_size": 8}, "purely recurrent"),
        ("llama", {"mixer": "retnet"}, "only an XATL GLA student"),
    ],
)
@needs_fla
def test_what_fla_cannot_express_is_refused(family, attention, message):
    from linearize.models.fla_export import to_fla

    with pytest.raises(LinearizeError, match=message):
        to_fla(linearize(make_tiny_model(family), "xatl", attention))


@needs_fla
@pytest.mark.cuda  # fla's GLA kernels run on a CUDA GPU only
def test_fla_export_gives_the_same_logits_on_gpu():
    from linearize.models.fla_export import to_fla

    model = linearize(make_tiny_model("llama"), "xatl").cuda()
    target = to_fla(model).cuda()
    x = tokens(length=100).cuda()
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, model(x).logits, rtol=2e-3, atol=2e-3)
