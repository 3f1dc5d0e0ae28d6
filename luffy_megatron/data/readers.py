"""Readers for LUFFY's parquet format and for the raw benchmark files, with row-level validation.

Two kinds of input:

* LUFFY / verl parquet (``read_luffy_parquet``): one row per problem,
  ``data_source`` (str, may be ""), ``prompt`` = [{role, content}, ...] (LUFFY: [system, user]),
  ``target`` = [{"role": "assistant", "content": "<think>\\n..."}] (training rows only: the off-policy
  demonstration), ``ability``, ``reward_model`` = {ground_truth, style}, ``extra_info`` = {split, index}.
  Validation files are the same without ``target``. Optional: a column of the teacher's token probabilities
  (``data.target_probs_key``, upstream ``target_ds_qwen_7b_probs``): per row a list of floats in [0, 1], one
  per token of the tokenized target (without its leading ``"<think>\\n"``) plus one for the EOS the rollout
  appends, as upstream's ``rl_dataset_with_target.py`` asserts. Read by `read_luffy_parquet` only when asked
  (``target_probs_key``): it is kept as one float32 array per row, not as Python lists.
* Raw benchmark files (``read_benchmark``): each upstream file keeps its own answer field (AMC floats,
  Minerva's answer inside the solution's last ``\\boxed{}``, OlympiadBench's list of ``$...$`` answers,
  MMLU-Pro's option list and letter). The registry ``BENCHMARKS`` knows each file's rules; every reader
  returns ``{"data_source", "problem", "answer", "index"}`` dicts with the answer as a string.

Files are loaded with Hugging Face ``datasets`` (parquet) or ``json`` (jsonl / a JSON list: parsing them
line by line is what lets an error name the line). Every row is validated: a malformed row raises
`DataError` naming the file, the row index (0-based, in file order) and the field, or, with
``skip_bad_rows=True``, is counted in a `BadRowReport` (returned and logged). A missing, empty or unreadable
file is always a `DataError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from luffy_megatron.data.answers import format_number, last_boxed, strip_dollars
from luffy_megatron.data.errors import BadRowReport, DataError, row_error_message

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data/reference folder: ``$LUFFY_SHARED_DIR``, else ``<repo>/../shared``."""
    return Path(os.environ.get("LUFFY_SHARED_DIR") or REPO_ROOT.parent / "shared")


def default_eval_root() -> Path:
    """Where the raw benchmark files live unless a caller passes ``data_root``."""
    return shared_dir() / "data" / "eval"


# --------------------------------------------------------------------------------------------- file loading


@contextlib.contextmanager
def datasets_progress_bars_off() -> Iterator[None]:
    # datasets prints a "Generating train split" bar per file; our callers print their own counts.

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")


def load_parquet_rows(path: str | Path, *, exclude_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """All rows of a parquet file as dicts (through ``datasets``); DataError if it is not readable parquet.
    ``exclude_columns`` are not loaded (e.g. the large per-token teacher probabilities, read apart)."""
    path = Path(path)
    _check_file(path)
    try:
        # The footer first: it names a torn or foreign file clearly, and datasets fails on 0-row files.
        num_rows = pq.read_metadata(path).num_rows
        if num_rows == 0:
            return []
        names = pq.read_schema(path).names
        columns = [c for c in names if c not in set(exclude_columns)]
        kwargs = {"columns": columns} if len(columns) < len(names) else {}
        with datasets_progress_bars_off():
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # pyarrow / datasets raise many types for a torn or foreign file
        cause = exc.__cause__ or exc  # datasets wraps the pyarrow error in a generic DatasetGenerationError
        raise DataError(f"{path}: cannot read as parquet ({type(cause).__name__}: {cause})") from exc
    if len(dataset) != num_rows:
        raise DataError(f"{path}: the footer says {num_rows} rows but {len(dataset)} were read")
    return dataset.to_list()


def load_json_rows(path: str | Path, report: BadRowReport | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(row_index, row)`` pairs of a JSON-lines file or of a file holding one JSON list.

    Blank lines are not rows. A line that is not valid JSON, or a record that is not an object, is a bad row:
    an error, or counted in ``report`` when one is given (the caller's ``skip_bad_rows``).
    """
    path = Path(path)
    _check_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise DataError(f"{path}: file is empty (whitespace only)")

    records: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        records = list(enumerate(parsed))
    else:
        row_index = 0
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((row_index, json.loads(line)))
            except json.JSONDecodeError as exc:
                problem = f"line {line_number} is not valid JSON ({exc.msg} at column {exc.colno})"
                if report is None:
                    raise DataError(row_error_message(path, row_index, "<json>", problem)) from exc
                report.add(row_index, "<json>", "not valid JSON")
            row_index += 1

    rows: list[tuple[int, dict[str, Any]]] = []
    for row_index, record in records:
        if isinstance(record, dict):
            rows.append((row_index, record))
            continue
        problem = f"expected a JSON object per record, got {type(record).__name__}"
        if report is None:
            raise DataError(row_error_message(path, row_index, "<record>", problem))
        report.add(row_index, "<record>", problem)
    return rows


def _load_any(path: Path, report: BadRowReport | None) -> list[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        return list(enumerate(load_parquet_rows(path)))
    if path.suffix in (".jsonl", ".json"):
        return load_json_rows(path, report)
    raise DataError(f"{path}: unknown file type '{path.suffix}' (expected .parquet, .jsonl or .json)")


# ------------------------------------------------------------------------------------------ row validation


class _RowProblem(Exception):
    """One field of one row is unusable; turned into a DataError (or a counted skip) by the row loop."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field_name = field_name
        self.problem = problem


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _RowProblem(name, "missing")
    return value


def _require_str(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if value is None:
        raise _RowProblem(name, "missing")
    if not isinstance(value, str):
        raise _RowProblem(name, f"wrong type: expected str, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _RowProblem(name, "empty string")
    return value


def _answer_str(value: Any, name: str) -> str:
    """A benchmark answer: a non-empty string, or a number written as a person would (142.0 -> "142")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    return _require_str(value, name).strip()


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if value is None:
        raise _RowProblem(name, "missing")
    if not isinstance(value, list):
        raise _RowProblem(name, f"wrong type: expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise _RowProblem(name, "empty message list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RowProblem(f"{name}[{i}]", f"wrong type: expected {{role, content}}, got {_type_name(message)}")
        role = _require_str(message.get("role"), f"{name}[{i}].role")
        content = _require_str(message.get("content"), f"{name}[{i}].content", allow_empty=True)
        messages.append({"role": role, "content": content})
    return messages


def _run_rows(
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    parse_row: Callable[[dict[str, Any], int], Any],
    report: BadRowReport,
    skip_bad_rows: bool,
) -> list[Any]:
    out = []
    for row_index, row in rows:
        try:
            out.append(parse_row(row, row_index))
        except _RowProblem as problem:
            if not skip_bad_rows:
                raise DataError(row_error_message(path, row_index, problem.field_name, problem.problem)) from None
            report.add(row_index, problem.field_name, problem.problem)
    if not out:
        if report.num_bad_rows:
            raise DataError(f"all rows are malformed: {report.summary()}; first: {' | '.join(report.examples)}")
        raise DataError(f"{path}: contains no rows")
    report.log()
    return out


# ------------------------------------------------------------------------------------------ LUFFY parquet


@dataclass(frozen=True)
class Example:
    """One validated row of a LUFFY / verl parquet file.

    ``demo`` is the off-policy demonstration exactly as stored (``target[0].content``, still starting with
    ``"<think>\\n"``), or None for rows without ``target``. The tokenizer strips the leading ``"<think>\\n"``.
    """

    prompt: list[dict[str, str]]
    ground_truth: str
    data_source: str
    demo: str | None
    ability: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)
    row_index: int = -1
    # the teacher's probability of each target token and of the EOS after it (float32, validated in [0, 1]),
    # or None when not read (see `read_luffy_parquet`'s ``target_probs_key``) or null in the file
    target_probs: Any = field(default=None, compare=False, repr=False)

    @property
    def problem(self) -> str:
        """The text of the last user message (the problem statement without the system prompt)."""
        return next(m["content"] for m in reversed(self.prompt) if m["role"] == "user")


def _parse_luffy_row(row: dict[str, Any], row_index: int, *, require_target: bool) -> Example:
    data_source = _require_str(_require(row, "data_source"), "data_source", allow_empty=True)
    prompt = _messages(row.get("prompt"), "prompt")
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise _RowProblem("prompt", "no user message with non-empty content")

    reward_model = _require(row, "reward_model")
    if not isinstance(reward_model, dict):
        expected = "expected {ground_truth, style}"
        raise _RowProblem("reward_model", f"wrong type: {expected}, got {_type_name(reward_model)}")
    ground_truth = _require_str(reward_model.get("ground_truth"), "reward_model.ground_truth")

    demo = None
    target = row.get("target")
    if target is None and require_target:
        raise _RowProblem("target", "missing (training rows need the demonstration)")
    if target is not None:
        target_messages = _messages(target, "target")
        demo = target_messages[0]["content"]
        if not demo.strip():
            raise _RowProblem("target[0].content", "empty string")

    ability = row.get("ability")
    ability = "" if ability is None else _require_str(ability, "ability", allow_empty=True)
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        raise _RowProblem("extra_info", f"wrong type: expected a struct, got {_type_name(extra_info)}")
    return Example(
        prompt=prompt,
        ground_truth=ground_truth,
        data_source=data_source,
        demo=demo,
        ability=ability,
        extra_info=dict(extra_info or {}),
        row_index=row_index,
    )


def luffy_row_problem(row: dict[str, Any], *, require_target: bool) -> tuple[str, str] | None:
    """``(field, problem)`` when `read_luffy_parquet` would refuse ``row``, else None (for callers that check
    rows one at a time, e.g. a download being converted)."""
    try:
        _parse_luffy_row(row, -1, require_target=require_target)
    except _RowProblem as problem:
        return problem.field_name, problem.problem
    return None


TARGET_PROBS_SETTING = "algo.use_off_policy_probs"


def load_target_probs_column(path: str | Path, key: str) -> list[Any] | None:
    """Column ``key`` of a parquet file as one float32 numpy array per row (None for a null row), or None
    when the file has no such column. Values are not range-checked here (`read_luffy_parquet` does, per
    row); null elements become NaN. A column that is not a list of numbers is a DataError naming file and column."""
    path = Path(path)
    _check_file(path)
    try:
        if key not in pq.read_schema(path).names:
            return None
        column = pq.read_table(path, columns=[key]).column(key).combine_chunks()
    except Exception as exc:
        raise DataError(f"{path}: cannot read column '{key}' as parquet ({type(exc).__name__}: {exc})") from exc
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    ):
        raise DataError(
            f"{path}: column '{key}' has type {kind}; expected a list of floats per row (the teacher's probability "
            f"of each target token, then of EOS)"
        )
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).cast(pa.float32()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    starts = np.concatenate([[0], np.cumsum(lengths)])
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[starts[i] : starts[i + 1]] if valid[i] else None for i in range(len(column))]


def _check_target_probs(probs: Any, key: str) -> Any:
    """One row's teacher probabilities: every value a finite float in [0, 1]."""
    bad = np.flatnonzero(~(np.isfinite(probs) & (probs >= 0.0) & (probs <= 1.0)))
    if bad.size:
        j = int(bad[0])
        value = "null or NaN" if np.isnan(probs[j]) else repr(float(probs[j]))
        hint = (
            " (-1 is upstream's in-memory padding: store exactly one probability per target token plus one for EOS)"
            if probs[j] == -1
            else ""
        )
        raise _RowProblem(
            key,
            f"{bad.size} of {probs.size} values are not probabilities in [0, 1] (first: position {j}: {value}){hint}",
        )
    if probs.size == 0:
        raise _RowProblem(key, "empty list (expected one probability per target token plus one for EOS)")
    return probs


def read_luffy_parquet(
    path: str | Path,
    *,
    require_target: bool,
    skip_bad_rows: bool = False,
    target_probs_key: str | None = None,
    require_target_probs: bool = False,
) -> tuple[list[Example], BadRowReport]:
    """Validated rows of a LUFFY-format parquet file (training: ``require_target=True``; validation: False).

    ``target_probs_key``: the column of teacher token probabilities to read into `Example.target_probs` when
    the file has it (rows with a target only; each value checked to be in [0, 1]). ``require_target_probs``
    (``algo.use_off_policy_probs=true``): a file without that column, or a row with a target and no
    probabilities, is an error. Without a key the column is not read at all.

    Raises DataError for a missing / empty / unreadable file, a file with no rows, and (unless
    ``skip_bad_rows``) the first malformed row. With ``skip_bad_rows`` the report counts skipped rows per reason.
    """
    path = Path(path)
    if require_target_probs and not target_probs_key:
        raise ValueError("require_target_probs=True needs target_probs_key (data.target_probs_key)")
    probs_by_row = None
    if target_probs_key:
        probs_by_row = load_target_probs_column(path, target_probs_key)
        if probs_by_row is None and require_target_probs:
            raise DataError(
                f"{path}: no column '{target_probs_key}' (data.target_probs_key), but {TARGET_PROBS_SETTING}=true "
                f"needs the teacher's token probabilities of every demonstration; add that column, point "
                f"data.target_probs_key at the right one, or set {TARGET_PROBS_SETTING}=false"
            )
    rows = list(enumerate(load_parquet_rows(path, exclude_columns=[target_probs_key] if target_probs_key else ())))
    report = BadRowReport(path=str(path), num_rows_read=len(rows))

    def parse(row: dict[str, Any], row_index: int) -> Example:
        example = _parse_luffy_row(row, row_index, require_target=require_target)
        if probs_by_row is None or example.demo is None:
            return example
        probs = probs_by_row[row_index]
        if probs is None:
            if require_target_probs:
                raise _RowProblem(
                    target_probs_key,
                    f"missing ({TARGET_PROBS_SETTING}=true needs the teacher's "
                    "token probabilities of every demonstration)",
                )
            return example
        return dataclasses.replace(example, target_probs=_check_target_probs(probs, target_probs_key))

    return _run_rows(path, rows, parse, report, skip_bad_rows), report


# ------------------------------------------------------------------------------------------- benchmarks

# A benchmark row reader: raw row -> (problem, answer). It raises _RowProblem for a malformed row.
RowReader = Callable[[dict[str, Any]], "tuple[str, str]"]


def _problem_answer(row: dict[str, Any]) -> tuple[str, str]:
    """aime24, aime25, amc, amc23, math500: ``problem`` and ``answer`` (a string or a float)."""
    return _require_str(row.get("problem"), "problem"), _answer_str(row.get("answer"), "answer")


def _minerva(row: dict[str, Any]) -> tuple[str, str]:
    """Minerva has no answer field: the answer is the last ``\\boxed{}`` of the solution (balanced braces)."""
    problem = _require_str(row.get("problem"), "problem")
    solution = _require_str(row.get("solution"), "solution")
    answer = last_boxed(solution)
    if answer is None:
        raise _RowProblem("solution", "no \\boxed{...} answer in the solution")
    if not answer:
        raise _RowProblem("solution", "empty \\boxed{} answer")
    return problem, answer


def _olympiadbench(row: dict[str, Any]) -> tuple[str, str]:
    """OlympiadBench: ``question`` (after ``context`` when there is one); ``final_answer`` is a list of
    ``$...$`` strings: the dollars are stripped and several answers joined with ", "."""
    question = _require_str(row.get("question"), "question")
    context = row.get("context")
    if context is not None:
        context = _require_str(context, "context", allow_empty=True)
    problem = f"{context.strip()}\n{question}" if context and context.strip() else question
    final_answer = _require(row, "final_answer")
    if not isinstance(final_answer, list):
        raise _RowProblem("final_answer", f"wrong type: expected a list of str, got {_type_name(final_answer)}")
    if not final_answer:
        raise _RowProblem("final_answer", "empty list")
    answers = [strip_dollars(_require_str(a, f"final_answer[{i}]")) for i, a in enumerate(final_answer)]
    if not all(answers):
        raise _RowProblem("final_answer", "empty answer inside $...$")
    return problem, ", ".join(answers)


CHOICE_LETTERS = "ABCDEFGHIJ"


def _mmlu_pro(row: dict[str, Any]) -> tuple[str, str]:
    """MMLU-Pro: ``question`` + ``options`` (up to 10) written as lettered lines "A) ..." like LUFFY's ARC-c
    prompts; the answer is the letter in ``answer``."""
    question = _require_str(row.get("question"), "question")
    options = _require(row, "options")
    if not isinstance(options, list):
        raise _RowProblem("options", f"wrong type: expected a list of str, got {_type_name(options)}")
    if not 2 <= len(options) <= len(CHOICE_LETTERS):
        raise _RowProblem("options", f"expected 2..{len(CHOICE_LETTERS)} options, got {len(options)}")
    options = [_require_str(o, f"options[{i}]", allow_empty=True).strip() for i, o in enumerate(options)]
    answer = _require_str(row.get("answer"), "answer").strip()
    letters = CHOICE_LETTERS[: len(options)]
    if answer not in letters:
        raise _RowProblem("answer", f"'{answer}' is not one of the option letters {letters}")
    # ``answer_index`` is not checked: TIGER-Lab's scorer compares against the letter, and one upstream row
    # (question_id 3983) has answer "C" with answer_index 1.
    lines = "\n".join(f"{letter}) {option}" for letter, option in zip(letters, options))
    return f"{question.strip()}\n\n{lines}\n", answer


def _verl_row(row: dict[str, Any]) -> tuple[str, str]:
    """A verl/LUFFY-format row (ARC-c, LUFFY's validation files): the user message and ground truth."""
    example = _parse_luffy_row(row, -1, require_target=False)
    return example.problem, example.ground_truth


def _generic_row(row: dict[str, Any]) -> tuple[str, str]:
    """Any other jsonl/json benchmark: ``problem`` or ``question``; ``answer`` (the text after "####" for
    GSM8K), ``final_answer`` or the last ``\\boxed{}`` of ``solution``."""
    if row.get("problem") is None and row.get("question") is not None:
        problem = _require_str(row.get("question"), "question")
    else:
        problem = _require_str(row.get("problem"), "problem")
    if row.get("answer") is not None:
        answer = _answer_str(row.get("answer"), "answer")
        if "####" in answer:  # GSM8K: rationale, then "#### 1,234"
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
            if not answer:
                raise _RowProblem("answer", "nothing after '####'")
        return problem, answer
    if row.get("final_answer") is not None:
        return _olympiadbench({"question": problem, "final_answer": row["final_answer"]})
    if row.get("solution") is not None:
        return _minerva({"problem": problem, "solution": row["solution"]})
    raise _RowProblem("answer", "missing (no answer, final_answer or solution field)")


class BenchmarkSpec(NamedTuple):
    """``file`` relative to the data root; ``reader`` turns a raw row into (problem, answer);
    ``data_source`` is LUFFY's name for it (``val/test_score/<data_source>``); ``kind`` says how to grade:
    "math" (math-verify against the answer) or "choice" (a letter)."""

    file: str
    reader: RowReader
    data_source: str | None  # None: taken from each row (verl-format files)
    kind: str = "math"


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24.jsonl", _problem_answer, "aime"),
    "aime25": BenchmarkSpec("aime25.jsonl", _problem_answer, "aime25"),
    "amc": BenchmarkSpec("amc.json", _problem_answer, "amc"),  # AMC22+23, 83 problems: LUFFY's "amc"
    "amc23": BenchmarkSpec("amc23.jsonl", _problem_answer, "amc23"),
    "math500": BenchmarkSpec("math500.jsonl", _problem_answer, "math"),
    "minerva": BenchmarkSpec("minerva_math.jsonl", _minerva, "minerva"),
    "olympiadbench": BenchmarkSpec("olympiadbench.jsonl", _olympiadbench, "olympiad_bench"),
    "arc_c": BenchmarkSpec("arc_challenge.parquet", _verl_row, "arc_c", "choice"),
    "mmlu_pro": BenchmarkSpec("mmlu_pro.parquet", _mmlu_pro, "mmlu_pro", "choice"),
    # LUFFY's own verl-format files: rows repeat (avg@k by repetition) and data_source comes from each row.
    "luffy_valid": BenchmarkSpec("luffy/valid.parquet", _verl_row, None),
    "luffy_valid_all": BenchmarkSpec("luffy/valid.all.parquet", _verl_row, None),
}


def resolve_benchmark(name_or_path: str | Path, data_root: str | Path | None = None) -> tuple[Path, BenchmarkSpec]:
    """A registry name (``"aime24"``) or a file path -> (path, spec). A path whose file name is a registry
    file uses that file's rules; any other path is read as verl parquet or generic jsonl/json."""
    root = Path(data_root) if data_root is not None else default_eval_root()
    key = str(name_or_path)
    if key in BENCHMARKS:
        spec = BENCHMARKS[key]
        return root / spec.file, spec
    path = Path(name_or_path)
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError(
            f"unknown benchmark '{key}': expected one of {sorted(BENCHMARKS)} or a .parquet/.jsonl/.json file"
        )
    for spec in BENCHMARKS.values():
        if Path(spec.file).name == path.name and Path(spec.file).parent.name in ("", path.parent.name):
            return path, spec
    if path.suffix == ".parquet":
        return path, BenchmarkSpec(path.name, _verl_row, None)
    return path, BenchmarkSpec(path.name, _generic_row, path.stem)


def load_benchmark(
    name_or_path: str | Path, *, data_root: str | Path | None = None, skip_bad_rows: bool = False
) -> tuple[list[dict[str, Any]], BadRowReport]:
    """Like `read_benchmark`, and also returns the bad-row report."""
    path, spec = resolve_benchmark(name_or_path, data_root)
    report = BadRowReport(path=str(path))
    rows = _load_any(path, report if skip_bad_rows else None)
    report.num_rows_read = len(rows) + report.num_bad_rows

    def parse(row: dict[str, Any], row_index: int) -> dict[str, Any]:
        problem, answer = spec.reader(row)
        data_source = spec.data_source
        if data_source is None:
            data_source = _require_str(row.get("data_source"), "data_source", allow_empty=True)
        return {"data_source": data_source, "problem": problem, "answer": answer, "index": row_index}

    return _run_rows(path, rows, parse, report, skip_bad_rows), report


def read_benchmark(
    name_or_path: str | Path, *, data_root: str | Path | None = None, skip_bad_rows: bool = False
) -> list[dict[str, Any]]:
    """``[{"data_source", "problem", "answer", "index"}]`` for a registry name or a file path.

    ``answer`` is always a non-empty string (numbers as ``"142"``, OlympiadBench without ``$``, a letter
    for the multiple-choice sets). ``index`` is the row's position in the file.
    """
    return load_benchmark(name_or_path, data_root=data_root, skip_bad_rows=skip_bad_rows)[0]
