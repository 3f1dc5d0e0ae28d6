"""The LUFFY algorithm core as pure tensor functions: advantages, the shaped loss, rollout composition."""

from .advantage import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    grpo_split_advantages,
    sft_prefix_advantages,
    zero_truncated_advantages,
)
from .composition import (
    PREFIX_STRATEGIES,
    GroupPlan,
    assemble_responses,
    plan_rows,
    prefix_ratios,
    prefix_target_probs,
    response_mask_from_eos,
)
from .loss import (
    KL_PENALTIES,
    LOSS_AGG_MODES,
    OFF_POLICY_RESHAPES,
    ON_POLICY_RESHAPES,
    aggregate_token_losses,
    masked_mean,
    microbatch_policy_loss,
    mixed_policy_loss,
)
from .options import advantage_options, loss_options, uses_target_probs

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_PENALTIES",
    "LOSS_AGG_MODES",
    "OFF_POLICY_RESHAPES",
    "ON_POLICY_RESHAPES",
    "PREFIX_STRATEGIES",
    "GroupPlan",
    "advantage_options",
    "aggregate_token_losses",
    "assemble_responses",
    "compute_advantages",
    "grpo_advantages",
    "grpo_split_advantages",
    "sft_prefix_advantages",
    "zero_truncated_advantages",
    "loss_options",
    "masked_mean",
    "microbatch_policy_loss",
    "mixed_policy_loss",
    "plan_rows",
    "prefix_ratios",
    "prefix_target_probs",
    "response_mask_from_eos",
    "uses_target_probs",
]
