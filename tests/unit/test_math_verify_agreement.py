"""tools/math_verify_agreement.py: a deterministic corpus, graded in killable worker processes, compared.

The real comparison (our math-verify against upstream's 0.6.0) needs a second venv and is run by hand; here
both sides are this venv, so every item must agree, and the worker restart is shown on a real slow item."""

import json
import sys

import pytest

from tests.helpers import SHARED
from tools import math_verify_agreement as tool

DATA = SHARED / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "eval" / "luffy" / "valid.all.parquet").is_file(), reason=f"no shared data at {DATA}"
)


def test_upstream_solution_is_the_text_between_the_first_and_second_think_close():
    assert tool.upstream_solution("a</think>b</think>c") == "b"
    assert tool.upstream_solution("a</think>1/2<|endoftext|>") == "1/2<|endoftext|>"
    assert tool.upstream_solution("no close tag") is None


@needs_data
def test_corpus_is_deterministic_and_covers_every_source_and_style():
    first = tool.build_corpus(DATA, limit_per_source=3, seed=0)
    assert first == tool.build_corpus(DATA, limit_per_source=3, seed=0)
    assert first != tool.build_corpus(DATA, limit_per_source=3, seed=1)  # the seed picks other problems
    assert {item["source"] for item in first} == {
        "aime24",
        "aime25",
        "amc",
        "amc23",
        "math500",
        "minerva",
        "olympiadbench",
        "luffy_valid_all",
        "math_train",
        "gsm8k",
        "synthetic_arith",
    }
    assert {item["style"] for item in first} >= {"boxed+im_end", "bare+endoftext", "solution+im_end", "our_demo+im_end"}
    assert len({item["id"] for item in first}) == len(first)
    assert all(tool.upstream_solution(item["response"]) is not None for item in first)
    stripped = tool.with_stripped_solutions(first)
    item = next(i for i in stripped if i["style"] == "bare+endoftext")
    assert item["solution_stripped"] == "\n" + item["gold"].strip("$")  # the EOS text is what stripping removes
    assert next(i for i in stripped if i["style"] == "bare")["solution_stripped"] is None


def test_a_silent_worker_is_killed_and_grading_goes_on_after_its_item(tmp_path):
    items = [
        {"response": "ok</think>\\boxed{3}<|im_end|>", "gold": "3"},
        {"response": "ok</think>\\boxed{9^{9^{9^{9}}}}", "gold": "1"},  # ~5 s: math-verify's own timeout
        {"response": "ok</think>1/2<|endoftext|>", "gold": "1", "solution_stripped": "1/2"},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    run = tool.grade_with(
        sys.executable, path, len(items), item_timeout_s=2.0, start_timeout_s=120.0, log_path=tmp_path / "worker.log"
    )
    scores = [r.get("score") for r in run["results"]]
    assert scores == [1, None, 1] and run["results"][1]["timed_out"] and run["restarts"] == 1
    assert run["results"][2]["score_stripped"] == 0  # "1/2" without the special token is not 1
    assert run["versions"]["math-verify"]


@needs_data
def test_same_version_on_both_sides_agrees_on_every_item(capsys):
    assert tool.main(["--other-python", sys.executable, "--limit-per-source", "1", "--examples", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["num_items"] == len(tool.build_corpus(DATA, limit_per_source=1)) > 50
    assert summary["disagreements"] == 0 and summary["disagreement_rate"] == 0.0
    assert sum(summary["correct"].values()) > 0 and set(summary["errors_or_timeouts"].values()) == {0}
    assert any(line.startswith("disagreements: 0 of ") for line in out)
