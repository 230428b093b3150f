"""config.dumps writes TOML through tomli_w: what it writes reads back to the same config, quoted keys included."""

import tomllib

import pytest

from gradcond import config


def test_dumps_round_trips_a_resolved_config_with_keys_that_need_quoting():
    cfg = config.resolve({
        "name": 'run "quoted" \\ name',
        "model": {"name": "mlp", "depth": 3, "odd key": 1.5, "dotted.key": True},
        "data": {"options": {"n-samples = 3": 7, "": "empty key"}},
        "train": {"epochs": 2},
        "callbacks": [{"name": "teleport", "at_epoch": [0, 1], "kind": "optimized"}, {"name": "stop_after", "epochs": 1}],
    })
    text = config.dumps(cfg)
    assert tomllib.loads(text) == cfg
    # the keys that are not bare TOML keys are written quoted, not as bare (which would not parse back)
    assert '"odd key" = 1.5' in text and '"dotted.key" = true' in text


def test_dumps_of_the_demo_config_reads_back_equal():
    cfg = config.resolve(config.DEMO)
    assert tomllib.loads(config.dumps(cfg)) == cfg


def test_parse_value_reads_toml_literals_and_keeps_bare_words():
    assert config.parse_value("0.1") == 0.1
    assert config.parse_value("[1, 2]") == [1, 2]
    assert config.parse_value("true") is True
    assert config.parse_value("tanh") == "tanh"


def test_dumps_refuses_values_toml_cannot_hold():
    with pytest.raises(TypeError):
        config.dumps({"name": None})
