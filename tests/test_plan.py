"""`linearize plan`: sizes and layouts from config.json alone, on the configs of large published models."""

from __future__ import annotations

import json

import pytest

from linearize import LinearizeError
from linearize.methods import build_config
from linearize.placement import planned_heads
from linearize.plan import (
    GiB,
    choose_store,
    count_costs,
    described_hardware,
    format_suggestion,
    model_shape,
    stage1_plan,
    stage2_plan,
    suggest,
)
from linearize.plan.layout import HOUR
from linearize.train.transfer import assign_blocks

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


def machine(kind="h100", devices=1, per_node=None, memory=None, disk=1000.0, **numbers):
    return described_hardware(kind, devices, per_node, memory, disk, free_disk=0.0, dtype="bfloat16", **numbers)


@pytest.fixture(scope="module")
def costs():
    config = run_config()
    return {name: count_costs(text_config(name), config, 1) for name in ("Llama-3.1-8B", "Llama-3.1-70B")}


def test_8b_on_one_80gb_gpu_runs_one_process_with_the_whole_teacher_and_nothing_stored(shapes, costs):
    """The issue's case: one teacher forward per step gives every layer's targets; no disk, no recomputation."""
    suggestion = suggest(shapes["Llama-3.1-8B"], costs["Llama-3.1-8B"], run_config(), machine(disk=100))
    best = suggestion.best
    assert best.processes == 1 and best.stage2.parallel == "local"
    assert best.stage1.store == "none" and best.stage1.blocks == 1 and best.disk == 0
    assert best.stage1.collect_seconds == 0 and best.stage2.targets_seconds > 0  # stage 2 computes its targets
    assert 1 * HOUR < best.seconds < 100 * HOUR
    assert best.stage1.memory <= 80 * GiB and best.stage2.memory <= 80 * GiB
    reasons = "\n".join(suggestion.others)
    assert "transfer.store=layers: does not fit disk" in reasons
    assert "transfer.store=blocks: slower" in reasons and "finetune.gradient_checkpointing=true: slower" in reasons
    text = format_suggestion(suggestion, machine(disk=100))
    assert "one process" in text and "| in all |" in text


def test_hours_follow_the_tokens_and_the_device(shapes, costs):
    shape, counted = shapes["Llama-3.1-8B"], costs["Llama-3.1-8B"]
    base = suggest(shape, counted, run_config(), machine(disk=100)).best
    double = suggest(shape, counted, run_config(transfer={"tokens": 40_000_000}, finetune={"tokens": 40_000_000}),
                     machine(disk=100)).best
    assert double.stage1.seconds == pytest.approx(2 * base.stage1.seconds, rel=0.01)
    assert double.stage2.seconds == pytest.approx(2 * base.stage2.seconds, rel=0.01)
    slower = suggest(shape, counted, run_config(), machine("a100-80", disk=100)).best
    assert slower.seconds > 1.3 * base.seconds  # a third of the H100's FLOP/s, 0.6 of its bandwidth
    eight = suggest(shape, counted, run_config(), machine(devices=8, disk=100)).best
    assert eight.seconds < base.seconds / 3 and eight.processes == 8


def test_70b_on_a_node_of_8_shards_stage_2_and_gives_each_process_its_blocks(shapes, costs):
    suggestion = suggest(shapes["Llama-3.1-70B"], costs["Llama-3.1-70B"], run_config(),
                         machine(devices=8, disk=20_000))
    best = suggestion.best
    assert best.stage2.parallel == "fsdp" and best.stage2.memory <= 80 * GiB
    assert best.stage1.blocks >= 8 and best.stage1.memory <= 80 * GiB  # every process trains a block
    assert any("finetune.parallel=ddp" in line and "does not fit memory" in line for line in suggestion.others)


def test_blocks_go_to_ranks_by_cost_the_costliest_first():
    assert assign_blocks([1.0] * 6, 2) == [0, 1, 0, 1, 0, 1]  # equal costs: round-robin
    costs = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]  # the upper half with a recall memory
    owners = assign_blocks(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert loads == [6.0, 6.0]  # round-robin would give 5 and 7
    assert assign_blocks([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1, 1, 1]


def test_the_costs_count_a_teacher_layer_as_two_flops_per_weight_and_token(shapes, costs):
    shape, counted = shapes["Llama-3.1-8B"], costs["Llama-3.1-8B"][1]
    tokens = counted.seq_len
    weights = 2 * shape.layer_params[0] * tokens
    attention = 2 * tokens * tokens * shape.heads * shape.head_dim  # q.k and the weighted values, causal half
    assert counted.layers[0].teacher.total_flops == pytest.approx(weights + attention, rel=0.01)
    # the student's step: forward and the backward to its input (no weight gradients but LoRA's), and more
    assert 1.5 * weights < counted.layers[0].student.total_flops < 3 * weights
    assert counted.layers[0].transfer.total_flops > 0
    # the upper half keeps a recall memory, the sparse cache one head in each of the layers the plan places it
    # (placement.planned_heads: as many as its budget pays for, spread): four kinds of layer, each counted once
    config = run_config()
    cached = {layer for layer, _ in planned_heads(config.attention, text_config("Llama-3.1-8B"), list(range(32)))}
    assert 0 < len(cached) < 16 and any(i < 16 for i in cached) and any(i >= 16 for i in cached)
    for i in range(shape.layers):
        alike = [j for j in range(shape.layers) if counted.layers[j] is counted.layers[i]]
        assert alike == [j for j in range(shape.layers) if (j >= 16, j in cached) == (i >= 16, i in cached)]
    plain, memory, sparse = (min(j for j in range(32) if (j >= 16, j in cached) == kind)
                             for kind in ((False, False), (True, False), (False, True)))
    # a memory's and a cache's ops cost more than the plain layer's
    for costlier in (memory, sparse):
        assert counted.layers[costlier].transfer.total_flops > counted.layers[plain].transfer.total_flops


@pytest.mark.parametrize("options, message", [
    ({"devices": 0}, "--devices must be greater than 0, got 0"),
    ({"memory": -1}, "--memory must be greater than 0, got -1"),
    ({"disk": 0}, "--disk must be greater than 0, got 0"),
    ({"kind": "v100"}, "unknown device kind 'v100': known are h100, h200"),
    ({"kind": None, "tflops": 100}, "needs all of"),
])
def test_bad_hardware_is_refused_naming_the_value(options, message):
    with pytest.raises(LinearizeError, match=message):
        machine(**options)


def test_a_device_given_by_its_numbers_and_this_cpu_measured():
    custom = machine("v100", memory=32, tflops=125, bandwidth_gbs=900)
    assert custom.memory == 32 * GiB and custom.device.flops == 125e12 and custom.device.bandwidth == 900e9
    cpu = machine("cpu", devices=2)
    assert cpu.kind == "cpu" and 1e9 < cpu.device.flops < 1e14 and 1e8 < cpu.device.bandwidth < 1e12


def test_a_layout_that_fits_nowhere_is_refused_naming_the_smallest_hardware_that_fits(shapes, costs):
    shape, counted = shapes["Llama-3.1-70B"], costs["Llama-3.1-70B"]
    with pytest.raises(LinearizeError, match=r"stage 2 needs at least .* per device on 1 device.*The smallest "
                                             r"hardware that fits: .*\d+ devices of 80 GiB"):
        suggest(shape, counted, run_config(), machine(disk=20_000))
    with pytest.raises(LinearizeError, match=r"stage 1 needs at least .* of disk"):
        suggest(shape, counted, run_config(), machine(devices=8, disk=10))


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


def test_layers_per_block_beyond_the_model_is_refused(shapes):
    with pytest.raises(LinearizeError, match=r"transfer.layers_per_block must lie in \[1, 32\]"):
        stage1_plan(shapes["Llama-3.1-8B"], run_config(transfer={"layers_per_block": 40}))


def test_the_plan_command_reads_a_bare_config_json(tmp_path, capsys):
    from linearize.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS["Llama-3.1-70B"]))
    assert main(["plan", "--memory", "80", "--per-node", "8", "--disk", "20000", str(path), "dtype=bfloat16",
                 "transfer.tokens=20000000"]) == 0
    printed = capsys.readouterr().out
    assert "parameters: 70.55 B" in printed and "finetune.parallel=fsdp" in printed
    assert "| layers |" in printed and "| blocks |" in printed and "| none |" in printed
    assert "8 x H100" in printed and "| in all |" in printed
    assert main(["plan", "--devices", "0", str(path)]) == 2
    assert "--devices must be greater than 0" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing.json")]) == 2
