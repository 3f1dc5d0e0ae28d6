"""A synthetic arithmetic task with step-by-step ``<think>`` demonstrations and verifiable answers.

Each problem is an expression such as ``47 + 382 * 15 - 906`` (no parentheses: multiplication first, then
left to right). The demonstration works it out one operation at a time -- multiplications split by place
value -- inside ``<think>\\n ... </think>\\n`` and ends with ``The final answer is $\\boxed{4871}$.``, so
LUFFY's reward (grade the text after ``</think>`` against ``$gold$``) accepts it. Difficulty is set by the
number of digits per operand, the number of operands and the operators allowed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT, make_prompt

OPERATORS = ("+", "-", "*")
_LATEX_OP = {"+": "+", "-": "-", "*": "\\times"}

DATA_SOURCE = "synthetic_arith"


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty controls. Operands have ``min_digits..max_digits`` digits; an expression has
    ``min_operands..max_operands`` operands joined by operators drawn from ``ops``."""

    min_digits: int = 2
    max_digits: int = 4
    min_operands: int = 2
    max_operands: int = 3
    ops: tuple[str, ...] = OPERATORS

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"digits {self.min_digits}..{self.max_digits}: need 1 <= min <= max")
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"operands {self.min_operands}..{self.max_operands}: need 2 <= min <= max")
        unknown = [op for op in self.ops if op not in OPERATORS]
        if unknown or not self.ops:
            raise ValueError(f"ops {list(self.ops)}: expected a non-empty subset of {list(OPERATORS)}")


@dataclass(frozen=True)
class ArithmeticProblem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def text(self, latex: bool = False) -> str:
        parts = [str(self.operands[0])]
        for op, value in zip(self.ops, self.operands[1:]):
            parts += [_LATEX_OP[op] if latex else op, str(value)]
        return " ".join(parts)

    @property
    def answer(self) -> int:
        return evaluate(self.operands, self.ops)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def evaluate(operands: tuple[int, ...] | list[int], ops: tuple[str, ...] | list[str]) -> int:
    """Multiplication first, then addition and subtraction from left to right."""
    values, pending = [operands[0]], []
    for op, value in zip(ops, operands[1:]):
        if op == "*":
            values[-1] *= value
        else:
            pending.append(op)
            values.append(value)
    result = values[0]
    for op, value in zip(pending, values[1:]):
        result = _apply(result, op, value)
    return result


def _expression(values: list[int], ops: list[str]) -> str:
    parts = [str(values[0])]
    for op, value in zip(ops, values[1:]):
        parts += [op, str(value)]
    return " ".join(parts)


def _multiplication_step(a: int, b: int) -> str:
    """``382 * 15 = 382 * 10 + 382 * 5 = 3820 + 1910 = 5730`` (place-value split of the second factor)."""
    product = a * b
    digits = str(abs(b))
    if len(digits) == 1:
        return f"{a} * {b} = {product}"
    pieces = [(int(d) * 10 ** (len(digits) - 1 - i)) for i, d in enumerate(digits) if d != "0"]
    if b < 0:
        pieces = [-p for p in pieces]
    if len(pieces) == 1:
        return f"{a} * {b} = {product}"
    split = " + ".join(f"{a} * {p}" for p in pieces)
    partial = " + ".join(str(a * p) for p in pieces)
    return f"{a} * {b} = {split} = {partial} = {product}"


def worked_solution(problem: ArithmeticProblem, step_result: Callable[[int, int], int] | None = None) -> str:
    """The demonstration: ``"<think>\\n"`` + one line per operation + ``"</think>\\n"`` + the boxed answer.

    `step_result(true_result, step)`, if given, writes another number as the result of each addition or
    subtraction step (format-only demonstrations: the same text, numbers that need not be right)."""
    values, ops = list(problem.operands), list(problem.ops)
    lines = [f"We need to evaluate {_expression(values, ops)}."]
    if "*" in ops and any(op != "*" for op in ops):
        lines.append("Multiplication comes before addition and subtraction; then we work from left to right.")
    step = 0
    while "*" in ops:  # multiplications, left to right
        i = ops.index("*")
        step += 1
        result = values[i] * values[i + 1]
        line = f"Step {step}: {_multiplication_step(values[i], values[i + 1])}."
        values[i : i + 2], ops[i : i + 1] = [result], []
        if ops:
            line += f" The expression becomes {_expression(values, ops)}."
        lines.append(line)
    while ops:  # additions and subtractions, left to right
        step += 1
        result = _apply(values[0], ops[0], values[1])
        if step_result is not None:
            result = step_result(result, step)
        line = f"Step {step}: {values[0]} {ops[0]} {values[1]} = {result}."
        values[0:2], ops[0:1] = [result], []
        if ops:
            line += f" The expression becomes {_expression(values, ops)}."
        lines.append(line)
    answer = values[0]
    assert step_result is not None or answer == problem.answer, (problem, answer)
    lines.append(f"So the value of the expression is {answer}.")
    return (
        "<think>\n" + "\n".join(lines) + "\n</think>\n"
        f"The value of ${problem.text(latex=True)}$ is ${answer}$.\n"
        f"The final answer is $\\boxed{{{answer}}}$."
    )


def rewrite_chain(problem: ArithmeticProblem) -> str:
    """The concise demonstration of a sum or difference chain (no multiplication): the expression, then one
    ``= ...`` line per operation, each replacing the first two operands by their result, then the boxed answer
    after ``</think>`` (the chat template's ``<think>\\n`` opens the response)::

        3 + 5 + 7
        = 8 + 7
        = 15
        </think>
        \\boxed{15}

    Each line is one two-operand fact plus a copy of the rest, so a model that knows the facts can learn the
    procedure from a few hundred of these."""
    if "*" in problem.ops:
        raise ValueError(f"rewrite_chain is for + and - only, got {problem.text()}")
    values, ops = list(problem.operands), list(problem.ops)
    lines = [_expression(values, ops)]
    while ops:
        values[0:2], ops[0:1] = [_apply(values[0], ops[0], values[1])], []
        lines.append("= " + _expression(values, ops))
    assert values[0] == problem.answer, (problem, values)
    return "\n".join(lines) + f"\n</think>\n\\boxed{{{values[0]}}}"


def problem_statement(problem: ArithmeticProblem) -> str:
    return f"Compute ${problem.text(latex=True)}$."


def sample_problem(rng: random.Random, config: ArithmeticConfig) -> ArithmeticProblem:
    num_operands = rng.randint(config.min_operands, config.max_operands)
    operands = []
    for _ in range(num_operands):
        digits = rng.randint(config.min_digits, config.max_digits)
        low = 10 ** (digits - 1) if digits > 1 else 0
        operands.append(rng.randint(low, 10**digits - 1))
    ops = tuple(rng.choice(config.ops) for _ in range(num_operands - 1))
    return ArithmeticProblem(tuple(operands), ops)


def generate_problems(
    num_problems: int, config: ArithmeticConfig, rng: random.Random, exclude: set[str] | None = None
) -> list[ArithmeticProblem]:
    """``num_problems`` distinct problems not in ``exclude`` (their ``text()``); ``exclude`` is extended."""
    seen = exclude if exclude is not None else set()
    problems: list[ArithmeticProblem] = []
    attempts = 0
    while len(problems) < num_problems:
        attempts += 1
        if attempts > 100 * num_problems + 1000:
            raise ValueError(
                f"found only {len(problems)} distinct problems of the {num_problems} asked for with {config}; "
                "allow more digits, operands or operators"
            )
        problem = sample_problem(rng, config)
        key = problem.text()
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return problems


def luffy_row(
    problem: ArithmeticProblem, index: int, *, split: str, with_target: bool, system_prompt: str, data_source: str
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "data_source": data_source,
        "prompt": make_prompt(problem_statement(problem), system_prompt),
    }
    if with_target:
        row["target"] = [{"role": "assistant", "content": worked_solution(problem)}]
    row.update(
        ability="math",
        reward_model={"style": "rule", "ground_truth": str(problem.answer)},
        extra_info={"split": split, "index": index},
    )
    return row


def generate_luffy_rows(
    num_train: int,
    num_val: int,
    config: ArithmeticConfig,
    *,
    seed: int = 0,
    system_prompt: str = LUFFY_SYSTEM_PROMPT,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """LUFFY-format training rows (with ``target``) and validation rows (without), disjoint problems.

    Training rows use ``data_source=""`` as LUFFY's own training file does; validation rows use
    ``"synthetic_arith"`` so they show up as ``val/test_score/synthetic_arith``.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    train = generate_problems(num_train, config, rng, seen)
    val = generate_problems(num_val, config, rng, seen)
    train_rows = [
        luffy_row(p, i, split="train", with_target=True, system_prompt=system_prompt, data_source="")
        for i, p in enumerate(train)
    ]
    val_rows = [
        luffy_row(p, i, split="test", with_target=False, system_prompt=system_prompt, data_source=DATA_SOURCE)
        for i, p in enumerate(val)
    ]
    return train_rows, val_rows
