"""algo.mode=sft: supervised fine-tuning on the demonstrations with the trainer's own loop (the SFT baseline of
LUFFY's paper and the experiment's SFT arm, tools/experiment.py): the loss is the token-mean NLL of every row,
without the entropy bonus, and the configuration refuses rows without a demonstration."""

import pytest
import torch

from luffy_megatron.algo import microbatch_policy_loss
from luffy_megatron.algo.options import loss_options
from luffy_megatron.config import ConfigError, load_config


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(3, 5, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    return dict(
        log_prob_BT=lp.clone().requires_grad_(True),
        entropy_BT=torch.rand(3, 5, generator=g) + 1.0,
        old_log_prob_BT=lp.detach() - 0.3,
        advantages_BT=torch.randn(3, 5, generator=g),
        response_mask_BT=mask,
        prefix_mask_BT=mask.bool(),
        max_response_length=5,
    )


def test_sft_loss_is_token_mean_nll_and_ignores_advantages_and_entropy():
    b = _rows()
    loss, metrics = microbatch_policy_loss(**b, mode="sft", entropy_coeff=0.5)
    mask = b["response_mask_BT"]
    expected = -(b["log_prob_BT"].detach() * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["sft_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(b["log_prob_BT"].grad, -mask / mask.sum())  # d NLL / d log p: -1/N on each valid token

    other = _rows()
    other["advantages_BT"] = -other["advantages_BT"] * 10
    other["old_log_prob_BT"] = other["old_log_prob_BT"] + 1.0
    loss2, _ = microbatch_policy_loss(**other, mode="sft", entropy_coeff=0.5)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_rl_mode_is_unchanged_by_default():
    b = _rows()
    default, _ = microbatch_policy_loss(**b)
    explicit, _ = microbatch_policy_loss(**_rows(), mode="rl")
    assert default.item() == pytest.approx(explicit.item())
    sft, _ = microbatch_policy_loss(**_rows(), mode="sft")
    assert sft.item() != pytest.approx(default.item())


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode='dpo'"):
        microbatch_policy_loss(**_rows(), mode="dpo")


def test_config_mode_reaches_the_loss_options():
    cfg = load_config(None, ["algo.mode=sft", "rollout.n=1", "rollout.n_off_policy=-1"])
    assert loss_options(cfg.algo)["mode"] == "sft"
    assert loss_options(load_config(None, []).algo)["mode"] == "rl"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["algo.mode=sft"], ["algo.mode=sft", "rollout.n_off_policy=-1"]),  # default n_off_policy=1 of n=8
        (
            ["algo.mode=sft", "rollout.n=2", "rollout.n_off_policy=-1", "rollout.min_prefix_ratio=0.5"],
            ["rollout.min_prefix_ratio=1.0"],
        ),
        (
            [
                "algo.mode=sft",
                "rollout.n=1",
                "rollout.n_off_policy=-1",
                "algo.use_sft_multitask_loss=true",
                "algo.use_off_policy_loss=false",
                "algo.adv_estimator=grpo_split",
            ],
            ["algo.use_sft_multitask_loss=false"],
        ),
        (["algo.mode=imitation"], ["algo.mode"]),
    ],
)
def test_sft_mode_refuses_rows_without_a_whole_demonstration(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_sft_mode_with_every_row_a_demonstration_loads():
    load_config(None, ["algo.mode=sft", "rollout.n=1", "rollout.n_off_policy=-1"])
    load_config(None, ["algo.mode=sft", "rollout.n=4", "rollout.n_off_policy=4"])
