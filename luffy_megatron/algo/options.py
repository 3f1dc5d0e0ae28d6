"""The one boundary where the algorithm settings (the typed `algo` config section) become keyword arguments of
the pure loss and advantage functions. An upstream LUFFY flat option dict enters through
`AlgoConfig.from_upstream`."""

from __future__ import annotations

from typing import Any

from luffy_megatron.config.algo_section import AlgoConfig

from .loss import upstream_clip

# Options passed through unchanged to `mixed_policy_loss` (via `microbatch_policy_loss(**shaping)`).
_SHAPING_KEYS = (
    "clip_ratio",
    "clip_upper_bound",
    "loss_remove_clip",
    "off_policy_reshape",
    "off_policy_reshape_weight",
    "off_policy_reshape_pow_exp",
    "on_policy_reshape",
    "on_policy_reshape_weight",
    "on_policy_reshape_pow_exp",
)
_LOSS_KEYS = (
    "mode",  # rl | sft (algo.mode)
    "loss_agg_mode",
    "use_off_policy_loss",
    "use_sft_multitask_loss",
    "sft_loss_coef",
    "entropy_coeff",
    "use_kl_loss",
    "kl_loss_coef",
    "kl_loss_type",
    "use_ppo_kl_loss",
    "ppo_kl_loss_coef",
)


def loss_options(algo: AlgoConfig) -> dict[str, Any]:
    """Keyword arguments for `microbatch_policy_loss` (everything except tensors and lengths)."""
    opts: dict[str, Any] = {key: getattr(algo, key) for key in _SHAPING_KEYS + _LOSS_KEYS}
    opts["off_policy_max_clip"] = upstream_clip(algo.off_policy_max_clip)
    opts["off_policy_min_clip"] = upstream_clip(algo.off_policy_min_clip)
    opts["all_max_clip"] = upstream_clip(algo.all_max_clip)
    return opts


def rollout_is_options(algo: AlgoConfig) -> dict[str, Any]:
    """Keyword arguments for `rollout_correction.loss_weights` and `rollout_correction_metrics` (mode, cap)."""
    return {"mode": algo.rollout_is, "cap": algo.rollout_is_cap}


def uses_target_probs(algo: AlgoConfig) -> bool:
    """Whether the loss takes the teacher's token probabilities (`target_probs_BT`): upstream selects
    `target_probs` only when both `use_off_policy_loss` and `use_off_policy_probs` are set (mix_actor.py)."""
    return algo.use_off_policy_loss and algo.use_off_policy_probs


def advantage_options(algo: AlgoConfig) -> dict[str, Any]:
    """Keyword arguments for `compute_advantages` (estimator, std, prefix reward weights)."""
    return {
        "estimator": algo.adv_estimator,
        "use_std": algo.grpo_use_std,
        "prefix_reward_weight_alpha": algo.prefix_reward_weight_alpha,
        "prefix_reward_weight_beta": algo.prefix_reward_weight_beta,
    }


def uses_reference(algo: AlgoConfig) -> bool:
    """Whether the actor builds the frozen reference model (actor/reference.py). `use_ref` (upstream
    actor_rollout_ref.ref.use_ref) decides when set; null: exactly when something uses it, the KL loss
    (`use_kl_loss`) or the KL reward penalty (`kl_ctrl_coef > 0`)."""
    if algo.use_ref is not None:
        return algo.use_ref
    return algo.use_kl_loss or algo.kl_ctrl_coef > 0


def kl_controller_options(algo: AlgoConfig) -> dict[str, Any]:
    """Keyword arguments for `algo.kl.make_kl_controller` (upstream algorithm.kl_ctrl.*)."""
    return {
        "kl_ctrl_type": algo.kl_ctrl_type,
        "kl_coef": algo.kl_ctrl_coef,
        "target_kl": algo.kl_ctrl_target_kl,
        "horizon": algo.kl_ctrl_horizon,
        "has_reference": uses_reference(algo),
    }


def dp_loss_factor(algo: AlgoConfig, dp_size: int) -> float:
    """What each rank multiplies its mini-batch loss by so that the reduced gradient has the DP scale the
    settings ask for. `dp_size`: the DP size without CP.

    Where megatron-core 0.16 averages (paths under megatron/core/): DDP pre-scales each bucket's gradient by
    1 / |DP x CP group| (distributed/distributed_data_parallel.py:281-292; the group is
    `get_data_parallel_group(with_context_parallel=True)`, process_groups_config.py:289-290), then SUM-reduces it
    (distributed/param_and_grad_buffer.py:391-395) when finalize_model_grads runs `finish_grad_sync`
    (distributed/finalize_model_grads.py:443). CP ranks are in that group, but the schedule multiplies every
    micro-batch loss by the CP size (pipeline_parallel/schedules.py:268), so CP cancels: the gradient is
    (sum over DP ranks) / DP at any CP, as upstream's FSDP mean over its DP ranks.
    Hence "mean": 1; "sum": DP; `reference_dp` R: DP / R, the gradient upstream gives on R ranks for the same
    global mini-batch."""
    if algo.reference_dp is not None:
        return dp_size / algo.reference_dp
    return float(dp_size) if algo.dp_gradient_reduction == "sum" else 1.0
