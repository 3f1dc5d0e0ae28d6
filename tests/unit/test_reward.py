"""Graders: LUFFY's think protocol, plain math-verify, multiple-choice letters (pure functions, in-process)."""

import threading
import time

import pytest

from luffy_megatron.reward import GRADERS, score_choice, score_luffy, score_math
from luffy_megatron.reward.graders import extract_choice, grader_spec, resolve_grader, strip_trailing_special_tokens

# (ground truth as stored in the data, i.e. bare LaTeX; final answer text; expected reward).
# Cases of platform_notes.md section 7 / probes/mv_probe.py, plus the wrong-answer twins.
KNOWN_ANSWERS = [
    ("\\frac{1}{2}", "0.5", 1.0),                                          # fraction vs decimal
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}", 1.0),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),                                  # and the other way round
    ("3", "so the result is \\boxed{3}.", 1.0),
    ("3", "\\boxed{4}", 0.0),                                               # wrong
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),                                  # algebraic equivalence
    ("x^2+2x+1", "\\boxed{(x-1)^2}", 0.0),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", 1.0),                               # sets are unordered
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", 0.0),
    ("(1,2]", "\\boxed{(1,2]}", 1.0),                                       # intervals
    ("(1,2]", "\\boxed{(1,2)}", 0.0),                                       # open vs half-open
    ("50\\%", "\\boxed{0.5}", 1.0),                                         # percentages
    ("10^{3}", "1000", 1.0),
    ("\\pi", "3.14159", 0.0),                                               # no numeric rounding to pi
    ("2", "I think 3 but the final answer is $\\boxed{2}$", 1.0),
    ("5", "First \\boxed{3}.\n\nFinal answer: \\boxed{5}", 1.0),           # the last \boxed wins
    ("3", "First \\boxed{3}.\n\nFinal answer: \\boxed{5}", 0.0),
    # math-verify 0.9 reads several \boxed in one sentence as a set: hedging earns nothing.
    ("5", "It is \\boxed{3} or \\boxed{5}", 0.0),
    ("\\{3,5\\}", "It is \\boxed{3} or \\boxed{5}", 1.0),
    ("2", "no answer here", 0.0),
    ("2", "", 0.0),
]


@pytest.mark.parametrize("gold, answer, expected", KNOWN_ANSWERS)
def test_known_answers_math(gold, answer, expected):
    assert score_math(answer, gold) == expected


@pytest.mark.parametrize("gold, answer, expected", KNOWN_ANSWERS)
def test_known_answers_luffy_think(gold, answer, expected):
    # The generation prompt ends with "<think>\n": the response starts inside the thought.
    response = "Let me work this out. 7 * 6 = 42, \\boxed{42}.\n</think>\n\n" + answer + "<|endoftext|>"
    assert score_luffy(response, gold) == expected


# -- LUFFY's think format -----------------------------------------------------------------------------

def test_missing_think_close_is_a_format_failure_even_when_right():
    assert score_luffy("The answer is \\boxed{3}", "3") == 0.0
    assert score_math("The answer is \\boxed{3}", "3") == 1.0  # the plain grader does not care


def test_answer_only_in_the_thought_does_not_count():
    assert score_luffy("so it is \\boxed{3}</think>The answer is \\boxed{4}.", "3") == 0.0
    assert score_luffy("so it is \\boxed{3}</think>I am not sure.", "3") == 0.0


def test_text_after_a_second_think_close_is_ignored():
    assert score_luffy("hmm</think>\\boxed{3}</think>actually \\boxed{4}", "3") == 1.0
    assert score_luffy("hmm</think>\\boxed{4}</think>actually \\boxed{3}", "3") == 0.0


def test_response_starting_inside_the_thought_is_accepted():
    # No "<think>" in the response itself: the prepended "<think>\n" supplies it.
    assert "<think>" not in "2+1=3</think>\\boxed{3}"
    assert score_luffy("2+1=3</think>\\boxed{3}", "3") == 1.0
    # An explicit "<think>" written by the model changes nothing.
    assert score_luffy("<think>2+1=3</think>\\boxed{3}", "3") == 1.0


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>", "<|im_end|><|endoftext|>", "</s>", "\n<|endoftext|>"])
def test_trailing_eos_text_does_not_break_grading(eos):
    assert score_luffy("ok</think>The answer is \\boxed{3}." + eos, "3") == 1.0
    assert score_luffy("ok</think>The answer is 3" + eos, "3") == 1.0  # no \boxed: plain-expression fallback
    assert score_math("The answer is 3" + eos, "3") == 1.0
    # Without stripping, math-verify reads "1/2<|endoftext|>" as 1.
    assert score_luffy("ok</think>So x = 1/2" + eos, "\\frac{1}{2}") == 1.0
    assert score_luffy("ok</think>The answer is 4" + eos, "3") == 0.0


def test_strip_trailing_special_tokens_only_strips_the_end():
    assert strip_trailing_special_tokens("a <|im_end|> b<|endoftext|><|endoftext|>") == "a <|im_end|> b"
    assert strip_trailing_special_tokens("x < y | z") == "x < y | z"
    start = time.monotonic()
    assert strip_trailing_special_tokens("x" + " " * 20_000 + "y<|endoftext|>") == "x" + " " * 20_000 + "y"
    assert time.monotonic() - start < 0.5  # linear: degenerate whitespace must not cost minutes


def test_choice_extraction_is_linear_on_degenerate_output():
    start = time.monotonic()
    assert score_choice("\\boxed{ " * 20_000 + "\nANSWER: C", "C") == 1.0
    assert time.monotonic() - start < 0.5


def test_pathologic_answers_are_cut_by_math_verify_timeouts_not_disabled():
    # Grading a huge power must come back (0.0) instead of hanging; math-verify's own alarm cuts it.
    assert score_math("\\boxed{2^{10^{7}}}", "1") == 0.0


def test_math_verify_timeouts_need_the_main_thread():
    # The graders keep math-verify's signal.alarm timeouts on, so off the main thread they refuse
    # loudly instead of silently scoring 0 (the reason the pool grades in processes).
    outcome = {}

    def run():
        try:
            outcome["score"] = score_math("\\boxed{3}", "3")
        except ValueError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "threaded" in outcome.get("error", ""), outcome


# -- multiple choice ----------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold, expected", [
    ("The correct option is \\boxed{C}.", "C", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("I first thought \\boxed{A} but it is \\boxed{D}", "D", 1.0),   # the last boxed letter wins
    ("I first thought \\boxed{A} but it is \\boxed{D}", "A", 0.0),
    ("Reasoning...\nANSWER: C", "C", 1.0),                            # GPQA's requested format
    ("Reasoning...\nANSWER: C<|endoftext|>", "C", 1.0),
    ("so the answer is (B) because of X", "B", 1.0),
    ("The answer is **E**.", "E", 1.0),
    ("answer: c", "C", 1.0),                                          # lower-case prediction
    ("\\boxed{c}", "C", 1.0),
    ("ANSWER: C", "c", 1.0),                                          # lower-case gold
    ("ANSWER: C", "(C)", 1.0),
    ("ANSWER: B", "C", 0.0),                                          # wrong letter
    ("I cannot decide between the options.", "C", 0.0),             # no letter
    ("The answer is a bit unclear, maybe 7.", "A", 0.0),             # an article is not a letter
    ("\\boxed{42}", "A", 0.0),
])
def test_choice(response, gold, expected):
    assert score_choice(response, gold) == expected


def test_extract_choice():
    assert extract_choice("\\boxed{J}") == "J"
    assert extract_choice("ANSWER: K") is None  # options stop at J
    assert extract_choice("nothing") is None


def test_choice_rejects_a_gold_that_is_not_a_letter():
    with pytest.raises(ValueError, match="one letter A-J"):
        score_choice("ANSWER: C", "42")


# -- registry -----------------------------------------------------------------------------------------

def test_registry_and_resolution():
    assert GRADERS == {"luffy_think": score_luffy, "math": score_math, "choice": score_choice}
    assert resolve_grader("math") is score_math
    assert resolve_grader("luffy_megatron.reward.graders:score_choice") is score_choice
    assert grader_spec(score_luffy) == "luffy_megatron.reward.graders:score_luffy"
    with pytest.raises(ValueError, match="unknown grader"):
        resolve_grader("maths")
    with pytest.raises(ValueError, match="no function"):
        resolve_grader("luffy_megatron.reward.graders:nope")
    with pytest.raises(ValueError, match="not importable"):
        grader_spec(lambda response, gold: 1.0)
