"""Config: YAML + overrides, method defaults, errors that name the key."""

import pytest
import yaml

from linearize import LinearizeError
from linearize.cli import shipped_configs
from linearize.config import RunConfig, build_config, load_config, parse_overrides


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


def test_method_defaults_sit_between_base_defaults_and_the_user():
    liger = build_config({"method": "liger"})
    assert liger.attention.feature_map == "softmax" and not liger.transfer.enabled and liger.finetune.lr == 1e-3
    assert build_config({"method": "liger", "finetune": {"lr": 5e-4}}).finetune.lr == 5e-4
    assert build_config({}).attention.feature_map == "hedgehog"


def test_liger_rejects_options_of_other_methods():
    with pytest.raises(LinearizeError, match="attention.feature_map does not apply to method 'liger'"):
        build_config({"method": "liger", "attention": {"feature_map": "hedgehog"}})
    with pytest.raises(LinearizeError, match="transfer.enabled does not apply to method 'liger'"):
        build_config({"method": "liger", "transfer": {"enabled": True}})
    with pytest.raises(LinearizeError, match="attention.mix does not apply to method 'lolcats'"):
        build_config({"attention": {"mix": [0.7, 0.3]}})


def test_unknown_method_and_feature_map_are_clear_errors():
    with pytest.raises(LinearizeError, match="unknown method 'mamba'"):
        build_config({"method": "mamba"})
    with pytest.raises(LinearizeError, match="attention.gate must be one of"):
        build_config({"method": "liger", "attention": {"gate": "lstm"}})


def test_shipped_default_config_is_the_built_in_default():
    shipped = load_config(shipped_configs()["default"])
    assert shipped.to_dict() == RunConfig().to_dict()


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


@pytest.mark.parametrize("method", ["lolcats", "liger", "window"])
def test_a_printed_full_config_loads_back_unchanged(method, tmp_path):
    config = build_config({"method": method})
    config.save(tmp_path / "full.yaml")
    assert load_config(tmp_path / "full.yaml").to_dict() == config.to_dict()
