import pytest

from qcompile import PRESETS, MixedPrecision, QuantConfig, QuantSpec
from qcompile.config import resolve_config
from qcompile.errors import ConfigError


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(group_size=0),
                                    dict(group_size=1), dict(granularity="row"), dict(granularity="group"),
                                    dict(group_size=32, granularity="channel"), dict(observer="max"),
                                    dict(percentile=20.0), dict(grid="log"), dict(exponent=0.5),
                                    dict(grid="power", exponent=0.0), dict(grid="power", exponent=2.5),
                                    dict(grid="power", exponent="auto"), dict(grid="power", exponent=True)])
def test_spec_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        QuantSpec(**kwargs)


def test_power_grid_spec_defaults_to_the_search():
    assert QuantSpec(bits=4, grid="power").exponent == "search"
    assert QuantSpec(bits=4, grid="power", exponent=1).exponent == 1.0
    assert QuantSpec(bits=4).exponent is None
    with pytest.raises(ConfigError, match="uniform grid"):
        QuantConfig(activation=QuantSpec(bits=8, granularity="tensor", grid="power"))


@pytest.mark.parametrize("kwargs", [dict(target_bits=0), dict(target_bits="3"), dict(target_bits=3, candidates=()),
                                    dict(target_bits=3, candidates=(1, 4)), dict(target_bits=3, candidates=(4, 9)),
                                    dict(target_bits=3, score="random")])
def test_mixed_precision_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        MixedPrecision(**kwargs)


def test_mixed_precision_round_trips():
    config = QuantConfig(weight=QuantSpec(bits=4, group_size=64, grid="power", exponent="learned"), method="signround",
                         mixed_precision=MixedPrecision(target_bits=3.25, candidates=[8, 2, 4, 4], score="hessian"))
    assert config.mixed_precision.candidates == (2, 4, 8)
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict(config.to_dict()).fingerprint() == config.fingerprint()


def test_spec_infers_granularity_and_range():
    assert QuantSpec(bits=4, group_size=128).granularity == "group"
    assert QuantSpec(bits=4).granularity == "channel"
    assert QuantSpec(bits=4, symmetric=True).qrange == (-8, 7)
    assert QuantSpec(bits=4, symmetric=False).qrange == (0, 15)


def test_config_is_frozen_and_validated():
    config = QuantConfig()
    with pytest.raises(AttributeError):
        config.method = "gptq"
    with pytest.raises(TypeError):
        config.method_options["iters"] = 3
    with pytest.raises(ConfigError):
        QuantConfig(granularity="model")
    with pytest.raises(ConfigError):
        QuantConfig(activation=QuantSpec(bits=8))  # activations are per tensor
    with pytest.raises(ConfigError):
        QuantConfig(weight=QuantSpec(bits=4, observer="percentile"))
    with pytest.raises(ConfigError):
        QuantConfig(overrides={"lm_head": 8})


def test_overrides_first_match_wins():
    config = QuantConfig(weight=QuantSpec(bits=4), overrides={"lm_head": None, "*.attn.*": QuantSpec(bits=8)})
    assert config.weight_spec_for("lm_head") == (None, "lm_head")
    assert config.weight_spec_for("blocks.0.attn.qkv")[0].bits == 8
    assert config.weight_spec_for("blocks.0.mlp.fc1") == (config.weight, None)


def test_presets_and_round_trip():
    assert {"w8a16-rtn", "w4a16-rtn", "w4g128-rtn", "w8a8-rtn"} <= set(PRESETS)
    assert resolve_config("w4g128-rtn").weight.group_size == 128
    assert resolve_config("w8a8-rtn").activation.bits == 8
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("w3-magic")
    for config in PRESETS.values():
        assert QuantConfig.from_dict(config.to_dict()) == config
        assert QuantConfig.from_dict(config.to_dict()).fingerprint() == config.fingerprint()
