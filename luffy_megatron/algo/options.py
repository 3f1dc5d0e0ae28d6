"""The one boundary where algorithm settings (our `algo` config section, or an upstream LUFFY flat
option dict) become keyword arguments of the pure loss and advantage functions."""

from __future__ import annotations

from typing import Any, Mapping

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


def loss_agg_mode_of(settings: Mapping[str, Any]) -> str:
    """Our `loss_agg_mode`, or upstream's `loss_remove_token_mean` (True = constant_length)."""
    if "loss_agg_mode" in settings:
        return settings["loss_agg_mode"]
    return "constant_length" if settings.get("loss_remove_token_mean", False) else "token_mean"


def loss_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `microbatch_policy_loss` (everything except tensors and lengths)."""
    opts: dict[str, Any] = {k: settings[k] for k in _SHAPING_KEYS + _LOSS_KEYS if k in settings}
    opts["loss_agg_mode"] = loss_agg_mode_of(settings)
    opts["off_policy_max_clip"] = upstream_clip(settings.get("off_policy_max_clip", -1))
    opts["off_policy_min_clip"] = upstream_clip(settings.get("off_policy_min_clip", -1))
    opts["all_max_clip"] = upstream_clip(settings.get("all_max_clip", -1))
    return opts


def uses_target_probs(settings: Mapping[str, Any]) -> bool:
    """Whether the loss takes the teacher's token probabilities (`target_probs_BT`): upstream selects
    `target_probs` only when both `use_off_policy_loss` and `use_off_policy_probs` are set (mix_actor.py)."""
    return bool(settings.get("use_off_policy_loss", False) and settings.get("use_off_policy_probs", False))


def advantage_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `compute_advantages` (estimator, std, prefix reward weights)."""
    return {
        "estimator": settings.get("adv_estimator", "grpo"),
        "use_std": settings.get("grpo_use_std", False),
        "prefix_reward_weight_alpha": settings.get("prefix_reward_weight_alpha", 1.0),
        "prefix_reward_weight_beta": settings.get("prefix_reward_weight_beta", 1.0),
    }


def uses_reference(settings: Mapping[str, Any]) -> bool:
    """Whether the actor builds the frozen reference model (actor/reference.py). `use_ref` (upstream
    actor_rollout_ref.ref.use_ref) decides when set; null: exactly when something uses it, the KL loss
    (`use_kl_loss`) or the KL reward penalty (`kl_ctrl_coef > 0`)."""
    use_ref = settings.get("use_ref")
    if use_ref is not None:
        return bool(use_ref)
    return bool(settings.get("use_kl_loss", False)) or settings.get("kl_ctrl_coef", 0.0) > 0


def kl_controller_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `algo.kl.make_kl_controller` (upstream algorithm.kl_ctrl.*)."""
    return {
        "kl_ctrl_type": settings.get("kl_ctrl_type", "fixed"),
        "kl_coef": settings.get("kl_ctrl_coef", 0.0),
        "target_kl": settings.get("kl_ctrl_target_kl", 0.1),
        "horizon": settings.get("kl_ctrl_horizon", 10000),
        "has_reference": uses_reference(settings),
    }
