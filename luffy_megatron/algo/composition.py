"""Rollout composition: how prompts, demonstrations and generations become the rows of a step.

Upstream (`mix_vllm_rollout.generate_sequences`):
  * every prompt is repeated n times; the first `n_off_policy` slots of a group get a prefix ratio
    from the prefix strategy, the others 0.0 (so the demonstration row is slot 0 of its group);
  * the demonstration gets `eos_token_id` appended (when non-empty); prefix = demo[:int(len * ratio)];
  * the engine continues `prompt + prefix`; response = prefix + generation, cut to the response
    width; `prefix_mask` is True on the prefix tokens (the appended EOS included);
  * the response mask is 1 up to and including the first EOS;
  * with `use_off_policy_probs`, the teacher's probability of each demonstration token (and of the
    appended EOS) sits at that token's response position (`prefix_target_probs`; -1 elsewhere).

The main run uses ratio 1.0: the whole demonstration (with its EOS) is the row, and there is nothing
left to generate for it. Upstream still sends such rows to vLLM and masks the output away; we skip
them (`needs_generation`), which gives the same tensors under the mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

PREFIX_STRATEGIES = ("random", "linear", "reverse_linear", "linear_max", "fixed")
NUM_STEP_WINDOWS = 10


def _window_bounds(strategy: str, global_step: int, prefix_steps: int, linear_max_ratio: float) -> tuple[float, float]:
    """`reverse_linear` / `linear_max`: 10 windows over `prefix_steps`; window k bounds the ratio to
    (0, (k+1) * max / 10) (growing prefix) or (0, (10 - k) * max / 10) (shrinking prefix).
    Steps past the last window use the last one, as upstream (w_idx = -1)."""
    step = global_step - 1  # upstream counts steps from 1 and subtracts one
    window = NUM_STEP_WINDOWS - 1
    for k in range(NUM_STEP_WINDOWS):
        if k * prefix_steps / NUM_STEP_WINDOWS <= step <= (k + 1) * prefix_steps / NUM_STEP_WINDOWS:
            window = k
            break
    if strategy == "reverse_linear":
        return 0.0, (window + 1) * linear_max_ratio / NUM_STEP_WINDOWS
    return 0.0, (NUM_STEP_WINDOWS - window) * linear_max_ratio / NUM_STEP_WINDOWS


def _fixed_ratios(num_slots: int, min_ratio: float, max_ratio: float) -> list[float]:
    """Evenly spaced from min to max. Upstream divides by (num_slots - 1) and so cannot take one
    slot; one slot gets `min_ratio` here (the config refuses it unless min == max)."""
    if num_slots == 1:
        return [min_ratio]
    step = (max_ratio - min_ratio) / (num_slots - 1)
    return [min_ratio + i * step for i in range(num_slots)]


def prefix_ratios(
    *,
    strategy: str,
    num_prompts: int,
    n: int,
    n_off_policy: int,
    min_prefix_ratio: float = 1.0,
    max_prefix_ratio: float = 1.0,
    share_across_samples: bool = False,
    global_step: int = 1,
    prefix_steps: int = 1000,
    linear_max_ratio: float = 0.8,
    rng: random.Random | None = None,
) -> list[float]:
    """One prefix ratio per row, rows ordered prompt-major (prompt 0's n slots, then prompt 1's...).

    `n_off_policy`: how many leading slots of each group are guided; -1 = all n slots; 0 = none.
    (Upstream, with shared ratios, treats 0 like -1; here 0 always means a pure on-policy group.)
    """
    if strategy not in PREFIX_STRATEGIES:
        raise ValueError(f"prefix_strategy={strategy!r} is not one of: {', '.join(PREFIX_STRATEGIES)}")
    if not -1 <= n_off_policy <= n:
        raise ValueError(f"n_off_policy={n_off_policy} must be -1 (all) or between 0 and n={n}")
    rng = rng or random.Random()
    guided = n if n_off_policy == -1 else n_off_policy

    if share_across_samples:
        if strategy == "fixed":
            raise ValueError("prefix_strategy='fixed' cannot be used with prefix_share_across_samples=true")
        ratios: list[float] = []
        for _ in range(num_prompts):
            if strategy == "linear":
                progress = min((global_step - 1) / prefix_steps, 1.0)
                ratio = linear_max_ratio * (1.0 - progress)
            elif strategy in ("reverse_linear", "linear_max"):
                # Upstream falls back to a uniform(min, max) draw for these when shared.
                ratio = rng.uniform(min_prefix_ratio, max_prefix_ratio)
            else:
                ratio = rng.uniform(min_prefix_ratio, max_prefix_ratio)
            ratios += [ratio] * guided + [0.0] * (n - guided)
        return ratios

    if strategy == "linear":
        raise ValueError("prefix_strategy='linear' needs prefix_share_across_samples=true (one ratio per prompt)")
    ratios = []
    for _ in range(num_prompts):
        if strategy == "random":
            group = [rng.uniform(min_prefix_ratio, max_prefix_ratio) for _ in range(guided)]
        elif strategy == "fixed":
            group = _fixed_ratios(guided, min_prefix_ratio, max_prefix_ratio) if guided else []
        else:
            lo, hi = _window_bounds(strategy, global_step, prefix_steps, linear_max_ratio)
            group = [rng.uniform(lo, hi) for _ in range(guided)]
        ratios += group + [0.0] * (n - guided)
    return ratios


@dataclass
class GroupPlan:
    """What the engines must do for one batch of prompts, and what to put back afterwards.

    Rows are prompt-major: row r belongs to prompt r // n (its `group_index`)."""

    engine_inputs: list[list[int]]  # prompt + prefix, per row
    prefixes: list[list[int]]  # demonstration tokens placed at the start of each row's response
    group_index: list[int]
    needs_generation: list[bool]  # False when the prefix already ends with EOS (a full trace)
    max_new_tokens: list[int]  # response width left after the prefix


def plan_rows(
    *,
    prompts: Sequence[Sequence[int]],
    demonstrations: Sequence[Sequence[int]],
    ratios: Sequence[float],
    n: int,
    eos_token_id: int,
    response_length: int,
) -> GroupPlan:
    """Expand prompts x n and attach demonstration prefixes (EOS appended to non-empty demos).

    `demonstrations[p]` are the token ids of prompt p's trace WITHOUT EOS (empty = no demonstration:
    the slot becomes on-policy, as upstream).
    """
    if len(demonstrations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(demonstrations)} demonstrations")
    if len(ratios) != len(prompts) * n:
        raise ValueError(f"{len(ratios)} prefix ratios for {len(prompts)} prompts x n={n}")
    plan = GroupPlan([], [], [], [], [])
    for row, ratio in enumerate(ratios):
        p = row // n
        demo = list(demonstrations[p])
        if demo:
            demo.append(eos_token_id)
        prefix = demo[: int(len(demo) * ratio)]
        plan.engine_inputs.append(list(prompts[p]) + prefix)
        plan.prefixes.append(prefix)
        plan.group_index.append(p)
        full_trace = bool(prefix) and prefix[-1] == eos_token_id
        budget = max(response_length - len(prefix), 0)
        plan.needs_generation.append(not full_trace and budget > 0)
        plan.max_new_tokens.append(budget)
    return plan


def response_mask_from_eos(responses_BT: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it (upstream `get_eos_mask`)."""
    is_eos = responses_BT.eq(eos_token_id).long()
    after_first_eos = (torch.cumsum(is_eos, dim=1) - is_eos).bool()
    return (~after_first_eos).long()


def assemble_responses(
    *,
    prefixes: Sequence[Sequence[int]],
    generations: Sequence[Sequence[int]],
    eos_token_id: int,
    pad_token_id: int,
    response_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """response = prefix + generation, cut to `response_length`, right-padded with `pad_token_id`.

    Returns (responses [B, L] int64, prefix_mask [B, L] bool, response_mask [B, L] int64).
    `generations[i]` are the engine's output ids for row i (empty for rows not generated).
    """
    if len(prefixes) != len(generations):
        raise ValueError(f"{len(prefixes)} prefixes but {len(generations)} generations")
    rows = len(prefixes)
    responses = torch.full((rows, response_length), pad_token_id, dtype=torch.long)
    prefix_mask = torch.zeros((rows, response_length), dtype=torch.bool)
    for i, (prefix, gen) in enumerate(zip(prefixes, generations)):
        tokens = (list(prefix) + list(gen))[:response_length]
        if tokens:
            responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        prefix_mask[i, : min(len(prefix), response_length)] = True
    return responses, prefix_mask, response_mask_from_eos(responses, eos_token_id)


TARGET_PROBS_PAD = -1.0  # upstream pads target_probs with -1 (rl_dataset_with_target.py)


def prefix_target_probs(
    *,
    prefix_lengths: Sequence[int],
    group_index: Sequence[int],
    demonstration_probs: Sequence[Sequence[float] | None],
    response_length: int,
) -> torch.Tensor:
    """Teacher probabilities of the demonstration-prefix tokens of every row, [B, L] float32
    (`algo.use_off_policy_probs`); `TARGET_PROBS_PAD` (-1, upstream's padding) everywhere else.

    `demonstration_probs[p]` belongs to prompt p's demonstration and is aligned with its tokens plus the
    appended EOS (`EncodedExample.demo_probs`): a row's prefix is `(demo + [eos])[:k]` (`plan_rows`), so its
    response positions 0..k-1 get `demonstration_probs[p][:k]`, cut to the response width -- upstream's
    placement (the dataset's target_probs sit on response positions 0.. of a row whose response starts with
    the target). The loss reads them only where `prefix_mask` is set."""
    if len(prefix_lengths) != len(group_index):
        raise ValueError(f"{len(prefix_lengths)} prefix lengths but {len(group_index)} group indices")
    out = torch.full((len(prefix_lengths), response_length), TARGET_PROBS_PAD, dtype=torch.float32)
    for row, (k, p) in enumerate(zip(prefix_lengths, group_index)):
        if k == 0:
            continue
        probs = demonstration_probs[p]
        if probs is None:
            raise ValueError(
                f"row {row} carries a demonstration prefix of {k} tokens but prompt {p} has no teacher probabilities"
            )
        if len(probs) < k:
            raise ValueError(
                f"row {row}: prefix of {k} tokens but prompt {p} has only {len(probs)} teacher probabilities "
                "(expected one per demonstration token plus one for EOS)"
            )
        k = min(k, response_length)
        out[row, :k] = torch.tensor(probs[:k], dtype=torch.float32)
    return out
