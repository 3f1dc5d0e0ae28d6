#!/usr/bin/env python
"""How often two math-verify versions grade the same responses differently (upstream LUFFY pins 0.6.0; we use 0.9.0).

    python3.11 -m venv /tmp/mv060
    /tmp/mv060/bin/pip install math-verify==0.6.0 latex2sympy2_extended==1.0.9 antlr4-python3-runtime==4.9.3 \\
        sympy==1.13.3          # upstream's luffy/requirements.txt pins these four
    python tools/math_verify_agreement.py --other-python /tmp/mv060/bin/python

Both versions grade one corpus along upstream's training code path (`reward_fn_math_verify`): the response as
decoded, special tokens kept, "<think>\\n" prepended, the text between the first and the second "</think>" parsed
and compared with ``verify(parse("$" + gold + "$"), parse(solution))`` at math-verify's default settings. Items
whose graded text ends in special tokens are also graded with them stripped (``reward.strip_special_tokens``).

The corpus is deterministic (no randomness but seeded `random.Random`): gold answers written as model outputs in
several styles (``\\boxed{}``, bare, in a sentence, with and without ``<|im_end|>`` / ``<|endoftext|>``, a wrong
answer), the reference solutions of the shared benchmarks, MATH and GSM8K (whole and cut short), our MATH
demonstrations (`math_train.math_demonstration`) and our synthetic arithmetic demonstrations
(`data.synthetic.worked_solution`). Gold answers are the ones luffy-eval grades against (`read_benchmark`), and
LUFFY's own ground truths (`eval/luffy/valid.all.parquet`) where they are written differently.

Each version grades in its own worker process (``--worker``, which needs only the standard library and
math-verify, so it runs under the other venv's python): math-verify's ``signal.alarm`` timeouts work in a main
thread only, and the parent kills a worker that is silent past ``--item-timeout-s`` (that item counts as timed
out; the worker restarts after it). Prints the counts, the disagreement rate, the disagreements by source and
style, a few examples, and as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THOUGHT = "Let me work through the problem step by step.\nI have checked the computation once more.\n"
EXAMPLE_CHARS = 160


# ------------------------------------------------------------------------------------------------ worker


def upstream_solution(response: str) -> str | None:
    """What upstream's reward_fn_math_verify grades: the text between the first and second </think> of
    "<think>\\n" + response, or None (a format failure, reward 0 without calling math-verify)."""
    text = THINK_OPEN + "\n" + response
    if THINK_OPEN not in text or THINK_CLOSE not in text:
        return None
    return text.split(THINK_CLOSE)[1]


def worker_main(items_path: str, start: int) -> int:
    """Grade items[start:] of a JSONL file, one JSON line per item on stdout (flushed)."""
    import importlib.metadata

    from math_verify import parse, verify

    gold_cache: dict[str, list] = {}

    def grade(solution: str, gold: str) -> tuple[int, str]:
        if gold not in gold_cache:
            gold_cache[gold] = parse("$" + gold + "$")
        predicted = parse(solution)
        return int(bool(verify(gold_cache[gold], predicted))), _short(predicted)

    versions = {name: importlib.metadata.version(name) for name in ("math-verify", "latex2sympy2_extended", "sympy")}
    verify(parse("$0.5$"), parse("\\boxed{\\frac{1}{2}}"))  # lazy set-up before the first item's clock starts
    print(json.dumps({"versions": versions}), flush=True)
    with open(items_path, encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            if index < start:
                continue
            item = json.loads(line)
            started = time.monotonic()
            result: dict = {"i": index}
            try:
                solution = upstream_solution(item["response"])
                if solution is None:
                    result.update(score=0, pred="(format failure)")
                else:
                    result["score"], result["pred"] = grade(solution, item["gold"])
                    if item.get("solution_stripped") is not None:
                        result["score_stripped"], _ = grade(item["solution_stripped"], item["gold"])
                result["gold_parsed"] = _short(gold_cache.get(item["gold"]))
            except Exception as error:  # noqa: BLE001 - a math-verify failure is a result to report
                result.update(score=None, error=f"{type(error).__name__}: {error}"[:300])
            result["seconds"] = round(time.monotonic() - started, 4)
            print(json.dumps(result), flush=True)
    return 0


def _short(parsed) -> str:
    if parsed is None:
        return ""
    return (str([str(x) for x in parsed]) if isinstance(parsed, list) else str(parsed))[:EXAMPLE_CHARS]


# ------------------------------------------------------------------------------------------------ corpus


def _sys_path() -> None:
    if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
        sys.path.insert(0, str(REPO_ROOT))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _select(rows: list, limit: int, seed: int) -> list:
    """The first `limit` of a seeded shuffle (all rows, in order, when limit <= 0 or >= len)."""
    if limit <= 0 or limit >= len(rows):
        return list(rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:limit])]


def _answer_styles(gold: str, wrong: str) -> list[tuple[str, str]]:
    """(style, text after </think>) for one gold answer written as a model would write it (a gold stored
    in "$...$", as some of LUFFY's are, is written without its dollars)."""
    from luffy_megatron.data.answers import strip_dollars

    gold, wrong = strip_dollars(gold), strip_dollars(wrong)
    return [
        ("boxed+im_end", f"The final answer is $\\boxed{{{gold}}}$.<|im_end|>"),
        ("boxed", f"The final answer is $\\boxed{{{gold}}}$."),
        ("bare+endoftext", f"{gold}<|endoftext|>"),
        ("bare", gold),
        ("sentence+endoftext", f"The answer is ${gold}$.<|endoftext|>"),
        ("wrong_boxed+im_end", f"The final answer is $\\boxed{{{wrong}}}$.<|im_end|>"),
        ("wrong_bare+endoftext", f"{wrong}<|endoftext|>"),
    ]


def _after_thought(text: str) -> str:
    return THOUGHT + THINK_CLOSE + "\n" + text


def _solution_styles(solution: str) -> list[tuple[str, str]]:
    """(style, response) for a reference solution written after the thought: whole, and cut short."""
    solution = solution.strip()
    return [
        ("solution+im_end", _after_thought(solution + "<|im_end|>")),
        ("solution_cut", _after_thought(solution[: max(1, 2 * len(solution) // 3)])),  # the token limit: no EOS
    ]


def build_corpus(data_root: Path, limit_per_source: int = 150, seed: int = 0) -> list[dict]:
    """[{id, source, style, response, gold}], the same for the same arguments and data files.

    `response` is what the trainer decodes (the prompt ends with "<think>\\n", so it starts inside the thought).
    """
    _sys_path()
    eval_root = data_root / "eval"
    # {source, key, gold, responses: [(style, whole response)]}, in this order of sources
    problems, raw_golds = _benchmark_problems(eval_root, limit_per_source, seed)
    problems += _luffy_valid_problems(eval_root, raw_golds, limit_per_source, seed)
    problems += _math_train_problems(data_root, limit_per_source, seed)
    problems += _gsm8k_problems(data_root, limit_per_source, seed)
    problems += _synthetic_problems(limit_per_source, seed)

    # Model-written styles for every gold; the wrong answer is the next problem's gold in the same source.
    corpus: list[dict] = []
    by_source: dict[str, list[dict]] = {}
    for problem in problems:
        by_source.setdefault(problem["source"], []).append(problem)
    for source, group in by_source.items():
        for position, problem in enumerate(group):
            wrong = group[(position + 1) % len(group)]["gold"]
            if wrong == problem["gold"]:
                wrong = problem["gold"] + "+1"
            entries = [(style, _after_thought(text)) for style, text in _answer_styles(problem["gold"], wrong)]
            for style, response in entries + problem["responses"]:
                corpus.append(
                    {
                        "id": f"{source}/{problem['key']}/{style}",
                        "source": source,
                        "style": style,
                        "response": response,
                        "gold": problem["gold"],
                    }
                )
    return corpus


# The corpus sources import luffy_megatron inside the functions (lazy): `--worker` runs this file under the other
# venv's python, which has only the standard library and math-verify.


def _problem(source: str, key, gold: str, responses: list[tuple[str, str]] = ()) -> dict:
    return {"source": source, "key": key, "gold": gold, "responses": list(responses)}


def _benchmark_problems(eval_root: Path, limit: int, seed: int) -> tuple[list[dict], set[str]]:
    """The shared benchmarks' golds, with their reference solutions where the raw files have them; and every
    benchmark gold (selected or not)."""
    from luffy_megatron.data import read_benchmark

    raw_solutions = {
        "math500": ("math500.jsonl", lambda row: row["solution"]),
        "minerva": ("minerva_math.jsonl", lambda row: row["solution"]),
        "aime24": ("aime24.jsonl", lambda row: row["solution"]),
        "olympiadbench": ("olympiadbench.jsonl", lambda row: row["solution"][0] if row["solution"] else ""),
    }
    problems: list[dict] = []
    raw_golds: set[str] = set()
    for name in ("aime24", "aime25", "amc", "amc23", "math500", "minerva", "olympiadbench"):
        rows = read_benchmark(name, data_root=eval_root)
        raw = None
        if name in raw_solutions:
            raw = _read_jsonl(eval_root / raw_solutions[name][0])
        for row in _select(rows, limit, seed):
            solutions = []
            if raw is not None:
                text = raw_solutions[name][1](raw[row["index"]])
                if text:
                    solutions = _solution_styles(text)
            problems.append(_problem(name, row["index"], row["answer"], solutions))
        raw_golds.update(row["answer"] for row in rows)
    return problems, raw_golds


def _luffy_valid_problems(eval_root: Path, raw_golds: set[str], limit: int, seed: int) -> list[dict]:
    """LUFFY's own ground truths whose text no raw benchmark answer has (aime25's 336^\\circ, other spellings)."""
    from luffy_megatron.data.readers import load_parquet_rows

    first_row: dict[str, int] = {}
    for index, row in enumerate(load_parquet_rows(eval_root / "luffy" / "valid.all.parquet")):
        gold = str(row["reward_model"]["ground_truth"])
        if gold not in raw_golds:
            first_row.setdefault(gold, index)
    return [_problem("luffy_valid_all", index, gold) for gold, index in _select(sorted(first_row.items()), limit, seed)]


def _math_train_problems(data_root: Path, limit: int, seed: int) -> list[dict]:
    """MATH (train-side; MATH-500 problems removed) with its reference solutions and our demonstrations."""
    from luffy_megatron.data import read_benchmark
    from luffy_megatron.data.answers import last_boxed, normalize_problem
    from luffy_megatron.data.math_train import math_demonstration

    math500 = {normalize_problem(row["problem"]) for row in read_benchmark("math500", data_root=data_root / "eval")}
    math_rows = [
        row
        for row in _read_jsonl(data_root / "train" / "math_test5000.jsonl")
        if normalize_problem(row["problem"]) not in math500 and last_boxed(row["solution"])
    ]
    problems = []
    for row in _select(math_rows, limit, seed):
        gold = last_boxed(row["solution"])
        demo = math_demonstration(row["solution"], gold).removeprefix("<think>\n")
        styles = _solution_styles(row["solution"]) + [("our_demo+im_end", demo + "<|im_end|>")]
        problems.append(_problem("math_train", row["idx"], gold, styles))
    return problems


def _gsm8k_problems(data_root: Path, limit: int, seed: int) -> list[dict]:
    problems = []
    for row in _select(_read_jsonl(data_root / "train" / "gsm8k_test1319.jsonl"), limit, seed):
        rationale, _, answer = row["answer"].rpartition("####")
        rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
        problems.append(
            _problem("gsm8k", row["idx"], answer.strip(), _solution_styles(rationale + "\n#### " + answer.strip()))
        )
    return problems


def _synthetic_problems(limit: int, seed: int) -> list[dict]:
    """Our synthetic arithmetic task: the demonstration as the trainer sees it, with an EOS as a model writes it."""
    from luffy_megatron.data.synthetic import ArithmeticConfig, generate_problems, worked_solution

    config = ArithmeticConfig(min_digits=1, max_digits=4, min_operands=2, max_operands=5)
    count = limit if limit > 0 else 1000
    problems = []
    for index, problem in enumerate(generate_problems(count, config, random.Random(seed))):
        demo = worked_solution(problem).removeprefix("<think>\n")
        styles = [("our_demo+im_end", demo + "<|im_end|>")]
        problems.append(_problem("synthetic_arith", index, str(problem.answer), styles))
    return problems


def with_stripped_solutions(corpus: list[dict]) -> list[dict]:
    """Adds `solution_stripped` (reward.strip_special_tokens=true's graded text) where stripping changes it."""
    _sys_path()
    from luffy_megatron.reward.graders import strip_trailing_special_tokens

    out = []
    for item in corpus:
        solution = upstream_solution(item["response"])
        stripped = None if solution is None else strip_trailing_special_tokens(solution)
        out.append({**item, "solution_stripped": stripped if stripped != solution else None})
    return out


# ------------------------------------------------------------------------------------------------ driver


def grade_with(
    python: str, items_path: Path, num_items: int, item_timeout_s: float, start_timeout_s: float, log_path: Path
) -> dict:
    """Run `python this_file --worker` over the items; restart past a silent item. Returns versions, results."""
    results: dict[int, dict] = {}
    versions: dict | None = None
    next_index, restarts = 0, 0
    with open(log_path, "ab") as log:
        while next_index < num_items:
            proc = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker", str(items_path), str(next_index)],
                stdout=subprocess.PIPE,
                stderr=log,
                cwd="/",
                env={**os.environ, "PYTHONPATH": ""},
            )
            buffer = b""
            deadline = time.monotonic() + start_timeout_s  # imports first, then one item at a time
            try:
                while next_index < num_items:
                    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                    if not ready:
                        if versions is None:
                            raise RuntimeError(
                                f"{python} --worker printed nothing in {start_timeout_s:.0f} s; see {log_path}"
                            )
                        results[next_index] = {"i": next_index, "score": None, "error": "timed out", "timed_out": True}
                        next_index += 1
                        restarts += 1
                        break
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        proc.wait()
                        if versions is None:
                            raise RuntimeError(
                                f"{python} --worker exited with {proc.returncode} before grading; "
                                f"is math-verify installed there? see {log_path}"
                            )
                        results[next_index] = {
                            "i": next_index,
                            "score": None,
                            "error": f"worker died ({proc.returncode})",
                        }
                        next_index += 1
                        restarts += 1
                        break
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        message = json.loads(line)
                        if "versions" in message:
                            versions = message["versions"]
                        else:
                            results[message["i"]] = message
                            next_index = message["i"] + 1
                    deadline = time.monotonic() + item_timeout_s
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()
    return {
        "python": python,
        "versions": versions,
        "results": [results[i] for i in range(num_items)],
        "restarts": restarts,
    }


def _disagreement_kind(a: dict, b: dict) -> str:
    """Why two versions' results for one item differ."""
    if a.get("score") is None or b.get("score") is None:
        return "an error or timeout in one version"
    if a.get("gold_parsed") != b.get("gold_parsed"):
        return "gold parsed differently"
    if a.get("pred") != b.get("pred"):
        return "answer parsed differently"
    return "same parses, verify differs"


def _disagreement_examples(disagree: list, name_a: str, name_b: str, num_examples: int, lines: list[str]) -> list[dict]:
    """Up to `num_examples` disagreements, spread over styles (one per style first), as summary entries; their
    report lines are appended to `lines`."""
    shown, seen_styles = [], set()
    for entry in disagree:
        if entry[0]["style"] not in seen_styles:
            shown.append(entry)
            seen_styles.add(entry[0]["style"])
    shown += [entry for entry in disagree if entry not in shown]
    examples = []
    for item, a, b in shown[:num_examples]:
        solution = upstream_solution(item["response"]) or ""
        tail = solution[-EXAMPLE_CHARS:] if len(solution) > EXAMPLE_CHARS else solution
        examples.append(
            {
                "id": item["id"],
                "gold": item["gold"],
                "graded_text_tail": tail,
                **{
                    name: {key: result.get(key) for key in ("score", "pred", "gold_parsed", "error")}
                    for name, result in ((name_a, a), (name_b, b))
                },
            }
        )
        lines.append(f"  e.g. {item['id']}: gold {item['gold']!r}; graded text ...{tail[-100:]!r}")
        for name, result in ((name_a, a), (name_b, b)):
            lines.append(
                f"       {name}: score {result.get('score')}, answer {result.get('pred') or result.get('error')!r}, "
                f"gold {result.get('gold_parsed')!r}"
            )
    return examples


def summarize(corpus: list[dict], runs: dict[str, dict], num_examples: int) -> tuple[dict, list[str]]:
    (name_a, run_a), (name_b, run_b) = runs.items()
    lines = []
    disagree, by_source, by_style, kinds = [], Counter(), Counter(), Counter()
    totals_source, totals_style = Counter(item["source"] for item in corpus), Counter(item["style"] for item in corpus)
    strip_changes = {name: 0 for name in runs}
    strip_disagree = 0
    for item, a, b in zip(corpus, run_a["results"], run_b["results"]):
        for name, result in ((name_a, a), (name_b, b)):
            if "score_stripped" in result and result["score_stripped"] != result["score"]:
                strip_changes[name] += 1
        if "score_stripped" in a and "score_stripped" in b and a["score_stripped"] != b["score_stripped"]:
            strip_disagree += 1
        if a.get("score") != b.get("score"):
            disagree.append((item, a, b))
            by_source[item["source"]] += 1
            by_style[item["style"]] += 1
            kinds[_disagreement_kind(a, b)] += 1
    num = len(corpus)
    correct = {name: sum(r.get("score") == 1 for r in run["results"]) for name, run in runs.items()}
    failed = {name: sum(r.get("score") is None for r in run["results"]) for name, run in runs.items()}
    with_strip = sum(item.get("solution_stripped") is not None for item in corpus)
    lines.append(f"corpus: {num} graded responses ({len(totals_source)} sources, {len(totals_style)} styles)")
    for name, run in runs.items():
        lines.append(
            f"  {name}: {run['versions']} via {run['python']}: {correct[name]} correct, "
            f"{num - correct[name] - failed[name]} wrong, {failed[name]} errors/timeouts, "
            f"{run['restarts']} worker restarts"
        )
    lines.append(
        f"disagreements: {len(disagree)} of {num} ({100.0 * len(disagree) / num:.2f}%); "
        + ", ".join(f"{k}: {v}" for k, v in kinds.items())
    )
    lines.append("  by source: " + ", ".join(f"{s} {by_source[s]}/{totals_source[s]}" for s in totals_source))
    lines.append("  by style:  " + ", ".join(f"{s} {by_style[s]}/{totals_style[s]}" for s in totals_style))
    lines.append(
        f"stripping trailing special tokens changes {', '.join(f'{n}: {c}' for n, c in strip_changes.items())} "
        f"of the {with_strip} items it applies to; the versions disagree on {strip_disagree} stripped items"
    )
    examples = _disagreement_examples(disagree, name_a, name_b, num_examples, lines)
    summary = {
        "num_items": num,
        "disagreements": len(disagree),
        "disagreement_rate": round(len(disagree) / num, 6) if num else None,
        "kinds": dict(kinds),
        "versions": {name: run["versions"] for name, run in runs.items()},
        "correct": correct,
        "errors_or_timeouts": failed,
        "by_source": {s: [by_source[s], totals_source[s]] for s in totals_source},
        "by_style": {s: [by_style[s], totals_style[s]] for s in totals_style},
        "strip_special_tokens": {
            "items_it_changes_the_text_of": with_strip,
            "score_changes": strip_changes,
            "version_disagreements_when_stripped": strip_disagree,
        },
        "examples": examples,
    }
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], int(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--other-python", required=True, help="a python with the other math-verify (e.g. /tmp/mv060/bin/python)"
    )
    parser.add_argument("--this-python", default=sys.executable, help="the python with ours (default: this one)")
    parser.add_argument("--data-root", default=None, help="the shared data folder (default: <shared>/data)")
    parser.add_argument(
        "--limit-per-source", type=int, default=150, help="problems per source, a seeded choice (0 = all; default 150)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--item-timeout-s", type=float, default=30.0, help="a worker silent this long is killed")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--keep", default=None, help="write the corpus and both versions' results to this JSON file")
    args = parser.parse_args(argv)
    if not Path(args.other_python).is_file():
        parser.error(f"--other-python {args.other_python}: no such file (create the venv first, see --help)")

    _sys_path()
    from luffy_megatron.data import shared_dir

    data_root = Path(args.data_root) if args.data_root else shared_dir() / "data"
    if not (data_root / "eval").is_dir():
        parser.error(f"--data-root {data_root}: no eval/ folder (the shared benchmarks); pass the shared data folder")
    start = time.monotonic()
    corpus = with_stripped_solutions(build_corpus(data_root, args.limit_per_source, args.seed))
    with tempfile.TemporaryDirectory(prefix="mv_agreement_") as tmp:
        items_path = Path(tmp) / "items.jsonl"
        with open(items_path, "w", encoding="utf-8") as fh:
            for item in corpus:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        runs: dict[str, dict] = {}
        errors: list[BaseException] = []

        def run(name: str, python: str) -> None:
            try:
                runs[name] = grade_with(
                    python, items_path, len(corpus), args.item_timeout_s, 120.0, Path(tmp) / f"{name}.log"
                )
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                errors.append(error)

        threads = [
            threading.Thread(target=run, args=(name, python))
            for name, python in (("this", args.this_python), ("other", args.other_python))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    runs = {f"math-verify {runs[n]['versions']['math-verify']} ({n})": runs[n] for n in ("this", "other")}
    summary, lines = summarize(corpus, runs, args.examples)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["limit_per_source"], summary["seed"] = args.limit_per_source, args.seed
    if args.keep:
        Path(args.keep).write_text(json.dumps({"corpus": corpus, "runs": runs, "summary": summary}, ensure_ascii=False))
    print("\n".join(lines))
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
