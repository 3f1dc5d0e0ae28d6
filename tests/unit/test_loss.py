"""Behaviour of the shaped loss beyond the reference vectors: gradient shape of policy shaping,
aggregation modes, robustness, and the advantage rules of mixed groups."""

import pytest
import torch

from luffy_megatron.algo import aggregate_token_losses, compute_advantages, microbatch_policy_loss, mixed_policy_loss


def _batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    return dict(
        log_prob_BT=lp.clone().requires_grad_(True),
        old_log_prob_BT=lp.detach() + 0.05 * torch.randn(B, T, generator=g),
        advantages_BT=torch.randn(B, 1, generator=g).expand(B, T).clone(),
        response_mask_BT=torch.ones(B, T),
        prefix_mask_BT=torch.zeros(B, T, dtype=torch.bool),
    )


def test_off_policy_gradient_is_policy_shaping_weight():
    """d/dlogp of -A * p/(p+0.1) is -A * 0.1 p/(p+0.1)^2: largest at p = 0.1 (0.25 per d logp, i.e.
    2.5 per dp), 0.1/1.21 ~ 0.083 at p = 1, vanishing as p -> 0."""
    p = torch.tensor([[0.001, 0.1, 0.5, 0.999]])
    lp = p.log().requires_grad_(True)
    out = mixed_policy_loss(
        log_prob_BT=lp,
        old_log_prob_BT=lp.detach(),
        advantages_BT=torch.ones(1, 4),
        response_mask_BT=torch.ones(1, 4),
        prefix_mask_BT=torch.ones(1, 4, dtype=torch.bool),
        max_response_length=1,
    )
    out["pg_loss"].backward()
    expected = -0.1 * p / (p + 0.1) ** 2
    assert torch.allclose(lp.grad, expected, rtol=1e-5)
    assert lp.grad[0, 1].item() == pytest.approx(-0.25, rel=1e-5)
    assert lp.grad[0, 3].item() == pytest.approx(-0.1 * 0.999 / 1.099**2, rel=1e-5)
    assert abs(lp.grad[0, 0].item()) < 0.01


def test_on_policy_gradient_is_ratio_without_clip():
    b = _batch()
    out = mixed_policy_loss(**b, max_response_length=1, loss_remove_clip=True)
    out["pg_loss"].backward()
    ratio = torch.exp(b["log_prob_BT"].detach() - b["old_log_prob_BT"])
    assert torch.allclose(b["log_prob_BT"].grad, -b["advantages_BT"] * ratio, rtol=1e-5)


def test_clip_zeroes_gradient_outside_trust_region():
    b = _batch()
    b["old_log_prob_BT"] = b["log_prob_BT"].detach() - 1.0  # ratio e ~ 2.7 > 1.2
    b["advantages_BT"] = torch.ones_like(b["advantages_BT"])
    out = mixed_policy_loss(**b, max_response_length=1, loss_remove_clip=False)
    out["pg_loss"].backward()
    assert torch.count_nonzero(b["log_prob_BT"].grad) == 0
    assert out["on_pg_clipfrac"].item() == 1.0


def test_constant_length_denominator_ignores_batch_width_and_counts():
    losses = torch.ones(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    assert aggregate_token_losses(
        losses, mask, mode="constant_length", max_response_length=8192
    ).item() == pytest.approx(4 / 8192)
    assert aggregate_token_losses(losses, mask, mode="token_mean", max_response_length=8192).item() == pytest.approx(
        1.0
    )
    per_row = torch.tensor([[1.0, 3.0, 0, 0, 0], [5.0, 0, 0, 0, 0]])
    assert aggregate_token_losses(per_row, mask, mode="seq_mean", max_response_length=1).item() == pytest.approx(
        (4 / 3 + 5) / 2
    )
    with pytest.raises(ValueError, match="loss_agg_mode='mean'"):
        aggregate_token_losses(losses, mask, mode="mean", max_response_length=1)


def test_packing_invariance_of_constant_length_loss():
    """Summing the loss of two micro-batches equals the loss of their union: upstream's semantics."""
    b = _batch(B=4)
    kw = dict(max_response_length=12, entropy_coeff=0.0)
    ent = torch.zeros(4, 6)
    whole, _ = microbatch_policy_loss(**b, entropy_BT=ent, **kw)
    halves = 0
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in b.items()}
        loss, _ = microbatch_policy_loss(**part, entropy_BT=ent[rows], **kw)
        halves = halves + loss
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)


def test_inf_in_unused_branch_does_not_poison_the_loss():
    b = _batch(B=1, T=2)
    b["prefix_mask_BT"] = torch.tensor([[True, False]])
    b["old_log_prob_BT"] = torch.tensor(
        [[-200.0, b["log_prob_BT"][0, 1].item()]]
    )  # on-policy ratio overflows on the demo token
    out = mixed_policy_loss(**b, max_response_length=2)
    assert torch.isfinite(out["pg_loss"])


def test_invalid_reshape_names_the_option():
    with pytest.raises(ValueError, match="off_policy_reshape='p_div_p_0.2'"):
        mixed_policy_loss(**_batch(), max_response_length=1, off_policy_reshape="p_div_p_0.2")
    with pytest.raises(ValueError, match="on_policy_reshape='bogus'"):
        mixed_policy_loss(**_batch(), max_response_length=1, on_policy_reshape="bogus")


def test_sft_variant_with_no_demonstration_rows_is_finite():
    b = _batch()
    loss, metrics = microbatch_policy_loss(
        **b, entropy_BT=torch.zeros(4, 6), max_response_length=6, use_off_policy_loss=False, use_sft_multitask_loss=True
    )
    assert torch.isfinite(loss) and metrics["sft_loss"].item() == 0.0


# ----------------------------------------------------------------------------- advantages


def _rewards(scores, T=3):
    r = torch.zeros(len(scores), T)
    r[:, -1] = torch.tensor(scores, dtype=torch.float32)
    return r


def test_demonstration_row_is_inside_the_group():
    """Off-policy correct, all 7 on-policy wrong: A_off = +7/8, A_on = -1/8 (section 2 worked example)."""
    prefix = torch.zeros(8, 3, dtype=torch.bool)
    prefix[0] = True
    adv = compute_advantages(
        token_level_rewards_BT=_rewards([1] + [0] * 7),
        response_mask_BT=torch.ones(8, 3),
        prefix_mask_BT=prefix,
        group_ids=["q"] * 8,
    )
    assert adv[0, 0].item() == pytest.approx(7 / 8)
    assert adv[1:, 0].tolist() == pytest.approx([-1 / 8] * 7)


def test_groups_are_found_by_id_not_position():
    ids = ["b", "a", "b", "a"]
    adv = compute_advantages(
        token_level_rewards_BT=_rewards([1, 0, 0, 1]),
        response_mask_BT=torch.ones(4, 3),
        prefix_mask_BT=torch.zeros(4, 3, dtype=torch.bool),
        group_ids=ids,
    )
    assert adv[:, 0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_grpo_split_uses_on_policy_baseline_and_needs_one():
    prefix = torch.zeros(4, 3, dtype=torch.bool)
    prefix[0] = True
    adv = compute_advantages(
        token_level_rewards_BT=_rewards([1, 1, 0, 0]),
        response_mask_BT=torch.ones(4, 3),
        prefix_mask_BT=prefix,
        group_ids=[0] * 4,
        estimator="grpo_split",
    )
    assert adv[:, 0].tolist() == pytest.approx([2 / 3, 2 / 3, -1 / 3, -1 / 3])
    with pytest.raises(ValueError, match="group 0 has no on-policy row"):
        compute_advantages(
            token_level_rewards_BT=_rewards([1]),
            response_mask_BT=torch.ones(1, 3),
            prefix_mask_BT=torch.ones(1, 3, dtype=torch.bool),
            group_ids=[0],
            estimator="grpo_split",
        )


def test_advantages_are_masked_and_std_optional():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = compute_advantages(
        token_level_rewards_BT=_rewards([1, 0]),
        response_mask_BT=mask,
        prefix_mask_BT=torch.zeros(2, 3, dtype=torch.bool),
        group_ids=[0, 0],
        use_std=True,
    )
    std = torch.tensor([1.0, 0.0]).std().item()
    a = 0.5 / (std + 1e-6)
    assert torch.allclose(adv, torch.tensor([[a, a, 0.0], [-a, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="adv_estimator='rloo'"):
        compute_advantages(
            token_level_rewards_BT=_rewards([1]),
            response_mask_BT=torch.ones(1, 3),
            prefix_mask_BT=torch.zeros(1, 3, dtype=torch.bool),
            group_ids=[0],
            estimator="rloo",
        )
