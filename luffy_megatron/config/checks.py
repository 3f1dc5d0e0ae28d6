"""Rules that join two or more sections: combinations that cannot run although each section is fine alone.

`validate` runs every section's own `problems()` and then these, and raises one ConfigError listing them all.
Every message names the key(s) and a fix.
"""

from __future__ import annotations

import dataclasses

# The module, not its functions: cluster.layout imports config.errors and config.sections, so when it is imported
# first this package initializes while cluster.layout is still half-defined (its names are looked up at call time).
from luffy_megatron.cluster import layout as cluster_layout

from .errors import problems_error
from .sections import Config


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every impossible combination in `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise problems_error(problems)


def config_problems(cfg: Config) -> list[str]:
    """Every section's own problems (in the tree's order), then the cross-section ones."""
    problems: list[str] = []
    for section in dataclasses.fields(cfg):
        problems += getattr(cfg, section.name).problems()
    return problems + cross_section_problems(cfg)


def cross_section_problems(cfg: Config) -> list[str]:
    return _placement_problems(cfg) + _algo_problems(cfg) + _batch_problems(cfg)


def _placement_problems(cfg: Config) -> list[str]:
    """The engines and the actor on the GPUs: rollout and actor settings against parallel and cluster."""
    parallel, rollout, cluster = cfg.parallel, cfg.rollout, cfg.cluster
    problems = []
    if rollout.tensor_model_parallel_size > parallel.world_size >= 1:
        problems.append(
            f"rollout.tensor_model_parallel_size={rollout.tensor_model_parallel_size} exceeds the "
            f"{parallel.world_size} GPUs of parallel.nnodes * n_gpus_per_node"
        )
    if cfg.actor.offload_during_rollout and cluster.layout == "disaggregated":
        problems.append(
            "actor.offload_during_rollout=true frees the training GPUs for colocated engines, but "
            "cluster.layout=disaggregated has none on them; set it to false"
        )
    if rollout.weight_sync_transport == "shared_memory" and (
        cluster.layout == "disaggregated" or cluster.rollout_nnodes > 0
    ):
        problems.append(
            "rollout.weight_sync_transport=shared_memory reaches only engines on the sending ranks' "
            "node (and GPUs), but cluster.layout=disaggregated puts them on their own nodes; use "
            "collective (or auto)"
        )
    if cluster.layout in ("colocated", "disaggregated") and cluster.rollout_nnodes >= 0:
        problems += cluster_layout.layout_problems(cfg, cluster.layout)
    overlap = cluster_layout.overlap_problem(cfg, cluster.layout)
    if overlap:
        problems.append(overlap)
    return problems


def _algo_problems(cfg: Config) -> list[str]:
    """Algorithm settings that need a given data column or shape of the rollout groups."""
    algo, rollout = cfg.algo, cfg.rollout
    problems = []
    if algo.use_off_policy_probs and not cfg.data.target_probs_key:
        problems.append(
            "algo.use_off_policy_probs=true but data.target_probs_key is empty: name the parquet column "
            "of the teacher's token probabilities (upstream: target_ds_qwen_7b_probs)"
        )
    if algo.use_sft_prefix_reward and rollout.n_off_policy != -1:
        problems.append(
            "algo.use_sft_prefix_reward=true needs rollout.n_off_policy=-1 (every row a demonstration "
            f"prefix, as upstream asserts n_prefix == -1); got {rollout.n_off_policy}"
        )
    if algo.mode == "sft" and rollout.n_off_policy not in (-1, rollout.n):
        problems.append(
            "algo.mode=sft trains on the demonstrations only, so every row must carry one: set "
            f"rollout.n_off_policy=-1 (got {rollout.n_off_policy} of rollout.n={rollout.n}; "
            "rollout.n=1 is enough)"
        )
    if algo.mode == "sft" and cfg.trainer.overlap != "none":
        problems.append(
            f"trainer.overlap={cfg.trainer.overlap} overlaps generation with training, but algo.mode=sft "
            "generates nothing; set trainer.overlap=none"
        )
    if algo.mode == "sft" and (rollout.min_prefix_ratio < 1.0 or algo.use_sft_multitask_loss):
        problems.append(
            "algo.mode=sft learns whole demonstrations: it needs rollout.min_prefix_ratio=1.0 and "
            "algo.use_sft_multitask_loss=false (the RL w/ SFT loss baseline is algo.mode=rl)"
        )
    return problems


def _batch_problems(cfg: Config) -> list[str]:
    """The actor's mini-batches and token budget against the data's batch and sequence lengths."""
    data, actor = cfg.data, cfg.actor
    problems = []
    if actor.ppo_mini_batch_size >= 1 and data.train_batch_size % actor.ppo_mini_batch_size:
        problems.append(
            f"data.train_batch_size={data.train_batch_size} is not a multiple of "
            f"actor.ppo_mini_batch_size={actor.ppo_mini_batch_size}; every optimiser step needs a full mini-batch"
        )
    max_seq_len = data.max_prompt_length + data.max_response_length
    if actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu < max_seq_len:
        problems.append(
            f"actor.ppo_max_token_len_per_gpu={actor.ppo_max_token_len_per_gpu} is smaller than one sequence "
            f"(data.max_prompt_length + data.max_response_length = {max_seq_len}); raise it"
        )
    return problems
