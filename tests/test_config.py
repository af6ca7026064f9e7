import json

import pytest

from llmcompress.config import CalibConfig, CompressConfig, ModuleOverride, PruneConfig, QuantFormat
from llmcompress.errors import ConfigError


def test_defaults_resolve_per_format():
    assert QuantFormat() == QuantFormat(kind="int", bits=4, group_size=128, symmetric=False)
    assert QuantFormat(kind="nvfp4").group_size == 16 and QuantFormat(kind="nvfp4").symmetric
    assert QuantFormat(kind="mxfp4").group_size == 32


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"bits": 1}, "bits", "1"),
        ({"bits": 9}, "bits", "9"),
        ({"bits": 3, "kind": "nvfp4"}, "bits", "3"),
        ({"group_size": 100}, "group_size", "100"),
        ({"group_size": 0}, "group_size", "0"),
        ({"kind": "nvfp4", "group_size": 32}, "group_size", "32"),
        ({"kind": "mxfp4", "symmetric": False}, "symmetric", "False"),
        ({"kind": "int5"}, "kind", "int5"),
    ],
)
def test_bad_format_names_field_value_and_allowed(kwargs, field, value):
    with pytest.raises(ConfigError) as err:
        QuantFormat(**kwargs)
    message = str(err.value)
    assert f"QuantFormat.{field}" in message and value in message and ":" in message


@pytest.mark.parametrize("kwargs", [{"nsamples": 0}, {"seqlen": 4}, {"batch_size": 0}, {"source": " "}, {"nsamples": True}])
def test_bad_calibration_is_refused(kwargs):
    with pytest.raises(ConfigError, match="CalibConfig"):
        CalibConfig(**kwargs)


def test_method_and_override_validation():
    with pytest.raises(ConfigError, match="CompressConfig.method='sparse'"):
        CompressConfig(method="sparse")
    with pytest.raises(ConfigError, match="pattern"):
        ModuleOverride(pattern="(")
    with pytest.raises(ConfigError, match="QuantFormat.bits=12"):
        CompressConfig(overrides=(ModuleOverride(pattern="down", bits=12),))


def test_overrides_first_match_wins_and_skip():
    config = CompressConfig(
        quant=QuantFormat(bits=4, group_size=64),
        overrides=(ModuleOverride(pattern=r"layers\.0\.", skip=True), ModuleOverride(pattern="down_proj", bits=8),
                   ModuleOverride(pattern="up_proj", kind="nvfp4")),
    )
    assert config.format_for("model.layers.0.mlp.down_proj") is None
    assert config.format_for("model.layers.1.mlp.down_proj") == QuantFormat(bits=8, group_size=64)
    assert config.format_for("model.layers.1.mlp.up_proj") == QuantFormat(kind="nvfp4")
    assert config.format_for("model.layers.1.self_attn.q_proj") == QuantFormat(bits=4, group_size=64)
    assert CompressConfig(quant=None, prune=PruneConfig(method="magnitude")).format_for("anything") is None


def test_json_round_trip_is_exact():
    config = CompressConfig(
        quant=QuantFormat(bits=3, group_size=-1, symmetric=True),
        calib=CalibConfig(source="notes.jsonl", nsamples=4, seqlen=64, seed=7),
        overrides=(ModuleOverride(pattern="q_proj", bits=8),),
        prune=PruneConfig(method="wanda", pattern="2:4"),
    )
    again = CompressConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["quant"]["bits"] == 3
    assert json.loads(config.to_json())["prune"] == {"method": "wanda", "pattern": "2:4", "sparsity": 0.5}
    assert CompressConfig.from_dict({**config.to_dict(), "quant": None}).quant is None


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="no field"):
        CompressConfig.from_dict({"quant": {"bitz": 4}})
