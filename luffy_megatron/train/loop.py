"""The LUFFY training loop: generate -> mix -> reward -> advantage -> log-probs -> update -> sync -> log/save.

    luffy-train --config recipes/luffy_main.yaml [--set key=value ...]

One driver process (this package) holds the data, the reward pool and the loop; Ray holds the Megatron ranks
(`cluster.ActorGroup`) and the vLLM engines (`rollout.EngineFleet`), placed on the GPUs by `cluster.layout`.
The ranks are called through `cluster.supervision.GuardedRanks` and the engines through
`rollout.faults.EngineSupervisor` (deadlines, named failures, engine restarts). The weight version is the step
whose update made the actor's weights; every generated row carries the version of the engine that made it and
is checked against the actor's, with the engines' log-probs against the actor's (`rollout/integrity.py`). A
step that fails (an engine, stale or drifting rollouts) first checkpoints the healthy actor
(`train/progress.py`), then `luffy-train` reports it in one `luffy-train: error: ...` line.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo.kl import make_kl_controller
from luffy_megatron.algo.options import kl_controller_options, uses_reference
from luffy_megatron.cluster.layout import preflight
from luffy_megatron.cluster.supervision import RankFailure, RunError
from luffy_megatron.config import Config, ConfigError, load_config, parse_overrides_from_argv
from luffy_megatron.data.errors import DataError
from luffy_megatron.data.sampler import PromptSampler
from luffy_megatron.metrics.compute import RunPerf, StepTimer
from luffy_megatron.metrics.sinks import plot_results_or_warn
from luffy_megatron.rollout.faults import EngineFailure
from luffy_megatron.rollout.integrity import RolloutIntegrityError
from luffy_megatron.train.overlap import Rollouts
from luffy_megatron.train.progress import RunProgress
from luffy_megatron.train.setup import (
    adopt_workers,
    check_install,
    check_megatron_settings,
    close_run,
    connect_ray,
    load_data,
    lock_output_dir,
    open_metrics_log,
    pad_token_id,
    reward_pool,
    start_workers,
    supervise,
    with_total_steps,
)
from luffy_megatron.train.step_parts import (
    StepDeps,
    batch_metrics,
    check_rollouts,
    grade,
    reward_metrics,
    rewards_and_advantages,
    rollout_correction,
)
from luffy_megatron.train.validation import validate, validate_after_step
from luffy_megatron.utils.logs import console_logging
from luffy_megatron.utils.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals


def train(cfg: Config, workers=None) -> Path:
    """Run (or resume) a training job; returns its output directory. `workers`: an already started
    `cluster.Workers` (see `train.setup.start_workers`), left running at the end; by default started here and
    stopped."""
    check_install()  # logs torch/CUDA/NCCL/TE/vLLM/megatron-core; refuses a torch the installed vLLM was not built for
    preflight(cfg)  # the model's heads vs TP, an explicit cluster.layout: before Ray and before any data or model
    check_megatron_settings(cfg)  # FP8 / TE / CP / distributed optimizer against what this machine can run
    out = Path(cfg.trainer.output_dir)
    lock = lock_output_dir(out)  # <out>/.lock: one run per output directory, released at the end
    owned, metrics_log, preempted, stop = workers is None, None, None, StopSignals()
    try:
        tokenizer, train_set, val_set = load_data(cfg)
        cfg = with_total_steps(cfg, len(train_set))
        total_steps, pad_id = cfg.trainer.total_training_steps, pad_token_id(tokenizer)
        connect_ray()
        check_megatron_settings(cfg)  # again where the driver could not judge before Ray: the cluster's GPUs known
        stop = StopSignals.install()  # SIGUSR1/SIGTERM: checkpoint after the current step, exit PREEMPTED_EXIT_CODE
        if owned:
            workers = start_workers(cfg, pad_id, log_dir=out / "logs" / "workers")
        adopt_workers(cfg, workers, out, pad_id)  # reused workers: the actor of another run is rebuilt
        ranks, engines = supervise(cfg, workers)
        workers.write_report(out / "placement.json")
        perf = RunPerf.of_run(cfg, workers.placement.layout, workers.actors.infos()[0]["cuda_device_name"])
        sampler = PromptSampler(len(train_set), cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        kl_ctrl = make_kl_controller(**kl_controller_options(cfg.algo))  # beta of the KL reward penalty
        progress = RunProgress.resume(cfg, ranks, engines, sampler, out, kl_ctrl=kl_ctrl, workers=workers)
        metrics_log = open_metrics_log(cfg, out, progress.step)  # steps after progress.step: logged once
        log_to = (metrics_log, perf, out, total_steps)
        with reward_pool(cfg) as rewards:
            deps = StepDeps(cfg, workers, ranks, engines, rewards, tokenizer, kl_ctrl)
            if val_set is not None and (cfg.trainer.val_only or (cfg.trainer.val_before_train and progress.step == 0)):
                metrics_log.log(progress.step, validate(cfg, engines, rewards, tokenizer, val_set))
            last_step = progress.step if cfg.trainer.val_only else total_steps  # val_only: validate and stop
            preempted = run_steps(deps, progress, Rollouts(deps, train_set, sampler, last_step), val_set, log_to, stop)
        plot_results_or_warn(out / "metrics.jsonl", out / "results.png")  # a failure only warns
    finally:
        close_run(metrics_log, stop, workers if owned else None, lock)
    if preempted is not None:
        raise preempted
    return out


def run_steps(
    deps: StepDeps, progress: RunProgress, rollouts: Rollouts, val_set, log_to: tuple, stop
) -> Preempted | None:
    """The steps after `progress.step` up to `rollouts.last_step`: each trained, validated when due, checkpointed
    when due and logged. Returns the stop (`Preempted`) when a signal came, after the checkpoint it asks for."""
    metrics_log, perf, out, total_steps = log_to
    try:
        while progress.step < rollouts.last_step:
            if stop.requested:  # the safe point: the previous step is complete
                rollouts.drop()  # trainer.overlap=one_step: the batch generated ahead is not trained
                return progress.stop(stop)
            step, timer = progress.step + 1, StepTimer()  # timing_s/<phase> (metrics/compute.py)
            try:
                batch, metrics = train_step(
                    deps,
                    rollouts,
                    step,
                    timer,
                    on_trained=lambda: progress.trained(step, rollouts.position_after(step)),
                )
                metrics.update(validate_after_step(deps, val_set, out, step, total_steps, timer))
            except (EngineFailure, RolloutIntegrityError, RankFailure) as failure:
                raise progress.after_failure(failure) from None
            if progress.save_due(total_steps):
                with timer("save_checkpoint"):  # before the step's metrics: timing_s/step includes it, as upstream
                    progress.save()
            metrics_log.log(step, {**metrics, **perf.step_metrics(batch, timer)})
    finally:
        rollouts.close()
    return None


def train_step(
    deps: StepDeps, rollouts: Rollouts, step: int, timer: StepTimer, *, on_trained: Callable[[], None]
) -> tuple[RolloutBatch, dict]:
    """One LUFFY step, its data flow in order: generate and mix -> reward -> old (and reference) log-probs ->
    rollout checks -> KL penalty and advantages -> update -> weight sync. `on_trained()` is called as soon as
    the update has changed the actor (what a failure afterwards must checkpoint). Under trainer.overlap=one_step
    the batch was generated during the previous step and the next one is generated during this one
    (train/overlap.py). Returns the batch and the step's metrics."""
    cfg, ranks, engines = deps.cfg, deps.ranks, deps.engines
    t0 = time.time()
    with timer("gen"):
        prompts, (batch, token_scores, rollout, rollout_metrics) = rollouts.take(step)
    with timer("reward"):  # critic/score/*: before any KL penalty
        scores = grade(deps.rewards, deps.tokenizer, batch, prompts, cfg.rollout.n, token_scores)
    switches = deps.workers.training_phase()  # colocated: engines sleep; offloaded optimizer state comes back
    with timer("old_log_prob"):
        old_log_probs, _ = ranks.call("compute_log_probs", batch)
    ref_log_probs = None
    if uses_reference(cfg.algo):  # the frozen initial model (algo.use_kl_loss, algo.kl_ctrl_coef)
        with timer("ref"):
            ref_log_probs = ranks.call("compute_ref_log_probs", batch)
    integrity = check_rollouts(cfg, engines, rollout, old_log_probs, actor_version=step - 1, step=step)
    behaviour, correction = rollout_correction(cfg, batch, rollout, old_log_probs)  # algo.rollout_is (or none)
    token_rewards, advantages, kl_metrics, kl_now = rewards_and_advantages(
        cfg, deps.kl_ctrl, batch, token_scores, old_log_probs, ref_log_probs, deps.tokenizer.eos_token_id
    )
    with timer("update_actor"):
        kl_loss_ref = ref_log_probs if cfg.algo.use_kl_loss else None
        actor_metrics = ranks.call(
            "update",
            batch,
            advantages=advantages,
            old_log_probs=old_log_probs,
            ref_log_probs=kl_loss_ref,
            behaviour_log_probs=behaviour,
        )
    on_trained()
    if kl_now is not None:  # after the update, so a checkpoint holds the controller of the last completed step
        deps.kl_ctrl.update(kl_now, n_steps=batch.num_rows)
    switches.update(deps.workers.rollout_phase())  # the ranks give back memory; engines wake their weights
    rollouts.settle()  # trainer.overlap=one_step: the next batch's generation ends before the sync
    with timer("sync"):
        sync_seconds = engines.sync(version=step)
    switches.update(deps.workers.generation_phase())  # then the KV cache, with no sync buckets beside it
    seconds = time.time() - t0
    metrics = {
        **rollout_metrics,
        **integrity,
        **correction,
        **reward_metrics(scores, batch, deps.rewards),
        **kl_metrics,
    }
    metrics.update(actor_metrics)
    metrics.update(switches, **{"perf/sync_s": sync_seconds, "perf/step_s": seconds})
    metrics["perf/overlap_s"] = rollouts.overlap_seconds()  # the next batch's generation during this step
    metrics["perf/tokens_per_s"] = sum(batch.sequence_lengths()) / seconds
    metrics.update(batch_metrics(cfg, batch, token_scores, token_rewards, advantages))
    return batch, metrics


def main(argv: list[str] | None = None) -> int:
    with console_logging("", fmt="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.WARNING):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        recipe, overrides = parse_overrides_from_argv(sys.argv[1:] if argv is None else argv)
        out = train(load_config(recipe, overrides))
    except (ConfigError, DataError) as err:  # the recipe, the data or the model files (ModelLoadError)
        print(f"luffy-train: error: {err}", file=sys.stderr)
        return 2
    # engines, ranks, stale or drifting rollouts (cluster/supervision.py, rollout/faults.py, rollout/integrity.py)
    except RunError as err:
        print(f"luffy-train: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stopped:
        print(f"luffy-train: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(f"luffy-train: done; results in {out} (metrics.jsonl, results.png, tensorboard/, checkpoints/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
