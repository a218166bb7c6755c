"""Config: YAML + overrides, each method's own attention section, errors that name the key, before any
model loads."""

import pytest
import yaml
from helpers import make_tiny_model

from linearize import LinearizeError, linearize
from linearize.cli import shipped_configs
from linearize.config import RunConfig, parse_overrides
from linearize.methods import METHODS, build_config, load_config


def test_overrides_parse_nested_keys_and_yaml_values():
    assert parse_overrides(["transfer.lr=1e-3", "attention.softmax_layers=[0, 2]", "method=liger"]) == {
        "transfer": {"lr": 1e-3},
        "attention": {"softmax_layers": [0, 2]},
        "method": "liger",
    }


def test_a_wrong_key_names_the_key_and_suggests_the_right_one():
    with pytest.raises(LinearizeError, match=r"unknown config key 'attention.windw_size'.*window_size"):
        build_config({"attention": {"windw_size": 32}})
    with pytest.raises(LinearizeError, match="unknown config key 'epochz'"):
        build_config({"epochz": 2})


def test_each_method_owns_its_attention_section():
    assert build_config({"method": "liger"}).attention.gate == "gla"
    assert build_config({"method": "lolcats"}).attention.window_factor_init == 0.1
    with pytest.raises(LinearizeError, match="unknown config key 'attention.gate'"):
        build_config({"method": "lolcats", "attention": {"gate": "gla"}})
    with pytest.raises(LinearizeError, match="unknown config key 'attention.mix'"):
        build_config({"attention": {"mix": [0.7, 0.3]}})


def test_method_stage_defaults_sit_between_base_defaults_and_the_user():
    assert build_config({"method": "liger"}).finetune.lora_alpha == 8.0
    assert build_config({"method": "liger", "finetune": {"lora_alpha": 4.0}}).finetune.lora_alpha == 4.0
    assert not build_config({"method": "liger"}).transfer.enabled
    assert build_config({}).transfer.enabled


@pytest.mark.parametrize(
    "user,message",
    [
        ({"method": "mamba"}, "unknown method 'mamba'"),
        ({"attention": {"feature_map": "relu6"}}, "attention.feature_map must be one of hedgehog"),
        ({"method": "lolcats", "attention": {"feature_map": "identity"}}, "attention.feature_map must be one of"),
        ({"method": "liger", "attention": {"gate": "lstm"}}, "attention.gate must be one of"),
        ({"attention": {"decay": 1.5}}, r"attention.decay must lie in \(0, 1\]"),
        ({"attention": {"decay": 0.0}}, r"attention.decay must lie in \(0, 1\]"),
        ({"attention": {"window_size": 0}}, "attention.window_size must be >= 1"),
        ({"method": "lolcats", "attention": {"window_size": 0, "sink_tokens": 4}}, "sink_tokens needs a softmax"),
        ({"method": "liger", "attention": {"window_size": 0, "sink_tokens": 4}}, "sink_tokens needs a softmax"),
        ({"attention": {"sink_tokens": -1}}, "attention.sink_tokens must be >= 0"),
        ({"attention": {"memory_buckets": -1}}, "attention.memory_buckets must be an integer >= 0"),
        ({"attention": {"memory_layers": "top"}}, "attention.memory_layers must be a list of layer indices"),
        ({"attention": {"memory_layers": [3, -1]}}, "attention.memory_layers must be a list of layer indices"),
        ({"attention": {"memory_ngram": 0}}, "attention.memory_ngram must be an integer >= 1"),
        ({"attention": {"memory_ngram": [2, 2]}}, "attention.memory_ngram must be an integer >= 1 .* or a list"),
        ({"attention": {"memory_ngram": []}}, "attention.memory_ngram must be an integer >= 1"),
        ({"attention": {"memory_format": "int3"}}, "attention.memory_format must be one of auto, bfloat16, int8, int4"),
        ({"attention": {"memory_recall": "best"}}, "attention.memory_recall must be one of all, longest"),
        ({"attention": {"memory_bias": [0, 2]}}, r"attention.memory_bias must be a number \(the bias of every order of "
                                                  r"2 or more tokens\) or a list of 4 numbers"),
        ({"attention": {"memory_bias": "high"}}, "attention.memory_bias must be a number"),
        ({"attention": {"sink_distance": 32}}, r"attention.sink_distance must be null .* >= attention.window_size "
                                                 r"\(60\), got 32"),
        ({"attention": {"sink_distance": "far"}}, "attention.sink_distance must be null"),
        ({"baselines": {"w": {"method": "window", "attention": {"sink_distance": -1}}}}, "sink_distance must be null"),
        ({"data": {"recall_fraction": 1.5}}, "data.recall_fraction must be a fraction"),
        ({"finetune": {"answer_weight": -1}}, "finetune.answer_weight must be >= 0"),
        ({"attention": {"memory_buckets": 2, "memory_ngram": [1, 2, 3]}}, "memory_buckets .2. must be at least the "
                                                                           "number of memory orders .3"),
        ({"attention": {"window_size": "wide"}}, "attention.window_size' must be a int"),
        ({"baselines": {"w": {"method": "window", "attention": {"sink_tokens": -2}}}}, "sink_tokens must be >= 0"),
        ({"baselines": {"w": {"attention": {}}}}, "baselines.w must be a mapping with a 'method'"),
        ({"dtype": "float8"}, "dtype must be float32"),
        ({"finetune": {"lr": 0}}, "lr and batch_size must be positive"),
    ],
)
def test_bad_settings_are_errors_naming_the_key_before_anything_loads(user, message):
    with pytest.raises(LinearizeError, match=message):
        build_config(user)


def test_shipped_default_config_is_the_built_in_default():
    shipped = load_config(shipped_configs()["default"])
    assert shipped.to_dict() == build_config({}).to_dict()
    assert shipped.method == RunConfig.method == "hybrid"
    window_sinks = {"method": "window", "attention": {"window_size": 64, "sink_tokens": 4, "sink_distance": 1024}}
    assert shipped.baselines == {"window+sinks": window_sinks}
    assert shipped.attention.sink_distance == shipped.data.seq_len == 1024


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_resolves(name):
    load_config(shipped_configs()[name])


def test_config_file_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": "liger", "attention": {"gate": "hgrn2"}}))
    config = load_config(path, ["finetune.tokens=2048"])
    assert (config.method, config.attention.gate, config.finetune.tokens) == ("liger", "hgrn2", 2048)
    with pytest.raises(LinearizeError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_printed_full_config_loads_back_unchanged(method, tmp_path):
    config = build_config({"method": method})
    config.save(tmp_path / "full.yaml")
    assert load_config(tmp_path / "full.yaml").to_dict() == config.to_dict()


def test_sink_distance_seq_len_resolves_to_the_runs_block_length():
    """`sink_distance: seq_len` is data.seq_len (the window size if larger), for the student and a baseline; a
    number stays as given; the layers refuse it unresolved (outside a run config)."""
    config = build_config({"data": {"seq_len": 512}, "attention": {"sink_distance": "seq_len"},
                           "baselines": {"w": {"method": "window", "attention": {"sink_distance": "seq_len"}}}})
    assert config.attention.sink_distance == 512 and config.baselines["w"]["attention"]["sink_distance"] == 512
    assert build_config({"attention": {"sink_distance": 2048}}).attention.sink_distance == 2048
    assert build_config({"data": {"seq_len": 32}}).attention.sink_distance == 60  # never inside the window
    with pytest.raises(LinearizeError, match="sink_distance: seq_len means the run's data.seq_len"):
        linearize(make_tiny_model("llama"), "window", {"sink_tokens": 2, "sink_distance": "seq_len"})


def test_measured_memory_layers_resolve_per_teacher():
    """`memory_layers: measured` is the embedded teacher's measured list, else the upper half; an explicit
    list stays as given."""
    from linearize.teacher.loading import EMBEDDED_TEACHERS

    assert build_config({}).attention.memory_layers == list(EMBEDDED_TEACHERS["smollm2-135m-instruct"].memory_layers)
    assert build_config({"model": "gemma3-270m"}).attention.memory_layers == "upper-half"
    assert build_config({"model": "some/hub-model"}).attention.memory_layers == "upper-half"
    assert build_config({"attention": {"memory_layers": [1, 2]}}).attention.memory_layers == [1, 2]


def test_the_defaults_that_follow_the_number_of_processes():
    """finetune.batch_size null = one sequence per process; transfer.layers_per_block null = at least as many
    blocks as processes, as even as the layers allow; a number set stays as set."""
    from linearize.config import for_processes
    from linearize.train.transfer import block_ranges

    config = build_config({})
    assert config.finetune.batch_size is None and config.transfer.layers_per_block is None
    one = for_processes(config, 1, 30)
    assert one.finetune.batch_size == 1 and one.transfer.layers_per_block is None  # one block of all
    for processes, size in ((2, 15), (4, 8), (7, 4), (30, 1), (64, 1)):
        resolved = for_processes(config, processes, 30)
        assert resolved.finetune.batch_size == processes and resolved.transfer.layers_per_block == size
        assert len(block_ranges(30, size)) >= min(processes, 30)
    chosen = build_config({"finetune": {"batch_size": 3}, "transfer": {"layers_per_block": 10}})
    resolved = for_processes(chosen, 2, 30)
    assert resolved.finetune.batch_size == 3 and resolved.transfer.layers_per_block == 10


def test_the_command_line_keeps_freed_memory_for_the_next_tensors_on_glibc():
    """mallopt takes every setting (a value out of its range is refused: False), so CPU runs stop faulting in
    the same activation-sized blocks at every layer."""
    import os

    from linearize.allocator import keep_freed_memory

    glibc = os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert keep_freed_memory() is glibc
