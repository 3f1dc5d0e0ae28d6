"""The KL reward penalty and its controllers (algo/kl.py) against upstream LUFFY's own code, reproduced
below from its source (ElliottYan/LUFFY, luffy/verl/verl/trainer/ppo/core_algos.py: AdaptiveKLController,
FixedKLController, kl_penalty; luffy/verl/verl/mix_src/mix_trainer.py: apply_kl_penalty; verl's
torch_functional.masked_mean)."""

from collections import defaultdict

import numpy as np
import pytest
import torch

from luffy_megatron.algo import compute_advantages
from luffy_megatron.algo.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    kl_penalty,
    make_kl_controller,
)

# ----- upstream, as written there (only the DataProto plumbing replaced by plain tensors) ---------------------


class UpstreamAdaptiveKLController:
    def __init__(self, init_kl_coef, target_kl, horizon):
        self.value = init_kl_coef
        self.target = target_kl
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        target = self.target
        proportional_error = np.clip(current_kl / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


class UpstreamFixedKLController:
    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass


def upstream_kl_penalty(logprob, ref_logprob, kl_penalty):
    if kl_penalty == "kl":
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty == "low_var_kl":
        kl = ref_logprob - logprob
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise NotImplementedError


def upstream_masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def upstream_apply_kl_penalty(batch: dict, kl_ctrl, kl_penalty="kl"):
    response_mask = batch["attention_mask"]
    token_level_scores = batch["token_level_scores"]
    batch_size = token_level_scores.shape[0]
    if "ref_log_prob" in batch:
        kld = upstream_kl_penalty(batch["old_log_probs"], batch["ref_log_prob"], kl_penalty=kl_penalty)
        kld = kld * response_mask
        beta = kl_ctrl.value
    else:
        beta = 0
        kld = torch.zeros_like(response_mask, dtype=torch.float32)
    token_level_rewards = token_level_scores - beta * kld
    current_kl = upstream_masked_mean(kld, mask=response_mask, axis=-1)
    current_kl = torch.mean(current_kl, dim=0).item()
    kl_ctrl.update(current_kl=current_kl, n_steps=batch_size)
    return token_level_rewards, {"critic/kl": current_kl, "critic/kl_coeff": beta}


def upstream_grpo_outcome_advantage(token_level_rewards, eos_mask, index, epsilon=1e-6, use_std=True):
    response_length = token_level_rewards.shape[-1]
    non_zero_mask = token_level_rewards != 0
    scores = (token_level_rewards * non_zero_mask).sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                id2mean[idx] = torch.mean(torch.tensor(id2score[idx]))
                id2std[idx] = torch.std(torch.tensor([id2score[idx]]))
        for i in range(bsz):
            if use_std:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1).tile([1, response_length]) * eos_mask
    return scores


# ----- a batch ---------------------------------------------------------------------------------------------------


def _batch(seed=0, rows=8, width=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    scores = torch.zeros(rows, width)
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    scores[torch.arange(rows), lengths - 1] = rewards
    old = -torch.rand(rows, width, generator=g) * 3 * mask
    ref = (old + 0.3 * torch.randn(rows, width, generator=g)) * mask
    return scores, mask, old, ref


def _ours(scores, mask, old, ref, ctrl, kind):
    rewards, metrics, current_kl = apply_kl_penalty(
        token_level_scores_BT=scores,
        response_mask_BT=mask,
        old_log_prob_BT=old,
        ref_log_prob_BT=ref,
        beta=ctrl.value,
        kind=kind,
    )
    ctrl.update(current_kl, n_steps=scores.shape[0])
    return rewards, metrics


# ----- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "low_var_kl"])
def test_reward_penalty_equals_upstream_apply_kl_penalty(kind):
    scores, mask, old, ref = _batch()
    up_rewards, up_metrics = upstream_apply_kl_penalty(
        {"attention_mask": mask, "token_level_scores": scores, "old_log_probs": old, "ref_log_prob": ref},
        UpstreamFixedKLController(0.05),
        kl_penalty=kind,
    )
    rewards, metrics = _ours(scores, mask, old, ref, FixedKLController(0.05), kind)
    assert torch.allclose(rewards, up_rewards, atol=1e-7, rtol=0)
    assert metrics["critic/kl"] == pytest.approx(up_metrics["critic/kl"], rel=1e-6, abs=1e-9)
    assert metrics["critic/kl_coeff"] == up_metrics["critic/kl_coeff"] == 0.05
    # the penalty is real: the rewards moved, by beta x KL on valid tokens only
    assert (rewards - scores).abs().max() > 1e-3
    assert torch.equal(rewards[mask == 0], scores[mask == 0])
    assert torch.allclose(kl_penalty(old, ref, kind), upstream_kl_penalty(old, ref, kind))


def test_adaptive_controller_follows_upstream_over_several_steps():
    up, ours = UpstreamAdaptiveKLController(0.2, 0.05, 100), AdaptiveKLController(0.2, 0.05, 100)
    values = []
    for step in range(6):
        scores, mask, old, ref = _batch(seed=step)
        ref = old + (ref - old) * (0.2 + 0.3 * step)  # KL below, then above the target: both clip ends
        up_rewards, up_m = upstream_apply_kl_penalty(
            {"attention_mask": mask, "token_level_scores": scores, "old_log_probs": old, "ref_log_prob": ref},
            up,
            "low_var_kl",
        )
        rewards, m = _ours(scores, mask, old, ref, ours, "low_var_kl")
        assert torch.allclose(rewards, up_rewards, atol=1e-7, rtol=0), step
        assert m["critic/kl_coeff"] == pytest.approx(up_m["critic/kl_coeff"], rel=1e-12), step
        assert ours.value == pytest.approx(float(up.value), rel=1e-12), step
        values.append(ours.value)
    assert values[0] < 0.2 and max(values) > min(values)  # it did move, both ways
    # hand check of one update: KL 0.1 against a target of 0.05 is clipped to +20%: x (1 + 0.2 * 8 / 100)
    c = AdaptiveKLController(0.5, 0.05, 100)
    c.update(0.1, n_steps=8)
    assert c.value == pytest.approx(0.5 * 1.016)
    c.update(0.05 * 0.9, n_steps=8)  # -10%, inside the clip
    assert c.value == pytest.approx(0.5 * 1.016 * (1 - 0.1 * 8 / 100))


def test_no_reference_means_beta_zero_and_zero_kl_as_upstream():
    scores, mask, old, _ = _batch()
    up_rewards, up_m = upstream_apply_kl_penalty(
        {"attention_mask": mask, "token_level_scores": scores}, UpstreamFixedKLController(0.0)
    )
    rewards, m, kl_now = apply_kl_penalty(
        token_level_scores_BT=scores, response_mask_BT=mask, old_log_prob_BT=old, ref_log_prob_BT=None, beta=0.3
    )
    assert torch.equal(rewards, up_rewards) and torch.equal(rewards, scores)
    assert m == up_m == {"critic/kl": 0.0, "critic/kl_coeff": 0}
    assert kl_now == 0.0
    ctrl = make_kl_controller(kl_ctrl_type="adaptive", kl_coef=0.3, target_kl=0.1, horizon=10, has_reference=False)
    assert isinstance(ctrl, FixedKLController) and ctrl.value == 0.0  # upstream: FixedKLController(0.) without ref


def test_penalised_rewards_change_the_advantages_as_upstream():
    """What the trainer feeds compute_advantages: the penalised rewards give upstream's GRPO advantages of
    the penalised rewards, and differ from those of the raw scores."""
    scores, mask, old, ref = _batch(rows=8)
    groups = [i // 4 for i in range(8)]
    rewards, _ = _ours(scores, mask, old, ref, FixedKLController(0.1), "kl")
    prefix = torch.zeros_like(mask, dtype=torch.bool)
    ours = compute_advantages(
        token_level_rewards_BT=rewards, response_mask_BT=mask, prefix_mask_BT=prefix, group_ids=groups
    )
    up = upstream_grpo_outcome_advantage(rewards, mask, groups, use_std=False)
    assert torch.allclose(ours, up, atol=1e-6)
    unpenalised = compute_advantages(
        token_level_rewards_BT=scores, response_mask_BT=mask, prefix_mask_BT=prefix, group_ids=groups
    )
    assert (ours - unpenalised).abs().max() > 1e-3


def test_controller_state_round_trips_and_a_resumed_run_continues_the_same():
    straight = AdaptiveKLController(0.2, 0.05, 50)
    for kl in (0.01, 0.2):
        straight.update(kl, n_steps=16)
    saved = straight.state_dict()
    assert saved == {"type": "adaptive", "value": straight.value}
    resumed = make_kl_controller(kl_ctrl_type="adaptive", kl_coef=0.2, target_kl=0.05, horizon=50, has_reference=True)
    resumed.load_state_dict(saved)
    for c in (straight, resumed):
        c.update(0.03, n_steps=16)
    assert resumed.value == straight.value and resumed.value != 0.2
    # a saved fixed (or penalty-free) state does not overwrite an adaptive controller's start, and a fixed
    # controller keeps the configured beta
    fresh = make_kl_controller(kl_ctrl_type="adaptive", kl_coef=0.2, target_kl=0.05, horizon=50, has_reference=True)
    fresh.load_state_dict({"type": "fixed", "value": 0.0})
    assert fresh.value == 0.2
    fixed = make_kl_controller(kl_ctrl_type="fixed", kl_coef=0.1, target_kl=0.05, horizon=50, has_reference=True)
    fixed.load_state_dict(saved)
    assert fixed.value == 0.1


def test_errors_name_the_settings():
    with pytest.raises(ValueError, match="algo.kl_penalty"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "full")
    with pytest.raises(ValueError, match="algo.kl_ctrl_horizon"):
        AdaptiveKLController(0.1, 0.1, 0)
    with pytest.raises(ValueError, match="algo.kl_ctrl_type"):
        make_kl_controller(kl_ctrl_type="pid", kl_coef=0.1, target_kl=0.1, horizon=1, has_reference=True)


def test_config_decides_the_reference_and_rejects_what_upstream_would_ignore():
    from luffy_megatron.algo.options import kl_controller_options, uses_reference
    from luffy_megatron.config import ConfigError, load_config

    def ref(*overrides):
        return uses_reference(load_config(None, list(overrides)).algo)

    assert not ref()  # LUFFY's main run: no reference model
    assert ref("algo.kl_ctrl_coef=0.01")
    assert ref("algo.use_kl_loss=true", "algo.kl_loss_coef=0.001")
    assert ref("algo.use_ref=true")  # critic/kl monitoring with beta 0
    adaptive = load_config(None, ["algo.kl_ctrl_type=adaptive", "algo.kl_ctrl_coef=0.2", "algo.kl_ctrl_horizon=7"])
    ctrl = make_kl_controller(**kl_controller_options(adaptive.algo))
    assert isinstance(ctrl, AdaptiveKLController) and (ctrl.value, ctrl.target, ctrl.horizon) == (0.2, 0.1, 7)
    for overrides, named in [
        (["algo.use_kl_loss=true", "algo.kl_loss_coef=0.1", "algo.kl_ctrl_coef=0.1"], "algo.kl_ctrl_coef"),
        (["algo.use_ref=false", "algo.kl_ctrl_coef=0.1"], "algo.use_ref"),
        (["algo.kl_ctrl_type=adaptive"], "algo.kl_ctrl_coef"),
        (["algo.kl_ctrl_type=adaptive", "algo.kl_ctrl_coef=0.1", "algo.kl_ctrl_horizon=0"], "algo.kl_ctrl_horizon"),
        (["algo.kl_ctrl_coef=-1"], "algo.kl_ctrl_coef"),
        (["algo.kl_ctrl.kl_coef=0.1"], "algo.kl_ctrl_coef"),  # upstream's spelling points to ours
    ]:
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            load_config(None, overrides)
