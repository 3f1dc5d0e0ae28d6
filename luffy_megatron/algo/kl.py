"""KL to a frozen reference policy in the reward, as upstream LUFFY (its verl fork: `core_algos.py`
`FixedKLController` / `AdaptiveKLController` / `kl_penalty`, `mix_trainer.py` `apply_kl_penalty`).

Upstream's step, when a reference model exists (`actor_rollout_ref.ref.use_ref`, here `algo.use_ref` /
`algo/options.py` `uses_reference`): after the old log-probs, the reference log-probs of every row; then, unless
`use_kl_loss` (which puts the KL into the actor's loss instead, `algo/loss.py`), the token rewards become

    token_level_rewards = token_level_scores - beta * kl_penalty(old_log_prob, ref_log_prob) * response_mask

with beta = the controller's value, before the advantages are computed from them (GRPO sums a row's token
rewards into its score, so a row's score drops by beta x its summed KL). Without a reference upstream still
runs this with beta = 0 and a zero KL. The controller then moves: `fixed` never; `adaptive` (Ziegler et al.
2019) multiplies beta by 1 + clip(kl / target - 1, -0.2, 0.2) x n_rows / horizon. Metrics: `critic/kl`
(the batch mean of each row's token-mean KL) and `critic/kl_coeff` (the beta used).

Here the controller's update is a separate call, made by the trainer once the actor's update of the step
has gone through, so a checkpoint always holds the controller of the last completed step (its
`state_dict` travels in the checkpoint's trainer_state).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .loss import KL_PENALTIES

Tensor = torch.Tensor

KL_CTRL_TYPES = ("fixed", "adaptive")


class FixedKLController:
    """beta stays `kl_coef` (upstream `FixedKLController`)."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A fixed beta is the configured one: nothing of a saved state is restored (a resumed run with
        another algo.kl_ctrl_coef uses the new value, as a restarted upstream run would)."""
        del state


class AdaptiveKLController:
    """Upstream `AdaptiveKLController` (arXiv 1909.08593): beta follows the KL towards `target_kl`."""

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if horizon <= 0:
            raise ValueError(f"adaptive KL controller: horizon={horizon} must be > 0 (algo.kl_ctrl_horizon)")
        if target_kl <= 0:
            raise ValueError(f"adaptive KL controller: target_kl={target_kl} must be > 0 (algo.kl_ctrl_target_kl)")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # upstream: np.clip
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved beta, when it was saved by an adaptive controller too (a checkpoint of a
        fixed or penalty-free run starts the adaptive one from its configured initial value)."""
        if state.get("type") == self.kind:
            self.value = float(state["value"])


def make_kl_controller(
    *, kl_ctrl_type: str, kl_coef: float, target_kl: float, horizon: int, has_reference: bool
) -> FixedKLController | AdaptiveKLController:
    """The controller upstream's trainer builds: without a reference model a fixed beta of 0, whatever the
    settings; with one, `fixed` or `adaptive` from algo.kl_ctrl_* (upstream algorithm.kl_ctrl.*)."""
    if not has_reference:
        return FixedKLController(0.0)
    if kl_ctrl_type == "fixed":
        return FixedKLController(kl_coef)
    if kl_ctrl_type == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"kl_ctrl_type={kl_ctrl_type!r} is not one of: {', '.join(KL_CTRL_TYPES)} (algo.kl_ctrl_type)")


def kl_penalty(log_prob_BT: Tensor, ref_log_prob_BT: Tensor, kind: str = "kl") -> Tensor:
    """Per-token KL estimate of the reward penalty (upstream `core_algos.kl_penalty`): kl | abs | mse |
    low_var_kl, the same estimators the KL loss uses."""
    try:
        estimator = KL_PENALTIES[kind]
    except KeyError:
        raise ValueError(f"kl_penalty={kind!r} is not one of: {', '.join(KL_PENALTIES)} (algo.kl_penalty)") from None
    return estimator(log_prob_BT, ref_log_prob_BT)


def apply_kl_penalty(
    *,
    token_level_scores_BT: Tensor,
    response_mask_BT: Tensor,
    old_log_prob_BT: Optional[Tensor],
    ref_log_prob_BT: Optional[Tensor],
    beta: float,
    kind: str = "kl",
) -> tuple[Tensor, dict[str, float], float]:
    """Upstream `apply_kl_penalty` without the controller update: returns the token rewards, the metrics
    `critic/kl` and `critic/kl_coeff`, and the KL to feed the controller's `update` (with n_steps = rows).

    `ref_log_prob_BT` None (no reference model): beta is 0 and the KL zero, as upstream. A row without valid
    tokens counts a KL of 0 (upstream's masked mean would divide 0 by 0 there).
    """
    mask = response_mask_BT.to(token_level_scores_BT.dtype)
    if ref_log_prob_BT is None:
        beta = 0.0
        kld = torch.zeros_like(token_level_scores_BT)
    else:
        if old_log_prob_BT is None:
            raise ValueError("apply_kl_penalty: reference log-probs need the old log-probs they are compared with")
        if old_log_prob_BT.shape != ref_log_prob_BT.shape or ref_log_prob_BT.shape != token_level_scores_BT.shape:
            raise ValueError(
                f"apply_kl_penalty: scores {tuple(token_level_scores_BT.shape)}, old log-probs "
                f"{tuple(old_log_prob_BT.shape)} and reference log-probs {tuple(ref_log_prob_BT.shape)} "
                "must have the same [rows, tokens] shape"
            )
        kld = kl_penalty(old_log_prob_BT.to(mask.dtype), ref_log_prob_BT.to(mask.dtype), kind) * mask
    token_level_rewards_BT = token_level_scores_BT - beta * kld
    per_row = (kld * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # upstream masked_mean(kld, mask, axis=-1)
    current_kl = float(per_row.mean()) if per_row.numel() else 0.0
    return token_level_rewards_BT, {"critic/kl": current_kl, "critic/kl_coeff": float(beta)}, current_kl
