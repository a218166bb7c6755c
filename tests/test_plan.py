"""`linearize plan`: sizes and layouts from config.json alone, on the configs of large published models."""

from __future__ import annotations

import json

import pytest

from linearize import LinearizeError
from linearize.methods import build_config
from linearize.plan import GiB, choose_store, model_shape, stage1_plan, stage2_plan, suggest_layout

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
         "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
# the config.json files of the published models (hidden sizes, layers, heads as released)
CONFIGS = {
    "Llama-3.1-8B": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "Llama-3.1-70B": {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "Llama-3.1-405B": {**LLAMA, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                       "num_attention_heads": 128, "num_key_value_heads": 8},
    "Qwen2.5-72B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                    "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "bfloat16"},
    # five local layers (window 512) to every global one, derived from sliding_window_pattern
    "gemma-3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
                   "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768,
                   "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                   "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6,
                   "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
}
PUBLISHED_PARAMETERS = {"Llama-3.1-8B": 8.03e9, "Llama-3.1-70B": 70.55e9, "Llama-3.1-405B": 405.85e9,
                        "Qwen2.5-72B": 72.71e9, "gemma-3-1b": 999_885_952}


def text_config(name: str):
    from transformers import AutoConfig

    data = dict(CONFIGS[name])
    return AutoConfig.for_model(data.pop("model_type"), **data)


def run_config(**sections):
    # the planned models are not the embedded teacher: "measured" means the upper half for them
    settings = {"dtype": "bfloat16", "data": {"seq_len": 1024}, "attention": {"memory_layers": "upper-half"},
                "transfer": {"tokens": 20_000_000}, "finetune": {"tokens": 20_000_000}}
    for key, value in sections.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(settings)


@pytest.fixture(scope="module")
def shapes():
    config = run_config()
    return {name: model_shape(text_config(name), config.method, config.attention, config.finetune.target_modules,
                              config.finetune.lora_r) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_counts_match_the_published_sizes(shapes, name):
    shape = shapes[name]
    assert shape.teacher_params == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.005)
    # every layer converted by default, but a Gemma 3's local layers, which are kept
    assert shape.converted == ([5, 11, 17, 23] if name == "gemma-3-1b" else list(range(shape.layers)))
    # LoRA r=8 on q, k, v, o: 8 x (in + out) per projection per layer
    hidden, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    assert shape.lora_params == shape.layers * 8 * ((hidden + q) + 2 * (hidden + kv) + (q + hidden))


def test_stage1_storage_per_choice_for_an_8b_model(shapes):
    """The issue's arithmetic: 20M tokens x 32 layers x (4096 + 4096) x 2 bytes ~ 10 TB with every layer kept."""
    plan = stage1_plan(shapes["Llama-3.1-8B"], run_config(transfer={"layers_per_block": 4}))
    tokens = plan.tokens
    assert tokens == 19_999_744  # whole 1024-token sequences
    assert plan.disk["layers"] == tokens * 32 * 8192 * 2 + tokens * 7 * 4096 * 2  # + the block boundaries
    assert plan.disk["layers"] / 1e12 == pytest.approx(11.6, abs=0.1)  # 10.5 TB of layers, 1.1 TB of boundaries
    assert plan.disk["blocks"] == tokens * 7 * 4096 * 2  # hidden x 2 bytes per token per boundary
    assert plan.disk["none"] == 0
    assert plan.disk["blocks"] <= plan.disk["layers"] / 10
    # a block of 4 layers holds 4 layers' weights (+ the embeddings for the first block)
    layer = shapes["Llama-3.1-8B"].layer_params[0] * 2
    assert 4 * layer <= plan.weights["blocks"] <= 4 * layer + shapes["Llama-3.1-8B"].embed_params * 2 * 1.01


def test_the_disk_budget_picks_the_fastest_store_that_fits_and_refuses_one_that_does_not(shapes):
    plan = stage1_plan(shapes["Llama-3.1-8B"], run_config(transfer={"layers_per_block": 4}))
    assert choose_store(plan, "auto", 20e12) == "layers"
    assert choose_store(plan, "auto", 2e12) == "blocks"
    assert choose_store(plan, "auto", 1e9) == "none"
    refusal = r"transfer.store=layers stores 10.6 TiB .* disk budget of 1.0 TiB .* blocks 1.1 TiB"
    with pytest.raises(LinearizeError, match=refusal):
        choose_store(plan, "layers", 1000 * GiB)


def test_layouts_one_gpu_for_8b_a_node_for_70b_several_nodes_for_405b(shapes):
    config = run_config()
    small = suggest_layout(shapes["Llama-3.1-8B"], config, memory=80 * GiB, per_node=8)
    assert small.parallel == "ddp" and small.stage2_nodes == 1
    big = suggest_layout(shapes["Llama-3.1-70B"], config, memory=80 * GiB, per_node=8)
    assert big.parallel == "fsdp" and big.stage2_processes <= 8 and big.stage1_nodes == 1
    largest = suggest_layout(shapes["Llama-3.1-405B"], config, memory=80 * GiB, per_node=8)
    assert largest.parallel == "fsdp" and largest.stage2_nodes >= 2 and largest.stage1_nodes >= 2
    assert largest.layers_per_block <= 12  # LoLCATS used 9: 405 GB of bf16 weights need small blocks
    for layout in (small, big, largest):
        assert layout.stage1_memory <= 80 * GiB and layout.stage2_memory <= 80 * GiB
    qwen = suggest_layout(shapes["Qwen2.5-72B"], config, memory=80 * GiB, per_node=8)
    assert qwen.parallel == "fsdp"


def test_tied_embeddings_are_counted_once():
    from helpers import make_tiny_model

    config = run_config(model="tiny-llama")  # a run of this model: its memory layers are not SmolLM2's
    for tie in (False, True):
        model = make_tiny_model("llama", tie_word_embeddings=tie)
        shape = model_shape(model.config, config.method, config.attention, ["q_proj"], 8)
        assert shape.teacher_params == sum(p.numel() for p in model.parameters())  # parameters() counts a tie once
        assert (shape.head_params == 0) == tie


def test_fsdp_divides_the_weights_and_ddp_holds_them_whole(shapes):
    plan = stage2_plan(shapes["Llama-3.1-70B"], run_config(), "cuda", processes=(2, 8))
    weights = shapes["Llama-3.1-70B"].teacher_params * 2
    assert plan.ddp > weights
    assert plan.fsdp[8] < plan.fsdp[2] < plan.ddp
    assert plan.ddp - plan.fsdp[8] > 0.8 * weights * (1 - 1 / 8)


def test_a_layout_that_fits_nowhere_is_refused_with_the_reason(shapes):
    with pytest.raises(LinearizeError, match="stage 1 does not fit a device of 4.00 GiB: a block of 1 layer"):
        suggest_layout(shapes["Llama-3.1-405B"], run_config(), memory=4 * GiB, per_node=8)
    with pytest.raises(LinearizeError, match=r"transfer.layers_per_block must lie in \[1, 32\]"):
        stage1_plan(shapes["Llama-3.1-8B"], run_config(transfer={"layers_per_block": 40}))


def test_the_plan_command_reads_a_bare_config_json(tmp_path, capsys):
    from linearize.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS["Llama-3.1-70B"]))
    assert main(["plan", "--memory", "80", str(path), "dtype=bfloat16", "transfer.tokens=20000000"]) == 0
    printed = capsys.readouterr().out
    assert "parameters: 70.55 B" in printed and "finetune.parallel=fsdp" in printed
    assert "| layers |" in printed and "| blocks |" in printed and "| none |" in printed
    assert main(["plan", str(tmp_path / "missing.json")]) == 2
