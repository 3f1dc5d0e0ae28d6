"""algo.rollout_is: truncated importance weights of the engines' log-probs (the behaviour policy) against the
trainer's old log-probs, on the on-policy tokens' loss only (algo/rollout_correction.py, algo/loss.py), the
driver's behaviour tensor and `rollout_corr/*` metrics (train/step_parts.py), and the settings' rules."""

import math

import pytest
import torch

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo import microbatch_policy_loss
from luffy_megatron.algo.composition import assemble_responses
from luffy_megatron.algo.options import loss_options
from luffy_megatron.algo.rollout_correction import (
    behaviour_log_probs,
    loss_weights,
    on_policy_mask,
    rollout_correction_metrics,
    rollout_is_weights,
)
from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.config.algo_section import AlgoConfig
from luffy_megatron.rollout.engine import Generation
from luffy_megatron.rollout.integrity import record_generations

EOS, PAD, NAN = 2, 0, float("nan")
CAP = 2.0

# Four rows of width 5: row 0 all generated; row 1 a two-token demonstration prefix, then generated; row 2 a
# full demonstration (no engine); row 3 generated, then padding.
PREFIXES = [[], [5, 6], [7, 8, 9, 10, EOS], []]
GENERATIONS = [
    Generation([11, 12, 13, 14, 15], [-1.0, -0.2, -3.0, -0.5, -2.0], (0,), engine=0),
    Generation([16, 17, EOS], [-0.4, -1.5, -0.1], (0,), engine=1),
    None,
    Generation([18, EOS], [-2.0, -0.3], (0,), engine=0),
]
OLD = torch.tensor(
    [
        [-0.5, -0.3, -2.0, -0.5, -4.0],  # old - engine: 0.5, -0.1, 1.0 (e > 2: cut), 0.0, -2.0
        [-9.0, -9.0, -0.6, -0.5, -0.1],  # prefix tokens (any value); then -0.2, 1.0 (cut), 0.0
        [-1.0, -1.0, -1.0, -1.0, -1.0],  # demonstration
        [-1.5, -0.7, 0.0, 0.0, 0.0],  # 0.5, -0.4; then padding
    ]
)


def _rows():
    responses, prefix_mask, response_mask = assemble_responses(
        prefixes=PREFIXES,
        generations=[g.token_ids if g else [] for g in GENERATIONS],
        eos_token_id=EOS,
        pad_token_id=PAD,
        response_length=5,
    )
    record = record_generations(prefixes=PREFIXES, generations=GENERATIONS, response_mask_BT=response_mask)
    behaviour = behaviour_log_probs(record.engine_log_prob_BT, record.generated_mask_BT)
    return responses, prefix_mask, response_mask, record, behaviour


def test_behaviour_log_probs_are_the_engines_on_generated_tokens_and_nan_elsewhere():
    _, prefix_mask, response_mask, _, behaviour = _rows()
    expected = torch.tensor(
        [
            [-1.0, -0.2, -3.0, -0.5, -2.0],
            [NAN, NAN, -0.4, -1.5, -0.1],
            [NAN] * 5,
            [-2.0, -0.3, NAN, NAN, NAN],
        ]
    )
    assert torch.equal(torch.isnan(behaviour), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(behaviour), torch.nan_to_num(expected))
    assert torch.isnan(behaviour[prefix_mask]).all()  # demonstration tokens have no behaviour log-prob


def test_token_tis_weights_equal_the_formula_and_leave_the_rest_at_one():
    _, prefix_mask, response_mask, _, behaviour = _rows()
    w = rollout_is_weights(OLD, behaviour, on_policy_mask(response_mask, prefix_mask), mode="token_tis", cap=CAP)
    e = math.exp
    expected = torch.tensor(
        [
            [e(0.5), e(-0.1), CAP, 1.0, e(-2.0)],
            [1.0, 1.0, e(-0.2), CAP, 1.0],  # prefix tokens: 1 whatever their log-probs
            [1.0] * 5,  # a full demonstration: no engine log-prob, weight 1
            [e(0.5), e(-0.4), 1.0, 1.0, 1.0],  # padding: 1 (masked in the loss anyway)
        ]
    )
    assert torch.allclose(w, expected, rtol=1e-6, atol=0)
    assert not w.requires_grad and torch.isfinite(w).all()


def test_seq_tis_is_one_truncated_weight_per_row_on_its_generated_tokens():
    _, prefix_mask, response_mask, _, behaviour = _rows()
    w = rollout_is_weights(OLD, behaviour, on_policy_mask(response_mask, prefix_mask), mode="seq_tis", cap=CAP)
    row0 = min(math.exp(0.5 - 0.1 + 1.0 + 0.0 - 2.0), CAP)  # exp(-0.6): under the cap
    row1 = min(math.exp(-0.2 + 1.0 + 0.0), CAP)  # exp(0.8) > 2: truncated
    row3 = min(math.exp(0.5 - 0.4), CAP)
    expected = torch.tensor([[row0] * 5, [1.0, 1.0, row1, row1, row1], [1.0] * 5, [row3, row3, 1.0, 1.0, 1.0]])
    assert row1 == CAP
    assert torch.allclose(w, expected, rtol=1e-6, atol=0)


def test_a_huge_log_ratio_gives_the_cap_not_inf():
    old = torch.tensor([[0.0, 0.0]])
    behaviour = torch.tensor([[-500.0, -500.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for mode in ("token_tis", "seq_tis"):
        assert torch.equal(rollout_is_weights(old, behaviour, mask, mode=mode, cap=CAP), torch.full((1, 2), CAP))


def test_loss_weights_are_none_without_the_setting_and_refuse_a_missing_behaviour():
    _, prefix_mask, response_mask, _, behaviour = _rows()
    kw = dict(old_log_prob_BT=OLD, response_mask_BT=response_mask, prefix_mask_BT=prefix_mask)
    assert loss_weights("none", CAP, behaviour_log_prob_BT=behaviour, **kw) is None
    with pytest.raises(ValueError, match="rollout_is=token_tis"):
        loss_weights("token_tis", CAP, behaviour_log_prob_BT=None, **kw)
    with pytest.raises(ValueError, match="one of: token_tis, seq_tis"):
        loss_weights("tis", CAP, behaviour_log_prob_BT=behaviour, **kw)


# ----- the loss


def _loss_inputs(seed=0):
    """A mixed micro-batch: the rows above, with log-probs near the old ones and one advantage per row."""
    _, prefix_mask, response_mask, _, behaviour = _rows()
    g = torch.Generator().manual_seed(seed)
    lp = (OLD + 0.1 * torch.randn(OLD.shape, generator=g)).clamp(max=-0.01) * response_mask
    adv = torch.tensor([[1.0], [-0.5], [0.8], [-1.2]]).expand(4, 5).clone()
    return lp, adv, prefix_mask, response_mask, behaviour


def _loss_and_grad(lp, adv, prefix_mask, response_mask, weights, **opts):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = microbatch_policy_loss(
        log_prob_BT=lp,
        entropy_BT=torch.ones_like(lp),
        old_log_prob_BT=OLD * response_mask,
        advantages_BT=adv,
        response_mask_BT=response_mask,
        prefix_mask_BT=prefix_mask,
        max_response_length=5,
        **{**loss_options(AlgoConfig()), **opts},
        **({} if weights is None else {"rollout_is_weights_BT": weights}),
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics


def test_rollout_is_none_leaves_the_loss_and_gradient_bit_identical():
    lp, adv, prefix_mask, response_mask, behaviour = _loss_inputs()
    today = _loss_and_grad(lp, adv, prefix_mask, response_mask, None)
    weights = loss_weights(
        "none",
        CAP,
        old_log_prob_BT=OLD,
        behaviour_log_prob_BT=behaviour,
        response_mask_BT=response_mask,
        prefix_mask_BT=prefix_mask,
    )
    none = _loss_and_grad(lp, adv, prefix_mask, response_mask, weights)
    assert torch.equal(today[0], none[0]) and torch.equal(today[1], none[1])
    # token_tis with behaviour == old: every weight is exactly 1, so the same bits again
    same = loss_weights(
        "token_tis",
        CAP,
        old_log_prob_BT=OLD,
        behaviour_log_prob_BT=torch.where(torch.isnan(behaviour), NAN, OLD),
        response_mask_BT=response_mask,
        prefix_mask_BT=prefix_mask,
    )
    assert torch.equal(same, torch.ones_like(same))
    ones = _loss_and_grad(lp, adv, prefix_mask, response_mask, same)
    assert torch.equal(today[0], ones[0]) and torch.equal(today[1], ones[1])


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis"])
def test_weights_multiply_the_on_policy_gradient_only(mode):
    """LUFFY's loss (constant_length over 5 tokens, no clip): the gradient on an on-policy token is
    -A * exp(lp - old) * w / 5; on a demonstration token it is the policy-shaping gradient, unweighted."""
    lp, adv, prefix_mask, response_mask, behaviour = _loss_inputs()
    on = on_policy_mask(response_mask, prefix_mask)
    w = rollout_is_weights(OLD, behaviour, on, mode=mode, cap=CAP)
    assert not torch.allclose(w[on], torch.ones_like(w[on]))  # the weights do something here
    _, plain_grad, _ = _loss_and_grad(lp, adv, prefix_mask, response_mask, None)
    _, grad, metrics = _loss_and_grad(lp, adv, prefix_mask, response_mask, w)
    by_hand = -adv * torch.exp(lp - OLD * response_mask) * w / 5
    assert torch.allclose(grad[on], by_hand[on], rtol=1e-5, atol=1e-7)
    off = prefix_mask & response_mask.bool()
    assert off.any() and torch.equal(grad[off], plain_grad[off])
    assert torch.equal(grad[~response_mask.bool()], torch.zeros_like(grad[~response_mask.bool()]))
    on_losses = -adv * torch.exp(lp - OLD * response_mask) * w
    assert metrics["on_pg_loss"].item() == pytest.approx(on_losses[on].mean().item(), rel=1e-5)


def test_weights_reach_the_plain_ppo_loss_too():
    """algo.use_off_policy_loss=false (plain GRPO on every row): the same weight on each token's loss."""
    lp, adv, prefix_mask, response_mask, behaviour = _loss_inputs()
    w = rollout_is_weights(OLD, behaviour, on_policy_mask(response_mask, prefix_mask), mode="token_tis", cap=CAP)
    _, grad, _ = _loss_and_grad(lp, adv, prefix_mask, response_mask, w, use_off_policy_loss=False)
    by_hand = -adv * torch.exp(lp - OLD * response_mask) * w * response_mask / 5
    assert torch.allclose(grad, by_hand, rtol=1e-5, atol=1e-7)


# ----- the metrics and the driver


def test_metrics_are_over_the_corrected_tokens():
    _, prefix_mask, response_mask, _, behaviour = _rows()
    on = on_policy_mask(response_mask, prefix_mask)
    e = math.exp
    token = [e(0.5), e(-0.1), CAP, 1.0, e(-2.0), e(-0.2), CAP, 1.0, e(0.5), e(-0.4)]  # 10 generated tokens
    got = rollout_correction_metrics(OLD, behaviour, on, mode="token_tis", cap=CAP)
    assert got["rollout_corr/weight_mean"] == pytest.approx(sum(token) / 10, rel=1e-6)
    assert got["rollout_corr/weight_max"] == pytest.approx(CAP)
    assert got["rollout_corr/truncated_share"] == pytest.approx(2 / 10)
    seq = rollout_correction_metrics(OLD, behaviour, on, mode="seq_tis", cap=CAP)
    rows = [e(-0.6)] * 5 + [CAP] * 3 + [e(0.1)] * 2
    assert seq["rollout_corr/weight_mean"] == pytest.approx(sum(rows) / 10, rel=1e-6)
    assert seq["rollout_corr/weight_max"] == pytest.approx(CAP)
    assert seq["rollout_corr/truncated_share"] == pytest.approx(3 / 10)  # row 1's three tokens
    nothing = torch.full_like(behaviour, NAN)
    assert rollout_correction_metrics(OLD, nothing, on, mode="token_tis", cap=CAP) == {}


def _batch(responses, response_mask, prefix_mask) -> RolloutBatch:
    return RolloutBatch(
        prompts=[[1]] * 4,
        responses=responses,
        response_mask=response_mask,
        prefix_mask=prefix_mask,
        group_ids=[0] * 4,
    )


def test_the_driver_passes_the_engine_log_probs_and_logs_the_metrics():
    from luffy_megatron.train.step_parts import rollout_correction

    responses, prefix_mask, response_mask, record, behaviour = _rows()
    batch = _batch(responses, response_mask, prefix_mask)
    off = load_config(None)
    assert rollout_correction(off, batch, record, OLD) == (None, {})
    cfg = load_config(None, ["algo.rollout_is=seq_tis", "algo.rollout_is_cap=2.0"])
    sent, metrics = rollout_correction(cfg, batch, record, OLD)
    assert torch.equal(torch.isnan(sent), torch.isnan(behaviour))
    assert torch.equal(torch.nan_to_num(sent), torch.nan_to_num(behaviour))
    on = on_policy_mask(response_mask, prefix_mask)
    assert metrics == rollout_correction_metrics(OLD, behaviour, on, mode="seq_tis", cap=2.0)


def test_the_actor_refuses_an_update_without_behaviour_log_probs():
    responses, prefix_mask, response_mask, _, behaviour = _rows()
    batch = _batch(responses, response_mask, prefix_mask)
    batch.check_behaviour_log_probs(None, mode="none")
    batch.check_behaviour_log_probs(behaviour, mode="token_tis")
    with pytest.raises(ValueError, match="algo.rollout_is=token_tis"):
        batch.check_behaviour_log_probs(None, mode="token_tis")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        batch.check_behaviour_log_probs(behaviour[:, :3], mode="seq_tis")


# ----- settings


@pytest.mark.parametrize("cap", ["1.0", "0.5", "-1"])
def test_the_cap_must_exceed_one(cap):
    with pytest.raises(ConfigError, match="algo.rollout_is_cap"):
        load_config(None, ["algo.rollout_is=token_tis", f"algo.rollout_is_cap={cap}"])


def test_rollout_is_settings():
    assert load_config(None).algo.rollout_is == "auto"
    assert load_config(None, ["algo.rollout_is=seq_tis", "algo.rollout_is_cap=5"]).algo.rollout_is_cap == 5.0
    with pytest.raises(ConfigError, match="algo.rollout_is"):
        load_config(None, ["algo.rollout_is=tis"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algo.mode=sft", "rollout.n_off_policy=-1", "algo.rollout_is=token_tis"])
    assert "algo.rollout_is=token_tis" in str(info.value) and "algo.mode=sft" in str(info.value)


@pytest.mark.parametrize(
    "settings, mode",
    [
        ([], "none"),  # the synchronous loop: upstream's loss
        (["trainer.overlap=one_step"], "token_tis"),  # every generated row one update old
        (["trainer.overlap=one_step", "algo.rollout_is=none"], "none"),
        (["algo.rollout_is=seq_tis"], "seq_tis"),
        (["trainer.overlap=one_step", "algo.rollout_is=seq_tis"], "seq_tis"),
        (["algo.mode=sft", "rollout.n_off_policy=-1"], "none"),  # auto is accepted where nothing is generated
    ],
)
def test_auto_resolves_against_the_overlap(settings, mode):
    from luffy_megatron.algo.options import rollout_is_options

    cfg = load_config(None, settings)
    assert rollout_is_options(cfg.algo, cfg.trainer.overlap) == {"mode": mode, "cap": cfg.algo.rollout_is_cap}
