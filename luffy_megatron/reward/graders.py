"""Graders: (decoded response, ground truth) -> 1.0 or 0.0.

Pure functions, meant to run inside the worker processes of `reward.pool.RewardPool`.

Signature: `grader(response, ground_truth, *, strip_special_tokens=False) -> float`.

Special tokens (`RewardConfig.strip_special_tokens`): upstream LUFFY decodes the valid response tokens
without `skip_special_tokens`, so the end-of-sequence text (`<|endoftext|>`, `<|im_end|>`, ...) is part of
the graded text, and math-verify sometimes reads it differently: `parse("1/2<|endoftext|>")` gives 1 (in
0.6.0, upstream's pin, and in 0.9.0 alike), while `parse("1/2\n<|endoftext|>")` gives 1/2. By default the
graders do what upstream does and grade the text as decoded; `strip_special_tokens=True` first removes
trailing whitespace and special-token text (`strip_trailing_special_tokens`), which grades such a bare
answer by its value. `score_luffy` and `score_math` honour the option; `score_choice` always strips (see
its docstring); `score_boxed_math` and `score_boxed_choice` (luffy-eval's default protocol, see their
section below) read the box by its braces, which trailing special tokens cannot change.

Contract: a grader returns 0.0 for anything the *model* wrote (no answer, garbage, a format failure,
an expression math-verify cannot parse or compare in time). It raises only for what the *data* or the
caller got wrong (an unusable ground truth, being called off the main thread).

math-verify (0.9.0) is always called with its own timeouts ON (`parse` 5 s, `verify` 5 s per comparison).
They are `signal.alarm` based, so they only work in a process's main thread; off the main thread
math-verify raises ValueError, which we let through. Its timeouts are not a hard bound (they stack per
expression and a C-level computation ignores the alarm), so the pool adds a hard kill deadline on top.
Never pass `timeout=None` here: pathological answers such as `\\boxed{9^{9^{9^{9}}}}` then hang for minutes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from typing import Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# End-of-sequence / pad token text that may trail a decoded response: upstream decodes the valid
# response tokens without skip_special_tokens, so Qwen's `<|endoftext|>` (or `<|im_end|>`, `</s>`, ...)
# is part of the text, and math-verify's plain-expression extractor reads "1/2<|endoftext|>" as 1.
_SPECIAL_TOKEN_AT_END = re.compile(r"(?:<\|[A-Za-z0-9_]{1,40}\|>|</s>|<eos>)\Z")


def strip_trailing_special_tokens(text: str) -> str:
    """The text without trailing whitespace and special-token text. Looks only at the end, so it stays
    linear on degenerate output (a single regex over the whole text was quadratic on long whitespace)."""
    text = text.rstrip()
    while (match := _SPECIAL_TOKEN_AT_END.search(text, max(0, len(text) - 48))) is not None:
        text = text[: match.start()].rstrip()
    return text


@functools.lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> list:
    # A rollout group shares one ground truth (n samples per prompt): parse it once per worker.
    return parse("$" + ground_truth + "$")


def _math_verify(solution: str, ground_truth: str, strip_special_tokens: bool) -> float:
    gold = _parse_gold(ground_truth)
    if not gold:
        return 0.0
    if strip_special_tokens:
        solution = strip_trailing_special_tokens(solution)
    return 1.0 if verify(gold, parse(solution)) else 0.0


def score_luffy(response: str, ground_truth: str, *, strip_special_tokens: bool = False) -> float:
    """LUFFY's training reward (upstream `reward_impl_version=3`, `reward_fn_math_verify`).

    The generation prompt ends with "<think>\\n", so the response starts inside the thought: prepend it,
    require a "</think>", and grade only the text between the first and the second "</think>"
    against "$gold$". No "</think>" is a format failure: 0.0 even if the answer is right.

    By default that text is graded as decoded, trailing special tokens included, exactly as upstream:
    "ok</think>1/2<|endoftext|>" scores 1.0 against "1" and 0.0 against "\\frac{1}{2}".
    `strip_special_tokens=True` strips them from the graded part first (then it is the other way round).
    """
    text = THINK_OPEN + "\n" + response
    if THINK_OPEN not in text or THINK_CLOSE not in text:
        return 0.0
    return _math_verify(text.split(THINK_CLOSE)[1], ground_truth, strip_special_tokens)


def score_math(response: str, ground_truth: str, *, strip_special_tokens: bool = False) -> float:
    """math-verify without the think requirement (upstream version 4): grades the whole response.

    math-verify takes the last \\boxed{} (or, without one, the last parsable expression), so a final
    answer after the thought wins over numbers inside it. Special tokens: as `score_luffy` (upstream's
    version 4 decodes the same way, so the default keeps them; luffy-eval's vLLM text has none anyway).
    """
    return _math_verify(response, ground_truth, strip_special_tokens)


_LETTERS = "ABCDEFGHIJ"
# \boxed{C}, \boxed{(c)}, \boxed{\text{C}}, \boxed{\textbf{(C)}}, \boxed{C.}. A regex, not a brace matcher:
# it stays linear on degenerate output such as thousands of unclosed "\boxed{".
_BOXED_LETTER = re.compile(
    r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-Ja-j])\s*\)?\s*\}?\s*[.:]?\s*\}"
)
# "ANSWER: C", "Answer: (c)", "the answer is (C)", "final answer is **C**." A bare letter must end the
# line (so "the answer is a bit..." is not read as A); a letter in parentheses may stand anywhere.
_ANSWER_PATTERN = re.compile(
    r"answer\s*(?:is|:)?[\s:*$]*(?:option\s*)?"
    r"(?:\(([A-Ja-j])\)|([A-Ja-j])[\s*$.!]*$)",
    re.IGNORECASE | re.MULTILINE,
)


def extract_choice(response: str) -> str | None:
    """The predicted option letter (upper case), or None.

    The last \\boxed{} holding a letter wins; without one, the last "ANSWER: X" / "answer is (X)".
    """
    for pattern in (_BOXED_LETTER, _ANSWER_PATTERN):
        matches = list(pattern.finditer(strip_trailing_special_tokens(response)))
        if matches:
            return next(group for group in matches[-1].groups() if group).upper()
    return None


def _gold_letter(ground_truth: str) -> str:
    gold = ground_truth.strip().strip("()").strip().upper()
    if len(gold) != 1 or gold not in _LETTERS:
        raise ValueError(f"multiple-choice ground truth must be one letter A-J, got {ground_truth!r}")
    return gold


def score_choice(response: str, ground_truth: str, *, strip_special_tokens: bool = True) -> float:
    """Multiple-choice letter grading (ARC-c, MMLU-Pro, GPQA): 1.0 if the predicted letter is the gold.

    Always strips trailing special tokens, whatever `strip_special_tokens` says (the parameter is accepted
    so that every built-in grader takes the same options): upstream has no letter reward to match, its
    evaluation of these sets grades vLLM's text, which has no special tokens, and a final "ANSWER: C" must
    still end its line when the decoded text goes on with "<|im_end|>".
    """
    del strip_special_tokens  # always on, see above
    gold = _gold_letter(ground_truth)
    return 1.0 if extract_choice(response) == gold else 0.0


# ------------------------------------------------------------------------------ boxed answers (luffy-eval)
#
# luffy-eval's default protocol grades as upstream's evaluation script with its OAT grader does: the answer is
# the content of the *last* \boxed{} and nothing else (no box -> 0.0). A math answer matches the ground
# truth if the two are equal after a MATH-style string normalisation (`normalize_boxed_answer`), or if
# math-verify finds them equal when each is read as one LaTeX expression (first match, no fallback).
# Where this differs from upstream's grader (written from its source, not compared on data): upstream also
# deletes about 150 unit words ("cm", "mph", "apple", ...) in its normalisation, tries a third check (its
# own lower-casing normalisation, then sympy.simplify of the difference for short expressions), skips its
# math-verify step for answers over 128 characters that repeat themselves, and gives math-verify 1 s where
# we give it 5 s. Multiple-choice answers: upstream grades the box with the same math grader, which accepts
# the gold letter as C, (C), \text{C}, \textbf{(C)} or in lower case; `score_boxed_choice` accepts these
# (and \mathrm{}, \mathbf{}) and nothing else, where upstream's equivalence steps may accept a few more.

_BOXED = "\\boxed"


def last_boxed_content(text: str) -> str | None:
    """The text inside the last ``\\boxed{...}`` (braces matched), or None.

    Only the last ``\\boxed`` counts: when it is not followed directly by ``{`` (``\\boxed 5``) or its braces
    never close, there is no answer, even if an earlier box is well formed (as upstream's reader).
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    open_at = start + len(_BOXED)
    if not text.startswith("{", open_at):
        return None
    depth = 0
    for match in _BRACE.finditer(text, open_at):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1 : match.start()]
    return None


_BRACE = re.compile(r"[{}]")
_WHOLE_TEXT = re.compile(r"^\\text\{(.+?)\}$")
_TRAILING_TEXT = re.compile(r"\\text\{.*?\}$")
_SQRT_BARE = re.compile(r"\\sqrt([^{\\])")
_FRAC_BARE = re.compile(r"\\frac([^{\\])([^{\\])|\\frac([^{\\])(?=\{)")
_INT_SLASH_INT = re.compile(r"(-?\d+)/(-?\d+)")


def normalize_boxed_answer(answer: str) -> str:
    """A MATH-style normal form of a boxed answer (Hendrycks et al.'s rules, as upstream's grader uses).

    Unwraps ``\\text{...}``, drops line breaks, ``\\!``, ``\\left``/``\\right``, degree signs, ``\\$``, ``\\%``
    and a trailing ``\\text{unit}``; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``x = 5`` -> ``5`` (a name of at
    most two characters); ``.5`` -> ``0.5``; ``\\sqrt3`` -> ``\\sqrt{3}``; ``\\frac12`` -> ``\\frac{1}{2}``;
    ``0.5`` and ``1/2`` -> ``\\frac{1}{2}``; spaces removed.
    """
    answer = answer.strip()
    whole_text = _WHOLE_TEXT.match(answer)
    if whole_text:
        answer = whole_text.group(1).strip()
    answer = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    answer = answer.replace("tfrac", "frac").replace("dfrac", "frac").replace("bmatrix", "pmatrix")
    answer = answer.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    answer = answer.replace("\\left", "").replace("\\right", "")
    without_unit = _TRAILING_TEXT.sub("", answer).strip()
    if without_unit:
        answer = without_unit
    for mark in ("^{\\circ}", "^\\circ", "\\$", "\\%"):
        answer = answer.replace(mark, "")
    if "\\text{ " in answer:
        answer = answer.split("\\text{ ")[0]
    answer = answer.replace(" .", " 0.").replace("{.", "{0.")
    if answer.startswith("."):
        answer = "0" + answer
    name, equals, value = answer.partition("=")
    if equals and "=" not in value and len(name) <= 2:
        answer = value
    answer = _SQRT_BARE.sub(r"\\sqrt{\1}", answer).replace(" ", "")
    answer = _FRAC_BARE.sub(lambda m: f"\\frac{{{m[1]}}}{{{m[2]}}}" if m[1] else f"\\frac{{{m[3]}}}", answer)
    if answer == "0.5":
        return "\\frac{1}{2}"
    fraction = _INT_SLASH_INT.fullmatch(answer)
    if fraction and answer == f"{int(fraction[1])}/{int(fraction[2])}":
        return f"\\frac{{{fraction[1]}}}{{{fraction[2]}}}"
    return answer


def _as_latex(text: str) -> str:
    return text if "$" in text else f"${text}$"


def _latex_equal(given: str, gold: str) -> bool:
    """math-verify on two bare answers, each read as its first LaTeX (or plain) expression, no fallback."""
    config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    options = dict(extraction_config=config, fallback_mode="no_fallback", extraction_mode="first_match")
    gold_parsed = parse(_as_latex(gold), **options)
    given_parsed = parse(_as_latex(given), **options)
    return bool(gold_parsed and given_parsed and verify(gold_parsed, given_parsed))


def boxed_answers_match(given: str, ground_truth: str) -> bool:
    """Whether a boxed answer matches the ground truth (a ground truth holding a box is read from it)."""
    if _BOXED in ground_truth:
        boxed_gold = last_boxed_content(ground_truth)
        if boxed_gold is None:
            raise ValueError(f"ground truth {ground_truth!r} holds an unreadable \\boxed")
        ground_truth = boxed_gold
    if normalize_boxed_answer(given) == normalize_boxed_answer(ground_truth):
        return True
    return _latex_equal(given, ground_truth)


def score_boxed_math(response: str, ground_truth: str, *, strip_special_tokens: bool = False) -> float:
    """1.0 if the last ``\\boxed{}`` of the response matches the ground truth (`boxed_answers_match`).

    No box, an unclosed box, or a wrong answer: 0.0. Trailing special tokens cannot change a boxed answer,
    so `strip_special_tokens` is accepted and has no effect.
    """
    del strip_special_tokens  # the box is read by its braces
    given = last_boxed_content(response)
    if given is None or not given.strip():
        return 0.0
    return 1.0 if boxed_answers_match(given, ground_truth) else 0.0


# C, (C), \text{C}, \textbf{(C)}, \mathrm{C}, in either case; nothing else in the box.
_LETTER_FORMS = r"\(\s*([A-Ja-j])\s*\)|([A-Ja-j])"
_BOXED_LETTER_ONLY = re.compile(
    rf"\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{{\s*(?:{_LETTER_FORMS})\s*\}}|(?:{_LETTER_FORMS}))\s*"
)


def score_boxed_choice(response: str, ground_truth: str, *, strip_special_tokens: bool = True) -> float:
    """Multiple-choice letters, boxed only: 1.0 if the last ``\\boxed{}`` holds just the gold letter.

    ``\\boxed{C}``, ``\\boxed{(c)}``, ``\\boxed{\\text{C}}`` count; "ANSWER: C" or "the answer is (C)"
    without a box score 0.0, as do a box with more than the letter and an earlier box followed by a
    later one. `strip_special_tokens` is accepted and has no effect (the box is read by its braces).
    """
    del strip_special_tokens
    gold = _gold_letter(ground_truth)
    given = last_boxed_content(response)
    if given is None:
        return 0.0
    match = _BOXED_LETTER_ONLY.fullmatch(given)
    if match is None:
        return 0.0
    letter = next(group for group in match.groups() if group)
    return 1.0 if letter.upper() == gold else 0.0


Grader = Callable[..., float]  # (response, ground_truth, *, strip_special_tokens=...) -> float; see the top

GRADERS: dict[str, Grader] = {
    "luffy_think": score_luffy,
    "math": score_math,
    "choice": score_choice,
    "boxed_math": score_boxed_math,
    "boxed_choice": score_boxed_choice,
}


def resolve_grader(spec: str | Grader) -> Grader:
    """A grader from a registered name, an importable "module:function" string, or a function.

    "module:function" lets a caller (or a test) plug in a grader without touching GRADERS; in pool
    mode the module must be importable in the worker processes (they get the parent's sys.path).
    """
    if callable(spec):
        return spec
    if spec in GRADERS:
        return GRADERS[spec]
    if ":" in spec:
        module_name, _, function_name = spec.partition(":")
        function = getattr(importlib.import_module(module_name), function_name, None)
        if not callable(function):
            raise ValueError(f"grader {spec!r}: {module_name} has no function {function_name!r}")
        return function
    raise ValueError(f"unknown grader {spec!r}; use one of {sorted(GRADERS)} or 'module:function'")


def bind_options(grader: Grader, *, strip_special_tokens: bool) -> Callable[[str, str], float]:
    """`grader` with the grading options fixed: a (response, ground_truth) -> float function.

    A plug-in grader ("module:function") need not take `strip_special_tokens`: then it gets the text as
    decoded, which is the default; asking it to strip is refused here, before any item is graded.
    """
    try:
        parameters = inspect.signature(grader).parameters
    except (TypeError, ValueError):  # a builtin or C function without a signature
        parameters = {}
    takes_option = "strip_special_tokens" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    if takes_option:
        return functools.partial(grader, strip_special_tokens=strip_special_tokens)
    if strip_special_tokens:
        name = getattr(grader, "__qualname__", repr(grader))
        raise ValueError(
            f"grader {name} takes no strip_special_tokens keyword, so reward.strip_special_tokens=true "
            "cannot apply to it: add `*, strip_special_tokens: bool = False` to it, or set the option false"
        )
    return grader


def grader_spec(spec: str | Grader) -> str:
    """The picklable name of a grader, checked here so that a typo fails in the caller, not in a worker."""
    if callable(spec):
        name = f"{spec.__module__}:{spec.__qualname__}"
        if "<" in name:  # lambdas and nested functions cannot be imported by a worker
            raise ValueError(f"grader {name} is not importable; use a module-level function")
        return name
    resolve_grader(spec)
    return spec
