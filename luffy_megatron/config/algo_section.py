"""The `algo` section: advantage and loss of LUFFY, its own rules, and its reading of upstream's flat options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

# Keys of upstream's flat algorithm options that have no counterpart here (`AlgoConfig.from_upstream`).
_UPSTREAM_ONLY_KEYS = frozenset({"off_policy_cliprange", "off_policy_normalize"})

OffPolicyReshape = Literal[
    "no_reshape", "logp", "p_logp", "square_root", "p_div_p_0.1", "p_div_p_0.3", "p_div_p_0.5", "pow"
]
OnPolicyReshape = Literal["no_reshape", "logp", "p_logp", "square_root", "pow", "p_div_p_0.1", "p_div_p_0.5"]


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
    # The gradient upstream's "mean" gives on this many DP ranks, whatever this cluster's DP: the loss is
    # multiplied by DP / reference_dp (upstream's train.sh: 8). null = the cluster's own DP (as "mean").
    reference_dp: int | None = None
    entropy_coeff: float = 0.001
    # kl_loss_coef x token-mean KL(policy, reference) in the actor's loss (needs the reference)
    use_kl_loss: bool = False
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
    # upstream data.disable_truncation_advantage: no advantage for cut-off rows
    disable_truncation_advantage: bool = False
    use_sft_prefix_reward: bool = False  # upstream actor.use_sft_prefix_reward: demonstration tokens get weight / n
    sft_prefix_reward_weight: float = 1.0
    # rollout importance correction (not upstream; algo/rollout_correction.py): each on-policy token's loss times
    # min(exp(old - engine log-prob), rollout_is_cap), per token (token_tis) or one weight per row from the sum
    # over its generated tokens (seq_tis); demonstration tokens keep weight 1. none = upstream's loss. auto =
    # token_tis under trainer.overlap=one_step (every generated row one update old), none otherwise
    rollout_is: Literal["auto", "none", "token_tis", "seq_tis"] = "auto"
    rollout_is_cap: float = 2.0

    @classmethod
    def from_upstream(cls, flat: Mapping[str, Any]) -> AlgoConfig:
        """The section from an upstream LUFFY flat option dict (the reference vectors' configs). Names are the
        same, except upstream's `loss_remove_token_mean` (true = constant_length, false or absent = token_mean);
        a key that is neither a field nor one of `_UPSTREAM_ONLY_KEYS` is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - names - _UPSTREAM_ONLY_KEYS - {"loss_remove_token_mean"})
        if unknown:
            raise ValueError(f"upstream algorithm options with no counterpart in the algo section: {unknown}")
        settings = {key: value for key, value in flat.items() if key in names}
        if "loss_agg_mode" not in settings:
            settings["loss_agg_mode"] = "constant_length" if flat.get("loss_remove_token_mean") else "token_mean"
        return cls(**settings)

    def problems(self) -> list[str]:
        problems = []
        if self.use_off_policy_loss and self.use_sft_multitask_loss:
            problems.append(
                "algo.use_off_policy_loss and algo.use_sft_multitask_loss are both true; pick one "
                "(LUFFY: use_off_policy_loss; the RL w/ SFT loss baseline: use_sft_multitask_loss)"
            )
        if self.use_sft_multitask_loss and self.adv_estimator != "grpo_split":
            problems.append(
                "algo.use_sft_multitask_loss=true needs algo.adv_estimator='grpo_split' "
                f"(got {self.adv_estimator!r}), so demonstrations do not enter the on-policy baseline"
            )
        if self.use_off_policy_probs and not self.use_off_policy_loss:
            problems.append(
                "algo.use_off_policy_probs=true needs algo.use_off_policy_loss=true: the teacher "
                "probabilities enter only the off-policy loss (upstream ignores them otherwise)"
            )
        if self.use_kl_loss and self.kl_loss_coef <= 0:
            problems.append(f"algo.use_kl_loss=true with algo.kl_loss_coef={self.kl_loss_coef}; set a coefficient > 0")
        problems += self._kl_problems()
        if self.use_ppo_kl_loss and self.ppo_kl_loss_coef <= 0:
            problems.append(
                f"algo.use_ppo_kl_loss=true with algo.ppo_kl_loss_coef={self.ppo_kl_loss_coef}; set a coefficient > 0"
            )
        if not 0.0 < self.clip_ratio < 1.0:
            problems.append(f"algo.clip_ratio={self.clip_ratio} must be in (0, 1)")
        if self.sft_loss_coef < 0:
            problems.append(f"algo.sft_loss_coef={self.sft_loss_coef} must be >= 0")
        problems += self._rollout_is_problems()
        if self.reference_dp is not None and self.reference_dp < 1:
            problems.append(f"algo.reference_dp={self.reference_dp} must be >= 1 (or null: the cluster's own DP)")
        if self.reference_dp is not None and self.dp_gradient_reduction == "sum":
            problems.append(
                f"algo.reference_dp={self.reference_dp} and algo.dp_gradient_reduction=sum both set the gradient's "
                "DP scale; keep one (reference_dp with dp_gradient_reduction=mean, or reference_dp=null)"
            )
        return problems

    def _rollout_is_problems(self) -> list[str]:
        problems = []
        if not self.rollout_is_cap > 1.0:
            problems.append(
                f"algo.rollout_is_cap={self.rollout_is_cap} must be > 1 (the truncation C of the rollout importance "
                "weights min(exp(old - engine log-prob), C); e.g. 2.0)"
            )
        if self.rollout_is not in ("auto", "none") and self.mode == "sft":
            problems.append(
                f"algo.rollout_is={self.rollout_is} has nothing to correct with algo.mode=sft (no token is generated); "
                "set algo.rollout_is=none"
            )
        return problems

    def _kl_problems(self) -> list[str]:
        """The reference model and the KL terms (algo/kl.py). Upstream builds the reference only with
        actor_rollout_ref.ref.use_ref and then silently drops what cannot apply (the reward penalty under
        use_kl_loss, any beta without a reference); here those combinations are errors."""
        problems = []
        if self.kl_ctrl_coef < 0:
            problems.append(f"algo.kl_ctrl_coef={self.kl_ctrl_coef} must be >= 0 (0 = no KL reward penalty)")
        if self.use_kl_loss and self.kl_ctrl_coef > 0:
            problems.append(
                f"algo.kl_ctrl_coef={self.kl_ctrl_coef} has no effect with algo.use_kl_loss=true: upstream applies "
                "the KL reward penalty only without the KL loss; set algo.kl_ctrl_coef=0 or algo.use_kl_loss=false"
            )
        if self.use_ref is False and (self.use_kl_loss or self.kl_ctrl_coef > 0):
            needs = "algo.use_kl_loss=true" if self.use_kl_loss else f"algo.kl_ctrl_coef={self.kl_ctrl_coef}"
            problems.append(
                f"{needs} needs the reference model but algo.use_ref=false; set algo.use_ref=null (or true)"
            )
        if self.kl_ctrl_type == "adaptive":
            if self.kl_ctrl_coef <= 0:
                problems.append(
                    "algo.kl_ctrl_type=adaptive multiplies algo.kl_ctrl_coef, which is 0, so beta stays 0; "
                    "set algo.kl_ctrl_coef > 0 (the initial beta) or algo.kl_ctrl_type=fixed"
                )
            if self.kl_ctrl_horizon <= 0:
                problems.append(f"algo.kl_ctrl_horizon={self.kl_ctrl_horizon} must be > 0 (upstream asserts it)")
            if self.kl_ctrl_target_kl <= 0:
                problems.append(
                    f"algo.kl_ctrl_target_kl={self.kl_ctrl_target_kl} must be > 0 (beta follows the KL towards it)"
                )
        return problems
