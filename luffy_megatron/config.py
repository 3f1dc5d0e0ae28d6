"""Typed configuration: a tree of dataclasses, loaded from a YAML recipe plus dotted overrides.

One spelling per setting: every option is a field below, with its default next to it, and that is the only
place it is declared. A recipe (``recipes/*.yaml``) sets some of the fields; ``--set section.key=value`` on the
command line sets more; ``validate`` then rejects combinations that cannot run. Unknown keys, wrong types
and values outside a ``Literal`` are errors that name the dotted key, what was given and what is allowed,
because a silently ignored typo in an RL recipe costs a whole run.

Names follow upstream LUFFY (``actor_rollout_ref.actor.off_policy_reshape`` -> ``algo.off_policy_reshape``)
so its users find their way; the few renamed ones are listed in ``_RENAMED_UPSTREAM_KEYS``.

The list of every dotted path with its default is snapshotted by ``tests/unit/test_config.py``, so adding or
changing a setting shows up as a reviewed diff.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

import yaml

__all__ = [
    "ActorConfig",
    "AlgoConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "config_paths",
    "dump_yaml",
    "load_config",
    "parse_overrides_from_argv",
    "validate",
]


class ConfigError(ValueError):
    """A configuration the user has to fix; the message names the dotted key and what to do."""


# --------------------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------------------

OffPolicyReshape = Literal[
    "no_reshape", "logp", "p_logp", "square_root", "p_div_p_0.1", "p_div_p_0.3", "p_div_p_0.5", "pow"
]
OnPolicyReshape = Literal["no_reshape", "logp", "p_logp", "square_root", "pow", "p_div_p_0.1", "p_div_p_0.5"]


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
    tensor_model_parallel_size: int = 2  # TP of each vLLM engine, independent of parallel.*
    num_engines: int | None = None  # None = as many as fit on the GPUs
    gpu_memory_utilization: float = 0.8
    enforce_eager: bool = True
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


@dataclass
class AlgoConfig:
    """Advantage and loss of LUFFY (upstream: algorithm.* and actor_rollout_ref.actor.*)."""

    # rl: the policy-gradient losses below (LUFFY, on-policy GRPO, RL w/ SFT loss); sft: supervised fine-tuning
    # on the demonstrations only (token-mean NLL per micro-batch, no entropy bonus, nothing generated; needs
    # rollout.n_off_policy=-1), with the same data, optimiser and step budget as an RL run
    mode: Literal["rl", "sft"] = "rl"
    adv_estimator: Literal["grpo", "grpo_split"] = "grpo"
    grpo_use_std: bool = False  # divide group advantages by their std; LUFFY does not
    use_off_policy_loss: bool = True  # the shaped off-policy term for demonstration rows
    use_sft_multitask_loss: bool = False  # baseline "RL w/ SFT loss": NLL on demonstrations (needs grpo_split)
    sft_loss_coef: float = 1.0
    off_policy_reshape: OffPolicyReshape = "p_div_p_0.1"  # policy shaping f(p) = p / (p + 0.1)
    off_policy_reshape_weight: float = 0.1
    off_policy_reshape_pow_exp: float = 0.5
    on_policy_reshape: OnPolicyReshape = "no_reshape"
    on_policy_reshape_weight: float = 0.1
    on_policy_reshape_pow_exp: float = 0.5
    off_policy_max_clip: float = -1.0  # -1 = off (upstream convention)
    off_policy_min_clip: float = -1.0  # -1 = off
    all_max_clip: float = -1.0  # -1 = off; else drop tokens whose p exceeds it
    # off-policy ratio p / (teacher p + 1e-6) from the dataset's data.target_probs_key column instead of the
    # shaped p / (p + 0.1) (off_policy_reshape is then unused, as upstream); needs use_off_policy_loss
    use_off_policy_probs: bool = False
    clip_ratio: float = 0.2
    clip_upper_bound: float = 1.0
    loss_remove_clip: bool = True  # on-policy term without PPO clipping
    # constant_length = upstream loss_remove_token_mean=True: token sum / data.max_response_length
    loss_agg_mode: Literal["constant_length", "token_mean", "seq_mean"] = "constant_length"
    # How data-parallel ranks combine their gradients. "mean" is upstream (FSDP averages each rank's summed
    # loss, so the step scales with 1/DP); "sum" makes the step independent of the DP size.
    dp_gradient_reduction: Literal["mean", "sum"] = "mean"
    entropy_coeff: float = 0.001
    use_kl_loss: bool = False  # kl_loss_coef x token-mean KL(policy, reference) in the actor's loss (needs the reference)
    kl_loss_coef: float = 0.0
    kl_loss_type: Literal["kl", "abs", "mse", "low_var_kl"] = "low_var_kl"
    # KL reward penalty (upstream algorithm.kl_penalty, algorithm.kl_ctrl.*; algo/kl.py), applied when not use_kl_loss:
    # token rewards -= beta x kl_penalty(old log-prob, reference log-prob); beta starts at kl_ctrl_coef
    kl_penalty: Literal["kl", "abs", "mse", "low_var_kl"] = "kl"
    kl_ctrl_type: Literal["fixed", "adaptive"] = "fixed"  # adaptive: beta follows the KL towards kl_ctrl_target_kl
    kl_ctrl_coef: float = 0.0  # upstream kl_ctrl.kl_coef; LUFFY's train.sh: 0.0 (no penalty, no reference model)
    kl_ctrl_target_kl: float = 0.1  # adaptive only (upstream kl_ctrl.target_kl)
    kl_ctrl_horizon: int = 10000  # adaptive only (upstream kl_ctrl.horizon)
    # the frozen reference model (upstream actor_rollout_ref.ref.use_ref; algo/options.py uses_reference): null =
    # built when use_kl_loss or kl_ctrl_coef > 0; true = also without them (critic/kl is then logged with beta 0)
    use_ref: bool | None = None
    use_ppo_kl_loss: bool = False
    ppo_kl_loss_coef: float = 0.01
    prefix_reward_weight_alpha: float = 1.0
    prefix_reward_weight_beta: float = 1.0
    disable_truncation_advantage: bool = False  # upstream data.disable_truncation_advantage: no advantage for cut-off rows
    use_sft_prefix_reward: bool = False  # upstream actor.use_sft_prefix_reward: demonstration tokens get weight / n
    sft_prefix_reward_weight: float = 1.0


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
    chat_template: str | None = None  # None = the model's own (or LUFFY's default when it lacks <think>); default; model; a Jinja file
    sample_target_ratio: float = 1.0  # fraction of prompts that keep their demonstration each step (upstream data.sample_target_ratio)
    target_probs_key: str = "target_ds_qwen_7b_probs"  # column of teacher token probabilities (algo.use_off_policy_probs)
    remove_system_prompt: bool = False


@dataclass
class RewardConfig:
    """Grading of responses, run in worker processes with a hard deadline."""

    fn: Literal["luffy_think", "math", "choice"] = "luffy_think"  # luffy_think = upstream reward_impl_version=3
    num_workers: int = 2
    timeout_s: float = 10.0  # per response; a timeout scores 0
    # false = upstream: grade the decoded text with its trailing special tokens (math-verify reads
    # "1/2<|endoftext|>" as 1); true = strip trailing special tokens first (luffy_think and math; choice always strips)
    strip_special_tokens: bool = False


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
    zero_lr_first_step: bool = False  # true = upstream's LambdaLR quirk: lr 0 on the first trainer step even without warmup
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


@dataclass
class ClusterConfig:
    """Where the Megatron ranks and the vLLM engines run on the GPUs of the Ray cluster (luffy_megatron.cluster)."""

    layout: Literal["auto", "colocated", "disaggregated"] = "auto"  # auto: colocated on GPUs
    rollout_nnodes: int = 0  # disaggregated: whole nodes given to the engines (the rest train)
    placement_timeout_s: float = 600.0  # how long to wait for Ray to grant the GPUs before failing


@dataclass
class TrainerConfig:
    """The loop: how long, how often to validate and save, where to write."""

    total_epochs: int = 30
    total_training_steps: int | None = None  # None = total_epochs over the training set
    save_freq: int = 50  # steps; -1 = never
    test_freq: int = 10  # steps; -1 = never
    val_before_train: bool = True
    val_only: bool = False  # validate once (the resumed or initial weights) and exit, as upstream's trainer.val_only
    save_best_hf: bool = True  # HF export of the best val/test_score/avg to <output_dir>/best/actor (upstream maybe_save_best_hf)
    output_dir: str = "outputs/luffy"
    max_checkpoints_to_keep: int = 3
    resume: Literal["auto", "disable"] = "auto"  # auto: continue from the latest checkpoint in output_dir
    resume_from: str | None = None  # a checkpoint dir (checkpoints/step_N) to resume from; `luffy-train --resume PATH`
    seed: int = 1
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # a call on the Megatron ranks (log-probs, update, checkpoint, optimizer offload/reload) that takes longer
    # counts as a hang: the step fails naming the late rank(s)
    rank_call_timeout_s: float = 4 * 3600.0


@dataclass
class LoggingConfig:
    """Console progress and TensorBoard scalars."""

    project_name: str = "luffy-megatron"
    experiment_name: str = "luffy"
    tensorboard_dir: str | None = None  # None = <trainer.output_dir>/tensorboard
    log_every_steps: int = 1
    console: bool = True


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


# Upstream keys that exist here under another spelling: a user porting a script gets told the new one.
_RENAMED_UPSTREAM_KEYS = {
    "algo.loss_remove_token_mean": (
        "use algo.loss_agg_mode=constant_length (upstream loss_remove_token_mean=true) "
        "or algo.loss_agg_mode=token_mean (false)"
    ),
    "rollout.n_prefix": "use rollout.n_off_policy (same meaning; 0 = pure on-policy, -1 = every row)",
    "actor.lr_warmup_style": "the schedule is always upstream's constant-with-warmup; remove the key "
                             "(actor.lr_warmup_steps_ratio sets the warmup)",
    "data.disable_truncation_advantage": "use algo.disable_truncation_advantage",
    "actor.use_sft_prefix_reward": "use algo.use_sft_prefix_reward (and algo.sft_prefix_reward_weight)",
    "algo.kl_ctrl": (
        "upstream's algorithm.kl_ctrl section is flat here: algo.kl_ctrl_type (type), algo.kl_ctrl_coef (kl_coef), "
        "algo.kl_ctrl_target_kl (target_kl), algo.kl_ctrl_horizon (horizon)"
    ),
}


# --------------------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, where `1e-6` (no dot, or no exponent sign) is a string. Recipes write learning
# rates that way, so both the loader and the dumper resolve such scalars as floats.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """Safe loader that reads `1e-6` as a float and rejects duplicate keys (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes strings that `_Loader` would read back as floats, so dump_yaml round-trips."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the recipe at `path` (None = defaults only), then `overrides` ("a.b=value"), validated."""
    cfg = Config()
    if path is not None:
        _apply_mapping(cfg, _read_recipe(path), prefix="", where=f"{path}: ")
    for text in overrides:
        _apply_override(cfg, text)
    try:
        validate(cfg)
    except ConfigError as err:
        origin = " + ".join(s for s in (str(path) if path else "", "--set overrides" if overrides else "") if s)
        raise ConfigError(f"{origin}: {err}" if origin else str(err)) from None
    return cfg


def parse_overrides_from_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config PATH` (once), repeated `--set a.b=v` and `--resume CHECKPOINT` (= `--set trainer.resume_from=...`)
    (argv without the program name)."""
    recipe: str | None = None
    overrides: list[str] = []
    usage = "usage: [--config RECIPE.yaml] [--set section.key=value ...] [--resume CHECKPOINT_DIR]"
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if flag in ("--config", "--set", "--resume"):
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{flag} needs a value; {usage}")
            if flag == "--config":
                if recipe is not None:
                    raise ConfigError(f"--config given twice ({recipe!r} and {value!r}); {usage}")
                recipe = value
            elif flag == "--resume":
                overrides.append(f"trainer.resume_from={value}")
            else:
                overrides.append(value)
        elif "=" in arg and not arg.startswith("-"):
            raise ConfigError(f"unexpected argument {arg!r}; write it as --set {arg}")
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {usage}")
        i += 1
    return recipe, overrides


def _read_recipe(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:  # an empty file is an empty recipe
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping of sections ({', '.join(_field_types(Config))}), "
            f"got {_yaml_type(data)} at the top level"
        )
    return data


def _apply_override(cfg: Config, text: str) -> None:
    """Set one "section.key=value"; the value is a YAML scalar or flow list ([a, b]), `null` for None."""
    where = "--set "
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set expects section.key=value (e.g. algo.clip_ratio=0.2), got {text!r}")
    *sections, name = key.split(".")
    node, prefix = cfg, ""
    for part in sections:
        tp = _lookup(node, prefix, part, where)
        dotted = _join(prefix, part)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}{key}: {dotted} is a setting, not a section; set it as {dotted}=value")
        node, prefix = getattr(node, part), dotted
    tp = _lookup(node, prefix, name, where)
    if raw.strip() == "":
        value: Any = ""
    else:
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}{key}: cannot parse {raw!r} as a YAML value: {err}") from None
    # A shell makes quoting awkward, so `logging.experiment_name=2024` means the string "2024".
    if _accepts_str(tp) and isinstance(value, (bool, int, float)):
        value = raw.strip()
    _set_field(node, prefix, name, value, where)


def _apply_mapping(node: Any, data: Any, prefix: str, where: str) -> None:
    for name, value in data.items():
        _set_field(node, prefix, str(name), value, where)


def _set_field(node: Any, prefix: str, name: str, value: Any, where: str) -> None:
    tp = _lookup(node, prefix, name, where)
    dotted = _join(prefix, name)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out
            return
        if not isinstance(value, dict):
            keys = ", ".join(_field_types(tp))
            raise ConfigError(
                f"{where}{dotted} is a section; give it a mapping of its keys ({keys}), "
                f"got {_yaml_type(value)} {value!r}"
            )
        _apply_mapping(getattr(node, name), value, dotted, where)
    else:
        setattr(node, name, _check_value(value, tp, dotted, where))


def _lookup(node: Any, prefix: str, name: str, where: str) -> Any:
    """The declared type of node.<name>; an unknown name is an error listing the valid ones."""
    types_ = _field_types(type(node))
    if name in types_:
        return types_[name]
    dotted = _join(prefix, name)
    if dotted in _RENAMED_UPSTREAM_KEYS:
        raise ConfigError(f"{where}{dotted} is the upstream LUFFY spelling; {_RENAMED_UPSTREAM_KEYS[dotted]}")
    what = f"section {prefix!r}" if prefix else "the config"
    noun = "keys" if prefix else "sections"
    message = f"{where}unknown key {dotted!r} in {what}; valid {noun}: {', '.join(types_)}"
    close = difflib.get_close_matches(name, list(types_), n=1)
    elsewhere = [p for p, _ in config_paths(Config) if p.rsplit(".", 1)[-1] == name]
    if close:
        message += f". Did you mean {_join(prefix, close[0])!r}?"
    elif elsewhere:
        message += f". Did you mean {' or '.join(map(repr, elsewhere))}?"
    raise ConfigError(message)


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` if it has type `tp` (an int is widened to float); otherwise a ConfigError naming `key`."""
    nullable = _is_optional(tp)
    if nullable:
        if value is None:
            return None
        tp = _strip_none(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(args) + (", null" if nullable else "")
        raise ConfigError(f"{where}{key}={value!r} is not one of: {choices}")
    hint = ""
    if origin is list:
        if isinstance(value, list):
            return [_check_value(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
        hint = f" (write a list, e.g. [{value}])" if isinstance(value, str) else ""
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        if tp is str and isinstance(value, (int, float, bool)):
            hint = f" (quote it to mean the string: '{value}')"
    else:
        raise TypeError(f"config.py cannot check fields of type {tp!r} ({key}); extend _check_value")
    raise ConfigError(
        f"{where}{key} expects {_type_name(tp, nullable)}, got {_yaml_type(value)} {value!r}{hint}"
    )


# --------------------------------------------------------------------------------------------------------------
# Validation: combinations that cannot run. Read top to bottom; every message names the key(s) and a fix.
# --------------------------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every impossible combination in `cfg`."""
    errors: list[str] = []
    m, p, r, a, d, act, t = cfg.model, cfg.parallel, cfg.rollout, cfg.algo, cfg.data, cfg.actor, cfg.trainer

    def at_least(minimum: int, *keys: str) -> None:
        for key in keys:
            value = _get(cfg, key)
            if value is not None and value < minimum:
                errors.append(f"{key}={value} must be >= {minimum}")

    # model
    if m.fp8 is not None and m.transformer_impl == "local":
        errors.append(
            f"model.fp8={m.fp8!r} needs Transformer Engine but model.transformer_impl='local'; "
            "set model.transformer_impl=auto (or transformer_engine), or model.fp8=null"
        )
    if m.fp8 is not None and m.dtype == "fp32":
        errors.append(f"model.fp8={m.fp8!r} cannot be used with model.dtype='fp32'; use bf16 or model.fp8=null")
    at_least(1, "model.fp8_amax_history_len", "model.make_vocab_size_divisible_by", "model.recompute_num_layers")
    for key in ("model.attention_dropout", "model.hidden_dropout"):
        if not 0.0 <= _get(cfg, key) < 1.0:
            errors.append(f"{key}={_get(cfg, key)} must be in [0, 1)")

    # parallel
    at_least(1, "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
             "parallel.virtual_pipeline_model_parallel_size", "parallel.context_parallel_size",
             "parallel.nnodes", "parallel.n_gpus_per_node")
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if model_parallel >= 1 and p.world_size >= 1 and p.world_size % model_parallel:
        errors.append(
            f"parallel.tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size = "
            f"{p.tensor_model_parallel_size}*{p.pipeline_model_parallel_size}*{p.context_parallel_size} = "
            f"{model_parallel} must divide the world size parallel.nnodes * n_gpus_per_node = "
            f"{p.nnodes}*{p.n_gpus_per_node} = {p.world_size}"
        )
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        errors.append(
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1; "
            "set parallel.sequence_parallel=false"
        )
    if p.virtual_pipeline_model_parallel_size is not None and p.pipeline_model_parallel_size == 1:
        errors.append(
            "parallel.virtual_pipeline_model_parallel_size is set but parallel.pipeline_model_parallel_size=1; "
            "set parallel.virtual_pipeline_model_parallel_size=null or raise pipeline_model_parallel_size"
        )

    # rollout
    at_least(1, "rollout.n", "rollout.n_val", "rollout.prefix_steps", "rollout.max_prefix_len",
             "rollout.tensor_model_parallel_size", "rollout.num_engines", "rollout.max_num_seqs",
             "rollout.weight_sync_bucket_mb")
    if r.n_off_policy < -1 or r.n_off_policy > r.n:
        errors.append(
            f"rollout.n_off_policy={r.n_off_policy} must be between 0 and rollout.n={r.n} "
            "(or -1 = every row gets a prefix)"
        )
    for key in ("rollout.min_prefix_ratio", "rollout.max_prefix_ratio", "rollout.prefix_linear_max_ratio"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            errors.append(f"{key}={_get(cfg, key)} must be in [0, 1]")
    if r.min_prefix_ratio > r.max_prefix_ratio:
        errors.append(
            f"rollout.min_prefix_ratio={r.min_prefix_ratio} > rollout.max_prefix_ratio={r.max_prefix_ratio}"
        )
    if r.prefix_strategy == "linear" and not r.prefix_share_across_samples:
        errors.append(
            "rollout.prefix_strategy='linear' needs rollout.prefix_share_across_samples=true (as upstream)"
        )
    if r.prefix_strategy == "fixed":
        if r.prefix_share_across_samples:
            errors.append(
                "rollout.prefix_strategy='fixed' spreads ratios over the prefixed rows, so it needs "
                "rollout.prefix_share_across_samples=false"
            )
        num_prefixed = r.n if r.n_off_policy == -1 else r.n_off_policy
        if num_prefixed == 1 and r.min_prefix_ratio != r.max_prefix_ratio:
            errors.append(
                "rollout.prefix_strategy='fixed' spaces ratios evenly over the prefixed rows and needs at least 2 "
                f"(rollout.n_off_policy={r.n_off_policy}); raise rollout.n_off_policy or set "
                "rollout.min_prefix_ratio = rollout.max_prefix_ratio"
            )
    if r.temperature <= 0:
        errors.append(f"rollout.temperature={r.temperature} must be > 0 (training needs sampled log-probs)")
    if r.val_temperature < 0:
        errors.append(f"rollout.val_temperature={r.val_temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < r.top_p <= 1.0:
        errors.append(f"rollout.top_p={r.top_p} must be in (0, 1]")
    if r.top_k == 0 or r.top_k < -1:
        errors.append(f"rollout.top_k={r.top_k} must be -1 (off) or >= 1")
    if not 0.0 < r.gpu_memory_utilization <= 1.0:
        errors.append(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1]")
    if r.tensor_model_parallel_size > p.world_size >= 1:
        errors.append(
            f"rollout.tensor_model_parallel_size={r.tensor_model_parallel_size} exceeds the {p.world_size} GPUs "
            "of parallel.nnodes * n_gpus_per_node"
        )
    # rollout.max_prefix_len > data.max_response_length is fine: the demonstration is cut to the response.
    if r.max_logprob_diff is not None and r.max_logprob_diff <= 0:
        errors.append(f"rollout.max_logprob_diff={r.max_logprob_diff} must be > 0 (a mean |engine - actor log-prob| "
                      "limit, e.g. 0.05), or null to turn the check off")
    if r.max_logprob_diff is None and r.logprob_diff_action == "error":
        errors.append("rollout.logprob_diff_action=error has no limit to act on: set rollout.max_logprob_diff "
                      "(e.g. 0.05), or logprob_diff_action=warn")
    if r.request_timeout_s <= 0:
        errors.append(f"rollout.request_timeout_s={r.request_timeout_s} must be > 0 (seconds a generation or weight "
                      "sync may take before the engine counts as failed)")

    if cfg.trainer.rank_call_timeout_s <= 0:
        errors.append(f"trainer.rank_call_timeout_s={cfg.trainer.rank_call_timeout_s} must be > 0 (seconds one call "
                      "on the Megatron ranks, e.g. an update, may take before it counts as a hang)")

    # cluster (the layout rules that need the Ray cluster, e.g. `auto`, are checked by cluster.placement.reserve)
    c = cfg.cluster
    if c.placement_timeout_s <= 0:
        errors.append(f"cluster.placement_timeout_s={c.placement_timeout_s} must be > 0 (seconds to wait for the GPUs)")
    if c.rollout_nnodes < 0:
        errors.append(f"cluster.rollout_nnodes={c.rollout_nnodes} must be >= 0")
    if c.layout == "auto" and c.rollout_nnodes > 0:
        errors.append(f"cluster.rollout_nnodes={c.rollout_nnodes} gives whole nodes to the engines, which only "
                      "cluster.layout=disaggregated does; set cluster.layout=disaggregated (or rollout_nnodes=0)")
    if act.offload_during_rollout and c.layout == "disaggregated":
        errors.append("actor.offload_during_rollout=true frees the training GPUs for colocated engines, but "
                      "cluster.layout=disaggregated has none on them; set it to false")
    if r.weight_sync_transport == "shared_memory" and (c.layout == "disaggregated" or c.rollout_nnodes > 0):
        errors.append("rollout.weight_sync_transport=shared_memory reaches only engines on the sending ranks' node "
                      "(and GPUs), but cluster.layout=disaggregated puts them on their own nodes; use collective "
                      "(or auto)")
    if c.layout in ("colocated", "disaggregated") and c.rollout_nnodes >= 0:
        from luffy_megatron.cluster.layout import layout_problems  # here: the layout module imports this one

        errors.extend(layout_problems(cfg, c.layout))

    # algo
    if a.use_off_policy_loss and a.use_sft_multitask_loss:
        errors.append(
            "algo.use_off_policy_loss and algo.use_sft_multitask_loss are both true; pick one "
            "(LUFFY: use_off_policy_loss; the RL w/ SFT loss baseline: use_sft_multitask_loss)"
        )
    if a.use_sft_multitask_loss and a.adv_estimator != "grpo_split":
        errors.append(
            f"algo.use_sft_multitask_loss=true needs algo.adv_estimator='grpo_split' (got {a.adv_estimator!r}), "
            "so demonstrations do not enter the on-policy baseline"
        )
    if a.use_off_policy_probs and not a.use_off_policy_loss:
        errors.append("algo.use_off_policy_probs=true needs algo.use_off_policy_loss=true: the teacher probabilities "
                      "enter only the off-policy loss (upstream ignores them otherwise)")
    if a.use_off_policy_probs and not d.target_probs_key:
        errors.append("algo.use_off_policy_probs=true but data.target_probs_key is empty: name the parquet column of "
                      "the teacher's token probabilities (upstream: target_ds_qwen_7b_probs)")
    if a.use_kl_loss and a.kl_loss_coef <= 0:
        errors.append(f"algo.use_kl_loss=true with algo.kl_loss_coef={a.kl_loss_coef}; set a coefficient > 0")
    errors.extend(_kl_problems(a))
    if a.use_ppo_kl_loss and a.ppo_kl_loss_coef <= 0:
        errors.append(
            f"algo.use_ppo_kl_loss=true with algo.ppo_kl_loss_coef={a.ppo_kl_loss_coef}; set a coefficient > 0"
        )
    if a.use_sft_prefix_reward and r.n_off_policy != -1:
        errors.append(f"algo.use_sft_prefix_reward=true needs rollout.n_off_policy=-1 (every row a demonstration "
                      f"prefix, as upstream asserts n_prefix == -1); got {r.n_off_policy}")
    if not 0.0 < a.clip_ratio < 1.0:
        errors.append(f"algo.clip_ratio={a.clip_ratio} must be in (0, 1)")
    if a.sft_loss_coef < 0:
        errors.append(f"algo.sft_loss_coef={a.sft_loss_coef} must be >= 0")
    if a.mode == "sft" and r.n_off_policy not in (-1, r.n):
        errors.append(f"algo.mode=sft trains on the demonstrations only, so every row must carry one: set "
                      f"rollout.n_off_policy=-1 (got {r.n_off_policy} of rollout.n={r.n}; rollout.n=1 is enough)")
    if a.mode == "sft" and (r.min_prefix_ratio < 1.0 or a.use_sft_multitask_loss):
        errors.append("algo.mode=sft learns whole demonstrations: it needs rollout.min_prefix_ratio=1.0 and "
                      "algo.use_sft_multitask_loss=false (the RL w/ SFT loss baseline is algo.mode=rl)")

    # data
    at_least(1, "data.max_prompt_length", "data.max_response_length", "data.train_batch_size",
             "data.val_batch_size")

    if not 0.0 <= d.sample_target_ratio <= 1.0:
        errors.append(f"data.sample_target_ratio={d.sample_target_ratio} must be in [0, 1]")

    # reward
    if cfg.reward.timeout_s <= 0:
        errors.append(f"reward.timeout_s={cfg.reward.timeout_s} must be > 0")
    at_least(1, "reward.num_workers")

    # actor
    at_least(1, "actor.ppo_mini_batch_size", "actor.ppo_epochs", "actor.ppo_max_token_len_per_gpu",
             "actor.ppo_micro_batch_size", "actor.log_prob_chunk_tokens")
    if act.ppo_mini_batch_size >= 1 and d.train_batch_size % act.ppo_mini_batch_size:
        errors.append(
            f"data.train_batch_size={d.train_batch_size} is not a multiple of "
            f"actor.ppo_mini_batch_size={act.ppo_mini_batch_size}; every optimiser step needs a full mini-batch"
        )
    max_seq_len = d.max_prompt_length + d.max_response_length
    if act.use_dynamic_bsz and act.ppo_max_token_len_per_gpu < max_seq_len:
        errors.append(
            f"actor.ppo_max_token_len_per_gpu={act.ppo_max_token_len_per_gpu} is smaller than one sequence "
            f"(data.max_prompt_length + data.max_response_length = {max_seq_len}); raise it"
        )
    if act.ppo_micro_batch_size is not None and act.ppo_micro_batch_size >= 1 and act.ppo_mini_batch_size % act.ppo_micro_batch_size:
        errors.append(
            f"actor.ppo_mini_batch_size={act.ppo_mini_batch_size} is not a multiple of "
            f"actor.ppo_micro_batch_size={act.ppo_micro_batch_size} (both in prompts, as upstream, which asserts it); "
            "the micro-batch losses are divided by their ratio"
        )
    if act.lr <= 0:
        errors.append(f"actor.lr={act.lr} must be > 0")
    if not 0.0 <= act.lr_warmup_steps_ratio <= 1.0:
        errors.append(f"actor.lr_warmup_steps_ratio={act.lr_warmup_steps_ratio} must be in [0, 1]")

    # trainer and logging
    at_least(1, "trainer.total_epochs", "trainer.total_training_steps", "trainer.max_checkpoints_to_keep",
             "logging.log_every_steps")
    for key in ("trainer.save_freq", "trainer.test_freq"):
        if _get(cfg, key) == 0 or _get(cfg, key) < -1:
            errors.append(f"{key}={_get(cfg, key)} must be >= 1 (steps) or -1 (never)")

    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))


def _kl_problems(a: AlgoConfig) -> list[str]:
    """The reference model and the KL terms (algo/kl.py). Upstream builds the reference only with
    actor_rollout_ref.ref.use_ref and then silently drops what cannot apply (the reward penalty under
    use_kl_loss, any beta without a reference); here those combinations are errors."""
    errors = []
    if a.kl_ctrl_coef < 0:
        errors.append(f"algo.kl_ctrl_coef={a.kl_ctrl_coef} must be >= 0 (0 = no KL reward penalty)")
    if a.use_kl_loss and a.kl_ctrl_coef > 0:
        errors.append(
            f"algo.kl_ctrl_coef={a.kl_ctrl_coef} has no effect with algo.use_kl_loss=true: upstream applies the KL reward "
            "penalty only without the KL loss; set algo.kl_ctrl_coef=0 or algo.use_kl_loss=false"
        )
    if a.use_ref is False and (a.use_kl_loss or a.kl_ctrl_coef > 0):
        needs = "algo.use_kl_loss=true" if a.use_kl_loss else f"algo.kl_ctrl_coef={a.kl_ctrl_coef}"
        errors.append(f"{needs} needs the reference model but algo.use_ref=false; set algo.use_ref=null (or true)")
    if a.kl_ctrl_type == "adaptive":
        if a.kl_ctrl_coef <= 0:
            errors.append(
                "algo.kl_ctrl_type=adaptive multiplies algo.kl_ctrl_coef, which is 0, so beta stays 0; "
                "set algo.kl_ctrl_coef > 0 (the initial beta) or algo.kl_ctrl_type=fixed"
            )
        if a.kl_ctrl_horizon <= 0:
            errors.append(f"algo.kl_ctrl_horizon={a.kl_ctrl_horizon} must be > 0 (upstream asserts it)")
        if a.kl_ctrl_target_kl <= 0:
            errors.append(f"algo.kl_ctrl_target_kl={a.kl_ctrl_target_kl} must be > 0 (beta follows the KL towards it)")
    return errors


# --------------------------------------------------------------------------------------------------------------
# Writing and listing
# --------------------------------------------------------------------------------------------------------------


def dump_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full config as a recipe that load_config reads back to an equal Config (atomically)."""
    text = "# Full configuration written by luffy_megatron.config.dump_yaml; loads with --config.\n"
    text += yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".yaml.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_paths(cfg_or_cls: Any = Config) -> list[tuple[str, str]]:
    """Every dotted setting path with the repr of its value (of the defaults, when given a class)."""
    node = cfg_or_cls() if isinstance(cfg_or_cls, type) else cfg_or_cls
    paths: list[tuple[str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, _join(prefix, f.name))
            else:
                paths.append((_join(prefix, f.name), repr(value)))

    walk(node, "")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------

_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved field types in declaration order (annotations are strings under `from __future__`)."""
    if cls not in _TYPE_CACHE:
        hints = typing.get_type_hints(cls)
        _TYPE_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _TYPE_CACHE[cls]


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_none(tp: Any) -> Any:
    (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]  # the tree only uses `X | None`
    return inner


def _accepts_str(tp: Any) -> bool:
    return (_strip_none(tp) if _is_optional(tp) else tp) is str


def _type_name(tp: Any, nullable: bool = False) -> str:
    if typing.get_origin(tp) is list:
        name = f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    else:
        name = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string"}[tp]
    return name + (" or null" if nullable else "")


def _yaml_type(value: Any) -> str:
    """The type as a recipe author sees it."""
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
