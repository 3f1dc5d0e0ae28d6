"""tools/prepare_data.py: synthetic arithmetic and MATH conversion. Every demonstration must grade correct
with the project's own LUFFY reward, exactly as the trainer will see it (the demonstration without its
leading "<think>\\n", which the reward prepends back)."""

import json
import random
import re

import pytest

from luffy_megatron.data import normalize_problem, read_benchmark, read_luffy_parquet
from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT
from luffy_megatron.data.synthetic import ArithmeticConfig, ArithmeticProblem, evaluate, sample_problem, worked_solution
from luffy_megatron.reward.graders import score_luffy
from tests.helpers import SHARED
from tools.prepare_data import main

MATH_SRC = SHARED / "data" / "train" / "math_test5000.jsonl"
MATH500 = SHARED / "data" / "eval" / "math500.jsonl"


def run(argv, capsys):
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def as_trainer_sees_it(demo: str) -> str:
    assert demo.startswith("<think>\n")
    return demo.removeprefix("<think>\n")


def test_evaluate_follows_precedence():
    rng = random.Random(1)
    config = ArithmeticConfig(min_digits=1, max_digits=3, min_operands=2, max_operands=6)
    for _ in range(300):
        problem = sample_problem(rng, config)
        assert problem.answer == eval(problem.text())  # Python's precedence is the same: * before + and -
    assert evaluate([2, 3, 4], ["+", "*"]) == 14 and evaluate([2, 3, 4], ["-", "-"]) == -5


def test_worked_solution_shows_the_steps():
    demo = worked_solution(ArithmeticProblem((47, 382, 15, 906), ("+", "*", "-")))
    assert "382 * 15 = 382 * 10 + 382 * 5 = 3820 + 1910 = 5730" in demo
    assert "47 + 5730 = 5777" in demo and "5777 - 906 = 4871" in demo
    assert demo.endswith("The final answer is $\\boxed{4871}$.") and demo.count("</think>") == 1


def test_synthetic_dataset(tmp_path, capsys):
    out = tmp_path / "arith"
    summary = run(
        [
            "synthetic",
            "--out",
            out,
            "--num-train",
            150,
            "--num-val",
            30,
            "--digits",
            "1..4",
            "--operands",
            "2..5",
            "--ops",
            "+",
            "-",
            "*",
            "--seed",
            7,
        ],
        capsys,
    )
    assert summary["train"]["rows"] == 150 and summary["val"]["rows"] == 30
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet", "val.parquet"]  # no temporary files left

    train, _ = read_luffy_parquet(out / "train.parquet", require_target=True)
    val, _ = read_luffy_parquet(out / "val.parquet", require_target=False)
    assert len(train) == 150 and len(val) == 30 and all(ex.demo is None for ex in val)
    assert train[0].prompt[0] == {"role": "system", "content": LUFFY_SYSTEM_PROMPT}
    assert {ex.data_source for ex in train} == {""} and {ex.data_source for ex in val} == {"synthetic_arith"}
    assert not {ex.problem for ex in train} & {ex.problem for ex in val}  # disjoint
    assert len({ex.problem for ex in train}) == 150

    for ex in train:
        assert score_luffy(as_trainer_sees_it(ex.demo), ex.ground_truth) == 1.0, ex.demo
        wrong = str(int(ex.ground_truth) + 1)
        assert score_luffy(as_trainer_sees_it(ex.demo), wrong) == 0.0
    for ex in train + val:  # the difficulty controls hold
        numbers = re.findall(r"\d+", ex.problem)
        assert 2 <= len(numbers) <= 5 and all(1 <= len(n) <= 4 for n in numbers)
        assert (
            str(eval(ex.problem.removeprefix("Compute $").removesuffix("$.").replace("\\times", "*")))
            == ex.ground_truth
        )


def test_synthetic_controls_and_determinism(tmp_path, capsys):
    args = [
        "--num-train",
        40,
        "--num-val",
        5,
        "--digits",
        "3",
        "--operands",
        "2",
        "--ops",
        "+,*",
        "--seed",
        3,
        "--system-prompt",
        "short",
    ]
    run(["synthetic", "--out", tmp_path / "a", *args], capsys)
    run(["synthetic", "--out", tmp_path / "b", *args], capsys)
    assert (tmp_path / "a" / "train.parquet").read_bytes() == (tmp_path / "b" / "train.parquet").read_bytes()
    train, _ = read_luffy_parquet(tmp_path / "a" / "train.parquet", require_target=True)
    assert train[0].prompt[0]["content"] == SHORT_SYSTEM_PROMPT
    for ex in train:
        a, op, b = re.fullmatch(r"Compute \$(\d{3}) (\+|\\times) (\d{3})\$\.", ex.problem).groups()
        assert int(ex.ground_truth) == (int(a) + int(b) if op == "+" else int(a) * int(b))


def test_synthetic_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synthetic", "--out", str(tmp_path), "--ops", "/"])
    with pytest.raises(SystemExit):
        main(["synthetic", "--out", str(tmp_path), "--digits", "4..2"])
    # 1-digit sums of 2 operands: only 100 distinct problems exist.
    assert (
        main(
            [
                "synthetic",
                "--out",
                str(tmp_path),
                "--num-train",
                "200",
                "--digits",
                "1",
                "--operands",
                "2",
                "--ops",
                "+",
            ]
        )
        == 2
    )
    assert "distinct problems" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not MATH_SRC.is_file(), reason=f"no shared data at {MATH_SRC}")
def test_math_conversion_excludes_math500(tmp_path, capsys):
    out = tmp_path / "math"
    summary = run(["math", "--src", MATH_SRC, "--math500", MATH500, "--out", out, "--no-verify"], capsys)
    assert summary["excluded_math500"] == 500 and summary["math500_problems"] == 500
    assert summary["written"] == 4500 and summary["source_rows"] == 5000 and summary["skipped"] == {}
    assert [p.name for p in out.iterdir()] == ["train.parquet"]

    rows, _ = read_luffy_parquet(out / "train.parquet", require_target=True)
    assert len(rows) == 4500
    math500 = {normalize_problem(item["problem"]) for item in read_benchmark(MATH500)}
    assert not math500 & {normalize_problem(ex.problem) for ex in rows}
    for ex in random.Random(0).sample(rows, 50):
        assert ex.demo.startswith("<think>\n") and "\n</think>\nThe final answer is $\\boxed{" in ex.demo
        assert score_luffy(as_trainer_sees_it(ex.demo), ex.ground_truth) == 1.0, (ex.demo[-200:], ex.ground_truth)
