"""The LUFFY training loop: generate -> mix -> reward -> advantage -> log-probs -> update -> sync -> log/save.

    luffy-train --config recipes/luffy_main.yaml [--set key=value ...]

One driver process (this module) holds the data, the reward pool and the loop; Ray holds the Megatron
ranks (`cluster.ActorGroup`) and the vLLM engines (`rollout.EngineFleet`), placed on the GPUs by the layout
of `cluster.layout` (`cluster/`). Each box of the data flow in DESIGN.md is one call below.

The ranks are called through `rollout.faults.GuardedRanks` and the engines through
`rollout.faults.EngineSupervisor` (deadlines, named failures, engine restarts). The weight version is the
step whose update made the actor's weights; every generated row carries the version of the engine that made
it and is checked against the actor's, with the engines' log-probs against the actor's
(`rollout/integrity.py`). A step that fails (an engine, stale or drifting rollouts) first checkpoints the
healthy actor, then `luffy-train` reports it in one `luffy-train: error: ...` line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo import (advantage_options, assemble_responses, compute_advantages, plan_rows, prefix_ratios,
                                 prefix_target_probs, uses_target_probs)
from luffy_megatron.algo.kl import apply_kl_penalty, make_kl_controller
from luffy_megatron.algo.options import kl_controller_options, uses_reference
from luffy_megatron.config import Config, ConfigError, load_config, parse_overrides_from_argv
from luffy_megatron.data.errors import DataError
from luffy_megatron.metrics_log import MetricsLogger, plot_results
from luffy_megatron.monitoring import RunPerf, StepTimer, data_metrics
from luffy_megatron.rollout.faults import EngineFailure, EngineSupervisor, GuardedRanks, RankFailure, RunError, remote_cause
from luffy_megatron.rollout.integrity import (RolloutIntegrityError, check_weight_versions, drift_metrics,
                                              enforce_max_logprob_diff, logprob_drift, record_generations)
from luffy_megatron.utils.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals

log = logging.getLogger("luffy.trainer")


# ----------------------------------------------------------------------------------------- the loop


def train(cfg: Config, workers=None) -> Path:
    """Run (or resume) a training job; returns its output directory. `workers`: an already started
    `cluster.Workers` (see `start_workers`), left running at the end; by default started here and stopped."""
    import ray

    from luffy_megatron.cluster.layout import preflight
    from luffy_megatron.reward.pool import RewardPool
    preflight(cfg)  # the model's heads vs TP, an explicit cluster.layout: before Ray and before any data or model
    check_megatron_settings(cfg)  # FP8 / TE / CP / distributed optimizer against what this machine can run
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, train_set, val_set = load_data(cfg)
    if cfg.trainer.val_only and val_set is None:
        raise ConfigError("trainer.val_only=true but data.val_files is empty: give the validation parquet files")
    # the real step count, as upstream injects it into the optimizer config: the actor's LR warmup counts from it
    total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * (len(train_set) // cfg.data.train_batch_size)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_training_steps=total_steps))
    use_gpu = resolve_device(cfg) == "cuda"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    stop = StopSignals.install()  # SIGUSR1/SIGTERM: checkpoint after the current step, exit PREEMPTED_EXIT_CODE

    owned, metrics_log = workers is None, None
    try:
        if owned:
            workers = start_workers(cfg, pad_token_id(tokenizer), use_gpu=use_gpu, log_dir=out / "logs" / "workers")
        take_over(cfg, workers, out, pad_token_id(tokenizer))  # reused workers: the actor of another run is rebuilt
        ranks, engines = guard(cfg, workers)
        workers.write_report(out / "placement.json")
        metrics_log = MetricsLogger(cfg.logging.tensorboard_dir or out / "tensorboard", out / "metrics.jsonl", total_steps=total_steps, console=cfg.logging.console, config=cfg)
        perf = RunPerf.of_run(cfg, workers.placement.layout, workers.actors.infos()[0]["cuda_device_name"])  # perf/throughput, perf/mfu
        sampler = PromptSampler(len(train_set), cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        kl_ctrl = make_kl_controller(**kl_controller_options(cfg.algo))  # beta of the KL reward penalty (algo/kl.py)
        step = resume(cfg, ranks, engines, sampler, out, kl_ctrl=kl_ctrl)
        saved_step, preempted = step, None
        trained = (step, sampler.position)  # the newest state of the actor: after step trained[0], data position trained[1]

        def trained_at(step_done: int, position: int) -> None:
            nonlocal trained
            trained = (step_done, position)

        with RewardPool(num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s, grader=cfg.reward.fn,
                        strip_special_tokens=cfg.reward.strip_special_tokens) as rewards:
            if val_set is not None and (cfg.trainer.val_only or (cfg.trainer.val_before_train and step == 0)):
                metrics_log.log(step, validate(cfg, engines, rewards, tokenizer, val_set))
                if cfg.trainer.val_only:  # upstream: validate the loaded weights and stop
                    total_steps = step
            while step < total_steps:
                if stop.requested:  # the safe point: the previous step is complete
                    preempted = stop_with_checkpoint(stop, ranks, cfg, out, step, sampler.position, saved=saved_step == step, kl_ctrl=kl_ctrl)
                    break
                step += 1
                timer = StepTimer()  # timing_s/<phase> (monitoring.py)
                prompts = [train_set[i] for i in sampler.next_batch()]
                box = StepBox(cfg, workers, ranks, engines, rewards, tokenizer, kl_ctrl, timer)
                try:
                    batch, metrics = train_step(box, prompts, step, on_trained=lambda: trained_at(step, sampler.position))
                    if val_set is not None and cfg.trainer.test_freq > 0 and (step % cfg.trainer.test_freq == 0 or step == total_steps):
                        with timer("testing"):
                            metrics.update(validate(cfg, engines, rewards, tokenizer, val_set))
                        if cfg.trainer.save_best_hf:
                            save_best_hf(ranks, out, metrics["val/test_score/avg"], step)
                except (EngineFailure, RolloutIntegrityError) as failure:
                    raise checkpoint_after_failure(failure, ranks, cfg, out, trained, saved_step, kl_ctrl=kl_ctrl) from None
                except RankFailure as failure:
                    raise with_newest_checkpoint(failure, out) from None
                if cfg.trainer.save_freq > 0 and (step % cfg.trainer.save_freq == 0 or step == total_steps):
                    with timer("save_checkpoint"):  # before the step's metrics: timing_s/step includes it, as upstream
                        saved_step = checkpoint_step(ranks, cfg, out, step, sampler.position, kl_ctrl=kl_ctrl)
                metrics_log.log(step, {**metrics, **perf.step_metrics(batch, timer)})
        plot_results(out / "metrics.jsonl", out / "results.png")
    finally:
        if metrics_log is not None:
            metrics_log.close()
        stop.uninstall()
        if owned and workers is not None:
            workers.shutdown()
    if preempted is not None:
        raise preempted
    return out


# ----------------------------------------------------------------------------------------- one step


@dataclass
class StepBox:
    """What one training step talks to."""

    cfg: Config
    workers: object  # cluster.Workers
    ranks: GuardedRanks
    engines: EngineSupervisor
    rewards: object  # reward.pool.RewardPool
    tokenizer: object
    kl_ctrl: object  # algo.kl controller (beta of the KL reward penalty)
    timer: StepTimer


def train_step(box: StepBox, prompts: list, step: int, *, on_trained) -> tuple[RolloutBatch, dict]:
    """One LUFFY step, the boxes of DESIGN.md in order: generate and mix -> reward -> old (and reference)
    log-probs -> rollout checks -> KL penalty and advantages -> update -> weight sync. `on_trained()` is called
    as soon as the update has changed the actor (what a failure afterwards must checkpoint). Returns the batch
    and the step's metrics."""
    cfg, ranks, engines, timer = box.cfg, box.ranks, box.engines, box.timer
    t0 = time.time()
    with timer("gen"):
        batch, token_scores, rollout, rollout_metrics = generate_and_mix(cfg, engines, box.tokenizer, prompts, step, step_rng(cfg, step))
    with timer("reward"):
        scores = grade(box.rewards, box.tokenizer, batch, prompts, cfg.rollout.n, token_scores)  # critic/score/*: before any KL penalty
    switches = box.workers.training_phase()  # colocated: engines sleep; offloaded optimizer state comes back
    with timer("old_log_prob"):
        old_log_probs, _ = ranks.call("compute_log_probs", batch)
    ref_log_probs = None
    if uses_reference(cfg.algo):  # the frozen initial model (algo.use_kl_loss, algo.kl_ctrl_coef)
        with timer("ref"):
            ref_log_probs = ranks.call("compute_ref_log_probs", batch)
    integrity = check_rollouts(cfg, engines, rollout, old_log_probs, actor_version=step - 1, step=step)
    token_rewards, advantages, kl_metrics, kl_now = rewards_and_advantages(cfg, box.kl_ctrl, batch, token_scores, old_log_probs, ref_log_probs, box.tokenizer.eos_token_id)
    with timer("update_actor"):
        actor_metrics = ranks.call("update", batch, advantages=advantages, old_log_probs=old_log_probs,
                                   ref_log_probs=ref_log_probs if cfg.algo.use_kl_loss else None)
    on_trained()
    if kl_now is not None:  # after the update, so a checkpoint holds the controller of the last completed step
        box.kl_ctrl.update(kl_now, n_steps=batch.num_rows)
    switches.update(box.workers.rollout_phase())  # optimizer state to host (offload); engines wake for the sync
    with timer("sync"):
        sync_seconds = engines.sync(version=step)
    metrics = {**rollout_metrics, **integrity, **reward_metrics(scores, batch), **kl_metrics, **actor_metrics, **switches, "perf/sync_s": sync_seconds,
               "perf/step_s": time.time() - t0, "perf/tokens_per_s": sum(batch.sequence_lengths()) / (time.time() - t0)}
    metrics.update(data_metrics(token_scores_BT=token_scores, token_rewards_BT=token_rewards, advantages_BT=advantages,
                                response_mask_BT=batch.response_mask, prefix_mask_BT=batch.prefix_mask,
                                prompt_lengths=[len(p) for p in batch.prompts], max_prompt_length=cfg.data.max_prompt_length,
                                max_response_length=cfg.data.max_response_length))
    return batch, metrics


# ----------------------------------------------------------------------------------------- the boxes


def check_megatron_settings(cfg: Config) -> None:
    """The actor's refusals (FP8 or CP without Transformer Engine, the distributed optimizer without CUDA, ...),
    raised by the driver at start instead of by every rank after the cluster is up. The driver runs on a node
    of the job (the Slurm batch step), so it sees the same CUDA and Transformer Engine as the ranks."""
    from luffy_megatron.actor.megatron_actor import megatron_settings

    try:
        megatron_settings(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def start_workers(cfg: Config, pad_id: int, *, use_gpu: bool, log_dir: Path | None = None):
    """GPUs reserved for the layout (bounded by cluster.placement_timeout_s, before any model loads), then the
    Megatron ranks built in their bundles and the engines started beside them (`cluster.Workers`; engine i
    logs to `log_dir/engine_<i>.log`). A model the ranks cannot load or convert is a `ModelLoadError`."""
    from luffy_megatron.cluster.actor_group import ActorGroup
    from luffy_megatron.cluster.placement import reserve
    from luffy_megatron.cluster.workers import Workers

    placement = reserve(cfg)
    log.warning("%s", placement.describe())
    workers = Workers(placement, None, None, offload=cfg.actor.offload_during_rollout)
    try:
        workers.actors = ActorGroup(placement)
        build_ranks(workers.actors, cfg, pad_id, log_dir)
        workers.fleet = start_engines(cfg, placement, use_gpu=use_gpu, log_dir=log_dir)
        # Engines and a fresh actor load the same model.path: both hold weight version 0 (no sync before
        # step 1). An actor started from model.load_checkpoint holds other weights: sync them first.
        workers.fleet.synced_version = None if cfg.model.load_checkpoint else 0
    except BaseException:
        workers.shutdown()
        raise
    return workers


class ModelLoadError(ConfigError):
    """The Megatron ranks could not load (convert) the model of model.path / model.load_checkpoint."""


def build_ranks(actors, cfg: Config, pad_id: int, log_dir: Path | None, *, fresh: bool = False) -> None:
    """Builds the Megatron model on every rank (HF -> Megatron conversion, or model.load_checkpoint). An error
    raised there reaches the user as one line naming the model and the error; the rank's traceback goes to
    `log_dir/model_load_error.log`."""
    import ray

    try:
        actors.build(cfg, cfg.model.path, pad_id, fresh=fresh)
    except ray.exceptions.RayTaskError as err:
        cause = remote_cause(err)
        where = f"model.path={cfg.model.path}" + (f", model.load_checkpoint={cfg.model.load_checkpoint}" if cfg.model.load_checkpoint else "")
        saved = ""
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "model_load_error.log").write_text(str(err))
            saved = f" (the rank's traceback: {Path(log_dir) / 'model_load_error.log'})"
        raise ModelLoadError(f"the Megatron ranks could not load the model ({where}): {type(cause).__name__}: {cause}{saved}") from None


def take_over(cfg: Config, workers, out: Path, pad_id: int) -> bool:
    """Workers passed to `train` may hold the actor of another run (its trained weights, optimizer state, LR
    schedule, step): that actor is rebuilt from model.path (or model.load_checkpoint), as new workers would
    have it, and the engines are synced from it before they generate. Returns whether it rebuilt; the workers
    then hold this run (`Workers.actor_run`)."""
    rebuilt = workers.actor_run is not None and workers.actor_run != str(out)
    if rebuilt:
        log.warning("these workers' Megatron ranks hold the run in %s: rebuilding the actor for %s", workers.actor_run, out)
        build_ranks(workers.actors, cfg, pad_id, out / "logs" / "workers", fresh=True)
        workers.fleet.synced_version = None  # the engines hold the other run's weights
    workers.actor_run = str(out)
    return rebuilt


def start_engines(cfg: Config, placement, *, use_gpu: bool, log_dir: Path | None = None):
    """The vLLM engines of the layout, started from the same HF weights the actor loaded (so no sync before
    step 1); colocated engines with vLLM sleep mode, so they can free their GPU memory for the update."""
    from luffy_megatron.rollout.ray_engine import EngineFleet

    r, layout = cfg.rollout, placement.layout
    extra = {"gpu_memory_utilization": r.gpu_memory_utilization} if use_gpu else {}
    # Ray gives actors without CPUs one thread; generation and training take turns, so use all cores.
    threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    return EngineFleet.start(
        cfg.model.path, num_engines=len(layout.engines), launches=[placement.engine_launch(e) for e in range(len(layout.engines))],
        tensor_parallel_size=r.tensor_model_parallel_size, enable_sleep_mode=layout.mode == "colocated",
        max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length, enforce_eager=r.enforce_eager,
        seed=cfg.trainer.seed, max_num_seqs=r.max_num_seqs, env=threads, log_dir=log_dir,
        request_timeout_s=r.request_timeout_s, direct_load=r.engine_direct_load, **extra,
    )


def guard(cfg: Config, workers) -> tuple[GuardedRanks, EngineSupervisor]:
    """The ranks and the engines as the loop calls them: bounded waits, named failures, engine restarts."""
    from functools import partial, update_wrapper

    from luffy_megatron.sync.weights import resolve_transport

    ranks = GuardedRanks(workers.actors, timeout_s=cfg.trainer.rank_call_timeout_s)
    workers.ranks = ranks  # the optimizer offload/reload of a step go through the same bounded calls
    # rollout.weight_sync_transport (auto: by the layout, see sync.weights.resolve_transport)
    transport = resolve_transport(cfg.rollout.weight_sync_transport, workers.placement.mode)
    log.warning("weight sync: %s transport (rollout.weight_sync_transport=%s, %s layout)", transport,
                cfg.rollout.weight_sync_transport, workers.placement.mode)
    # auto on a colocated layout: shared memory, or the collective path where an engine cannot map it (CPU)
    fallback = "collective" if cfg.rollout.weight_sync_transport == "auto" and transport == "shared_memory" else None
    push = update_wrapper(partial(sync_weights, transport=transport, timeout_s=cfg.rollout.request_timeout_s,
                                  fallback=fallback), sync_weights)  # the ranks log it as sync_weights
    engines = EngineSupervisor(workers.fleet, ranks, push=push, bucket_bytes=cfg.rollout.weight_sync_bucket_mb * 2**20,
                               request_timeout_s=cfg.rollout.request_timeout_s, on_engine_failure=cfg.rollout.on_engine_failure)
    return ranks, engines


def load_data(cfg: Config):
    """Tokenizer, tokenized training set (with demonstrations) and validation set (or None)."""
    from transformers import AutoTokenizer

    from luffy_megatron.data.tokenization import load_tokenized_dataset, resolve_chat_template

    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give at least one LUFFY-format parquet file")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    common = dict(max_prompt_length=cfg.data.max_prompt_length, long_prompt_policy=cfg.data.long_prompt_policy,
                  skip_bad_rows=cfg.data.skip_bad_rows, remove_system=cfg.data.remove_system_prompt,
                  chat_template=resolve_chat_template(tokenizer, cfg.data.chat_template))
    # algo.use_off_policy_probs: the teacher's token probabilities (data.target_probs_key) of every demonstration
    probs = dict(target_probs_key=cfg.data.target_probs_key, require_target_probs=True) if uses_target_probs(cfg.algo) else {}
    train_sets = [load_tokenized_dataset(p, tokenizer, require_target=True, max_prefix_len=cfg.rollout.max_prefix_len, long_demo_policy=cfg.data.long_demo_policy, **probs, **common) for p in cfg.data.train_files]
    train_set = [ex for ds in train_sets for ex in ds]
    if len(train_set) < cfg.data.train_batch_size:
        raise ConfigError(f"data.train_files hold {len(train_set)} usable prompts, fewer than data.train_batch_size={cfg.data.train_batch_size}")
    val_set = [ex for p in cfg.data.val_files for ex in load_tokenized_dataset(p, tokenizer, require_target=False, **common)] or None
    return tokenizer, train_set, val_set


def generate_and_mix(cfg: Config, engines: EngineSupervisor, tokenizer, prompts: list, step: int, rng: random.Random):
    """Rows of one step: n slots per prompt, the first n_off_policy carry the demonstration (prefix),
    the engines generate the rest. Returns the batch, an empty reward tensor to fill, what the engines
    reported per row (`RolloutRecord`: engine, weight version, log-probs) and metrics."""
    r, width = cfg.rollout, cfg.data.max_response_length
    ratios = prefix_ratios(strategy=r.prefix_strategy, num_prompts=len(prompts), n=r.n, n_off_policy=r.n_off_policy,
                           min_prefix_ratio=r.min_prefix_ratio, max_prefix_ratio=r.max_prefix_ratio,
                           share_across_samples=r.prefix_share_across_samples, global_step=step,
                           prefix_steps=r.prefix_steps, linear_max_ratio=r.prefix_linear_max_ratio, rng=rng)
    plan = plan_rows(prompts=[p.prompt_ids for p in prompts], demonstrations=sampled_demonstrations(cfg, prompts, step),
                     ratios=ratios, n=r.n, eos_token_id=tokenizer.eos_token_id, response_length=width)
    todo = [i for i, need in enumerate(plan.needs_generation) if need]
    t0 = time.time()
    outputs = engines.generate_rollouts([plan.engine_inputs[i] for i in todo], [plan.max_new_tokens[i] for i in todo],
                                        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, group_size=r.n) if todo else []
    generations: list = [None for _ in plan.prefixes]
    for i, gen in zip(todo, outputs):
        generations[i] = gen
    responses, prefix_mask, response_mask = assemble_responses(prefixes=plan.prefixes, generations=[g.token_ids if g else [] for g in generations], eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), response_length=width)
    # algo.use_off_policy_probs: the teacher's probability of each demonstration token at its response position, -1 elsewhere
    target_probs = prefix_target_probs(prefix_lengths=[len(x) for x in plan.prefixes], group_index=plan.group_index,
                                       demonstration_probs=[p.demo_probs for p in prompts], response_length=width) if uses_target_probs(cfg.algo) else None
    batch = RolloutBatch(prompts=[prompts[g].prompt_ids for g in plan.group_index], responses=responses, response_mask=response_mask,
                         prefix_mask=prefix_mask, group_ids=[f"{step}:{g}" for g in plan.group_index], target_probs=target_probs)
    record = record_generations(prefixes=plan.prefixes, generations=generations, response_mask_BT=response_mask)
    metrics = {"rollout/generated_tokens": sum(len(g.token_ids) for g in outputs), "rollout/generate_s": time.time() - t0,
               "rollout/response_length_mean": float(response_mask.sum(-1).float().mean()),
               "rollout/off_policy_rows": float(prefix_mask.any(-1).sum()), "rollout/engine_restarts": float(engines.restarts)}
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


def rewards_and_advantages(cfg: Config, kl_ctrl, batch: RolloutBatch, token_scores: torch.Tensor, old_log_probs: torch.Tensor,
                           ref_log_probs: torch.Tensor | None, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor, dict, float | None]:
    """Upstream's order after the log-probs (mix_trainer.py): the KL reward penalty with the controller's beta
    (algo/kl.py; skipped under algo.use_kl_loss, whose KL is in the loss instead), then the advantages of the
    penalised rewards. Returns the token rewards, the advantages, `critic/kl` + `critic/kl_coeff`, and the KL
    for the controller's update (None under use_kl_loss)."""
    if cfg.algo.use_kl_loss:
        token_rewards, kl_metrics, kl_now = token_scores, {}, None
    else:
        token_rewards, kl_metrics, kl_now = apply_kl_penalty(
            token_level_scores_BT=token_scores, response_mask_BT=batch.response_mask, old_log_prob_BT=old_log_probs,
            ref_log_prob_BT=ref_log_probs, beta=kl_ctrl.value, kind=cfg.algo.kl_penalty)
    advantages = compute_advantages(token_level_rewards_BT=token_rewards, response_mask_BT=batch.response_mask, prefix_mask_BT=batch.prefix_mask,
                                    group_ids=batch.group_ids, **advantage_options(cfg.algo))
    return token_rewards, upstream_advantage_options(cfg, batch, advantages, eos_token_id), kl_metrics, kl_now


def upstream_advantage_options(cfg: Config, batch: RolloutBatch, advantages: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The advantage edits upstream applies after GRPO (mix_trainer.py), both off in LUFFY's runs:
    algo.disable_truncation_advantage and algo.use_sft_prefix_reward."""
    from luffy_megatron.algo import sft_prefix_advantages, zero_truncated_advantages

    a = cfg.algo
    if a.disable_truncation_advantage:
        advantages = zero_truncated_advantages(advantages, batch.responses, batch.response_mask, eos_token_id=eos_token_id,
                                               max_response_length=cfg.data.max_response_length)
    if a.use_sft_prefix_reward:
        advantages = sft_prefix_advantages(advantages, batch.prefix_mask, weight=a.sft_prefix_reward_weight, n=cfg.rollout.n)
    return advantages


def check_rollouts(cfg: Config, engines: EngineSupervisor, rollout, old_log_probs: torch.Tensor, *, actor_version: int, step: int) -> dict[str, float]:
    """Before the update: the drift between the engines' and the actor's log-probs of the generated tokens,
    the weight version of every row against the actor's (`StaleRolloutError`), and rollout.max_logprob_diff
    (warn, or `LogprobDriftError`). Returns the `rollout/logprob_diff_*` and `rollout/weight_version` metrics."""
    drift = logprob_drift(rollout, old_log_probs)
    check_weight_versions(rollout, actor_version, old_log_prob_BT=old_log_probs, describe_engine=engines.fleet.describe_engine)
    enforce_max_logprob_diff(drift, max_logprob_diff=cfg.rollout.max_logprob_diff, action=cfg.rollout.logprob_diff_action, step=step)
    return drift_metrics(rollout, drift)


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


def reward_metrics(scores: list[float], batch: RolloutBatch) -> dict[str, float]:
    off = batch.prefix_mask.any(-1).tolist()
    on_scores = [s for s, o in zip(scores, off) if not o]
    off_scores = [s for s, o in zip(scores, off) if o]
    out = {"rollout/reward_mean": sum(scores) / len(scores)}
    if on_scores:
        out["rollout/on_policy_reward"] = sum(on_scores) / len(on_scores)
    if off_scores:
        out["rollout/off_policy_reward"] = sum(off_scores) / len(off_scores)
    return out


def validate(cfg: Config, engines: EngineSupervisor, rewards, tokenizer, val_set: list) -> dict[str, float]:
    """Validation as upstream's `_validate`: n_val samples per prompt at val_temperature with top_p=1 and
    top_k=-1 (upstream's validation sampling, whatever the training sampling), scored by the training reward;
    `val/test_score/<data_source>` (rows without a source: `unknown`) and their mean `val/test_score/avg`
    (upstream's avg_score, which picks the best checkpoint). data.val_batch_size prompts per generate call
    (None: all at once); the scores do not depend on it."""
    n_val = cfg.rollout.n_val
    chunk = cfg.data.val_batch_size or len(val_set)
    texts: list[str] = []
    for start in range(0, len(val_set), chunk):
        part = val_set[start : start + chunk]
        prompts = [ex.prompt_ids for ex in part for _ in range(n_val)]
        outputs = engines.generate(prompts, [cfg.data.max_response_length] * len(prompts),
                                   temperature=cfg.rollout.val_temperature, top_p=1.0, top_k=-1)
        texts += [tokenizer.decode(o) for o in outputs]
    golds = [ex.ground_truth for ex in val_set for _ in range(n_val)]
    scores = rewards.grade(list(zip(texts, golds)))
    return validation_metrics(scores, [val_set[i // n_val].data_source for i in range(len(scores))])


def validation_metrics(scores: list[float], sources: list[str | None]) -> dict[str, float]:
    """Per-source means (`val/test_score/<source>`, `unknown` for rows without one) and their mean over the
    sources, `val/test_score/avg` (upstream: np.mean over the val/test_score/* values)."""
    by_source: dict[str, list[float]] = {}
    for score, source in zip(scores, sources):
        by_source.setdefault(source or "unknown", []).append(score)
    out = {f"val/test_score/{k}": sum(v) / len(v) for k, v in by_source.items()}
    out["val/test_score/avg"] = sum(out.values()) / len(out)
    return out


def save_best_hf(ranks, out: Path, score: float, step: int) -> bool:
    """Upstream's `maybe_save_best_hf`: when `score` (val/test_score/avg) beats the best so far (recorded in
    <out>/best/actor/metrics.json), export the actor as an HF model there, replacing the previous best
    atomically. Returns whether it saved."""
    import json

    best_dir = out / "best" / "actor"
    record = best_dir / "metrics.json"
    best = json.loads(record.read_text())["best_avg_score"] if record.exists() else -float("inf")
    if not score > best:
        return False
    ranks.run(export_hf, best_dir, {"best_avg_score": score, "global_step": step})
    log.warning("new best val/test_score/avg %.4f at step %d: HF model in %s", score, step, best_dir)
    return True


def export_hf(actor, out_dir, record: dict | None = None) -> str:
    """Runs on every Megatron rank (collective): the actor's current weights as an HF model directory
    (safetensors in the model's dtype, config and tokenizer from model.path), written by global rank 0
    into a temporary directory renamed into place; `record` goes to metrics.json beside it."""
    import json

    import torch.distributed as dist

    from luffy_megatron.convert.hf_io import copy_side_files, write_hf_safetensors
    from luffy_megatron.utils.fs import atomic_dir

    weights = actor.export_hf_weights()
    if dist.get_rank() != 0:
        for _ in weights:  # every rank takes part in the gathers
            pass
        dist.barrier()
        return str(out_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtypes: set = set()

    def on_host():
        for name, t in weights:
            dtypes.add(t.dtype)
            yield name, t.detach().to("cpu")

    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_hf_safetensors(tmp, on_host())
        copy_side_files(actor.hf_dir, tmp, dtype=str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None)
        if record is not None:
            (tmp / "metrics.json").write_text(json.dumps(record) + "\n")
    dist.barrier()
    return str(out_dir)


def sync_weights(actor, fleet, bucket_bytes: int, *, transport: str = "object_store", timeout_s: float = 1800.0,
                 fallback: str | None = None) -> float:
    """Runs on every Megatron rank (collective): stream HF-named weights into the engines through `transport`
    (sync/weights.py). The driver runs it through `EngineSupervisor.sync`, which bounds it, handles engine
    failures and labels the weights."""
    from luffy_megatron.sync.weights import sync_actor_to_engines

    t0 = time.time()
    sync_actor_to_engines(actor, fleet, bucket_bytes=bucket_bytes, transport=transport, timeout_s=timeout_s,
                          fallback=fallback)
    return time.time() - t0


def save_checkpoint(actor, root, step: int, trainer_state: dict, keep: int) -> str:
    from luffy_megatron.actor import checkpoint

    return str(checkpoint.save_checkpoint(actor, root, step=step, trainer_state=trainer_state, keep=keep))


def checkpoint_step(ranks, cfg: Config, out: Path, step: int, data_position: int, *, kl_ctrl=None) -> int:
    """Checkpoint the state after `step` (model, optimizer, RNG, data position, the KL controller's beta);
    returns `step`."""
    state = {"data_position": data_position, **({"kl_ctrl": kl_ctrl.state_dict()} if kl_ctrl is not None else {})}
    ranks.run(save_checkpoint, out / "checkpoints", step, state, cfg.trainer.max_checkpoints_to_keep)
    return step


def stop_with_checkpoint(stop: StopSignals, ranks, cfg: Config, out: Path, step: int, data_position: int, *, saved: bool, kl_ctrl=None) -> Preempted:
    """A stop signal arrived: make sure the state after `step` is checkpointed (unless that step is saved
    already, or nothing was trained yet) and describe the stop for `main` (utils/preemption.py)."""
    from luffy_megatron.actor.checkpoint import find_latest

    if not saved:
        checkpoint_step(ranks, cfg, out, step, data_position, kl_ctrl=kl_ctrl)
    latest = find_latest(out / "checkpoints")
    return Preempted(stop.signal_name, step, str(latest) if latest else "none (stopped before the first step)")


def load_checkpoint(actor, path) -> dict:
    from luffy_megatron.actor import checkpoint

    return checkpoint.load_checkpoint(actor, path)


def resume(cfg: Config, ranks: GuardedRanks, engines: EngineSupervisor, sampler: "PromptSampler", out: Path, *, kl_ctrl=None) -> int:
    """Continue from trainer.resume_from (`luffy-train --resume PATH`), else from the newest complete checkpoint
    (trainer.resume=auto); returns the step reached, which is also the actor's weight version. The engines get
    the actor's weights first unless they are known to hold them (`EngineFleet.synced_version`: fresh workers,
    or the last run on these workers ended synced)."""
    from luffy_megatron.actor.checkpoint import find_latest

    if cfg.trainer.resume_from:
        latest = resume_path(cfg.trainer.resume_from)
    else:
        latest = find_latest(out / "checkpoints") if cfg.trainer.resume == "auto" else None
    step = 0
    if latest is not None:
        state = ranks.run(load_checkpoint, latest)
        sampler.position = state.get("data_position", 0)
        if kl_ctrl is not None and "kl_ctrl" in state:  # the adaptive beta continues (algo/kl.py)
            kl_ctrl.load_state_dict(state["kl_ctrl"])
        step = int(state["step"])
    if latest is not None or engines.fleet.synced_version != step:
        engines.sync(version=step)
    engines.version = step
    if latest is not None:
        log.warning("resumed from %s (step %d)", latest, step)
    return step


def resume_path(path: str) -> Path:
    """The checkpoint that trainer.resume_from names: a checkpoint directory (step_N, with trainer_state.json)
    or a checkpoints directory (its newest complete checkpoint). Anything else is a ConfigError."""
    from luffy_megatron.actor.checkpoint import find_latest

    given = Path(path)
    if (given / "trainer_state.json").is_file():
        return given
    found = find_latest(given) if given.is_dir() else None
    if found is None:
        what = "does not exist" if not given.exists() else "holds no complete checkpoint (no trainer_state.json)"
        raise ConfigError(f"trainer.resume_from={path} {what}; give a checkpoint directory such as "
                          "<output_dir>/checkpoints/step_000050 or the checkpoints directory")
    return found


def checkpoint_after_failure(failure: RunError, ranks: GuardedRanks, cfg: Config, out: Path, trained: tuple[int, int], saved_step: int,
                             *, kl_ctrl=None) -> RunError:
    """A step failed while the actor is healthy (an engine, stale or drifting rollouts): checkpoint the
    actor's newest state `trained` = (step, data position) unless it is saved already, and add to the error
    where the run can resume from. Returns the error to raise."""
    from luffy_megatron.actor.checkpoint import find_latest

    step, position = trained
    if step == 0:
        note = "nothing was trained yet, so there is no checkpoint to resume from"
    elif step == saved_step:
        note = f"the actor's state after step {step} is in checkpoint {find_latest(out / 'checkpoints')}; run the same command again to resume from it"
    else:
        try:
            checkpoint_step(ranks, cfg, out, step, position, kl_ctrl=kl_ctrl)
            note = f"wrote a checkpoint of the actor after step {step}: {find_latest(out / 'checkpoints')}; run the same command again to resume from it"
        except Exception as err:
            latest = find_latest(out / "checkpoints")
            note = (f"writing a checkpoint after the failure failed too ({type(err).__name__}: {err}); the newest complete "
                    f"checkpoint is {latest or 'none'}")
    if isinstance(failure, EngineFailure) and cfg.rollout.on_engine_failure == "fail":
        note += " (rollout.on_engine_failure=restart restarts a failed engine instead)"
    failure.args = (f"{failure}\n{note}",)
    return failure


def with_newest_checkpoint(failure: RankFailure, out: Path) -> RankFailure:
    """A rank died: nothing can be saved now; the newest complete checkpoint is untouched (a checkpoint is
    renamed into place only once complete). Returns the error to raise."""
    from luffy_megatron.actor.checkpoint import find_latest

    latest = find_latest(out / "checkpoints")
    resume_from = f"the newest complete checkpoint is {latest}: run the same command again to resume from it" if latest else "there is no checkpoint yet"
    failure.args = (f"{failure}. The run stops; {resume_from}",)
    return failure


# ----------------------------------------------------------------------------------------- small pieces


@dataclass
class PromptSampler:
    """Upstream's prompt order (`ResumableRandomSampler` in rl_dataset_with_target.py, DataLoader with
    drop_last=True): a torch.Generator seeded with data.seed (upstream: 47) draws `torch.randperm(size)` for the
    first epoch and the next permutation from the same generator for each later epoch; batches are consecutive
    slices, the last partial one dropped. `position` counts prompts consumed (saved in checkpoints), so a
    resumed run continues the same order. data.shuffle=false: the dataset order (upstream's SequentialSampler)."""

    size: int
    batch_size: int
    seed: int = 47
    shuffle: bool = True
    position: int = 0

    def __post_init__(self):
        self._perms: list[list[int]] = []
        self._generator = None

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        if self._generator is None:
            self._generator = torch.Generator()
            self._generator.manual_seed(self.seed)
        while len(self._perms) <= epoch:
            self._perms.append(torch.randperm(self.size, generator=self._generator).tolist())
        return self._perms[epoch]

    def next_batch(self) -> list[int]:
        per_epoch = self.size - self.size % self.batch_size  # drop the last partial batch, as upstream
        epoch, offset = divmod(self.position, per_epoch)
        self.position += self.batch_size
        return self._order(epoch)[offset : offset + self.batch_size]


def step_rng(cfg: Config, step: int) -> random.Random:
    """The prefix-ratio draws of `step`: a function of the seed and the step only, so a resumed run draws
    what the uninterrupted run would have."""
    return random.Random(cfg.trainer.seed * 1_000_003 + step)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def resolve_device(cfg: Config) -> str:
    if cfg.trainer.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible")
    return cfg.trainer.device


def main(argv: list[str] | None = None) -> int:
    from luffy_megatron.utils.logs import console_logging

    with console_logging("", fmt="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.WARNING):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        recipe, overrides = parse_overrides_from_argv(sys.argv[1:] if argv is None else argv)
        cfg = load_config(recipe, overrides)
        out = train(cfg)
    except (ConfigError, DataError) as err:  # the recipe, the data or the model files (ModelLoadError)
        print(f"luffy-train: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:  # engines, ranks, stale or drifting rollouts (rollout/faults.py, rollout/integrity.py)
        print(f"luffy-train: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stopped:
        print(f"luffy-train: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(f"luffy-train: done; results in {out} (metrics.jsonl, results.png, tensorboard/, checkpoints/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
