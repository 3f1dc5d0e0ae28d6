"""Graders: LUFFY's think protocol, plain math-verify, multiple-choice letters (pure functions, in-process)."""

import threading
import time

import pytest
from math_verify import parse, verify

from luffy_megatron.reward import GRADERS, score_choice, score_luffy, score_math
from luffy_megatron.reward.graders import (
    bind_options,
    extract_choice,
    grader_spec,
    resolve_grader,
    score_boxed_choice,
    score_boxed_math,
    strip_trailing_special_tokens,
)

# (ground truth as stored in the data, i.e. bare LaTeX; final answer text; expected reward).
# Cases of platform_notes.md section 7 / probes/mv_probe.py, plus the wrong-answer twins.
KNOWN_ANSWERS = [
    ("\\frac{1}{2}", "0.5", 1.0),  # fraction vs decimal
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}", 1.0),
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),  # and the other way round
    ("3", "so the result is \\boxed{3}.", 1.0),
    ("3", "\\boxed{4}", 0.0),  # wrong
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),  # algebraic equivalence
    ("x^2+2x+1", "\\boxed{(x-1)^2}", 0.0),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", 1.0),  # sets are unordered
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", 0.0),
    ("(1,2]", "\\boxed{(1,2]}", 1.0),  # intervals
    ("(1,2]", "\\boxed{(1,2)}", 0.0),  # open vs half-open
    ("50\\%", "\\boxed{0.5}", 1.0),  # percentages
    ("10^{3}", "1000", 1.0),
    ("\\pi", "3.14159", 0.0),  # no numeric rounding to pi
    ("2", "I think 3 but the final answer is $\\boxed{2}$", 1.0),
    ("5", "First \\boxed{3}.\n\nFinal answer: \\boxed{5}", 1.0),  # the last \boxed wins
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


# -- trailing special tokens: upstream's text by default, stripped on request ------------------------


def upstream_reward(response: str, ground_truth: str) -> float:
    """Upstream LUFFY's code path, written out from its source: RewardManager decodes the response without
    skip_special_tokens and prepends "<think>\\n" (main_mix_ppo.py), reward_fn_math_verify splits on
    "</think>" and returns verify(parse("$" + gold + "$"), parse(solution)) (math_verify_reward.py)."""
    text = "<think>" + "\n" + response
    if "<think>" not in text or "</think>" not in text:
        return 0.0
    return 1.0 if verify(parse("$" + ground_truth + "$"), parse(text.split("</think>")[1])) else 0.0


def test_math_verify_reads_a_bare_fraction_before_a_special_token_as_its_numerator():
    # The fact the default has to reproduce (math-verify 0.6.0, upstream's pin, gives the same).
    assert [str(x) for x in parse("1/2<|endoftext|>")] == ["1", "1"]
    assert [str(x) for x in parse("1/2")] == ["1/2", "1/2"]


def test_default_grades_like_upstream_with_the_special_token_kept():
    response = "ok</think>So x = 1/2<|endoftext|>"
    assert upstream_reward(response, "\\frac{1}{2}") == 0.0 and upstream_reward(response, "1") == 1.0
    assert score_luffy(response, "\\frac{1}{2}") == 0.0
    assert score_luffy(response, "1") == 1.0
    assert score_math("So x = 1/2<|endoftext|>", "\\frac{1}{2}") == 0.0
    assert score_math("So x = 1/2<|endoftext|>", "1") == 1.0
    # The option restores the stripping: the bare fraction is graded by its value.
    assert score_luffy(response, "\\frac{1}{2}", strip_special_tokens=True) == 1.0
    assert score_luffy(response, "1", strip_special_tokens=True) == 0.0
    assert score_math("So x = 1/2<|endoftext|>", "\\frac{1}{2}", strip_special_tokens=True) == 1.0


EOS_TEXTS = ["<|endoftext|>", "<|im_end|>", "<|im_end|><|endoftext|>", "</s>", "\n<|endoftext|>"]
EOS_CASES = [  # (text after </think>, gold)
    ("The answer is \\boxed{3}.", "3"),
    ("The answer is 3", "3"),  # no \boxed: the plain-expression fallback
    ("So x = 1/2", "\\frac{1}{2}"),
    ("So x = 1/2", "1"),
    ("The answer is 4", "3"),
    ("x = 0.5", "\\frac{1}{2}"),
    ("The answer is 12", "12"),
    ("so 2/3", "\\frac{2}{3}"),
    ("we get 3/4", "3"),
]


@pytest.mark.parametrize("eos", EOS_TEXTS)
@pytest.mark.parametrize("answer, gold", EOS_CASES)
def test_default_equals_upstream_code_path(answer, gold, eos):
    response = "Let me see.\n</think>\n" + answer + eos
    assert score_luffy(response, gold) == upstream_reward(response, gold)


@pytest.mark.parametrize("eos", EOS_TEXTS)
def test_strip_option_grades_the_answer_without_its_trailing_special_tokens(eos):
    strip = {"strip_special_tokens": True}
    assert score_luffy("ok</think>The answer is \\boxed{3}." + eos, "3", **strip) == 1.0
    assert score_luffy("ok</think>The answer is 3" + eos, "3", **strip) == 1.0  # no \boxed: plain-expression fallback
    assert score_math("The answer is 3" + eos, "3", **strip) == 1.0
    assert score_luffy("ok</think>So x = 1/2" + eos, "\\frac{1}{2}", **strip) == 1.0
    assert score_luffy("ok</think>So x = 1/2" + eos, "1", **strip) == 0.0
    assert score_luffy("ok</think>The answer is 4" + eos, "3", **strip) == 0.0
    # Stripping is exactly grading the text without the special tokens.
    for answer, gold in EOS_CASES:
        assert score_luffy("ok</think>" + answer + eos, gold, **strip) == upstream_reward("ok</think>" + answer, gold)


def test_the_two_settings_differ_only_where_the_special_token_changes_the_parse():
    differing = [
        (answer, gold, eos)
        for answer, gold in EOS_CASES
        for eos in EOS_TEXTS
        if score_luffy("ok</think>" + answer + eos, gold)
        != score_luffy("ok</think>" + answer + eos, gold, strip_special_tokens=True)
    ]
    assert differing, "the option changed nothing: it is not applied"
    assert all(not eos.startswith("\n") and "/" in answer for answer, gold, eos in differing), differing


def test_choice_strips_always():
    for strip in (False, True):
        assert score_choice("Reasoning...\nANSWER: C<|im_end|>", "C", strip_special_tokens=strip) == 1.0
        assert score_choice("Reasoning...\nANSWER: C<|im_end|>", "B", strip_special_tokens=strip) == 0.0


def test_bind_options():
    assert bind_options(score_luffy, strip_special_tokens=False)("ok</think>1/2<|endoftext|>", "1") == 1.0
    assert bind_options(score_luffy, strip_special_tokens=True)("ok</think>1/2<|endoftext|>", "1") == 0.0

    def plain(response, ground_truth):  # a plug-in grader without the option
        return 1.0

    assert bind_options(plain, strip_special_tokens=False) is plain
    with pytest.raises(ValueError, match="strip_special_tokens"):
        bind_options(plain, strip_special_tokens=True)


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


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("The correct option is \\boxed{C}.", "C", 1.0),
        ("\\boxed{\\text{(B)}}", "B", 1.0),
        ("I first thought \\boxed{A} but it is \\boxed{D}", "D", 1.0),  # the last boxed letter wins
        ("I first thought \\boxed{A} but it is \\boxed{D}", "A", 0.0),
        ("Reasoning...\nANSWER: C", "C", 1.0),  # GPQA's requested format
        ("Reasoning...\nANSWER: C<|endoftext|>", "C", 1.0),
        ("so the answer is (B) because of X", "B", 1.0),
        ("The answer is **E**.", "E", 1.0),
        ("answer: c", "C", 1.0),  # lower-case prediction
        ("\\boxed{c}", "C", 1.0),
        ("ANSWER: C", "c", 1.0),  # lower-case gold
        ("ANSWER: C", "(C)", 1.0),
        ("ANSWER: B", "C", 0.0),  # wrong letter
        ("I cannot decide between the options.", "C", 0.0),  # no letter
        ("The answer is a bit unclear, maybe 7.", "A", 0.0),  # an article is not a letter
        ("\\boxed{42}", "A", 0.0),
    ],
)
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
    assert GRADERS == {
        "luffy_think": score_luffy,
        "math": score_math,
        "choice": score_choice,
        "boxed_math": score_boxed_math,
        "boxed_choice": score_boxed_choice,
    }
    assert resolve_grader("math") is score_math
    assert resolve_grader("luffy_megatron.reward.graders:score_choice") is score_choice
    assert grader_spec(score_luffy) == "luffy_megatron.reward.graders:score_luffy"
    with pytest.raises(ValueError, match="unknown grader"):
        resolve_grader("maths")
    with pytest.raises(ValueError, match="no function"):
        resolve_grader("luffy_megatron.reward.graders:nope")
    with pytest.raises(ValueError, match="not importable"):
        grader_spec(lambda response, gold: 1.0)
