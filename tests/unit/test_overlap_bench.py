"""The rule of tools/bench/overlap.py --learn: "learns within noise of the synchronous run"."""

import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO))
from tools.bench import overlap  # noqa: E402


def run(val8: float, val12: float, reward: float, reward1: float = 0.0) -> dict:
    """A run's curves: validation at 0/4/8/12 (0 at step 0), `reward1` on step 1 and `reward` on steps 2-12."""
    return {
        "val_score": {0: 0.0, 4: 0.1, 8: val8, 12: val12},
        "on_policy_reward": {s: reward1 if s == 1 else reward for s in range(1, 13)},
        "entropy": {},
    }


def test_numbers_are_the_means_over_the_rules_steps_and_the_starting_points():
    curves = run(0.25, 0.75, 0.3, reward1=0.05)
    curves["on_policy_reward"][2] = 9.0  # outside steps 7-12: not counted
    curves["on_policy_reward"][7] = 0.9
    want = {"val": 0.5, "reward": (0.9 + 5 * 0.3) / 6, "val0": 0.0, "reward0": 0.05}
    assert overlap.learn_numbers(curves) == pytest.approx(want)


@pytest.mark.parametrize("missing", [("val_score", 12), ("val_score", 0), ("on_policy_reward", 1)])
def test_a_run_without_the_rules_steps_is_refused(missing):
    curves = run(0.2, 0.2, 0.2)
    del curves[missing[0]][missing[1]]
    with pytest.raises(ValueError, match="lacks"):
        overlap.learn_numbers(curves)


SYNC = {0: run(0.4, 0.5, 0.3), 1: run(0.3, 0.4, 0.2), 2: run(0.5, 0.6, 0.25)}


def test_within_noise_when_no_paired_difference_shows_and_the_arm_learned():
    close = {0: run(0.35, 0.5, 0.22), 1: run(0.4, 0.5, 0.3), 2: run(0.45, 0.55, 0.2)}
    verdict = overlap.learn_verdict(SYNC, close)
    assert verdict["verdict"] == "within noise"
    assert abs(verdict["val"]["d"]) <= 2 * verdict["val"]["se"]
    assert verdict["val"]["gain"] == pytest.approx(0.4583, abs=1e-4)


def test_paired_by_seed():
    """The same arm values against the synchronous runs in their own order: within noise; paired with the
    wrong seeds (each value 0.05 under its own seed's synchronous run): below."""
    offset = {s: run(c["val_score"][8] - 0.05, c["val_score"][12] - 0.05, 0.25) for s, c in SYNC.items()}
    verdict = overlap.learn_verdict(SYNC, offset)
    assert verdict["val"]["d"] == pytest.approx(-0.05) and verdict["val"]["se"] == pytest.approx(0.0, abs=1e-4)
    assert verdict["verdict"] == "below"  # consistently lower on every seed: shown, however small


def test_an_arm_that_does_not_learn_is_not_within_noise_however_spread_the_synchronous_runs():
    """The case the unpaired rule passed: synchronous runs 0.59 / 0.38 / 0.03, the arm flat."""
    spread = {0: run(0.59, 0.59, 0.33), 1: run(0.38, 0.38, 0.14), 2: run(0.03, 0.03, 0.01)}
    flat = {s: run(0.0, 0.0, 0.0) for s in range(3)}
    flat[2]["val_score"][8] = 1.0  # one seed moves (where the synchronous run did not): no difference shown,
    # and the arm's gain is not above its noise either
    assert overlap.learn_verdict(spread, flat)["verdict"] == "not shown"


def test_below_and_above_and_what_the_rule_refuses():
    low = {s: run(0.0, 0.05, 0.01 * s) for s in range(3)}
    assert overlap.learn_verdict(SYNC, low)["verdict"] == "below"
    high = {s: run(0.9, 0.95, 0.8 + 0.01 * s) for s in range(3)}
    assert overlap.learn_verdict(SYNC, high)["verdict"] == "above"
    with pytest.raises(ValueError, match="2 or more"):
        overlap.learn_verdict({0: SYNC[0]}, {0: run(0.4, 0.5, 0.3)})
    with pytest.raises(ValueError, match="pairs runs by seed"):
        overlap.learn_verdict(SYNC, {0: SYNC[0], 1: SYNC[1], 5: SYNC[2]})


def test_every_learning_run_samples_with_seeds():
    assert "rollout.seeded_sampling=true" in overlap.LEARN_SETTINGS


def test_curves_carry_the_minutes_of_steps_up_to_each_step():
    rows = [
        {"step": 0, "val/test_score/avg": 0.0},
        {"step": 1, "timing_s/step": 90.0, "rollout/on_policy_reward": 0.0},
        {"step": 2, "timing_s/step": 30.0, "rollout/on_policy_reward": 0.5, "val/test_score/avg": 0.25},
    ]
    curves = overlap.learning_curves(rows)
    assert curves["minutes"] == {0: 0.0, 1: 1.5, 2: 2.0} and curves["val_score"] == {0: 0.0, 2: 0.25}
