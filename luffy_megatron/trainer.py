"""The LUFFY training loop: generate -> mix -> reward -> advantage -> log-probs -> update -> sync -> log/save.

    luffy-train --config recipes/luffy_main.yaml [--set key=value ...]

One driver process (this module) holds the data, the reward pool and the loop; Ray holds the Megatron
ranks (`cluster.ActorGroup`) and the vLLM engines (`rollout.EngineFleet`), placed on the GPUs by the layout
of `cluster.layout` (`cluster/`). Each box of the data flow in DESIGN.md is one call below.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo import advantage_options, assemble_responses, compute_advantages, plan_rows, prefix_ratios
from luffy_megatron.config import Config, ConfigError, load_config, parse_overrides_from_argv
from luffy_megatron.metrics_log import MetricsLogger, plot_results
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
    total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * (len(train_set) // cfg.data.train_batch_size)
    use_gpu = resolve_device(cfg) == "cuda"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    stop = StopSignals.install()  # SIGUSR1/SIGTERM: checkpoint after the current step, exit PREEMPTED_EXIT_CODE

    owned = workers is None
    if owned:
        workers = start_workers(cfg, pad_token_id(tokenizer), use_gpu=use_gpu)
    actors, fleet = workers.actors, workers.fleet
    workers.write_report(out / "placement.json")
    metrics_log = MetricsLogger(cfg.logging.tensorboard_dir or out / "tensorboard", out / "metrics.jsonl", total_steps=total_steps, console=cfg.logging.console)
    sampler = PromptSampler(len(train_set), cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    step = resume(cfg, actors, fleet, sampler, out)
    saved_step, preempted = step, None
    rng = random.Random(cfg.trainer.seed + step)

    with RewardPool(num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s, grader=cfg.reward.fn) as rewards:
        if cfg.trainer.val_before_train and step == 0 and val_set is not None:
            metrics_log.log(0, validate(cfg, fleet, rewards, tokenizer, val_set))
        while step < total_steps:
            if stop.requested:  # the safe point: the previous step is complete
                preempted = stop_with_checkpoint(stop, actors, cfg, out, step, sampler, saved=saved_step == step)
                break
            step += 1
            t0 = time.time()
            prompts = [train_set[i] for i in sampler.next_batch()]
            batch, token_rewards, rollout_metrics = generate_and_mix(cfg, fleet, tokenizer, prompts, step, rng)
            scores = grade(rewards, tokenizer, batch, prompts, cfg.rollout.n, token_rewards)
            advantages = compute_advantages(token_level_rewards_BT=token_rewards, response_mask_BT=batch.response_mask, prefix_mask_BT=batch.prefix_mask, group_ids=batch.group_ids, **advantage_options(cfg.algo.__dict__))
            switches = workers.training_phase()  # colocated: engines sleep; offloaded optimizer state comes back
            old_log_probs, _ = actors.call("compute_log_probs", batch)
            actor_metrics = actors.call("update", batch, advantages=advantages, old_log_probs=old_log_probs)
            switches.update(workers.rollout_phase())  # optimizer state to host (offload); engines wake for the sync
            sync_seconds = actors.run(sync_weights, fleet, cfg.rollout.weight_sync_bucket_mb * 2**20)
            metrics = {**rollout_metrics, **reward_metrics(scores, batch), **actor_metrics, **switches, "perf/sync_s": sync_seconds,
                       "perf/step_s": time.time() - t0, "perf/tokens_per_s": sum(batch.sequence_lengths()) / (time.time() - t0)}
            if val_set is not None and cfg.trainer.test_freq > 0 and (step % cfg.trainer.test_freq == 0 or step == total_steps):
                metrics.update(validate(cfg, fleet, rewards, tokenizer, val_set))
            metrics_log.log(step, metrics)
            if cfg.trainer.save_freq > 0 and (step % cfg.trainer.save_freq == 0 or step == total_steps):
                saved_step = checkpoint_step(actors, cfg, out, step, sampler)
    metrics_log.close()
    plot_results(out / "metrics.jsonl", out / "results.png")
    if owned:
        workers.shutdown()
    stop.uninstall()
    if preempted is not None:
        raise preempted
    return out


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


def start_workers(cfg: Config, pad_id: int, *, use_gpu: bool):
    """GPUs reserved for the layout (bounded by cluster.placement_timeout_s, before any model loads), then the
    Megatron ranks built in their bundles and the engines started beside them (`cluster.Workers`)."""
    from luffy_megatron.cluster.actor_group import ActorGroup
    from luffy_megatron.cluster.placement import reserve
    from luffy_megatron.cluster.workers import Workers

    placement = reserve(cfg)
    log.warning("%s", placement.describe())
    workers = Workers(placement, None, None, offload=cfg.actor.offload_during_rollout)
    try:
        workers.actors = ActorGroup(placement)
        workers.actors.build(cfg, cfg.model.path, pad_id)
        workers.fleet = start_engines(cfg, placement, use_gpu=use_gpu)
    except BaseException:
        workers.shutdown()
        raise
    return workers


def start_engines(cfg: Config, placement, *, use_gpu: bool):
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
        seed=cfg.trainer.seed, max_num_seqs=r.max_num_seqs, env=threads, **extra,
    )


def load_data(cfg: Config):
    """Tokenizer, tokenized training set (with demonstrations) and validation set (or None)."""
    from transformers import AutoTokenizer

    from luffy_megatron.data.tokenization import load_tokenized_dataset

    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give at least one LUFFY-format parquet file")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    common = dict(max_prompt_length=cfg.data.max_prompt_length, long_prompt_policy=cfg.data.long_prompt_policy,
                  skip_bad_rows=cfg.data.skip_bad_rows, remove_system=cfg.data.remove_system_prompt)
    train_sets = [load_tokenized_dataset(p, tokenizer, require_target=True, max_prefix_len=cfg.rollout.max_prefix_len, long_demo_policy=cfg.data.long_demo_policy, **common) for p in cfg.data.train_files]
    train_set = [ex for ds in train_sets for ex in ds]
    if len(train_set) < cfg.data.train_batch_size:
        raise ConfigError(f"data.train_files hold {len(train_set)} usable prompts, fewer than data.train_batch_size={cfg.data.train_batch_size}")
    val_set = [ex for p in cfg.data.val_files for ex in load_tokenized_dataset(p, tokenizer, require_target=False, **common)] or None
    return tokenizer, train_set, val_set


def generate_and_mix(cfg: Config, fleet, tokenizer, prompts: list, step: int, rng: random.Random):
    """Rows of one step: n slots per prompt, the first n_off_policy carry the demonstration (prefix),
    the engines generate the rest. Returns the batch, an empty reward tensor to fill, and metrics."""
    r, width = cfg.rollout, cfg.data.max_response_length
    ratios = prefix_ratios(strategy=r.prefix_strategy, num_prompts=len(prompts), n=r.n, n_off_policy=r.n_off_policy,
                           min_prefix_ratio=r.min_prefix_ratio, max_prefix_ratio=r.max_prefix_ratio,
                           share_across_samples=r.prefix_share_across_samples, global_step=step,
                           prefix_steps=r.prefix_steps, linear_max_ratio=r.prefix_linear_max_ratio, rng=rng)
    plan = plan_rows(prompts=[p.prompt_ids for p in prompts], demonstrations=[p.demo_ids or [] for p in prompts],
                     ratios=ratios, n=r.n, eos_token_id=tokenizer.eos_token_id, response_length=width)
    todo = [i for i, need in enumerate(plan.needs_generation) if need]
    t0 = time.time()
    outputs = fleet.generate([plan.engine_inputs[i] for i in todo], [plan.max_new_tokens[i] for i in todo],
                             temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, group_size=r.n) if todo else []
    generations: list[list[int]] = [[] for _ in plan.prefixes]
    for i, gen in zip(todo, outputs):
        generations[i] = gen
    responses, prefix_mask, response_mask = assemble_responses(prefixes=plan.prefixes, generations=generations, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), response_length=width)
    batch = RolloutBatch(prompts=[prompts[g].prompt_ids for g in plan.group_index], responses=responses, response_mask=response_mask,
                         prefix_mask=prefix_mask, group_ids=[f"{step}:{g}" for g in plan.group_index])
    generated = sum(len(g) for g in generations)
    metrics = {"rollout/generated_tokens": generated, "rollout/generate_s": time.time() - t0,
               "rollout/response_length_mean": float(response_mask.sum(-1).float().mean()),
               "rollout/off_policy_rows": float(prefix_mask.any(-1).sum())}
    return batch, torch.zeros(responses.shape, dtype=torch.float32), metrics


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


def validate(cfg: Config, fleet, rewards, tokenizer, val_set: list) -> dict[str, float]:
    """Greedy-ish validation (val_temperature, n_val samples) scored by the training reward:
    `val/test_score/<data_source>` as upstream."""
    n_val = cfg.rollout.n_val
    prompts = [ex.prompt_ids for ex in val_set for _ in range(n_val)]
    outputs = fleet.generate(prompts, [cfg.data.max_response_length] * len(prompts), temperature=cfg.rollout.val_temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
    texts = [tokenizer.decode(o) for o in outputs]
    golds = [ex.ground_truth for ex in val_set for _ in range(n_val)]
    scores = rewards.grade(list(zip(texts, golds)))
    by_source: dict[str, list[float]] = {}
    for ex_i, s in enumerate(scores):
        by_source.setdefault(val_set[ex_i // n_val].data_source or "all", []).append(s)
    return {f"val/test_score/{k}": sum(v) / len(v) for k, v in by_source.items()}


def sync_weights(actor, fleet, bucket_bytes: int) -> float:
    """Runs on every Megatron rank (collective): stream HF-named weights into the engines."""
    from luffy_megatron.sync.weights import sync_actor_to_engines

    t0 = time.time()
    sync_actor_to_engines(actor, fleet, bucket_bytes=bucket_bytes)
    return time.time() - t0


def save_checkpoint(actor, root, step: int, trainer_state: dict, keep: int) -> str:
    from luffy_megatron.actor import checkpoint

    return str(checkpoint.save_checkpoint(actor, root, step=step, trainer_state=trainer_state, keep=keep))


def checkpoint_step(actors, cfg: Config, out: Path, step: int, sampler: "PromptSampler") -> int:
    """Checkpoint the state after `step` (model, optimizer, RNG, data position); returns `step`."""
    actors.run(save_checkpoint, out / "checkpoints", step, {"data_position": sampler.position}, cfg.trainer.max_checkpoints_to_keep)
    return step


def stop_with_checkpoint(stop: StopSignals, actors, cfg: Config, out: Path, step: int, sampler: "PromptSampler", *, saved: bool) -> Preempted:
    """A stop signal arrived: make sure the state after `step` is checkpointed (unless that step is saved
    already, or nothing was trained yet) and describe the stop for `main` (utils/preemption.py)."""
    from luffy_megatron.actor.checkpoint import find_latest

    if not saved:
        checkpoint_step(actors, cfg, out, step, sampler)
    latest = find_latest(out / "checkpoints")
    return Preempted(stop.signal_name, step, str(latest) if latest else "none (stopped before the first step)")


def load_checkpoint(actor, path) -> dict:
    from luffy_megatron.actor import checkpoint

    return checkpoint.load_checkpoint(actor, path)


def resume(cfg: Config, actors, fleet, sampler: "PromptSampler", out: Path) -> int:
    """Continue from the newest complete checkpoint (trainer.resume=auto); returns the step reached."""
    from luffy_megatron.actor.checkpoint import find_latest

    latest = find_latest(out / "checkpoints") if cfg.trainer.resume == "auto" else None
    if latest is None:
        return 0
    state = actors.run(load_checkpoint, latest)
    sampler.position = state.get("data_position", 0)
    actors.run(sync_weights, fleet, cfg.rollout.weight_sync_bucket_mb * 2**20)
    log.warning("resumed from %s (step %d)", latest, state["step"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------- small pieces


@dataclass
class PromptSampler:
    """Epochs of shuffled prompt indices; `position` counts prompts consumed (saved in checkpoints)."""

    size: int
    batch_size: int
    seed: int = 47
    shuffle: bool = True
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        per_epoch = self.size - self.size % self.batch_size  # drop the last partial batch, as upstream
        epoch, offset = divmod(self.position, per_epoch)
        self.position += self.batch_size
        return self._order(epoch)[offset : offset + self.batch_size]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def resolve_device(cfg: Config) -> str:
    if cfg.trainer.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible")
    return cfg.trainer.device


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        recipe, overrides = parse_overrides_from_argv(sys.argv[1:] if argv is None else argv)
        cfg = load_config(recipe, overrides)
        out = train(cfg)
    except ConfigError as err:
        print(f"luffy-train: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stopped:
        print(f"luffy-train: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(f"luffy-train: done; results in {out} (metrics.jsonl, results.png, tensorboard/, checkpoints/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
