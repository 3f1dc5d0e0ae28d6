"""Before the first step: the data, Ray, the workers (placement, Megatron ranks, vLLM engines) and the
supervised handles the loop calls them through."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from functools import partial, update_wrapper
from pathlib import Path

import ray  # the driver runs the job on Ray
import torch
from transformers import AutoTokenizer

from luffy_megatron.actor.remote import sync_weights
from luffy_megatron.algo import uses_target_probs
from luffy_megatron.cluster.actor_group import ActorGroup
from luffy_megatron.cluster.placement import reserve
from luffy_megatron.cluster.supervision import GuardedRanks, remote_cause
from luffy_megatron.cluster.workers import Workers
from luffy_megatron.compat.versions import check_torch_for_vllm, stack_versions
from luffy_megatron.config import Config, ConfigError
from luffy_megatron.data.tokenization import load_tokenized_dataset, resolve_chat_template
from luffy_megatron.metrics.sinks import MetricsLogger
from luffy_megatron.perf.memory_plan import colocated_offload_problem
from luffy_megatron.reward.pool import RewardPool
from luffy_megatron.rollout.faults import EngineSupervisor
from luffy_megatron.rollout.ray_engine import EngineFleet, StartingFleet
from luffy_megatron.sync.weights import resolve_transport
from luffy_megatron.utils.fs import FileLock, LockHeld, write_log
from luffy_megatron.utils.preemption import StopSignals
from luffy_megatron.utils.ray_auth import private_token_for_local_cluster

log = logging.getLogger("luffy.trainer")


class ModelLoadError(ConfigError):
    """The Megatron ranks could not load (convert) the model of model.path / model.load_checkpoint."""


def check_install() -> None:
    """Prints the installed torch, CUDA, NCCL, Transformer Engine, vLLM and megatron-core versions (one line on
    stdout, the job's log on Slurm), then refuses (ConfigError, saying what to install) a torch other than the one
    the installed vLLM was built for."""
    print("luffy-train: versions: " + ", ".join(f"{n} {v}" for n, v in stack_versions().items()), flush=True)
    check_torch_for_vllm()


def check_megatron_settings(cfg: Config) -> None:
    """The actor's refusals (FP8 or CP without Transformer Engine, the distributed optimizer without CUDA, ...),
    raised by the driver at start instead of by every rank after the cluster is up, where the driver's CUDA and
    Transformer Engine stand for the ranks' (`driver_judges_kernels`); otherwise the ranks refuse when they
    build. `train` calls it before Ray and again once connected, when the cluster's GPUs are known."""
    from luffy_megatron.actor.megatron_actor import Kernels, megatron_settings  # lazy: it probes Megatron and TE

    kernels = Kernels.detect()
    if not driver_judges_kernels(kernels.cuda, cluster_has_gpus()):
        return
    try:
        megatron_settings(cfg, kernels)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def driver_judges_kernels(driver_cuda: bool, cluster_gpus: bool | None) -> bool:
    """Whether the driver's kernels are the ranks' for `check_megatron_settings`: yes when the driver sees CUDA
    (it runs on a node of the job) or the cluster has no GPUs; no when the cluster's GPUs are out of the driver's
    sight (a login node, a job step without GPUs) or not known yet (`cluster_gpus` None)."""
    return driver_cuda or cluster_gpus is False


def cluster_has_gpus() -> bool | None:
    """Whether the Ray cluster of the job has GPUs. Before Ray is connected: for a local cluster (no RAY_ADDRESS)
    this machine's GPUs, else None (unknown)."""
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    if os.environ.get("RAY_ADDRESS", "local") == "local":
        return torch.cuda.is_available()
    return None


def lock_output_dir(out: Path) -> FileLock:
    """Makes `out` and takes `<out>/.lock` (an flock, naming this host and pid in the file) for the run's
    lifetime: two drivers on one output directory (a double submit, a requeue that overlaps the old job) would
    interleave checkpoints/latest and prune each other's checkpoints. A held lock is a ConfigError naming the
    holder. The caller releases it (`FileLock.release`); the kernel drops it if the driver dies."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".lock")
    try:
        lock.acquire(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    except LockHeld as held:
        holder = held.holder or "a process that has not written its name yet"
        raise ConfigError(
            f"trainer.output_dir={out} is in use by another run: {held.path} is held by {holder}. Wait for that "
            "run to end or stop it, or give another trainer.output_dir"
        ) from None
    return lock


def close_run(metrics_log: MetricsLogger | None, stop: StopSignals, workers: Workers | None, lock: FileLock) -> None:
    """The end of `train`, also after an error: the metrics log closed, the signal handlers put back, the
    workers it started stopped (`workers`: None for workers the caller owns) and, whatever failed before, the
    output directory's lock released."""
    try:
        if metrics_log is not None:
            metrics_log.close()
        stop.uninstall()
        if workers is not None:
            workers.shutdown()
    finally:
        lock.release()


def load_data(cfg: Config):
    """Tokenizer, tokenized training set (with demonstrations) and validation set (or None)."""
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give at least one LUFFY-format parquet file")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    common = dict(
        max_prompt_length=cfg.data.max_prompt_length,
        long_prompt_policy=cfg.data.long_prompt_policy,
        skip_bad_rows=cfg.data.skip_bad_rows,
        remove_system=cfg.data.remove_system_prompt,
        chat_template=resolve_chat_template(tokenizer, cfg.data.chat_template),
    )
    # algo.use_off_policy_probs: the teacher's token probabilities (data.target_probs_key) of every demonstration
    probs = {}
    if uses_target_probs(cfg.algo):
        probs = dict(target_probs_key=cfg.data.target_probs_key, require_target_probs=True)
    train_set = [
        ex
        for path in cfg.data.train_files
        for ex in load_tokenized_dataset(
            path,
            tokenizer,
            require_target=True,
            max_prefix_len=cfg.rollout.max_prefix_len,
            long_demo_policy=cfg.data.long_demo_policy,
            **probs,
            **common,
        )
    ]
    if len(train_set) < cfg.data.train_batch_size:
        raise ConfigError(
            f"data.train_files hold {len(train_set)} usable prompts, fewer than "
            f"data.train_batch_size={cfg.data.train_batch_size}"
        )
    val_set = [
        ex for p in cfg.data.val_files for ex in load_tokenized_dataset(p, tokenizer, require_target=False, **common)
    ] or None
    if cfg.trainer.val_only and val_set is None:
        raise ConfigError("trainer.val_only=true but data.val_files is empty: give the validation parquet files")
    return tokenizer, train_set, val_set


def with_total_steps(cfg: Config, num_prompts: int) -> Config:
    """The real step count, as upstream injects it into the optimizer config: the actor's LR warmup counts
    from it."""
    total = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * (num_prompts // cfg.data.train_batch_size)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_training_steps=total))


def connect_ray() -> None:
    """Joins the cluster at RAY_ADDRESS (the Slurm launcher's, with its token), else starts a local one with
    token auth and a token of this run's own (`utils.ray_auth`)."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "local")
        private_token_for_local_cluster(address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def gpu_mode(device: str, *, layout_uses_gpus: bool) -> bool:
    """Whether the engines run with the GPU settings (`rollout.gpu_memory_utilization`). The layout decides (the
    Ray cluster's GPUs, `cluster.placement.reserve`), not the driver's CUDA: a driver on a login node or in a job
    step without GPUs still runs a GPU cluster's job. `trainer.device`: auto = the layout's; cuda refuses a
    layout without GPUs; cpu keeps the engines' CPU settings."""
    if device == "cuda" and not layout_uses_gpus:
        raise ConfigError("trainer.device=cuda but the Ray cluster has no GPUs, so the layout places none")
    return layout_uses_gpus and device != "cpu"


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def start_workers(cfg: Config, pad_id: int, *, use_gpu: bool | None = None, log_dir: Path | None = None) -> Workers:
    """GPUs reserved for the layout (bounded by cluster.placement_timeout_s, before any model loads), then the
    Megatron ranks built in their bundles and the engines started beside them, after the build on a colocated
    layout and during it on the others (`cluster.Workers`; engine i logs to `log_dir/engine_<i>.log`). A model
    the ranks cannot load or convert is a `ModelLoadError`.
    `use_gpu`: the engines' GPU settings; None = `gpu_mode` of the layout."""
    placement = reserve(cfg)
    if use_gpu is None:
        use_gpu = gpu_mode(cfg.trainer.device, layout_uses_gpus=placement.layout.uses_gpus)
    log.warning("%s", placement.describe())
    try:
        refuse_unsafe_colocation(cfg, placement.layout)
    except ConfigError:
        placement.release()
        raise
    workers = Workers(placement, None, None, offload=cfg.actor.offload_during_rollout)
    starting = None
    try:
        if not workers.colocated:  # engines on devices (or CPU cores) of their own start while the ranks build
            starting = launch_engines(cfg, placement, use_gpu=use_gpu, log_dir=log_dir)
        workers.actors = ActorGroup(placement)
        build_ranks(workers.actors, cfg, pad_id, log_dir)
        workers.after_build()  # colocated: the ranks keep only their weights on the GPU while the engines start
        starting = starting or launch_engines(cfg, placement, use_gpu=use_gpu, log_dir=log_dir)
        workers.fleet, starting = starting.wait(), None
        # Engines and a fresh actor load the same model.path: both hold weight version 0 (no sync before
        # step 1). An actor started from model.load_checkpoint holds other weights: sync them first.
        workers.fleet.synced_version = None if cfg.model.load_checkpoint else 0
    except BaseException:
        if starting is not None:
            starting.cancel()
        workers.shutdown()
        raise
    return workers


def refuse_unsafe_colocation(cfg: Config, layout) -> None:
    """A colocated GPU layout without actor.offload_during_rollout keeps the trainer's grad buffer and optimizer
    state beside the engines' KV cache; refused at start, with the memory plan's numbers, when the plan says
    that does not fit (before any model loads)."""
    problem = colocated_offload_problem(cfg, layout) if layout.uses_gpus else None
    if problem:
        raise ConfigError(problem)


def build_ranks(actors, cfg: Config, pad_id: int, log_dir: Path | None, *, fresh: bool = False) -> None:
    """Builds the Megatron model on every rank (HF -> Megatron conversion, or model.load_checkpoint). An error
    raised there reaches the user as one line naming the model and the error; the rank's traceback goes to
    `log_dir/model_load_error.log`."""
    try:
        actors.build(cfg, cfg.model.path, pad_id, fresh=fresh)
    except ray.exceptions.RayTaskError as err:
        cause = remote_cause(err)
        where = f"model.path={cfg.model.path}"
        if cfg.model.load_checkpoint:
            where += f", model.load_checkpoint={cfg.model.load_checkpoint}"
        saved = ""
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            write_log(Path(log_dir) / "model_load_error.log", str(err))
            saved = f" (the rank's traceback: {Path(log_dir) / 'model_load_error.log'})"
        raise ModelLoadError(
            f"the Megatron ranks could not load the model ({where}): {type(cause).__name__}: {cause}{saved}"
        ) from None


def adopt_workers(cfg: Config, workers: Workers, out: Path, pad_id: int) -> bool:
    """Workers passed to `train` may hold the actor of another run (its trained weights, optimizer state, LR
    schedule, step): that actor is rebuilt from model.path (or model.load_checkpoint), as new workers would
    have it, and the engines are synced from it before they generate. Returns whether it rebuilt; the workers
    then hold this run (`Workers.actor_run`)."""
    rebuilt = workers.actor_run is not None and workers.actor_run != str(out)
    if rebuilt:
        log.warning(
            "these workers' Megatron ranks hold the run in %s: rebuilding the actor for %s", workers.actor_run, out
        )
        with workers.engines_asleep():  # colocated: the new actor is built while the engines sleep
            build_ranks(workers.actors, cfg, pad_id, out / "logs" / "workers", fresh=True)
        workers.fleet.synced_version = None  # the engines hold the other run's weights
    workers.actor_run = str(out)
    return rebuilt


def launch_engines(cfg: Config, placement, *, use_gpu: bool, log_dir: Path | None = None) -> StartingFleet:
    """The vLLM engines of the layout, launched from the same HF weights the actor loads (so no sync before
    step 1); colocated engines with vLLM sleep mode, so they can free their GPU memory for the update.
    `wait()` on the result gives the fleet."""
    r, layout = cfg.rollout, placement.layout
    extra = {"gpu_memory_utilization": r.gpu_memory_utilization} if use_gpu else {}
    return EngineFleet.launch(
        cfg.model.path,
        num_engines=len(layout.engines),
        launches=[placement.engine_launch(e) for e in range(len(layout.engines))],
        tensor_parallel_size=r.tensor_model_parallel_size,
        enable_sleep_mode=layout.mode == "colocated",
        max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        enforce_eager=r.enforce_eager,
        seed=cfg.trainer.seed,
        max_num_seqs=r.max_num_seqs,
        log_dir=log_dir,
        request_timeout_s=r.request_timeout_s,
        direct_load=r.engine_direct_load,
        **extra,
    )


def supervise(cfg: Config, workers: Workers) -> tuple[GuardedRanks, EngineSupervisor]:
    """The ranks and the engines as the loop calls them: bounded waits, named failures, engine restarts."""
    ranks = GuardedRanks(workers.actors, timeout_s=cfg.trainer.rank_call_timeout_s)
    workers.actors.call_timeout_s = cfg.trainer.rank_call_timeout_s  # its own calls (infos, ledgers) too
    workers.ranks = ranks  # the optimizer offload/reload of a step go through the same bounded calls
    # rollout.weight_sync_transport (auto: by the layout, see sync.weights.resolve_transport)
    transport = resolve_transport(cfg.rollout.weight_sync_transport, workers.placement.mode)
    log.warning(
        "weight sync: %s transport (rollout.weight_sync_transport=%s, %s layout)",
        transport,
        cfg.rollout.weight_sync_transport,
        workers.placement.mode,
    )
    # auto on a colocated layout: shared memory, or the collective path where an engine cannot map it (CPU)
    fallback = "collective" if cfg.rollout.weight_sync_transport == "auto" and transport == "shared_memory" else None
    push = partial(sync_weights, transport=transport, timeout_s=cfg.rollout.request_timeout_s, fallback=fallback)
    update_wrapper(push, sync_weights)  # the ranks' logs and GuardedRanks name the call sync_weights
    engines = EngineSupervisor(
        workers.fleet,
        ranks,
        push=push,
        bucket_bytes=cfg.rollout.weight_sync_bucket_mb * 2**20,
        request_timeout_s=cfg.rollout.request_timeout_s,
        on_engine_failure=cfg.rollout.on_engine_failure,
    )
    return ranks, engines


def open_metrics_log(cfg: Config, out: Path, start_step: int) -> MetricsLogger:
    """TensorBoard (logging.tensorboard_dir, default <out>/tensorboard), <out>/metrics.jsonl and the console.
    `start_step`: the step the run continues after (what an earlier run logged after it is dropped)."""
    return MetricsLogger(
        cfg.logging.tensorboard_dir or out / "tensorboard",
        out / "metrics.jsonl",
        total_steps=cfg.trainer.total_training_steps,
        console=cfg.logging.console,
        config=cfg,
        start_step=start_step,
    )


def reward_pool(cfg: Config) -> RewardPool:
    return RewardPool(
        num_workers=cfg.reward.num_workers,
        timeout_s=cfg.reward.timeout_s,
        grader=cfg.reward.fn,
        strip_special_tokens=cfg.reward.strip_special_tokens,
    )
