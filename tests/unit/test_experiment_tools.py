"""tools/experiment*.py without Ray: the arms differ only where they should, the task's data and the reading of
responses, the pre-registered gates, the paired bootstrap and the verdict rules."""

import random
import re
import sys
from dataclasses import asdict

import pandas as pd
import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO))
from luffy_megatron.data.synthetic import ArithmeticProblem, rewrite_chain  # noqa: E402
from luffy_megatron.reward.graders import score_luffy  # noqa: E402
from tools import experiment  # noqa: E402
from tools import experiment_stats as stats  # noqa: E402
from tools import experiment_task as task  # noqa: E402


def _algo_rollout(arm):
    cfg = experiment.run_config(["model.path=/nonexistent", *experiment.ARMS[arm]])
    return asdict(cfg.algo), asdict(cfg.rollout), cfg


def test_arms_differ_only_where_they_should():
    luffy_algo, luffy_rollout, base = _algo_rollout("luffy")
    assert luffy_algo["mode"] == "rl" and luffy_algo["off_policy_reshape"] == "p_div_p_0.1"
    assert (luffy_rollout["n"], luffy_rollout["n_off_policy"]) == (8, 1)  # 1 demonstration + 7 generations
    assert base.actor.zero_lr_first_step and base.algo.entropy_coeff == 0.0
    diffs = {}
    for arm in experiment.ARMS:
        algo, rollout, cfg = _algo_rollout(arm)
        diffs[arm] = {k: v for k, v in {**algo, **rollout}.items() if {**luffy_algo, **luffy_rollout}[k] != v}
        assert asdict(cfg.actor) == asdict(base.actor) and asdict(cfg.data) == asdict(base.data)  # same optimiser, data
        trainer = {k: v for k, v in asdict(cfg.trainer).items() if asdict(base.trainer)[k] != v}
        assert trainer == ({"overlap": "one_step"} if arm == "luffy_one_step" else {}), arm
    assert diffs == {
        "on_policy": {"n_off_policy": 0, "loss_remove_clip": False},
        "luffy": {},
        "luffy_no_reshape": {"off_policy_reshape": "no_reshape"},
        "sft": {"mode": "sft", "n": 1, "n_off_policy": -1},
        "luffy_one_step": {"rollout_is": "token_tis"},
    }


def test_rewrite_chain_replaces_the_first_two_operands_per_line_and_grades_correct():
    text = rewrite_chain(ArithmeticProblem((3, 5, 7, 2), ("+", "+", "+")))
    assert text == "3 + 5 + 7 + 2\n= 8 + 7 + 2\n= 15 + 2\n= 17\n</think>\n\\boxed{17}"
    assert rewrite_chain(ArithmeticProblem((9, 4, 2), ("-", "+"))).splitlines()[1:3] == ["= 5 + 2", "= 7"]
    assert score_luffy("<think>\n" + text, "17") == 1.0 and score_luffy("<think>\n" + text, "16") < 1.0
    with pytest.raises(ValueError, match=r"\+ and - only"):
        rewrite_chain(ArithmeticProblem((3, 5), ("*",)))


def test_data_splits_are_disjoint_and_within_the_facts(tmp_path):
    paths = task.build_data(tmp_path, num_train=60, num_eval=40, fact_copies=2)
    frames = {name: pd.read_parquet(p) for name, p in paths.items()}
    problems = {name: {row[0]["content"] for row in df["prompt"]} for name, df in frames.items()}
    held = [problems[s] for s in task.SPLITS]
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1 :]) and not (
        problems["train"] & set().union(*held)
    )
    assert len(frames["retention"]) == 20 and len(frames["facts"]) == 2 * len(task.all_facts()) == 2 * 387
    assert all(3 <= p.count("+") + 1 <= 5 and "-" not in p for p in problems["train"] | problems["id"])
    assert all(p.count("+") + 1 in (6, 7) for p in problems["ood_length"])
    assert all("-" in p for p in problems["ood_operator"])
    for content, gold in zip(frames["train"]["target"], frames["train"]["reward_model"]):
        assert content[0]["content"].endswith(f"\\boxed{{{gold['ground_truth']}}}")
    rewrites = sum("\n= " in t[0]["content"] for t in frames["facts"]["target"]) / len(frames["facts"])
    assert 0.01 < rewrites < 0.12  # ~REWRITE_SHARE of the base's answers use the one-line rewrite
    fact_texts = {f"Compute ${p.text()}$." for p in task.all_facts()}
    assert problems["retention"] <= fact_texts


def test_running_values_stay_in_range():
    rng = random.Random(0)
    for _ in range(300):
        p = task.sample_chain(rng, (3, 5), ("+", "-"))
        values = task._running_values(p)
        assert min(values) >= 0 and max(values) <= task.MAX_VALUE and "-" in p.ops


def test_reading_a_response():
    chain = "6 + 0 + 4\n= 6 + 4\n= 10\n</think>\n\\boxed{10}"
    assert task.starts_rewrite(chain) and task.chain_steps(chain) == 2
    assert task.uses_procedure(chain, "Compute $6 + 0 + 4$.")
    assert not task.uses_procedure(chain, "Compute $6 + 0 + 4 + 1$.")  # a chain of another expression
    assert not task.uses_procedure("6 + 0 + 4\n= 10\n</think>\n\\boxed{10}", "Compute $6 + 0 + 4$.")  # skips a step
    direct = "</think>\n\\boxed{10}"
    assert not task.starts_rewrite(direct) and task.chain_steps(direct) == 0
    assert not task.starts_rewrite("= 6\n</think>")


def test_gates_pass_and_fail_by_their_rules():
    good = {"facts": 95.0, "id_unsolved": 4.0, "rewrite_start": 5.0, "no_chains": 0.0}
    assert stats.gate_failures(stats.check_gates(good)) == ""
    bad = stats.check_gates({**good, "facts": 60.0, "rewrite_start": 0.5})
    failures = stats.gate_failures(bad)
    assert "facts: 60.0% fails" in failures and "rewrite_start: 0.5% fails 1% <=" in failures
    assert "id_unsolved" not in failures
    assert not stats.Gate("x", "x", low=1, high=20).passed(20.5)


def test_paired_bootstrap_point_and_interval():
    a = [{"id": [1.0] * 50 + [0.0] * 50}] * 3
    b = [{"id": [0.0] * 100}] * 3
    point, low, high = stats.paired_bootstrap(a, b, ["id"])
    assert point == pytest.approx(50.0) and 38 < low < 50 < high < 62
    same = stats.paired_bootstrap(a, a, ["id"])
    assert same == (0.0, 0.0, 0.0)
    # several splits: the mean of the splits' differences
    two = stats.paired_bootstrap([{"x": [1.0] * 10, "y": [0.0] * 4}], [{"x": [0.0] * 10, "y": [0.0] * 4}], ["x", "y"])
    assert two[0] == pytest.approx(50.0)
    assert stats.per_seed_differences(a, b, ["id"]) == [50.0, 50.0, 50.0]


def _scores(rate_per_seed, n=200, splits=("id", "ood_length", "ood_operator", "retention")):
    rng = random.Random(sum(rate_per_seed))
    return [{s: [1.0 if rng.random() < rate else 0.0 for _ in range(n)] for s in splits} for rate in rate_per_seed]


def test_claim_verdicts():
    strong, weak = _scores([0.6, 0.65, 0.7]), _scores([0.05, 0.05, 0.05])
    assert stats.verdict_c1(strong, weak)["verdict"] == stats.REPRODUCED
    assert stats.verdict_c1(weak, strong)["verdict"] == stats.NOT_REPRODUCED
    assert stats.verdict_c1(_scores([0.3, 0.1, 0.3]), weak)["verdict"] == stats.INCONCLUSIVE  # one seed short
    assert stats.verdict_c1([], weak)["verdict"] == stats.NOT_RUN
    assert stats.verdict_c2(strong, weak)["verdict"] == stats.REPRODUCED
    assert stats.verdict_c2(weak, strong)["verdict"] == stats.NOT_REPRODUCED

    flat = [{"reward": [0.0] * 80, "final_id": 3.0}] * 3
    learns = [{"reward": [0.0] * 40 + [0.8] * 40, "final_id": 60.0}] * 3
    assert stats.verdict_c3(learns, flat, base_id=2.0)["verdict"] == stats.REPRODUCED
    assert stats.verdict_c3(learns, learns, base_id=2.0)["verdict"] == stats.NOT_REPRODUCED  # GRPO learns too
    assert stats.verdict_c3(learns[:2] + flat[:1], flat, base_id=2.0)["verdict"] == stats.INCONCLUSIVE

    shaped = [{"probe_entropy": 0.5, "final_id": 50.0}] * 3
    unshaped = [{"probe_entropy": 0.3, "final_id": 52.0}] * 3
    assert stats.verdict_c4(shaped, unshaped)["verdict"] == stats.REPRODUCED
    assert stats.verdict_c4(unshaped, shaped)["verdict"] == stats.NOT_REPRODUCED
    assert stats.verdict_c4([{"probe_entropy": 0.5, "final_id": 40.0}] * 3, unshaped)["verdict"] == stats.NOT_REPRODUCED
    mixed = [{"probe_entropy": e, "final_id": 50.0} for e in (0.5, 0.2, 0.5)]
    assert stats.verdict_c4(mixed, unshaped)["verdict"] == stats.INCONCLUSIVE


def test_overlap_effect():
    sync = _scores([0.3, 0.35, 0.3])
    assert stats.overlap_effect(sync, sync)["verdict"] == "no change detected"
    assert stats.overlap_effect(_scores([0.05, 0.05, 0.05]), sync)["verdict"] == "changed"
    assert stats.overlap_effect([], sync)["verdict"] == stats.NOT_RUN


def test_window_means():
    values = [0.0] * 8 + [1.0] * 8
    assert stats.window_mean(values, last=0.25) == 1.0 and stats.window_mean(values, first=0.125) == 0.0
    assert stats.window_mean([None, 0.5], first=0.1) != stats.window_mean([None, 0.5], first=0.1)  # nan: no value
    assert stats.window_mean([0.2, 0.4], last=0.1) == 0.4  # at least one step


def test_every_number_of_the_task_is_one_token(tmp_path):
    paths = task.build_data(tmp_path, num_train=60, num_eval=40, fact_copies=2)
    tokenizer = task.build_tokenizer(task.corpus_of(paths))
    assert len(tokenizer) < 512  # every merge the corpus offers was made
    for column in ("prompt", "target"):
        for texts in pd.read_parquet(paths["train"])[column]:
            text = texts[0]["content"]
            tokens = [tokenizer.decode([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
            numbers = re.findall(r" ?[0-9]+", text)
            assert [t for t in tokens if t.strip().isdigit()] == numbers, text
            assert "".join(tokens) == text
