"""Reward: graders (LUFFY's math-verify protocol, plain math, multiple-choice letters, boxed answers for
luffy-eval's default protocol) and the process pool that runs them with a hard per-item deadline."""

from luffy_megatron.reward.graders import GRADERS, score_choice, score_luffy, score_math
from luffy_megatron.reward.pool import GradingError, PoolStats, RewardPool

__all__ = ["GRADERS", "GradingError", "PoolStats", "RewardPool", "score_choice", "score_luffy", "score_math"]
