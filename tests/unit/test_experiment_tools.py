"""tools/experiment.py without Ray: every arm is a valid trainer configuration that differs from LUFFY's main
settings only where the arm says, the format-only demonstrations have synthetic.py's exact format with other
numbers, and the report's mean/spread formatting."""

import random
import re
import sys
from dataclasses import asdict

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO))
from tools import experiment  # noqa: E402


def _algo_rollout(arm):
    cfg = experiment.run_config(["model.path=/nonexistent", *experiment.ARMS[arm]])
    return asdict(cfg.algo), asdict(cfg.rollout), cfg


def test_arms_differ_only_where_they_should():
    luffy_algo, luffy_rollout, base = _algo_rollout("luffy")
    assert (
        luffy_algo["mode"] == "rl"
        and luffy_algo["off_policy_reshape"] == "p_div_p_0.1"
        and luffy_algo["use_off_policy_loss"]
    )
    assert (luffy_rollout["n"], luffy_rollout["n_off_policy"]) == (8, 1)  # 1 demonstration + 7 generations
    diffs = {}
    for arm in experiment.ARMS:
        algo, rollout, cfg = _algo_rollout(arm)
        diffs[arm] = {k: v for k, v in {**algo, **rollout}.items() if {**luffy_algo, **luffy_rollout}[k] != v}
        assert asdict(cfg.actor) == asdict(base.actor) and asdict(cfg.data) == asdict(base.data)  # same optimiser, data
    assert diffs == {
        "on_policy": {"n_off_policy": 0, "loss_remove_clip": False},
        "luffy": {},
        "luffy_no_reshape": {"off_policy_reshape": "no_reshape"},
        "sft": {"mode": "sft", "n": 1, "n_off_policy": -1},
    }


def test_format_only_demonstrations_keep_the_format_and_change_the_numbers():
    from luffy_megatron.data.synthetic import ArithmeticConfig, generate_problems, worked_solution

    rng = random.Random(3)
    problems = generate_problems(30, ArithmeticConfig(1, 1, 2, 4, ("+",)), rng)
    changed = 0
    for p in problems:
        assert experiment._addition_solution(p, None) == worked_solution(p)
        fake = experiment._addition_solution(p, lambda bound: rng.randint(0, bound))
        real = worked_solution(p)
        assert fake.splitlines()[:2] == real.splitlines()[:2]  # "<think>", "We need to evaluate <the problem>."
        assert re.sub(r"\d+", "N", fake) == re.sub(r"\d+", "N", real)  # the same text up to the numbers
        changed += fake != real
    assert changed >= 25
    with pytest.raises(ValueError, match="additions only"):
        experiment._addition_solution(generate_problems(1, ArithmeticConfig(1, 1, 2, 2, ("*",)), rng)[0], None)


def test_mean_and_spread():
    assert experiment._mean_spread([50.0]) == "50.0"
    assert experiment._mean_spread([10.0, 20.0, 30.0]) == "20.0 ± 10.0 (10.0–30.0)"
    assert experiment._mean_spread([None]) == "n/a"


def test_unknown_arm_is_refused():
    with pytest.raises(SystemExit):
        experiment.parse_args(["--arms", "luffy,dpo"])
