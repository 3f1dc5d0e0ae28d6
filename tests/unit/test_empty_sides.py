"""One micro-batch's loss when a side is empty: no demonstration (off-policy) tokens, no on-policy tokens, or no
valid tokens at all (upstream LUFFY issue #24: re-batching made micro-batches without off-policy rows, 0/0 = NaN).
The loss, its gradient and every metric stay finite, and an empty side's metrics are 0."""

import math

import pytest
import torch

from luffy_megatron.algo import microbatch_policy_loss

B, T = 4, 6

# name: options of microbatch_policy_loss (beyond the main LUFFY run's defaults)
CONFIGS = {
    "luffy_main": {},
    "token_mean": {"loss_agg_mode": "token_mean"},
    "seq_mean": {"loss_agg_mode": "seq_mean"},
    "clipped": {"loss_remove_clip": False, "off_policy_max_clip": 0.5, "off_policy_min_clip": 0.01},
    "all_max_clip": {"all_max_clip": 0.9},
    "kl_terms": {"use_kl_loss": True, "kl_loss_coef": 0.1, "use_ppo_kl_loss": True},
    "ppo": {"use_off_policy_loss": False, "loss_agg_mode": "token_mean", "loss_remove_clip": False},
    "sft_multitask": {"use_off_policy_loss": False, "use_sft_multitask_loss": True, "loss_agg_mode": "token_mean"},
    "sft_mode": {"mode": "sft"},
}


def _inputs(case: str) -> dict:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g) * 3
    mask = torch.ones(B, T)
    prefix = torch.zeros(B, T, dtype=torch.bool)
    prefix[0] = True  # row 0: a demonstration
    if case == "no_off":
        prefix[:] = False
    elif case == "no_on":
        prefix[:] = True
    elif case == "no_tokens":
        mask[:] = 0
        prefix[:] = False
    elif case == "no_rows":
        lp, mask, prefix = lp[:0], mask[:0], prefix[:0]
    rows = lp.shape[0]
    return dict(
        log_prob_BT=(lp * mask).requires_grad_(True),
        entropy_BT=(torch.rand(rows, T, generator=g) * mask).requires_grad_(True),
        old_log_prob_BT=(lp + 0.05 * torch.randn(rows, T, generator=g)) * mask,
        ref_log_prob_BT=(lp + 0.1 * torch.randn(rows, T, generator=g)) * mask,
        advantages_BT=torch.randn(rows, 1, generator=g).expand(rows, T) * mask,
        response_mask_BT=mask.long(),
        prefix_mask_BT=prefix,
        max_response_length=T,
    )


@pytest.mark.parametrize("case", ["no_off", "no_on", "no_tokens", "no_rows"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_loss_gradient_and_metrics_stay_finite(config, case):
    inputs = _inputs(case)
    loss, metrics = microbatch_policy_loss(**inputs, **CONFIGS[config])
    bad = {k: v.item() for k, v in metrics.items() if not math.isfinite(v.item())}
    assert not bad, bad
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("log_prob_BT", "entropy_BT"):
        grad = inputs[name].grad
        assert grad is None or torch.isfinite(grad).all(), name
    if case in ("no_tokens", "no_rows"):
        assert loss.item() == 0.0  # nothing to learn from: no step direction at all
        assert inputs["log_prob_BT"].grad is None or not inputs["log_prob_BT"].grad.any()


@pytest.mark.parametrize("config", ["luffy_main", "clipped", "token_mean"])
def test_an_empty_side_reports_zero(config):
    """Upstream sets off_pg_loss, off_ratio_mean and both probabilities to 0 when their side is empty; on_pg_loss,
    the clip fractions and ppo_kl follow the same rule here (upstream leaves them NaN)."""
    _, no_off = microbatch_policy_loss(**_inputs("no_off"), **CONFIGS[config])
    for key in (
        "off_pg_loss",
        "off_policy_prob",
        "off_ratio_mean",
        "off_ratio_max_clip_frac",
        "off_ratio_min_clip_frac",
    ):
        assert no_off[key].item() == 0.0, key
    assert no_off["on_pg_loss"].item() != 0.0 and no_off["on_policy_prob"].item() > 0
    _, no_on = microbatch_policy_loss(**_inputs("no_on"), **CONFIGS[config])
    assert no_on["on_pg_loss"].item() == 0.0 and no_on["on_policy_prob"].item() == 0.0
    assert no_on["off_pg_loss"].item() != 0.0 and no_on["off_policy_prob"].item() > 0
    _, none = microbatch_policy_loss(**_inputs("no_tokens"), **CONFIGS[config])
    for key in ("pg_loss", "on_pg_loss", "off_pg_loss", "ppo_kl", "entropy_loss", "on_pg_clipfrac"):
        assert none[key].item() == 0.0, key


def test_a_side_with_tokens_is_unchanged_by_an_empty_other_side():
    """The guards only act on an empty mask: a micro-batch's numbers with both sides present are the plain
    masked means (here checked against a direct computation)."""
    inputs = _inputs("mixed")
    _, m = microbatch_policy_loss(**inputs, entropy_coeff=0.0)
    mask = inputs["response_mask_BT"].float()
    ent = (inputs["entropy_BT"] * mask).sum() / mask.sum()
    assert m["entropy_loss"].item() == pytest.approx(ent.item(), rel=1e-6)
    kl = ((inputs["old_log_prob_BT"] - inputs["log_prob_BT"]) * mask).sum() / mask.sum()
    assert m["ppo_kl"].item() == pytest.approx(kl.item(), rel=1e-6)
