"""luffy-eval's pure parts: --n-samples parsing, the grading-text rule, avg@k aggregation, the markdown
table, benchmark loading (limit, repetition in LUFFY's files), prompts, and the user errors. No vLLM here:
tests/e2e/test_eval.py runs the whole program."""

import json

import pytest

from luffy_megatron.data import LUFFY_SYSTEM_PROMPT
from luffy_megatron.eval import (
    DEFAULT_N_SAMPLES,
    EvalError,
    aggregate,
    average_accuracy,
    build_prompts,
    check_model_dir,
    grading_text,
    load_benchmarks,
    main,
    parse_n_samples,
    render_markdown,
)
from luffy_megatron.reward import score_choice, score_math

KNOWN = ["aime24", "aime25", "amc", "math500", "arc_c"]


# ------------------------------------------------------------------------------------------ --n-samples


def test_default_n_samples_is_32_for_aime_and_amc_and_1_elsewhere():
    per_name, default = parse_n_samples(DEFAULT_N_SAMPLES, KNOWN)
    assert per_name == {"aime24": 32, "aime25": 32, "amc": 32}
    assert default == 1


def test_n_samples_bare_number_sets_the_default_for_the_rest():
    assert parse_n_samples("aime24=8, 4", KNOWN) == ({"aime24": 8}, 4)
    assert parse_n_samples("3", KNOWN) == ({}, 3)
    assert parse_n_samples("", KNOWN) == ({}, 1)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("aime2024=32", "unknown benchmark 'aime2024'"),
        ("aime24=x", "K must be an integer"),
        ("aime24=0", "K must be >= 1"),
        ("-2", "K must be >= 1"),
        ("aime24=2,aime24=4", "names 'aime24' twice"),
        ("2,3", "more than one bare default"),
        ("=3", "expected NAME=K"),
    ],
)
def test_n_samples_errors_name_the_problem(spec, message):
    with pytest.raises(EvalError, match=message):
        parse_n_samples(spec, KNOWN)


# ------------------------------------------------------------------------------------------ grading text


def test_grading_text_is_after_the_first_think_close_or_the_whole_response():
    assert grading_text("reasoning \\boxed{3}\n</think>\nso \\boxed{4}") == "\nso \\boxed{4}"
    assert grading_text("no think block, \\boxed{4}") == "no think block, \\boxed{4}"
    assert grading_text("a</think>b</think>c") == "b</think>c"
    assert grading_text("all thought</think>") == ""
    assert grading_text("") == ""


def test_grading_rule_with_the_real_graders():
    # The answer after </think> counts, not the one inside the thought.
    assert score_math(grading_text("try \\boxed{3}</think>The answer is \\boxed{4}"), "4") == 1.0
    assert score_math(grading_text("try \\boxed{4}</think>The answer is \\boxed{3}"), "4") == 0.0
    # No </think>: the OAT override grades the whole text, so the think format is not enforced.
    assert score_math(grading_text("Hence \\boxed{\\frac{1}{2}}"), "0.5") == 1.0
    # A thought that never closed and a final answer after </think> for a letter question.
    assert score_choice(grading_text("maybe (B)</think>\nANSWER: C"), "C") == 1.0
    assert score_choice(grading_text("maybe \\boxed{B}</think>\nno letter here"), "B") == 0.0


# ------------------------------------------------------------------------------------------ aggregation


def test_avg_at_k_is_the_mean_over_all_samples_with_per_problem_means():
    summary = aggregate([7, 7, 7, 7, 9, 9, 9, 9], [1, 0, 0, 0, 1, 1, 1, 0])
    assert summary["num_problems"] == 2
    assert summary["k"] == 4
    assert summary["num_samples"] == 8
    assert summary["accuracy"] == pytest.approx(50.0)
    assert summary["per_problem"] == [{"index": 7, "mean": 0.25}, {"index": 9, "mean": 0.75}]


def test_aggregate_interleaved_samples_and_uneven_k():
    summary = aggregate([0, 1, 0, 1, 1], [1.0, 0.0, 1.0, 1.0, 1.0])
    assert summary["k"] is None  # 2 samples of problem 0, 3 of problem 1
    assert summary["accuracy"] == pytest.approx(80.0)
    assert [p["mean"] for p in summary["per_problem"]] == pytest.approx([1.0, 2 / 3])


def test_aggregate_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 problem ids but 1 scores"):
        aggregate([0, 1], [1.0])
    with pytest.raises(ValueError, match="no samples"):
        aggregate([], [])


def test_average_is_the_unweighted_mean_over_benchmarks():
    benchmarks = {"a": {"accuracy": 10.0, "num_samples": 1000}, "b": {"accuracy": 40.0, "num_samples": 2}}
    assert average_accuracy(benchmarks) == pytest.approx(25.0)
    assert average_accuracy({}) is None


# ------------------------------------------------------------------------------------------ markdown


def test_markdown_table_has_one_column_per_benchmark_and_avg():
    results = {
        "model_name": "luffy-7b",
        "benchmarks": {
            "aime24": {"accuracy": 29.4375, "num_problems": 30, "k": 32},
            "math500": {"accuracy": 87.6, "num_problems": 500, "k": 1},
        },
        "average": 58.51875,
        "protocol": {"temperature": 0.6, "top_p": 1.0, "max_new_tokens": 8192},
    }
    lines = render_markdown(results).splitlines()
    assert lines[0] == "| Model | aime24 | math500 | Avg |"
    assert lines[1] == "|:---|---:|---:|---:|"
    assert lines[2] == "| luffy-7b | 29.4 | 87.6 | 58.5 |"
    note = lines[4]
    assert "aime24 30x32" in note and "math500 500x1" in note and "8192 new tokens" in note


# ------------------------------------------------------------------------------------------ benchmarks


def test_load_benchmarks_limit_and_k_per_benchmark():
    aime, math500, arc = load_benchmarks(
        ["aime24", "math500", "arc_c"], data_root=None, limit=3, n_samples="aime24=32,arc_c=2"
    )
    assert (aime.name, aime.k, aime.kind, len(aime.rows)) == ("aime24", 32, "math", 3)
    assert (math500.k, math500.kind, len(math500.rows)) == (1, "math", 3)
    assert (arc.k, arc.kind, len(arc.rows)) == (2, "choice", 3)
    assert math500.problem_ids == [0, 1, 2]
    assert arc.rows[0]["answer"] == "C" and all(len(r["answer"]) == 1 for r in arc.rows)


def test_luffy_file_is_split_per_data_source_and_repeated_rows_are_one_problem():
    benchmarks = {b.name: b for b in load_benchmarks(["luffy_valid_all"], data_root=None, limit=2, n_samples="")}
    assert set(benchmarks) == {
        f"luffy_valid_all/{s}" for s in ("aime", "aime25", "amc", "math", "minerva", "olympiad_bench")
    }
    aime = benchmarks["luffy_valid_all/aime"]
    assert len(aime.rows) == 2 * 32  # 2 problems, each repeated 32 times in the file
    assert len(set(aime.problem_ids)) == 2
    assert aime.k == 1  # the repetition is in the file, vLLM draws one sample per row
    summary = aggregate(aime.problem_ids, [1.0] * 32 + [0.0] * 32)
    assert (summary["num_problems"], summary["k"]) == (2, 32)
    assert len(benchmarks["luffy_valid_all/math"].rows) == 2


def test_unknown_benchmark_lists_the_valid_names():
    with pytest.raises(EvalError) as info:
        load_benchmarks(["math500", "aime2024"], data_root=None, limit=None, n_samples="")
    message = str(info.value)
    assert "unknown benchmark 'aime2024'" in message
    for name in ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench", "arc_c", "mmlu_pro"):
        assert name in message


def test_benchmark_listed_twice_is_an_error():
    with pytest.raises(EvalError, match="twice"):
        load_benchmarks(["math500", "math500"], data_root=None, limit=None, n_samples="")


def test_prompts_drop_the_system_prompt_and_end_with_the_generation_prompt(qwen_tokenizer):
    (bench,) = load_benchmarks(["math500"], data_root=None, limit=2, n_samples="")
    template = build_prompts([bench], qwen_tokenizer, keep_system_prompt=False, chat_template=None)
    assert template.source == "default"  # Qwen3's own template does not end with <think>\n
    for row, text, ids in zip(bench.rows, bench.prompts, bench.prompt_ids):
        assert text == f"<|im_start|>user\n{row['problem']}<|im_end|>\n<|im_start|>assistant\n<think>\n"
        assert qwen_tokenizer.decode(ids) == text

    (kept,) = load_benchmarks(["math500"], data_root=None, limit=1, n_samples="")
    build_prompts([kept], qwen_tokenizer, keep_system_prompt=True, chat_template=None)
    assert kept.prompts[0].startswith(f"<|im_start|>system\n{LUFFY_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")


# ------------------------------------------------------------------------------------------ user errors


def test_model_dir_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(EvalError, match=f"{missing}: not a directory"):
        check_model_dir(missing)
    with pytest.raises(EvalError, match=f"{tmp_path}: no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvalError, match=f"{tmp_path}: no tokenizer"):
        check_model_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert check_model_dir(tmp_path) == tmp_path


def test_main_reports_user_errors_in_one_line_with_exit_code_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path), "--benchmarks", "math500", "--out", str(out)]) == 2
    assert f"luffy-eval: error: --model {tmp_path}: no config.json" in capsys.readouterr().err

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert main(["--model", str(tmp_path), "--benchmarks", "math500,gsm9k", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "luffy-eval: error: unknown benchmark 'gsm9k'; valid names: aime24, aime25" in err

    assert main(["--model", str(tmp_path), "--benchmarks", "math500", "--n-samples", "math500=0"]) == 2
    assert "K must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--benchmarks", "math500", "--limit", "0"]) == 2
    assert "--limit=0: must be >= 1" in capsys.readouterr().err
    assert not out.exists()  # nothing is written before the arguments are known to be good
