"""Answer-string helpers: the last ``\\boxed{}`` of a solution, and normalised forms for comparisons.

These are for reading data and for checking data against data (MATH-500 exclusion, LUFFY ground truths
against raw benchmark answers). Grading model outputs is the reward package's job (math-verify).
"""

from __future__ import annotations

import re

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` with balanced braces, or None.

    Nested braces are balanced (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); an unclosed box is ignored.
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        depth = 1
        start = match.end()
        for pos in range(start, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos].strip()
    return None


_MATH_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def strip_dollars(answer: str) -> str:
    """Inline-math answers as bare LaTeX (OlympiadBench writes its final answers in ``$...$``):
    ``"$2n$"`` -> ``"2n"``, ``"$69$,$84$"`` -> ``"69,84"``, ``"$(-\\infty, 0)$."`` -> ``"(-\\infty, 0)"``.
    Only an answer that starts and ends with ``$`` (a trailing period allowed) is touched; ``\\$`` is kept."""
    answer = answer.strip()
    if answer.endswith("$.") and answer.startswith("$"):
        answer = answer[:-1]
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$") and not answer.endswith("\\$"):
        answer = _MATH_DOLLAR_RE.sub("", answer).strip()
    return answer


def format_number(value: float | int) -> str:
    """Numbers stored as floats (AMC's ``142.0``) as the answer a person would write (``142``)."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a numeric answer")
    if isinstance(value, int):
        return str(value)
    if value.is_integer():
        return str(int(value))
    return repr(value)


_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")


def normalize_answer(answer: str) -> str:
    """A comparison key for two spellings of the same gold answer from different copies of a benchmark.

    Strips surrounding ``$``, whitespace and a degree sign, and writes numbers canonically, so
    ``"142.0"`` == ``"142"``, ``"$2n$"`` == ``"2n"``, ``"336^\\circ"`` == ``"336"``. It is not a grader.
    """
    text = strip_dollars(str(answer))
    text = _DEGREE_RE.sub("", text)
    text = "".join(text.split())
    try:
        number = float(text)
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):
        return text
    return format_number(number)


def normalize_problem(problem: str) -> str:
    """A key to match the same problem across files: whitespace collapsed, case folded."""
    return " ".join(problem.split()).casefold()
