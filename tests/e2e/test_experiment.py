"""`make experiment-quick` at a tiny scale: tools/experiment.py builds its data and weak model, trains two arms
(LUFFY and SFT) for 2 steps with one seed through the real stack (train.loop.train: Megatron rank, vLLM engine,
reward pool on Ray), grades the held-out splits with luffy-eval's grading and writes the table and plots.
What is asserted is that the outputs exist and are well formed, and that a second invocation after an
interruption resumes (a finished run is not redone, an interrupted one continues from its checkpoint without
retraining) -- not the scientific result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.tiny_run import env_for_runs
from tests.helpers import REPO

pytestmark = pytest.mark.e2e

ARMS = ["luffy", "sft"]
STEPS = 2
COLUMNS = [
    "arm",
    "seeds",
    "final ID accuracy %",
    "final OOD accuracy %",
    "on-policy reward, last 1 steps",
    "final entropy",
    "wall time per seed (s)",
    "wall time, all seeds (s)",
]


def _run(work, out, timeout):
    cmd = [
        sys.executable,
        str(REPO / "tools" / "experiment.py"),
        "--quick",
        "--steps",
        str(STEPS),
        "--eval-every",
        str(STEPS),
        "--format-steps",
        "2",
        "--num-train",
        "40",
        "--num-eval",
        "4",
        "--arms",
        ",".join(ARMS),
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for_runs(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _table(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def test_quick_experiment_writes_table_and_plots_and_resumes(tmp_path):
    import matplotlib.image as mpimg

    work, out = tmp_path / "work", tmp_path / "out"
    _run(work, out, timeout=420)

    table = _table((out / "results.md").read_text())
    assert table[0] == COLUMNS
    body = table[2:]
    assert [row[0] for row in body] == ["LUFFY (p/(p+0.1))", "SFT"]
    for row in body:
        assert row[1] == "0"
        for cell in row[2:4]:  # accuracies in %
            assert 0.0 <= float(cell) <= 100.0
        assert float(row[5]) > 0  # entropy of a softmax over the vocabulary
        assert float(row[6]) > 0 and float(row[7]) > 0
    assert 0.0 <= float(body[0][4]) <= 1.0 and body[1][4].startswith("n/a")

    for name in ("reward", "accuracy", "entropy"):
        image = mpimg.imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["steps"] == STEPS and results["settings"]["seeds"] == [0]
    for arm in ARMS:
        run = results["arms"][arm]["0"]
        assert run["steps"] == [1, 2]
        assert [e["step"] for e in run["evals"]] == [0, STEPS]
        assert all(0.0 <= e["id_accuracy"] <= 100.0 and 0.0 <= e["ood_accuracy"] <= 100.0 for e in run["evals"])
    # the arms really differ in the trainer: SFT's loss is the NLL of the demonstrations and it generates
    # nothing; LUFFY's batch holds generations and the shaped off-policy term
    metrics = {
        arm: [json.loads(line) for line in (work / "runs" / arm / "seed_0" / "metrics.jsonl").read_text().splitlines()]
        for arm in ARMS
    }
    assert all("actor/sft_loss" in m and m["rollout/generated_tokens"] == 0 for m in metrics["sft"])
    assert all("actor/off_policy_prob" in m and m["rollout/generated_tokens"] > 0 for m in metrics["luffy"])
    # every run starts from the same weak model: identical step-0 evaluations
    assert results["arms"]["luffy"]["0"]["evals"][0] == results["arms"]["sft"]["0"]["evals"][0]

    # an interruption of the LUFFY run after its last checkpoint, before its last evaluation
    luffy = work / "runs" / "luffy" / "seed_0"
    (luffy / "done.json").unlink()
    evals = (luffy / "evals.jsonl").read_text().splitlines()
    (luffy / "evals.jsonl").write_text("\n".join(evals[:-1]) + "\n")
    sft_done = (work / "runs" / "sft" / "seed_0" / "done.json").stat().st_mtime_ns
    log = _run(work, out, timeout=300)
    assert "sft seed 0: done already" in log
    assert (work / "runs" / "sft" / "seed_0" / "done.json").stat().st_mtime_ns == sft_done
    assert [json.loads(line)["step"] for line in (luffy / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]  # not retrained
    assert [json.loads(line)["step"] for line in (luffy / "evals.jsonl").read_text().splitlines()] == [0, STEPS]
    assert (luffy / "done.json").exists()
    assert _table((out / "results.md").read_text())[0] == COLUMNS
