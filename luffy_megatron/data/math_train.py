"""MATH (``train/math_test5000.jsonl``) -> LUFFY training format, with the human solution as demonstration.

The stand-in for LUFFY's OpenR1 traces: ``target`` = ``"<think>\\n" + solution + "\\n</think>\\n" +
"The final answer is $\\boxed{answer}$."``, where the answer is the last ``\\boxed{}`` of the solution and is
also the ground truth. Every MATH-500 problem is excluded (matched by normalised problem text), since
MATH-500 is an evaluation benchmark and the 5000-problem file contains all of it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from luffy_megatron.data.answers import last_boxed, normalize_problem
from luffy_megatron.data.errors import BadRowReport, DataError, row_error_message
from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT, make_prompt
from luffy_megatron.data.readers import load_json_rows, read_benchmark

logger = logging.getLogger(__name__)


def math_demonstration(solution: str, answer: str) -> str:
    return f"<think>\n{solution.strip()}\n</think>\nThe final answer is $\\boxed{{{answer}}}$."


@dataclass
class MathConversionStats:
    num_source_rows: int = 0
    num_written: int = 0
    num_excluded_math500: int = 0
    num_math500_problems: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (no \boxed answer, failed self-check, ...)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source_rows": self.num_source_rows,
            "written": self.num_written,
            "excluded_math500": self.num_excluded_math500,
            "math500_problems": self.num_math500_problems,
            "skipped": dict(self.skipped),
        }


def _bad_field(row: dict[str, Any]) -> tuple[str, str] | None:
    """(field, what is wrong) for the first of ``problem``/``solution`` that is not a non-empty string."""
    for name in ("problem", "solution"):
        value = row.get(name)
        if value is None:
            return name, "missing"
        if not isinstance(value, str):
            return name, f"wrong type: expected str, got {type(value).__name__}"
        if not value.strip():
            return name, "empty string"
    return None


def _training_row(
    problem: str, demo: str, answer: str, system_prompt: str, extra_info: dict[str, Any]
) -> dict[str, Any]:
    return {
        "data_source": "",  # as LUFFY's training rows
        "prompt": make_prompt(problem, system_prompt),
        "target": [{"role": "assistant", "content": demo}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": extra_info,
    }


def convert_math(
    src: str | Path,
    math500: str | Path | None,
    *,
    system_prompt: str = LUFFY_SYSTEM_PROMPT,
    verify: Callable[[str, str], float] | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[dict[str, Any]], MathConversionStats]:
    """Rows of LUFFY training parquet from a MATH jsonl (``problem``, ``solution``, ``level``, ``type``).

    ``math500``: the MATH-500 jsonl whose problems are excluded (None: exclude nothing).
    ``verify(response, gold) -> score``: if given, a row is kept only when its demonstration, as the trainer
    will see it (without the leading ``"<think>\\n"``), scores 1.0 -- LUFFY likewise kept only traces that
    pass math-verify, since a failing demonstration gets reward 0 and is pushed away from.
    A row without ``problem``/``solution`` is a DataError (or, with ``skip_bad_rows``, a counted skip);
    a solution without ``\\boxed{}`` is counted as skipped.
    """
    src = Path(src)
    stats = MathConversionStats()
    excluded_keys: set[str] = set()
    if math500 is not None:
        excluded_keys = {normalize_problem(item["problem"]) for item in read_benchmark(math500)}
        stats.num_math500_problems = len(excluded_keys)

    report = BadRowReport(path=str(src))
    rows = load_json_rows(src, report if skip_bad_rows else None)
    stats.num_source_rows = len(rows) + report.num_bad_rows
    out: list[dict[str, Any]] = []
    for row_index, row in rows:
        bad = _bad_field(row)
        if bad:
            if not skip_bad_rows:
                raise DataError(row_error_message(src, row_index, *bad))
            report.add(row_index, *bad)
            continue
        problem, solution = row["problem"], row["solution"]
        if normalize_problem(problem) in excluded_keys:
            stats.num_excluded_math500 += 1
            continue
        answer = last_boxed(solution)
        if not answer:
            stats.skipped["no \\boxed{} answer in the solution"] += 1
            continue
        demo = math_demonstration(solution, answer)
        if verify is not None and verify(demo.removeprefix("<think>\n"), answer) != 1.0:
            stats.skipped["demonstration fails the reward against its own answer"] += 1
            continue
        extra_info = {"split": "train", "index": len(out), "source_index": row.get("idx", row_index)}
        out.append(_training_row(problem, demo, answer, system_prompt, extra_info))
    if report.num_bad_rows:
        report.log()
        stats.skipped.update({f"malformed: {reason}": n for reason, n in report.reasons.items()})
    stats.num_written = len(out)
    if math500 is not None and stats.num_excluded_math500 < stats.num_math500_problems:
        logger.warning(
            "%d of %d MATH-500 problems were not found in %s (nothing to exclude for them)",
            stats.num_math500_problems - stats.num_excluded_math500,
            stats.num_math500_problems,
            src,
        )
    if not out:
        raise DataError(f"{src}: no rows left to write ({stats.as_dict()})")
    return out, stats
