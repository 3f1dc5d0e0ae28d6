"""The boxes of one training step between the engines and the update: mixing demonstrations into the
generated groups, grading, the KL penalty and advantages, and the rollout checks."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo import (
    advantage_options,
    assemble_responses,
    compute_advantages,
    plan_rows,
    prefix_ratios,
    prefix_target_probs,
    sft_prefix_advantages,
    uses_target_probs,
    zero_truncated_advantages,
)
from luffy_megatron.algo.kl import apply_kl_penalty
from luffy_megatron.algo.options import rollout_is_options
from luffy_megatron.algo.rollout_correction import behaviour_log_probs, on_policy_mask, rollout_correction_metrics
from luffy_megatron.cluster.supervision import GuardedRanks
from luffy_megatron.config import Config
from luffy_megatron.metrics.compute import data_metrics
from luffy_megatron.rollout.faults import EngineSupervisor
from luffy_megatron.rollout.integrity import (
    check_weight_versions,
    drift_metrics,
    enforce_max_logprob_diff,
    logprob_drift,
    record_generations,
    rows_of_version,
)
from luffy_megatron.train.setup import pad_token_id


@dataclass
class StepDeps:
    """What one training step talks to."""

    cfg: Config
    workers: object  # cluster.Workers
    ranks: GuardedRanks
    engines: EngineSupervisor
    rewards: object  # reward.pool.RewardPool
    tokenizer: object
    kl_ctrl: object  # algo.kl controller (beta of the KL reward penalty)


def step_rng(cfg: Config, step: int) -> random.Random:
    """The prefix-ratio draws of `step`: a function of the seed and the step only, so a resumed run draws
    what the uninterrupted run would have."""
    return random.Random(cfg.trainer.seed * 1_000_003 + step)


SEED_ROW_BITS, SEED_STEP_BITS = 24, 24  # rows per generate call, steps per run (the last value: validation)
VALIDATION_STEP = (1 << SEED_STEP_BITS) - 1


def sampling_seed(cfg: Config, step: int) -> int | None:
    """rollout.seeded_sampling: the vLLM seed of the first row `step` generates (row r gets it + r,
    `rollout.engine.row_seeds`), from trainer.seed and the step only, so the same weights sample the same rows
    in a resumed or repeated run; `step` VALIDATION_STEP: validation's, the same at every validation. None (vLLM's
    own random stream) when the setting is off. Distinct steps never share a row's seed, nor do distinct trainer.seed
    values below 2**15 (the seed enters modulo 2**15)."""
    if not cfg.rollout.seeded_sampling:
        return None
    if not 0 <= step <= VALIDATION_STEP:
        raise ValueError(f"rollout.seeded_sampling: step {step} is outside 0..{VALIDATION_STEP - 1}")
    seed = cfg.trainer.seed % (1 << (63 - SEED_ROW_BITS - SEED_STEP_BITS))  # the whole seed below 2**63
    return ((seed << SEED_STEP_BITS) | step) << SEED_ROW_BITS


def generate_and_mix(
    cfg: Config, engines: EngineSupervisor, tokenizer, prompts: list, step: int, rng: random.Random, restart=True
):
    """Rows of one step: n slots per prompt, the first n_off_policy carry the demonstration (prefix),
    the engines generate the rest. Returns the batch, an empty reward tensor to fill, what the engines
    reported per row (`RolloutRecord`: engine, weight version, log-probs) and metrics. `restart=False`: a
    failed engine is reported, not restarted (a generation that runs beside an update, train/overlap.py)."""
    r, width = cfg.rollout, cfg.data.max_response_length
    ratios = prefix_ratios(
        strategy=r.prefix_strategy,
        num_prompts=len(prompts),
        n=r.n,
        n_off_policy=r.n_off_policy,
        min_prefix_ratio=r.min_prefix_ratio,
        max_prefix_ratio=r.max_prefix_ratio,
        share_across_samples=r.prefix_share_across_samples,
        global_step=step,
        prefix_steps=r.prefix_steps,
        linear_max_ratio=r.prefix_linear_max_ratio,
        rng=rng,
    )
    plan = plan_rows(
        prompts=[p.prompt_ids for p in prompts],
        demonstrations=sampled_demonstrations(cfg, prompts, step),
        ratios=ratios,
        n=r.n,
        eos_token_id=tokenizer.eos_token_id,
        response_length=width,
    )
    todo = [i for i, need in enumerate(plan.needs_generation) if need]
    t0 = time.time()
    outputs = []
    if todo:
        outputs = engines.generate_rollouts(
            [plan.engine_inputs[i] for i in todo],
            [plan.max_new_tokens[i] for i in todo],
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            group_size=r.n,
            restart=restart,
            seed=sampling_seed(cfg, step),
        )
    generations: list = [None for _ in plan.prefixes]
    for i, gen in zip(todo, outputs):
        generations[i] = gen
    responses, prefix_mask, response_mask = assemble_responses(
        prefixes=plan.prefixes,
        generations=[g.token_ids if g else [] for g in generations],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id(tokenizer),
        response_length=width,
    )
    target_probs = None
    if uses_target_probs(cfg.algo):
        # algo.use_off_policy_probs: the teacher's probability of each demonstration token at its response
        # position, -1 elsewhere
        target_probs = prefix_target_probs(
            prefix_lengths=[len(x) for x in plan.prefixes],
            group_index=plan.group_index,
            demonstration_probs=[p.demo_probs for p in prompts],
            response_length=width,
        )
    batch = RolloutBatch(
        prompts=[prompts[g].prompt_ids for g in plan.group_index],
        responses=responses,
        response_mask=response_mask,
        prefix_mask=prefix_mask,
        group_ids=[f"{step}:{g}" for g in plan.group_index],
        target_probs=target_probs,
    )
    record = record_generations(prefixes=plan.prefixes, generations=generations, response_mask_BT=response_mask)
    metrics = {
        "rollout/generated_tokens": sum(len(g.token_ids) for g in outputs),
        "rollout/generate_s": time.time() - t0,
        "rollout/response_length_mean": float(response_mask.sum(-1).float().mean()),
        "rollout/off_policy_rows": float(prefix_mask.any(-1).sum()),
        "rollout/engine_restarts": float(engines.restarts),
    }
    return batch, torch.zeros(responses.shape, dtype=torch.float32), record, metrics


def sampled_demonstrations(cfg: Config, prompts: list, step: int) -> list[list[int]]:
    """Each prompt's demonstration, or none (its rows are all generated) with probability 1 - data.sample_target_ratio
    (upstream's dataset draws `np.random.rand() < sample_target_ratio` per example; 1.0 in LUFFY). The draws are a
    function of trainer.seed and the step, so a resumed run draws the same."""
    ratio = cfg.data.sample_target_ratio
    if ratio >= 1.0:
        return [p.demo_ids or [] for p in prompts]
    rng = random.Random(f"sample_target_ratio:{cfg.trainer.seed}:{step}")
    return [(p.demo_ids or []) if rng.random() < ratio else [] for p in prompts]


def grade(rewards, tokenizer, batch: RolloutBatch, prompts: list, n: int, token_rewards: torch.Tensor) -> list[float]:
    """Reward every row, demonstrations included (upstream verifies them too), on its valid response
    text (EOS text included, as upstream decodes it); the score sits on the last valid token."""
    lengths = batch.response_lengths()
    texts = [tokenizer.decode(batch.responses[i, : lengths[i]].tolist()) for i in range(batch.num_rows)]
    golds = [prompts[i // n].ground_truth for i in range(batch.num_rows)]
    scores = rewards.grade(list(zip(texts, golds)))
    for i, (score, length) in enumerate(zip(scores, lengths)):
        token_rewards[i, max(length, 1) - 1] = score
    return scores


def reward_metrics(scores: list[float], batch: RolloutBatch, pool=None) -> dict[str, float]:
    """The rewards of the step's rows by side; with the reward pool, its fault counts since the run started
    (`reward/timed_out`, `reward/crashed`: items scored 0 by a killed or dead grader; `reward/regraded`: items
    graded again after their worker died; `reward/worker_restarts`)."""
    off = batch.prefix_mask.any(-1).tolist()
    on_scores = [s for s, o in zip(scores, off) if not o]
    off_scores = [s for s, o in zip(scores, off) if o]
    out = {"rollout/reward_mean": sum(scores) / len(scores)}
    if on_scores:
        out["rollout/on_policy_reward"] = sum(on_scores) / len(on_scores)
    if off_scores:
        out["rollout/off_policy_reward"] = sum(off_scores) / len(off_scores)
    stats = getattr(pool, "stats", None)
    if stats is not None:
        for name in ("timed_out", "crashed", "regraded", "worker_restarts"):
            out[f"reward/{name}"] = getattr(stats, name)
    return out


def rewards_and_advantages(
    cfg: Config,
    kl_ctrl,
    batch: RolloutBatch,
    token_scores: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, dict, float | None]:
    """Upstream's order after the log-probs (mix_trainer.py): the KL reward penalty with the controller's beta
    (algo/kl.py; skipped under algo.use_kl_loss, whose KL is in the loss instead), then the advantages of the
    penalised rewards. Returns the token rewards, the advantages, `critic/kl` + `critic/kl_coeff`, and the KL
    for the controller's update (None under use_kl_loss)."""
    if cfg.algo.use_kl_loss:
        token_rewards, kl_metrics, kl_now = token_scores, {}, None
    else:
        token_rewards, kl_metrics, kl_now = apply_kl_penalty(
            token_level_scores_BT=token_scores,
            response_mask_BT=batch.response_mask,
            old_log_prob_BT=old_log_probs,
            ref_log_prob_BT=ref_log_probs,
            beta=kl_ctrl.value,
            kind=cfg.algo.kl_penalty,
        )
    advantages = compute_advantages(
        token_level_rewards_BT=token_rewards,
        response_mask_BT=batch.response_mask,
        prefix_mask_BT=batch.prefix_mask,
        group_ids=batch.group_ids,
        **advantage_options(cfg.algo),
    )
    return token_rewards, apply_upstream_advantage_edits(cfg, batch, advantages, eos_token_id), kl_metrics, kl_now


def apply_upstream_advantage_edits(
    cfg: Config, batch: RolloutBatch, advantages: torch.Tensor, eos_token_id: int
) -> torch.Tensor:
    """The advantage edits upstream applies after GRPO (mix_trainer.py), both off in LUFFY's runs:
    algo.disable_truncation_advantage and algo.use_sft_prefix_reward."""
    a = cfg.algo
    if a.disable_truncation_advantage:
        advantages = zero_truncated_advantages(
            advantages,
            batch.responses,
            batch.response_mask,
            eos_token_id=eos_token_id,
            max_response_length=cfg.data.max_response_length,
        )
    if a.use_sft_prefix_reward:
        advantages = sft_prefix_advantages(
            advantages, batch.prefix_mask, weight=a.sft_prefix_reward_weight, n=cfg.rollout.n
        )
    return advantages


def check_rollouts(
    cfg: Config, engines: EngineSupervisor, rollout, old_log_probs: torch.Tensor, *, actor_version: int, step: int
) -> dict[str, float]:
    """Before the update: the drift between the engines' and the actor's log-probs of the generated tokens,
    the weight version of every row against the actor's (`StaleRolloutError`; under trainer.overlap=one_step a
    row one update old is expected), and rollout.max_logprob_diff (warn, or `LogprobDriftError`) on the rows
    sampled by the actor's own weights (on rows one update old the drift includes the update's change). Returns
    the `rollout/logprob_diff_*`, `rollout/weight_version` and `rollout/weight_version_lag` metrics."""
    max_lag = 1 if cfg.trainer.overlap == "one_step" else 0
    drift = logprob_drift(rollout, old_log_probs)
    check_weight_versions(
        rollout,
        actor_version,
        old_log_prob_BT=old_log_probs,
        describe_engine=engines.fleet.describe_engine,
        max_lag=max_lag,
    )
    current = drift if max_lag == 0 else logprob_drift(rollout, old_log_probs, rows_of_version(rollout, actor_version))
    enforce_max_logprob_diff(
        current, max_logprob_diff=cfg.rollout.max_logprob_diff, action=cfg.rollout.logprob_diff_action, step=step
    )
    return drift_metrics(rollout, drift, actor_version)


def rollout_correction(
    cfg: Config, batch: RolloutBatch, rollout, old_log_probs: torch.Tensor
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """algo.rollout_is: the engines' log-probs of the step's generated tokens as the update's behaviour
    log-probs (NaN on tokens no engine sampled), and the `rollout_corr/*` metrics of the weights the update
    applies (from the same tensors). (None, {}) with rollout_is=none (or auto under trainer.overlap=none)."""
    options = rollout_is_options(cfg.algo, cfg.trainer.overlap)
    if options["mode"] == "none":
        return None, {}
    width = old_log_probs.shape[1]
    behaviour = behaviour_log_probs(rollout.engine_log_prob_BT[:, :width], rollout.generated_mask_BT[:, :width])
    mask = on_policy_mask(batch.response_mask[:, :width], batch.prefix_mask[:, :width])
    return behaviour, rollout_correction_metrics(old_log_probs, behaviour, mask, **options)


def batch_metrics(cfg: Config, batch: RolloutBatch, token_scores, token_rewards, advantages) -> dict[str, float]:
    """The batch's scores, rewards, advantages and lengths under upstream's names (`metrics/compute.py`)."""
    return data_metrics(
        token_scores_BT=token_scores,
        token_rewards_BT=token_rewards,
        advantages_BT=advantages,
        response_mask_BT=batch.response_mask,
        prefix_mask_BT=batch.prefix_mask,
        prompt_lengths=[len(p) for p in batch.prompts],
        max_prompt_length=cfg.data.max_prompt_length,
        max_response_length=cfg.data.max_response_length,
    )
