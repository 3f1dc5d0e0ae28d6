"""luffy-eval's grading protocols: `luffy` (upstream's OAT grading, boxed answers only) against `math-verify`
(the lenient grading), on responses the two grade differently, and the report naming the protocol."""

import io
import json
from types import SimpleNamespace

import pytest

from luffy_megatron import eval as luffy_eval
from luffy_megatron.eval import (
    PROTOCOLS,
    Benchmark,
    Generation,
    _results,
    build_parser,
    evaluate_benchmark,
    luffy_grading_text,
    protocol_grading_text,
    render_markdown,
)
from luffy_megatron.reward import RewardPool
from luffy_megatron.reward.graders import (
    GRADERS,
    last_boxed_content,
    normalize_boxed_answer,
    score_boxed_choice,
    score_boxed_math,
)

THINK_PROMPT = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n"
PLAIN_PROMPT = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def grade(protocol: str, kind: str, response: str, gold: str, prompt: str = THINK_PROMPT) -> float:
    spec = PROTOCOLS[protocol]
    return GRADERS[spec.graders[kind]](protocol_grading_text(protocol, response, prompt), gold)


# (case, kind, response, gold, prompt, grade under luffy, grade under math-verify)
TABLE = [
    ("boxed only inside the thought", "math", "so \\boxed{4}</think>The answer is 4.", "4", THINK_PROMPT, 0.0, 1.0),
    ("no </think>, no box", "math", "The answer is 4.", "4", THINK_PROMPT, 0.0, 1.0),
    ("no </think>, boxed: graded whole", "math", "hence \\boxed{4}", "4", THINK_PROMPT, 1.0, 1.0),
    ("box without braces", "math", "ok</think>\\boxed 4", "4", THINK_PROMPT, 0.0, 1.0),
    ("correct box after </think>", "math", "try \\boxed{3}</think>so \\boxed{4}", "4", THINK_PROMPT, 1.0, 1.0),
    ("wrong box after </think>", "math", "try \\boxed{4}</think>so \\boxed{3}", "4", THINK_PROMPT, 0.0, 0.0),
    ("\\frac{1}{2} against 0.5", "math", "ok</think>\\boxed{\\frac{1}{2}}", "0.5", THINK_PROMPT, 1.0, 1.0),
    ("0.5 against \\frac{1}{2}", "math", "ok</think>\\boxed{0.5}", "\\frac{1}{2}", THINK_PROMPT, 1.0, 1.0),
    ("1/2 against \\dfrac12", "math", "ok</think>\\boxed{1/2}", "\\dfrac12", THINK_PROMPT, 1.0, 1.0),
    ("x = 5 against 5", "math", "ok</think>\\boxed{x = 5}", "5", THINK_PROMPT, 1.0, 1.0),
    # upstream grades split("</think>")[1]: the box before a second </think>
    ("second </think>", "math", "a</think>\\boxed{4}</think>\\boxed{5}", "4", THINK_PROMPT, 1.0, 0.0),
    # a prompt without <think>\n: upstream grades the whole response
    ("no <think> in prompt", "math", "x \\boxed{4}</think> then", "4", PLAIN_PROMPT, 1.0, 0.0),
    ("ANSWER: C", "choice", "hmm</think>\nANSWER: C", "C", THINK_PROMPT, 0.0, 1.0),
    ("the answer is (C)", "choice", "hmm</think>\nthe answer is (C)", "C", THINK_PROMPT, 0.0, 1.0),
    ("\\boxed{C}", "choice", "hmm</think>\\boxed{C}", "C", THINK_PROMPT, 1.0, 1.0),
    ("\\boxed{(c)}", "choice", "hmm</think>\\boxed{(c)}", "C", THINK_PROMPT, 1.0, 1.0),
    ("\\boxed{\\text{C}}", "choice", "hmm</think>\\boxed{\\text{C}}", "C", THINK_PROMPT, 1.0, 1.0),
    ("a later non-letter box", "choice", "hmm</think>\\boxed{C} is \\boxed{3}", "C", THINK_PROMPT, 0.0, 1.0),
    ("wrong letter boxed", "choice", "hmm</think>\\boxed{B}", "C", THINK_PROMPT, 0.0, 0.0),
]


@pytest.mark.parametrize(
    "kind, response, gold, prompt, luffy, math_verify", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_the_two_protocols_on_a_table_of_responses(kind, response, gold, prompt, luffy, math_verify):
    assert grade("luffy", kind, response, gold, prompt) == luffy
    assert grade("math-verify", kind, response, gold, prompt) == math_verify


def test_luffy_is_the_default_protocol_and_help_documents_both():
    parser = build_parser()
    assert parser.parse_args(["--model", "m", "--benchmarks", "b"]).protocol == "luffy"
    assert parser.parse_args(["--model", "m", "--benchmarks", "b", "--protocol", "math-verify"]).protocol == (
        "math-verify"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--benchmarks", "b", "--protocol", "oat"])
    assert "[--protocol {luffy,math-verify}]" in parser.format_usage()
    (action,) = [a for a in parser._actions if "--protocol" in a.option_strings]
    assert "'luffy' (default)" in action.help and "'math-verify'" in action.help and "\\boxed{C}" in action.help


def test_luffy_grading_text_is_upstreams_split():
    assert luffy_grading_text("a</think>b</think>c", THINK_PROMPT) == "b"
    assert luffy_grading_text("no close", THINK_PROMPT) == "no close"
    assert luffy_grading_text("a</think>b", PLAIN_PROMPT) == "a</think>b"


def test_last_boxed_content_reads_only_the_last_box_by_its_braces():
    assert last_boxed_content("\\boxed{1} and \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed_content("\\boxed{1} and \\boxed 2") is None  # the last one has no brace
    assert last_boxed_content("\\boxed{1} and \\boxed{2") is None  # the last one never closes
    assert last_boxed_content("no box") is None
    assert last_boxed_content("\\boxed{" * 20_000) is None  # linear on degenerate output


def test_boxed_normalisation_and_graders():
    assert normalize_boxed_answer("\\text{ 5 }") == "5"
    assert normalize_boxed_answer("\\dfrac{3}{4}") == normalize_boxed_answer("3/4") == "\\frac{3}{4}"
    assert normalize_boxed_answer("90^\\circ") == "90"
    assert normalize_boxed_answer("\\sqrt3") == "\\sqrt{3}"
    assert normalize_boxed_answer(".5") == "\\frac{1}{2}"
    assert score_boxed_math("\\boxed{10\\%}", "10") == 1.0
    assert score_boxed_math("\\boxed{}", "0") == 0.0
    assert score_boxed_math("\\boxed{4}", "\\boxed{4}") == 1.0  # a boxed ground truth is read from its box
    assert score_boxed_choice("\\boxed{\\textbf{(C)}}", "(C)") == 1.0
    assert score_boxed_choice("\\boxed{C. Paris}", "C") == 0.0
    with pytest.raises(ValueError, match="one letter"):
        score_boxed_choice("\\boxed{C}", "CD")


# ------------------------------------------------------------------------------------ the report


@pytest.mark.parametrize("protocol, accuracy", [("luffy", 50.0), ("math-verify", 100.0)])
def test_evaluate_benchmark_grades_and_records_under_the_protocol(monkeypatch, protocol, accuracy):
    rows = [{"data_source": "arc_c", "problem": f"Q{i}", "answer": "C", "index": i} for i in range(2)]
    benchmark = Benchmark(name="arc_c", kind="choice", k=1, rows=rows, problem_ids=[0, 1], prompts=[THINK_PROMPT] * 2)
    texts = ["hmm</think>\nANSWER: C", "hmm</think>\\boxed{C}"]
    monkeypatch.setattr(
        luffy_eval, "generate", lambda llm, bench, args: [[Generation(text, 5, "stop")] for text in texts]
    )
    args = build_parser().parse_args(["--model", "m", "--benchmarks", "arc_c", "--protocol", protocol])
    samples = io.StringIO()
    with RewardPool(num_workers=0) as pool:
        summary = evaluate_benchmark(None, pool, benchmark, args, samples)
    assert summary["protocol"] == protocol
    assert summary["grader"] == PROTOCOLS[protocol].graders["choice"]
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert [json.loads(line)["score"] for line in samples.getvalue().splitlines()] == (
        [0.0, 1.0] if protocol == "luffy" else [1.0, 1.0]
    )


@pytest.mark.parametrize("argv, protocol", [([], "luffy"), (["--protocol", "math-verify"], "math-verify")])
def test_results_and_table_name_the_protocol(tmp_path, argv, protocol):
    args = build_parser().parse_args(["--model", str(tmp_path), "--benchmarks", "math500", *argv])
    per_benchmark = {"math500": {"accuracy": 50.0, "num_problems": 2, "k": 1, "protocol": protocol}}
    template = SimpleNamespace(source="default", ends_with_think=True)
    results = _results(args, tmp_path, template, per_benchmark, True)
    assert results["protocol"]["grading_protocol"] == protocol
    assert results["protocol"]["grading"] == PROTOCOLS[protocol].description
    table = render_markdown(json.loads(json.dumps(results))).splitlines()
    assert table[0].startswith(f"Grading protocol: {protocol} (")
    assert table[2] == "| Model | math500 | Avg |"
