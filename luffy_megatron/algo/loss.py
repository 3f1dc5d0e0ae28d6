"""LUFFY's shaped mixed-policy loss, as pure tensor functions.

Everything here follows upstream LUFFY (`mix_core_alg.compute_token_on_off_policy_loss`,
`core_algos.compute_policy_loss`, `mix_actor.update_policy`, commit 01f4ae06) option for option.
Shapes: `_BT` = [rows, response tokens].
No config object enters these functions: the actor maps its config to keyword arguments once.

The main LUFFY run, per token (off-policy = demonstration token, `prefix_mask` True):

    on  = -A * exp(logp - old_logp)          (no clip: loss_remove_clip=True)
    off = -A * p / (p + 0.1),  p = exp(logp)  (policy shaping; teacher prob treated as 1)
    pg  = sum(mask * where(prefix, off, on)) / max_response_length

A micro-batch may lack demonstration tokens, on-policy tokens or valid tokens altogether (upstream issue #24:
0/0 = NaN). Every mean over tokens here is then 0 with a zero gradient (`mean_or_zero`), so the loss, its
gradient and every metric stay finite; upstream's own NaN guards are kept where it has them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- helpers


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """sum(v * m) / sum(m), with no epsilon: 0/0 gives NaN exactly as upstream's `masked_mean`."""
    return (values * mask).sum() / mask.sum()


def mean_or_zero(values: Tensor, mask: Tensor) -> Tensor:
    """sum(v * m) / sum(m), and 0 (with a zero gradient) when the mask is empty: a micro-batch without
    demonstration tokens, without on-policy tokens or without valid tokens at all (upstream issue #24).
    Equal to `masked_mean` whenever the mask holds a token."""
    total = mask.sum()
    return (values * mask).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _nan_to_zero(x: Tensor) -> Tensor:
    """Upstream replaces a NaN (empty mask) by 0 for some metrics only; keep that distinction."""
    return torch.zeros_like(x) if torch.isnan(x).any() else x


# --------------------------------------------------------------------------- reshapes
# Each on-policy reshape maps (log_prob, old_log_prob) to the ratio multiplied by -A.


def _f_gamma(gamma: float) -> Callable[[Tensor], Tensor]:
    return lambda p: p / (p + gamma)


def _on_p_div_p(gamma: float):
    f = _f_gamma(gamma)

    def ratio(log_prob: Tensor, old_log_prob: Tensor, weight: float, pow_exp: float) -> Tensor:
        return f(torch.exp(log_prob)) / f(torch.exp(old_log_prob))

    return ratio


ON_POLICY_RESHAPES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "no_reshape": lambda lp, old, w, e: torch.exp(lp - old),
    "logp": lambda lp, old, w, e: lp - old,
    "p_logp": lambda lp, old, w, e: torch.exp(lp - old) + w * (lp - old),
    "square_root": lambda lp, old, w, e: torch.sqrt(torch.exp(lp - old)),
    "pow": lambda lp, old, w, e: torch.pow(torch.exp(lp - old), e),
    "p_div_p_0.1": _on_p_div_p(0.1),
    "p_div_p_0.5": _on_p_div_p(0.5),
}

# Each off-policy reshape maps log_prob (the CURRENT policy; the behaviour policy is taken as 1)
# to the shaped ratio multiplied by -A.
OFF_POLICY_RESHAPES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "no_reshape": lambda lp, w, e: torch.exp(lp),
    "logp": lambda lp, w, e: lp * w,
    "p_logp": lambda lp, w, e: lp * w + torch.exp(lp),
    "square_root": lambda lp, w, e: torch.sqrt(torch.exp(lp)),
    "p_div_p_0.1": lambda lp, w, e: _f_gamma(0.1)(torch.exp(lp)),
    "p_div_p_0.3": lambda lp, w, e: _f_gamma(0.3)(torch.exp(lp)),
    "p_div_p_0.5": lambda lp, w, e: _f_gamma(0.5)(torch.exp(lp)),
    "pow": lambda lp, w, e: torch.pow(torch.exp(lp), e),
}


def _lookup(registry: dict, name: str, what: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{what}={name!r} is not one of: {', '.join(registry)}") from None


# --------------------------------------------------------------------------- aggregation


def aggregate_token_losses(losses_BT: Tensor, mask_BT: Tensor, *, mode: str, max_response_length: int) -> Tensor:
    """Reduce per-token losses of one micro-batch to a scalar.

    constant_length: upstream `loss_remove_token_mean=True`: sum over all valid tokens of the
        micro-batch / max_response_length (a constant, NOT the packed or padded length of this batch).
    token_mean: upstream default: masked mean over the micro-batch's valid tokens (0 when it has none).
    seq_mean: mean over rows of each row's token mean (rows without valid tokens are skipped).
    """
    if mode == "constant_length":
        return (losses_BT * mask_BT).sum() / max_response_length
    if mode == "token_mean":
        return mean_or_zero(losses_BT, mask_BT)
    if mode == "seq_mean":
        tokens_B = mask_BT.sum(-1)
        has_tokens = tokens_B > 0
        per_row = (losses_BT * mask_BT).sum(-1) / tokens_B.clamp(min=1)
        return per_row[has_tokens].sum() / has_tokens.sum().clamp(min=1)
    raise ValueError(f"loss_agg_mode={mode!r} is not one of: constant_length, token_mean, seq_mean")


LOSS_AGG_MODES = ("constant_length", "token_mean", "seq_mean")


# --------------------------------------------------------------------------- the LUFFY loss


def _clipped_on_policy_losses(
    ratio: Tensor, adv: Tensor, mask: Tensor, *, loss_remove_clip: bool, clip_ratio: float, clip_upper_bound: float
) -> tuple[Tensor, Tensor]:
    """-A * ratio per token, PPO-clipped to [1 - clip_ratio, max(clip_upper_bound, 1 + clip_ratio)] unless
    `loss_remove_clip`; and the fraction of valid tokens the clip changed."""
    on_losses = -adv * ratio
    if loss_remove_clip:
        return on_losses, torch.zeros((), dtype=mask.dtype)
    upper = max(clip_upper_bound, 1.0 + clip_ratio)
    clipped_losses = -adv * torch.clamp(ratio, 1.0 - clip_ratio, upper)
    on_clipfrac = mean_or_zero(torch.gt(clipped_losses, on_losses).to(mask.dtype), mask)
    return torch.maximum(on_losses, clipped_losses), on_clipfrac


def _off_policy_ratio(
    log_prob_BT: Tensor,
    prefix_f: Tensor,
    off_mask: Tensor,
    *,
    target_probs_BT: Tensor | None,
    reshape: str,
    weight: float,
    pow_exp: float,
    max_clip: float | None,
    min_clip: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The shaped off-policy ratio (`reshape` of the current policy's p, or p / (teacher p + 1e-6) with
    `target_probs_BT`), clamped to [min_clip, max_clip] (None: that side unclipped); and the fractions of
    off-policy tokens at each bound (0 for a bound that is off)."""
    if target_probs_BT is None:
        off_ratio = _lookup(OFF_POLICY_RESHAPES, reshape, "off_policy_reshape")(log_prob_BT, weight, pow_exp)
    else:
        off_ratio = torch.exp(log_prob_BT) / (target_probs_BT + 1e-6) * prefix_f
    zero = torch.zeros((), dtype=off_mask.dtype)
    max_clipfrac = min_clipfrac = zero
    if max_clip is not None:
        off_ratio = torch.clamp(off_ratio, max=max_clip)
        max_clipfrac = mean_or_zero((off_ratio == max_clip).to(off_mask.dtype), off_mask)
    if min_clip is not None:
        off_ratio = torch.clamp(off_ratio, min=min_clip)
        min_clipfrac = mean_or_zero((off_ratio == min_clip).to(off_mask.dtype), off_mask)
    return off_ratio, max_clipfrac, min_clipfrac


def _mixed_masks(response_mask_BT: Tensor, prefix_mask_BT: Tensor, dtype: torch.dtype):
    """(mask, prefix, prefix_f, on_mask, off_mask): the response mask in `dtype`, the prefix (demonstration)
    mask as bool and in `dtype`, and the response mask split into on-policy and off-policy tokens."""
    mask = response_mask_BT.to(dtype)
    prefix = prefix_mask_BT.bool()
    prefix_f = prefix.to(dtype)
    on_mask = (~prefix).to(mask.dtype) * mask
    off_mask = prefix_f * mask
    return mask, prefix, prefix_f, on_mask, off_mask


def _mixed_pg_loss(
    off_losses: Tensor,
    on_losses: Tensor,
    prefix: Tensor,
    mask: Tensor,
    log_prob_BT: Tensor,
    all_max_clip: float | None,
    loss_agg_mode: str,
    max_response_length: int,
) -> Tensor:
    """Per-token off/on losses merged by the prefix mask, optionally all-max-clipped, then aggregated."""
    # where() rather than upstream's `off*prefix + on*(1-prefix)`: equal for finite values, and an
    # inf in the unused branch cannot turn into NaN.
    losses = torch.where(prefix, off_losses, on_losses)
    loss_mask = mask
    if all_max_clip is not None:
        keep = (torch.exp(log_prob_BT) <= all_max_clip).to(mask.dtype)
        loss_mask = mask * keep
        losses = losses * keep
    return aggregate_token_losses(losses, loss_mask, mode=loss_agg_mode, max_response_length=max_response_length)


def _mixed_prob_metrics(
    log_prob_BT: Tensor, old_log_prob_BT: Tensor, off_ratio: Tensor, prefix_f: Tensor, mask: Tensor, off_mask: Tensor
) -> dict[str, Tensor]:
    """`off_policy_prob`, `on_policy_prob` and `off_ratio_mean` of the mixed-policy loss (call under no_grad)."""
    return {
        "off_policy_prob": _nan_to_zero(masked_mean(torch.exp(log_prob_BT), off_mask)),
        "on_policy_prob": _nan_to_zero(masked_mean(torch.exp(old_log_prob_BT), (1.0 - prefix_f) * mask)),
        "off_ratio_mean": _nan_to_zero(masked_mean(off_ratio, off_mask)),
    }


def mixed_policy_loss(
    *,
    log_prob_BT: Tensor,
    old_log_prob_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    prefix_mask_BT: Tensor,
    max_response_length: int,
    loss_agg_mode: str = "constant_length",
    clip_ratio: float = 0.2,
    clip_upper_bound: float = 1.0,
    loss_remove_clip: bool = True,
    off_policy_reshape: str = "p_div_p_0.1",
    off_policy_reshape_weight: float = 0.1,
    off_policy_reshape_pow_exp: float = 0.5,
    on_policy_reshape: str = "no_reshape",
    on_policy_reshape_weight: float = 0.1,
    on_policy_reshape_pow_exp: float = 0.5,
    off_policy_max_clip: float | None = None,
    off_policy_min_clip: float | None = None,
    all_max_clip: float | None = None,
    target_probs_BT: Tensor | None = None,
    rollout_is_weights_BT: Tensor | None = None,
) -> dict[str, Tensor]:
    """Upstream `compute_token_on_off_policy_loss`: returns `pg_loss` (the optimised value) and the
    metrics upstream logs (`off_pg_loss`, `on_pg_loss`, clip fractions, `ppo_kl`, probabilities).

    Clip values of None mean "off" (upstream's config value -1). With `target_probs_BT` the off-policy
    ratio is p / (teacher p + 1e-6) and `off_policy_reshape` is ignored, as upstream.
    `rollout_is_weights_BT` (algo.rollout_is, not upstream): a constant weight on each on-policy token's loss.
    """
    mask, prefix, prefix_f, on_mask, off_mask = _mixed_masks(response_mask_BT, prefix_mask_BT, log_prob_BT.dtype)
    adv = advantages_BT

    log_ratio = log_prob_BT - old_log_prob_BT
    ppo_kl = mean_or_zero(-log_ratio, mask)

    # On-policy tokens: (optionally reshaped) importance ratio, PPO clip unless removed.
    ratio = _lookup(ON_POLICY_RESHAPES, on_policy_reshape, "on_policy_reshape")(
        log_prob_BT, old_log_prob_BT, on_policy_reshape_weight, on_policy_reshape_pow_exp
    )
    on_losses, on_clipfrac = _clipped_on_policy_losses(
        ratio, adv, mask, loss_remove_clip=loss_remove_clip, clip_ratio=clip_ratio, clip_upper_bound=clip_upper_bound
    )
    if rollout_is_weights_BT is not None:
        on_losses = on_losses * rollout_is_weights_BT.detach()
    on_pg_loss = mean_or_zero(on_losses, on_mask)

    # Off-policy (demonstration) tokens: shaped current-policy probability.
    off_ratio, off_max_clipfrac, off_min_clipfrac = _off_policy_ratio(
        log_prob_BT,
        prefix_f,
        off_mask,
        target_probs_BT=target_probs_BT,
        reshape=off_policy_reshape,
        weight=off_policy_reshape_weight,
        pow_exp=off_policy_reshape_pow_exp,
        max_clip=off_policy_max_clip,
        min_clip=off_policy_min_clip,
    )
    off_losses = -adv * off_ratio
    zero = torch.zeros((), dtype=mask.dtype)

    pg_loss = _mixed_pg_loss(
        off_losses, on_losses, prefix, mask, log_prob_BT, all_max_clip, loss_agg_mode, max_response_length
    )

    with torch.no_grad():
        metrics = {
            "off_pg_loss": _nan_to_zero(masked_mean(off_losses, off_mask)),
            "on_pg_loss": on_pg_loss,
            "off_pg_clipfrac": zero,
            "on_pg_clipfrac": on_clipfrac,
            "ppo_kl": ppo_kl,
            **_mixed_prob_metrics(log_prob_BT, old_log_prob_BT, off_ratio, prefix_f, mask, off_mask),
            "off_ratio_max_clip_frac": off_max_clipfrac,
            "off_ratio_min_clip_frac": off_min_clipfrac,
        }
    return {"pg_loss": pg_loss, **{k: v.detach() for k, v in metrics.items()}}


def ppo_policy_loss(
    *,
    log_prob_BT: Tensor,
    old_log_prob_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    clip_ratio: float,
    loss_remove_clip: bool,
    loss_agg_mode: str,
    max_response_length: int,
    rollout_is_weights_BT: Tensor | None = None,
) -> dict[str, Tensor]:
    """Plain PPO loss (upstream `core_algos.compute_policy_loss`), used by the SFT-multitask variant
    on the on-policy rows. Symmetric clip [1-c, 1+c] (no `clip_upper_bound` here, as upstream).
    `rollout_is_weights_BT`: as in `mixed_policy_loss`, a constant weight on each token's loss."""
    mask = response_mask_BT.to(log_prob_BT.dtype)
    log_ratio = log_prob_BT - old_log_prob_BT
    ratio = torch.exp(log_ratio)
    losses = -advantages_BT * ratio
    clipped = -advantages_BT * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    if not loss_remove_clip:
        losses = torch.maximum(losses, clipped)
    if rollout_is_weights_BT is not None:
        losses = losses * rollout_is_weights_BT.detach()
    pg_loss = aggregate_token_losses(losses, mask, mode=loss_agg_mode, max_response_length=max_response_length)
    with torch.no_grad():
        clipfrac = mean_or_zero(torch.gt(clipped, losses).to(mask.dtype), mask)
        ppo_kl = mean_or_zero(-log_ratio, mask)
    return {"pg_loss": pg_loss, "pg_clipfrac": clipfrac, "ppo_kl": ppo_kl}


def sft_loss(*, log_prob_BT: Tensor, response_mask_BT: Tensor) -> Tensor:
    """Token-mean negative log-likelihood; 0 when there are no rows (upstream fix 9d25e17) or no valid tokens."""
    if log_prob_BT.numel() == 0:
        return log_prob_BT.sum() * 0.0
    return mean_or_zero(-log_prob_BT, response_mask_BT.to(log_prob_BT.dtype))


# --------------------------------------------------------------------------- KL penalties

KL_PENALTIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl": lambda lp, ref: lp - ref,
    "abs": lambda lp, ref: (lp - ref).abs(),
    "mse": lambda lp, ref: 0.5 * (lp - ref).square(),
    # Schulman's k3 estimator, clamped as upstream.
    "low_var_kl": lambda lp, ref: torch.clamp(torch.exp(ref - lp) - (ref - lp) - 1, min=-10, max=10),
}


def kl_penalty(log_prob_BT: Tensor, ref_log_prob_BT: Tensor, kind: str) -> Tensor:
    return _lookup(KL_PENALTIES, kind, "kl_loss_type")(log_prob_BT, ref_log_prob_BT)


# --------------------------------------------------------------------------- one micro-batch


def microbatch_policy_loss(
    *,
    log_prob_BT: Tensor,
    entropy_BT: Tensor,
    old_log_prob_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    prefix_mask_BT: Tensor,
    max_response_length: int,
    loss_agg_mode: str = "constant_length",
    use_off_policy_loss: bool = True,
    use_sft_multitask_loss: bool = False,
    sft_loss_coef: float = 1.0,
    entropy_coeff: float = 0.001,
    use_kl_loss: bool = False,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "low_var_kl",
    ref_log_prob_BT: Tensor | None = None,
    use_ppo_kl_loss: bool = False,
    ppo_kl_loss_coef: float = 0.01,
    gradient_accumulation: int = 1,
    mode: str = "rl",
    rollout_is_weights_BT: Tensor | None = None,
    **shaping,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The value upstream's actor calls `.backward()` on for one micro-batch, and its metrics.

    loss = (pg_loss - entropy_coeff * token_mean(entropy) [+ kl terms]) / gradient_accumulation

    `gradient_accumulation` is 1 in LUFFY's main run, so micro-batch losses are summed over a
    mini-batch. `shaping` are the keyword options of `mixed_policy_loss` (reshapes, clips, teacher
    probabilities). Metric names are upstream's, without the `actor/` prefix.

    mode="sft" (algo.mode): pg_loss is the token-mean NLL of every row (demonstrations only), without the
    entropy bonus; the policy-gradient options are unused.
    `rollout_is_weights_BT` (algo.rollout_is; `rollout_correction.loss_weights`): on the on-policy tokens' loss.
    """
    mask = response_mask_BT.to(log_prob_BT.dtype)
    if mode not in ("rl", "sft"):
        raise ValueError(f"mode={mode!r} is not one of: rl, sft")
    pg_loss, metrics = _policy_term(
        mode,
        log_prob_BT=log_prob_BT,
        old_log_prob_BT=old_log_prob_BT,
        advantages_BT=advantages_BT,
        mask=mask,
        prefix_mask_BT=prefix_mask_BT,
        max_response_length=max_response_length,
        loss_agg_mode=loss_agg_mode,
        use_off_policy_loss=use_off_policy_loss,
        use_sft_multitask_loss=use_sft_multitask_loss,
        sft_loss_coef=sft_loss_coef,
        shaping=shaping,
        is_weights=rollout_is_weights_BT,
    )
    entropy_loss = mean_or_zero(entropy_BT, mask)
    policy_loss = pg_loss - entropy_loss * (entropy_coeff if mode == "rl" else 0.0)
    policy_loss = _regularizers(
        policy_loss,
        metrics,
        log_prob_BT=log_prob_BT,
        old_log_prob_BT=old_log_prob_BT,
        mask=mask,
        policy_rows=~prefix_mask_BT.bool().any(-1) if use_sft_multitask_loss else slice(None),
        use_kl_loss=use_kl_loss,
        kl_loss_coef=kl_loss_coef,
        kl_loss_type=kl_loss_type,
        ref_log_prob_BT=ref_log_prob_BT,
        use_ppo_kl_loss=use_ppo_kl_loss,
        ppo_kl_loss_coef=ppo_kl_loss_coef,
    )
    loss = policy_loss / gradient_accumulation
    metrics.update(
        pg_loss=pg_loss.detach(),
        entropy_loss=entropy_loss.detach(),
        entropy=entropy_loss.detach(),  # verl's `actor/entropy`: the token-mean entropy of the micro-batch
        policy_loss=policy_loss.detach(),
        loss_backward=loss.detach(),
    )
    return loss, metrics


def _policy_term(
    mode: str,
    *,
    log_prob_BT: Tensor,
    old_log_prob_BT: Tensor,
    advantages_BT: Tensor,
    mask: Tensor,
    prefix_mask_BT: Tensor,
    max_response_length: int,
    loss_agg_mode: str,
    use_off_policy_loss: bool,
    use_sft_multitask_loss: bool,
    sft_loss_coef: float,
    shaping: dict,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(pg_loss, its metrics) of one micro-batch: the NLL (mode="sft"), NLL on the demonstration rows plus PPO
    on the others (SFT multitask), LUFFY's mixed-policy loss (off-policy loss), or plain PPO. `is_weights`:
    the rollout importance weights of the policy-gradient tokens (None: none)."""
    if mode == "sft":
        pg_loss = sft_loss(log_prob_BT=log_prob_BT, response_mask_BT=mask)
        return pg_loss, {"sft_loss": pg_loss.detach()}
    if use_off_policy_loss and not use_sft_multitask_loss:
        out = mixed_policy_loss(
            log_prob_BT=log_prob_BT,
            old_log_prob_BT=old_log_prob_BT,
            advantages_BT=advantages_BT,
            response_mask_BT=mask,
            prefix_mask_BT=prefix_mask_BT,
            max_response_length=max_response_length,
            loss_agg_mode=loss_agg_mode,
            rollout_is_weights_BT=is_weights,
            **shaping,
        )
        pg_loss = out.pop("pg_loss")
        return pg_loss, {**out, "pg_clipfrac": out["on_pg_clipfrac"]}
    metrics: dict[str, Tensor] = {}
    rows = slice(None)
    if use_sft_multitask_loss:
        if use_off_policy_loss:
            raise ValueError("use_sft_multitask_loss and use_off_policy_loss cannot both be true")
        off_rows = prefix_mask_BT.bool().any(-1)
        sft = sft_loss(log_prob_BT=log_prob_BT[off_rows], response_mask_BT=mask[off_rows])
        metrics["sft_loss"] = sft.detach()
        rows = ~off_rows
    ppo = ppo_policy_loss(
        log_prob_BT=log_prob_BT[rows],
        old_log_prob_BT=old_log_prob_BT[rows],
        advantages_BT=advantages_BT[rows],
        response_mask_BT=mask[rows],
        clip_ratio=shaping.get("clip_ratio", 0.2),
        loss_remove_clip=shaping.get("loss_remove_clip", True),
        loss_agg_mode=loss_agg_mode,
        max_response_length=max_response_length,
        rollout_is_weights_BT=None if is_weights is None else is_weights[rows],
    )
    pg_loss = sft * sft_loss_coef + ppo["pg_loss"] if use_sft_multitask_loss else ppo["pg_loss"]
    return pg_loss, {**metrics, "pg_clipfrac": ppo["pg_clipfrac"], "ppo_kl": ppo["ppo_kl"]}


def _regularizers(
    policy_loss: Tensor,
    metrics: dict[str, Tensor],
    *,
    log_prob_BT: Tensor,
    old_log_prob_BT: Tensor,
    mask: Tensor,
    policy_rows,
    use_kl_loss: bool,
    kl_loss_coef: float,
    kl_loss_type: str,
    ref_log_prob_BT: Tensor | None,
    use_ppo_kl_loss: bool,
    ppo_kl_loss_coef: float,
) -> Tensor:
    """`policy_loss` plus the KL penalty to the reference and the |PPO KL| term when they are on; their
    metrics go into `metrics`. `policy_rows`: the rows the policy loss used (an index of the batch)."""
    if use_kl_loss:
        if ref_log_prob_BT is None:
            raise ValueError("use_kl_loss=True needs reference log-probs (ref_log_prob_BT)")
        kl_loss = mean_or_zero(kl_penalty(log_prob_BT, ref_log_prob_BT, kl_loss_type), mask)
        policy_loss = policy_loss + kl_loss * kl_loss_coef
        metrics["kl_loss"] = kl_loss.detach()
        metrics["kl_coef"] = torch.full_like(metrics["kl_loss"], kl_loss_coef)  # upstream logs actor/kl_coef too
    if use_ppo_kl_loss:
        # |mean(old_logp - logp)| over the rows the policy loss used, with its gradient, as upstream.
        ppo_kl_grad = mean_or_zero(old_log_prob_BT[policy_rows] - log_prob_BT[policy_rows], mask[policy_rows])
        policy_loss = policy_loss + ppo_kl_grad.abs() * ppo_kl_loss_coef
        metrics["ppo_kl_loss"] = ppo_kl_grad.abs().detach()
    return policy_loss


def upstream_clip(value: float) -> float | None:
    """Upstream config convention: -1 means "no clip"."""
    return None if value is None or (isinstance(value, (int, float)) and math.isclose(value, -1.0)) else float(value)
