"""AlgoConfig.from_upstream: upstream LUFFY's flat algorithm options as the typed algo section."""

import pytest

from luffy_megatron.algo.options import loss_options
from luffy_megatron.config import AlgoConfig


def test_same_names_and_the_renamed_token_mean_flag():
    algo = AlgoConfig.from_upstream(
        {
            "grpo_use_std": True,
            "clip_ratio": 0.3,
            "loss_remove_token_mean": True,
            "off_policy_cliprange": 0.2,
            "off_policy_normalize": False,
        }
    )
    assert algo.grpo_use_std and algo.clip_ratio == 0.3 and algo.loss_agg_mode == "constant_length"
    assert AlgoConfig.from_upstream({"loss_remove_token_mean": False}).loss_agg_mode == "token_mean"
    assert AlgoConfig.from_upstream({}).loss_agg_mode == "token_mean"  # upstream's default
    assert AlgoConfig.from_upstream({"loss_agg_mode": "seq_mean"}).loss_agg_mode == "seq_mean"
    assert loss_options(AlgoConfig.from_upstream({"off_policy_max_clip": -1}))["off_policy_max_clip"] is None


def test_an_unknown_upstream_key_is_an_error():
    with pytest.raises(ValueError, match="no counterpart in the algo section: \\['clip_ratoi'\\]"):
        AlgoConfig.from_upstream({"clip_ratoi": 0.2})
