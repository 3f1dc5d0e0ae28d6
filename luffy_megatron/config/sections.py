"""The config tree: one dataclass per section, each field with its default, and each section's own rules.

`problems()` of a section lists what is impossible within that section alone; rules that join two sections live
in `config.checks`. Both run after the recipe and the overrides are applied (`config.loading.load_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .algo_section import AlgoConfig


def _at_least(section: Any, prefix: str, minimum: int, *names: str) -> list[str]:
    """One problem per set field among `names` below `minimum` (None means "unset" and is never a problem)."""
    problems = []
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            problems.append(f"{prefix}.{name}={value} must be >= {minimum}")
    return problems


def _in_unit_interval(section: Any, prefix: str, *names: str, include_one: bool = True) -> list[str]:
    """One problem per field among `names` outside [0, 1] ([0, 1) without `include_one`)."""
    problems = []
    for name in names:
        value = getattr(section, name)
        inside = 0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0
        if not inside:
            problems.append(f"{prefix}.{name}={value} must be in [0, 1{']' if include_one else ')'}")
    return problems


@dataclass
class ModelConfig:
    """Which weights to train and how Megatron builds the model (upstream: actor_rollout_ref.model.*)."""

    path: str = ""  # Hugging Face model dir: config, tokenizer, and the initial weights
    load_checkpoint: str | None = None  # Megatron checkpoint dir to start from instead of converting `path`
    dtype: Literal["bf16", "fp32"] = "bf16"
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"  # auto: TE when importable
    fp8: Literal["e4m3", "hybrid"] | None = None  # None = no FP8
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    fp8_margin: int = 0
    make_vocab_size_divisible_by: int = 128
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"  # full recompute: how layers are grouped
    recompute_num_layers: int = 1  # full recompute: layers per unit (uniform) or recomputed layers per stage (block)
    tp_only_amax_red: bool = False  # FP8 delayed scaling: reduce amax over TP only instead of TP x DP x CP

    def problems(self) -> list[str]:
        problems = []
        if self.fp8 is not None and self.transformer_impl == "local":
            problems.append(
                f"model.fp8={self.fp8!r} needs Transformer Engine but model.transformer_impl='local'; "
                "set model.transformer_impl=auto (or transformer_engine), or model.fp8=null"
            )
        if self.fp8 is not None and self.dtype == "fp32":
            problems.append(
                f"model.fp8={self.fp8!r} cannot be used with model.dtype='fp32'; use bf16 or model.fp8=null"
            )
        problems += _at_least(
            self, "model", 1, "fp8_amax_history_len", "make_vocab_size_divisible_by", "recompute_num_layers"
        )
        problems += _in_unit_interval(self, "model", "attention_dropout", "hidden_dropout", include_one=False)
        return problems


@dataclass
class ParallelConfig:
    """Megatron actor layout over the GPUs; data parallel is whatever tp*pp*cp leaves (upstream: trainer.*)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    nnodes: int = 1
    n_gpus_per_node: int = 8

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_gpus_per_node

    @property
    def data_parallel_size(self) -> int:
        """Valid only after `validate` has checked that tp*pp*cp divides the world size."""
        model_parallel = (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )
        return self.world_size // model_parallel

    def world_size_problem(self) -> str | None:
        """Why tp*pp*cp does not divide the world size (None when it does, or a size is below 1). The one
        statement of this rule: `cluster.layout.plan_layout` raises it too."""
        model_parallel = (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )
        if model_parallel < 1 or self.world_size < 1 or self.world_size % model_parallel == 0:
            return None
        return (
            f"parallel.tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size = "
            f"{self.tensor_model_parallel_size}*{self.pipeline_model_parallel_size}*{self.context_parallel_size} = "
            f"{model_parallel} must divide the world size parallel.nnodes * n_gpus_per_node = "
            f"{self.nnodes}*{self.n_gpus_per_node} = {self.world_size}"
        )

    def problems(self) -> list[str]:
        problems = _at_least(
            self,
            "parallel",
            1,
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "context_parallel_size",
            "nnodes",
            "n_gpus_per_node",
        )
        world_size_problem = self.world_size_problem()
        if world_size_problem:
            problems.append(world_size_problem)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            problems.append(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1; "
                "set parallel.sequence_parallel=false"
            )
        if self.virtual_pipeline_model_parallel_size is not None and self.pipeline_model_parallel_size == 1:
            problems.append(
                "parallel.virtual_pipeline_model_parallel_size is set but parallel.pipeline_model_parallel_size=1; "
                "set parallel.virtual_pipeline_model_parallel_size=null or raise pipeline_model_parallel_size"
            )
        return problems


@dataclass
class RolloutConfig:
    """How each prompt's group of n rows is made: n_off_policy demonstrations + generated samples
    (upstream: actor_rollout_ref.rollout.*)."""

    n: int = 8  # rows per prompt, on- and off-policy together
    n_off_policy: int = 1  # upstream `n_prefix`: rows that get a demonstration prefix; 0 = pure on-policy, -1 = all n
    prefix_strategy: Literal["random", "linear", "reverse_linear", "linear_max", "fixed"] = "random"
    min_prefix_ratio: float = 1.0  # fraction of the demonstration used as prefix; 1.0 = the whole trace
    max_prefix_ratio: float = 1.0
    prefix_share_across_samples: bool = False
    prefix_steps: int = 1000  # schedule length of the linear / reverse_linear / linear_max strategies
    prefix_linear_max_ratio: float = 0.8
    max_prefix_len: int = 8192  # demonstration tokens kept (longer ones are truncated, as upstream)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    val_temperature: float = 0.6
    n_val: int = 1  # samples per validation prompt
    # a vLLM sampling seed per row from trainer.seed and the step (validation: the same seeds every time), so the
    # same weights sample the same rows: runs repeat and compare seed for seed. vLLM samples seeded rows one by one
    # and without FlashInfer's sampler: slower on GPUs. false = vLLM's own random stream
    seeded_sampling: bool = False
    tensor_model_parallel_size: int = 2  # TP of each vLLM engine, independent of parallel.*
    num_engines: int | None = None  # None = as many as fit on the GPUs
    gpu_memory_utilization: float = 0.8
    # vLLM without CUDA graphs; None = by the engine's device: CUDA graphs on GPUs, eager on vLLM-CPU
    enforce_eager: bool | None = None
    max_num_seqs: int = 256
    weight_sync_bucket_mb: int = 512  # size of the buckets streamed from the actor to the engines
    # how buckets reach the engines: auto = shared_memory for colocated engines, collective for disaggregated ones
    weight_sync_transport: Literal["auto", "collective", "shared_memory", "object_store"] = "auto"
    # CPU engines: load synced weights straight into vLLM's kernel format (rollout/direct_load.py) where the
    # model qualifies; false = always vLLM's own layerwise reload
    engine_direct_load: bool = True
    max_logprob_diff: float | None = None  # mean |engine - actor old log-prob| over generated tokens; None = no check
    logprob_diff_action: Literal["warn", "error"] = "warn"  # what exceeding rollout.max_logprob_diff does
    request_timeout_s: float = 1800.0  # a generation or sync call that takes longer fails naming the engine
    on_engine_failure: Literal["fail", "restart"] = "fail"  # restart: start the engine again, re-sync, retry

    def problems(self) -> list[str]:
        problems = _at_least(
            self,
            "rollout",
            1,
            "n",
            "n_val",
            "prefix_steps",
            "max_prefix_len",
            "tensor_model_parallel_size",
            "num_engines",
            "max_num_seqs",
            "weight_sync_bucket_mb",
        )
        problems += self._prefix_problems()
        problems += self._sampling_problems()
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            problems.append(f"rollout.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        # rollout.max_prefix_len > data.max_response_length is fine: the demonstration is cut to the response.
        if self.max_logprob_diff is not None and self.max_logprob_diff <= 0:
            problems.append(
                f"rollout.max_logprob_diff={self.max_logprob_diff} must be > 0 (a mean |engine - actor "
                "log-prob| limit, e.g. 0.05), or null to turn the check off"
            )
        if self.max_logprob_diff is None and self.logprob_diff_action == "error":
            problems.append(
                "rollout.logprob_diff_action=error has no limit to act on: set rollout.max_logprob_diff "
                "(e.g. 0.05), or logprob_diff_action=warn"
            )
        if self.request_timeout_s <= 0:
            problems.append(
                f"rollout.request_timeout_s={self.request_timeout_s} must be > 0 (seconds a generation "
                "or weight sync may take before the engine counts as failed)"
            )
        return problems

    def _prefix_problems(self) -> list[str]:
        """How many rows get a demonstration prefix, and how much of it."""
        problems = []
        if self.n_off_policy < -1 or self.n_off_policy > self.n:
            problems.append(
                f"rollout.n_off_policy={self.n_off_policy} must be between 0 and rollout.n={self.n} "
                "(or -1 = every row gets a prefix)"
            )
        problems += _in_unit_interval(
            self, "rollout", "min_prefix_ratio", "max_prefix_ratio", "prefix_linear_max_ratio"
        )
        if self.min_prefix_ratio > self.max_prefix_ratio:
            problems.append(
                f"rollout.min_prefix_ratio={self.min_prefix_ratio} > rollout.max_prefix_ratio={self.max_prefix_ratio}"
            )
        if self.prefix_strategy == "linear" and not self.prefix_share_across_samples:
            problems.append(
                "rollout.prefix_strategy='linear' needs rollout.prefix_share_across_samples=true (as upstream)"
            )
        if self.prefix_strategy == "fixed":
            if self.prefix_share_across_samples:
                problems.append(
                    "rollout.prefix_strategy='fixed' spreads ratios over the prefixed rows, so it needs "
                    "rollout.prefix_share_across_samples=false"
                )
            num_prefixed = self.n if self.n_off_policy == -1 else self.n_off_policy
            if num_prefixed == 1 and self.min_prefix_ratio != self.max_prefix_ratio:
                problems.append(
                    "rollout.prefix_strategy='fixed' spaces ratios evenly over the prefixed rows and needs at least "
                    f"2 (rollout.n_off_policy={self.n_off_policy}); raise rollout.n_off_policy or set "
                    "rollout.min_prefix_ratio = rollout.max_prefix_ratio"
                )
        return problems

    def _sampling_problems(self) -> list[str]:
        problems = []
        if self.temperature <= 0:
            problems.append(f"rollout.temperature={self.temperature} must be > 0 (training needs sampled log-probs)")
        if self.val_temperature < 0:
            problems.append(f"rollout.val_temperature={self.val_temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"rollout.top_k={self.top_k} must be -1 (off) or >= 1")
        return problems


@dataclass
class DataConfig:
    """Prompts and demonstrations (upstream: data.*)."""

    train_files: list[str] = field(default_factory=list)  # parquet
    val_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 1024  # tokens after the chat template
    max_response_length: int = 8192
    train_batch_size: int = 128  # prompts per step
    val_batch_size: int | None = None  # None = the whole validation set at once
    shuffle: bool = True
    seed: int = 47  # upstream's fixed sampler seed
    long_prompt_policy: Literal["drop", "error"] = "drop"  # prompts over max_prompt_length
    long_demo_policy: Literal["truncate", "drop"] = "truncate"  # demonstrations over rollout.max_prefix_len
    skip_bad_rows: bool = False  # skip malformed rows instead of failing
    # None = the model's own (or LUFFY's default when it lacks <think>); default; model; a Jinja file
    chat_template: str | None = None
    # fraction of prompts that keep their demonstration each step (upstream data.sample_target_ratio)
    sample_target_ratio: float = 1.0
    # column of teacher token probabilities (algo.use_off_policy_probs)
    target_probs_key: str = "target_ds_qwen_7b_probs"
    remove_system_prompt: bool = False

    def problems(self) -> list[str]:
        problems = _at_least(
            self, "data", 1, "max_prompt_length", "max_response_length", "train_batch_size", "val_batch_size"
        )
        problems += _in_unit_interval(self, "data", "sample_target_ratio")
        return problems


@dataclass
class RewardConfig:
    """Grading of responses, run in worker processes with a hard deadline."""

    fn: Literal["luffy_think", "math", "choice"] = "luffy_think"  # luffy_think = upstream reward_impl_version=3
    num_workers: int = 2
    timeout_s: float = 10.0  # per response; a timeout scores 0
    # false = upstream: grade the decoded text with its trailing special tokens (math-verify reads
    # "1/2<|endoftext|>" as 1); true = strip trailing special tokens first (luffy_think and math; choice always strips)
    strip_special_tokens: bool = False

    def problems(self) -> list[str]:
        problems = []
        if self.timeout_s <= 0:
            problems.append(f"reward.timeout_s={self.timeout_s} must be > 0")
        return problems + _at_least(self, "reward", 1, "num_workers")


@dataclass
class ActorConfig:
    """Optimiser and micro-batching of the Megatron actor (upstream: actor_rollout_ref.actor.*)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    lr_warmup_steps_ratio: float = 0.0  # warmup over int(ratio x total trainer steps), as upstream (actor/schedule.py)
    # true = upstream's LambdaLR quirk: lr 0 on the first trainer step even without warmup
    zero_lr_first_step: bool = False
    ppo_mini_batch_size: int = 64  # prompts per optimiser step (each brings rollout.n rows; x n / DP rows per rank)
    ppo_epochs: int = 1
    use_dynamic_bsz: bool = True  # micro-batches packed up to a token budget instead of a row count
    ppo_max_token_len_per_gpu: int = 32768  # the token budget when use_dynamic_bsz
    # prompts per micro-batch when not use_dynamic_bsz (upstream's units: x rollout.n / DP rows per rank); with or
    # without dynamic batch sizes every micro-batch loss is divided by ppo_mini_batch_size // ppo_micro_batch_size.
    # None = ppo_mini_batch_size (divisor 1: micro-batch losses summed, as LUFFY's train.sh with 64 / 64)
    ppo_micro_batch_size: int | None = None
    log_prob_chunk_tokens: int = 4096  # tokens per chunk when computing log-probs over the vocab
    use_sequence_packing: bool = True  # upstream use_remove_padding
    balance_batch: bool = True  # balance tokens across data-parallel ranks
    offload_during_rollout: bool = False  # colocated: optimizer state and gradients to host while engines generate

    def problems(self) -> list[str]:
        problems = _at_least(
            self,
            "actor",
            1,
            "ppo_mini_batch_size",
            "ppo_epochs",
            "ppo_max_token_len_per_gpu",
            "ppo_micro_batch_size",
            "log_prob_chunk_tokens",
        )
        micro = self.ppo_micro_batch_size
        if micro is not None and micro >= 1 and self.ppo_mini_batch_size % micro:
            problems.append(
                f"actor.ppo_mini_batch_size={self.ppo_mini_batch_size} is not a multiple of "
                f"actor.ppo_micro_batch_size={micro} (both in prompts, as upstream, which asserts it); "
                "the micro-batch losses are divided by their ratio"
            )
        if self.lr <= 0:
            problems.append(f"actor.lr={self.lr} must be > 0")
        problems += _in_unit_interval(self, "actor", "lr_warmup_steps_ratio")
        return problems


@dataclass
class ClusterConfig:
    """Where the Megatron ranks and the vLLM engines run on the GPUs of the Ray cluster (luffy_megatron.cluster)."""

    layout: Literal["auto", "colocated", "disaggregated"] = "auto"  # auto: colocated on GPUs
    rollout_nnodes: int = 0  # disaggregated: whole nodes given to the engines (the rest train)
    placement_timeout_s: float = 600.0  # how long to wait for Ray to grant the GPUs before failing
    # CPU jobs (no GPUs): the cores of the Megatron ranks. all: every core (generation and training take turns);
    # free: those no vLLM engine binds (the engines generate while the ranks train); auto: free under
    # trainer.overlap=one_step, else all
    cpu_rank_cores: Literal["auto", "all", "free"] = "auto"

    def problems(self) -> list[str]:
        """The rules of this section alone; those that need the Ray cluster (e.g. `auto`) are checked by
        cluster.placement.reserve, and the layout itself by config.checks."""
        problems = []
        if self.placement_timeout_s <= 0:
            problems.append(
                f"cluster.placement_timeout_s={self.placement_timeout_s} must be > 0 (seconds to wait for the GPUs)"
            )
        if self.rollout_nnodes < 0:
            problems.append(f"cluster.rollout_nnodes={self.rollout_nnodes} must be >= 0")
        if self.layout == "auto" and self.rollout_nnodes > 0:
            problems.append(
                f"cluster.rollout_nnodes={self.rollout_nnodes} gives whole nodes to the engines, which only "
                "cluster.layout=disaggregated does; set cluster.layout=disaggregated (or rollout_nnodes=0)"
            )
        return problems


@dataclass
class TrainerConfig:
    """The loop: how long, how often to validate and save, where to write."""

    total_epochs: int = 30
    total_training_steps: int | None = None  # None = total_epochs over the training set
    save_freq: int = 50  # steps; -1 = never
    test_freq: int = 10  # steps; -1 = never
    val_before_train: bool = True
    val_only: bool = False  # validate once (the resumed or initial weights) and exit, as upstream's trainer.val_only
    # HF export of the best val/test_score/avg to <output_dir>/best/actor (upstream maybe_save_best_hf)
    save_best_hf: bool = True
    output_dir: str = "outputs/luffy"
    max_checkpoints_to_keep: int = 3
    resume: Literal["auto", "disable"] = "auto"  # auto: continue from the latest checkpoint in output_dir
    resume_from: str | None = None  # a checkpoint dir (checkpoints/step_N) to resume from; `luffy-train --resume PATH`
    # resume although data.train_files differ from the checkpoint's (names, sizes, row count): the saved data
    # position then points into another order of prompts. false: such a resume is refused
    allow_data_change: bool = False
    seed: int = 1
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # a call on the Megatron ranks (log-probs, update, checkpoint, optimizer offload/reload) that takes longer
    # counts as a hang: the step fails naming the late rank(s)
    rank_call_timeout_s: float = 4 * 3600.0
    # one_step: the engines generate the next step's batch with the weights before this step's update, while the
    # trainer computes it (one update off-policy, rollout/weight_version_lag 1; disaggregated or CPU layouts
    # only). none: generation and training take turns, every generated row on-policy (upstream's loop)
    overlap: Literal["none", "one_step"] = "none"

    def problems(self) -> list[str]:
        problems = []
        if self.rank_call_timeout_s <= 0:
            problems.append(
                f"trainer.rank_call_timeout_s={self.rank_call_timeout_s} must be > 0 (seconds one call "
                "on the Megatron ranks, e.g. an update, may take before it counts as a hang)"
            )
        problems += _at_least(self, "trainer", 1, "total_epochs", "total_training_steps", "max_checkpoints_to_keep")
        for name in ("save_freq", "test_freq"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                problems.append(f"trainer.{name}={value} must be >= 1 (steps) or -1 (never)")
        return problems


@dataclass
class LoggingConfig:
    """Console progress and TensorBoard scalars."""

    project_name: str = "luffy-megatron"
    experiment_name: str = "luffy"
    tensorboard_dir: str | None = None  # None = <trainer.output_dir>/tensorboard
    log_every_steps: int = 1
    console: bool = True

    def problems(self) -> list[str]:
        return _at_least(self, "logging", 1, "log_every_steps")


@dataclass
class Config:
    """The whole run. Defaults are the paper's main LUFFY run (upstream exp_scripts/train.sh)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, as a recipe would spell them (for dumping and for checkpoints)."""
        return dataclasses.asdict(self)
