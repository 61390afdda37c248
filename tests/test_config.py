import pytest

import semu_fast as sf


@pytest.mark.parametrize("kwargs, match", [
    ({"gamma": 0}, "gamma must be a number in \\(0, 1\\]"),
    ({"gamma": 1.01}, "gamma"),
    ({"gamma": "0.9"}, "gamma"),
    ({"gamma": True}, "gamma"),
    ({"projection": "parallel"}, "projection must be one of 'orthogonal', 'official', 'none'"),
    ({"rank_rule": "max"}, "rank_rule must be one of"),
    ({"conv_rank": "min"}, "conv_rank must be one of"),
    ({"svd": "magic"}, "svd must be one of"),
    ({"norm_mode": "frozen"}, "norm_mode must be one of"),
    ({"target_modules": ["("]}, "not a valid regular expression"),
    ({"exclude_modules": [3]}, "regular expressions as strings"),
    ({"gamma_overrides": {"attn": 2.0}}, r"gamma_overrides\['attn'\]"),
    ({"gamma_overrides": ["attn"]}, "gamma_overrides must be a dict"),
    ({"seed": 1.5}, "seed must be an int"),
])
def test_config_rejects_bad_values_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sf.SEMUConfig(**kwargs)


def test_config_defaults_and_round_trip():
    config = sf.SEMUConfig(target_modules="fc", gamma_overrides={"attn": 1})
    assert config.gamma == 0.95 and config.projection == "orthogonal" and config.rank_rule == "at_least"
    assert config.target_modules == ("fc",) and config.gamma_overrides == {"attn": 1.0}
    assert sf.SEMUConfig.from_dict(config.to_dict()) == config
    assert config.gamma_for("block.attn.q") == 1.0 and config.gamma_for("block.mlp") == 0.95
