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
its docstring).

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

from math_verify import parse, verify

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


Grader = Callable[..., float]  # (response, ground_truth, *, strip_special_tokens=...) -> float; see the top

GRADERS: dict[str, Grader] = {
    "luffy_think": score_luffy,
    "math": score_math,
    "choice": score_choice,
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
