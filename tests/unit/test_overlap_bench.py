"""The rule of tools/bench/overlap.py --learn: "learns within noise of the synchronous run"."""

import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO))
from tools.bench import overlap  # noqa: E402


def run(val8: float, val12: float, reward: float) -> dict:
    """A run's curves: validation at 0/4/8/12 and the same on-policy reward on every step."""
    return {
        "val_score": {0: 0.0, 4: 0.1, 8: val8, 12: val12},
        "on_policy_reward": {s: reward for s in range(1, 13)},
        "entropy": {},
    }


def test_numbers_are_the_means_over_the_rules_steps():
    curves = run(0.25, 0.75, 0.3)
    curves["on_policy_reward"][1] = 9.0  # outside steps 7-12: not counted
    curves["on_policy_reward"][7] = 0.9
    assert overlap.learn_numbers(curves) == pytest.approx({"val": 0.5, "reward": (0.9 + 5 * 0.3) / 6})


def test_a_run_without_the_rules_steps_is_refused():
    curves = run(0.2, 0.2, 0.2)
    del curves["val_score"][12]
    with pytest.raises(ValueError, match="lacks validation"):
        overlap.learn_numbers(curves)


def test_verdicts():
    sync = {0: run(0.4, 0.5, 0.3), 1: run(0.3, 0.4, 0.2), 2: run(0.5, 0.6, 0.25)}
    close = {0: run(0.35, 0.5, 0.22), 1: run(0.4, 0.5, 0.3), 2: run(0.45, 0.55, 0.2)}
    verdict = overlap.learn_verdict(sync, close)
    assert verdict["verdict"] == "within noise"
    assert abs(verdict["val"]["d"]) <= 2 * verdict["val"]["se"]
    low = {s: run(0.0, 0.05, 0.01 * s) for s in range(3)}
    assert overlap.learn_verdict(sync, low)["verdict"] == "below"
    high = {s: run(0.9, 0.95, 0.8 + 0.01 * s) for s in range(3)}
    assert overlap.learn_verdict(sync, high)["verdict"] == "above"
    with pytest.raises(ValueError, match="2 seeds"):
        overlap.learn_verdict(sync, {0: run(0.4, 0.5, 0.3)})
