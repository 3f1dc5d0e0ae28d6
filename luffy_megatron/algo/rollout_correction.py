"""Rollout importance correction (`algo.rollout_is`): truncated importance weights between the policy that
sampled the on-policy tokens (the engines, the behaviour policy) and the trainer's old policy, as pure tensor
functions. An addition to LUFFY (upstream has no such weight), off by default.

Per generated token, with `old` the trainer's recomputed log-prob and `behaviour` the engine's:

    token_tis:  w_t = min(exp(old_t - behaviour_t), C)
    seq_tis:    w_t = min(exp(sum over the row's generated tokens of (old - behaviour)), C), the same on the row

C is `algo.rollout_is_cap`. The weight multiplies the per-token on-policy loss as a constant (no gradient).
Demonstration-prefix tokens (sampled by the teacher, not by an engine) and tokens without an engine log-prob
keep weight 1. A missing engine log-prob is NaN in the behaviour tensor (`behaviour_log_probs`).
Shapes: `_BT` = [rows, response tokens].
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

ROLLOUT_IS_MODES = ("none", "token_tis", "seq_tis")


def behaviour_log_probs(engine_log_prob_BT: Tensor, generated_mask_BT: Tensor) -> Tensor:
    """The behaviour tensor the loss takes: the engine's log-prob on the tokens it generated, NaN elsewhere
    (demonstration tokens, padding, rows no engine generated). float32 [B, L]."""
    nan = torch.full_like(engine_log_prob_BT, float("nan"), dtype=torch.float32)
    return torch.where(generated_mask_BT.bool(), engine_log_prob_BT.float(), nan)


def on_policy_mask(response_mask_BT: Tensor, prefix_mask_BT: Tensor) -> Tensor:
    """Valid response tokens outside the demonstration prefix (bool [B, L])."""
    return response_mask_BT.bool() & ~prefix_mask_BT.bool()


def _log_weights(
    old_log_prob_BT: Tensor, behaviour_log_prob_BT: Tensor, on_policy_mask_BT: Tensor, mode: str
) -> tuple[Tensor, Tensor]:
    """(raw log-weight per token, the corrected tokens): on-policy tokens that carry an engine log-prob.
    The log-weight is 0 on every other token."""
    if mode not in ("token_tis", "seq_tis"):
        raise ValueError(f"rollout_is={mode!r} has no weights; one of: token_tis, seq_tis")
    old = old_log_prob_BT.detach()
    behaviour = behaviour_log_prob_BT.detach().to(device=old.device, dtype=old.dtype)
    corrected = on_policy_mask_BT.to(old.device).bool() & torch.isfinite(behaviour)
    token = old - torch.where(corrected, behaviour, old)  # 0 off the corrected tokens, NaN never enters
    if mode == "token_tis":
        return token, corrected
    per_row = token.sum(-1, keepdim=True).expand_as(token)
    return torch.where(corrected, per_row, torch.zeros_like(old)), corrected


def rollout_is_weights(
    old_log_prob_BT: Tensor, behaviour_log_prob_BT: Tensor, on_policy_mask_BT: Tensor, *, mode: str, cap: float
) -> Tensor:
    """Truncated importance weights [B, L] (detached), 1 outside the corrected tokens. min(exp(x), C) is
    computed as exp(min(x, log C)), so a large log-ratio cannot overflow."""
    log_w, corrected = _log_weights(old_log_prob_BT, behaviour_log_prob_BT, on_policy_mask_BT, mode)
    weights = torch.exp(torch.clamp(log_w, max=math.log(cap)))
    return torch.where(corrected, weights, torch.ones_like(weights))


def loss_weights(
    mode: str,
    cap: float,
    *,
    old_log_prob_BT: Tensor,
    behaviour_log_prob_BT: Tensor | None,
    response_mask_BT: Tensor,
    prefix_mask_BT: Tensor,
) -> Tensor | None:
    """The weights of one micro-batch's on-policy loss, or None with mode "none" (the loss is then untouched).
    Refuses a missing behaviour tensor rather than ignoring the setting."""
    if mode == "none":
        return None
    if behaviour_log_prob_BT is None:
        raise ValueError(f"algo.rollout_is={mode} needs the engines' log-probs (behaviour_log_prob_BT), got None")
    mask = on_policy_mask(response_mask_BT, prefix_mask_BT)
    return rollout_is_weights(old_log_prob_BT, behaviour_log_prob_BT, mask, mode=mode, cap=cap)


def rollout_correction_metrics(
    old_log_prob_BT: Tensor, behaviour_log_prob_BT: Tensor, on_policy_mask_BT: Tensor, *, mode: str, cap: float
) -> dict[str, float]:
    """`rollout_corr/weight_mean`, `weight_max` (of the applied, truncated weights) and `truncated_share` (the
    share whose raw weight exceeded the cap) over the corrected tokens; empty when there are none."""
    log_w, corrected = _log_weights(old_log_prob_BT, behaviour_log_prob_BT, on_policy_mask_BT, mode)
    if not bool(corrected.any()):
        return {}
    raw = log_w[corrected]
    applied = torch.exp(torch.clamp(raw, max=math.log(cap)))
    return {
        "rollout_corr/weight_mean": float(applied.double().mean()),
        "rollout_corr/weight_max": float(applied.max()),
        "rollout_corr/truncated_share": float((raw > math.log(cap)).double().mean()),
    }
