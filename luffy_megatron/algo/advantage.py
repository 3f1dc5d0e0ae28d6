"""Group advantages for mixed on-/off-policy groups (upstream: `core_algos.compute_grpo_outcome_advantage`,
called from `mix_trainer.py`).

LUFFY (`grpo`): the demonstration row is INSIDE its prompt's group: A_i = r_i - mean(group), no std
division by default. `grpo_split` (the "RL w/ SFT loss" baseline) takes mean and std over the
on-policy rows only and applies them to every row of the group.

Groups are identified by any hashable id per row (upstream's `uid`), never by row position: rows are
reordered for load balancing before the update (pitfall 13).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch

Tensor = torch.Tensor


def outcome_scores(token_level_rewards_BT: Tensor) -> Tensor:
    """One score per row: the sum of its token rewards (the reward sits on the last valid token)."""
    return token_level_rewards_BT.sum(dim=-1)


def _group_rows(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    rows: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        rows.setdefault(g, []).append(i)
    return rows


def _mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Upstream: a single-row group has mean 0 and std 1; otherwise mean and UNBIASED std."""
    if values.numel() == 1:
        return torch.zeros((), dtype=values.dtype), torch.ones((), dtype=values.dtype)
    return values.mean(), values.std()


def _normalised(scores: Tensor, mean: Tensor, std: Tensor, use_std: bool, epsilon: float) -> Tensor:
    return (scores - mean) / (std + epsilon) if use_std else scores - mean


def grpo_advantages(
    scores_B: Tensor,
    group_ids: Sequence[Hashable],
    *,
    use_std: bool = False,
    epsilon: float = 1e-6,
    on_policy_mask_B: Tensor | None = None,
) -> Tensor:
    """GRPO over the whole group, demonstration rows included (LUFFY's estimator).

    With `use_std` an all-equal group gives 0 / (0 + eps) = 0 (upstream has no zero-std guard here).
    """
    del on_policy_mask_B  # the whole group is the baseline
    adv = torch.empty_like(scores_B)
    for rows in _group_rows(group_ids).values():
        idx = torch.tensor(rows)
        mean, std = _mean_std(scores_B[idx])
        adv[idx] = _normalised(scores_B[idx], mean, std, use_std, epsilon)
    return adv


def grpo_split_advantages(
    scores_B: Tensor,
    group_ids: Sequence[Hashable],
    *,
    use_std: bool = False,
    epsilon: float = 1e-6,
    on_policy_mask_B: Tensor | None = None,
) -> Tensor:
    """Baseline (mean, std) from the group's on-policy rows only, applied to all its rows.

    A zero std is replaced by 1, as upstream's `compute_grpo_outcome_advantage_split`.
    """
    if on_policy_mask_B is None:
        raise ValueError("adv_estimator=grpo_split needs on_policy_mask_B (rows without demonstration tokens)")
    adv = torch.empty_like(scores_B)
    for group, rows in _group_rows(group_ids).items():
        idx = torch.tensor(rows)
        on_idx = idx[on_policy_mask_B[idx].bool()]
        if on_idx.numel() == 0:
            raise ValueError(
                f"adv_estimator=grpo_split: group {group!r} has no on-policy row to take a baseline from; "
                "use adv_estimator=grpo or give every prompt at least one on-policy sample "
                "(rollout.n_off_policy < rollout.n)"
            )
        mean, std = _mean_std(scores_B[on_idx])
        if std.item() == 0:
            std = torch.ones_like(std)
        adv[idx] = _normalised(scores_B[idx], mean, std, use_std, epsilon)
    return adv


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "grpo_split": grpo_split_advantages,
}


def compute_advantages(
    *,
    token_level_rewards_BT: Tensor,
    response_mask_BT: Tensor,
    prefix_mask_BT: Tensor,
    group_ids: Sequence[Hashable],
    estimator: str = "grpo",
    use_std: bool = False,
    prefix_reward_weight_alpha: float = 1.0,
    prefix_reward_weight_beta: float = 1.0,
) -> Tensor:
    """Per-token advantages [B, T]: the row advantage tiled over its tokens, times the response mask,
    then weighted by alpha on demonstration tokens and beta on the others (both 1.0 in LUFFY).

    A row counts as on-policy for `grpo_split` when none of its tokens is a demonstration token.
    """
    try:
        estimate = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"adv_estimator={estimator!r} is not one of: {', '.join(ADVANTAGE_ESTIMATORS)}") from None
    if len(group_ids) != token_level_rewards_BT.shape[0]:
        raise ValueError(f"{len(group_ids)} group ids for {token_level_rewards_BT.shape[0]} rows")
    prefix = prefix_mask_BT.bool()
    with torch.no_grad():
        adv_B = estimate(
            outcome_scores(token_level_rewards_BT),
            group_ids,
            use_std=use_std,
            on_policy_mask_B=~prefix.any(-1),
        )
        adv_BT = adv_B.unsqueeze(-1) * response_mask_BT.to(adv_B.dtype)
        if prefix_reward_weight_alpha != 1.0 or prefix_reward_weight_beta != 1.0:
            weight = torch.where(prefix, prefix_reward_weight_alpha, prefix_reward_weight_beta).to(adv_BT.dtype)
            adv_BT = adv_BT * weight
    return adv_BT


def zero_truncated_advantages(
    advantages_BT: Tensor,
    responses_BT: Tensor,
    response_mask_BT: Tensor,
    *,
    eos_token_id: int,
    max_response_length: int,
) -> Tensor:
    """Upstream's `data.disable_truncation_advantage` (mix_trainer.py): rows that reached
    max_response_length without an EOS token get advantage 0 (a cut-off answer is neither right nor wrong)."""
    lengths = response_mask_BT.sum(-1)
    has_eos = ((responses_BT == eos_token_id) & response_mask_BT.bool()).any(-1)
    truncated = (lengths >= max_response_length) & ~has_eos
    out = advantages_BT.clone()
    out[truncated] = 0
    return out


def sft_prefix_advantages(advantages_BT: Tensor, prefix_mask_BT: Tensor, *, weight: float, n: int) -> Tensor:
    """Upstream's `actor.use_sft_prefix_reward` (mix_trainer.py): every demonstration-prefix token gets the
    fixed advantage `sft_prefix_reward_weight / n` (upstream requires n_prefix = -1, every row a prefix row)."""
    out = advantages_BT.clone()
    out[prefix_mask_BT.bool()] = weight / n
    return out
