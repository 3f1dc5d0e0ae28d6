"""`make experiment-quick`'s machinery at a tiny scale: tools/experiment.py builds its data, pretrains a base for 2
steps through the real stack (train.loop.train: Megatron rank, vLLM engine, reward pool on Ray), evaluates it and
checks its gates, trains two arms (LUFFY and SFT) for 2 steps on the same workers, measures them (held-out splits
graded as luffy-eval grades, the entropy/KL probe) and writes the report. Asserted: the report's structure (the
pre-registered rules before the numbers, the gates, every split, the verdicts), that an interrupted run resumes
without retraining and a finished one is not redone, and that a base failing a gate stops an enforced run with a
message before any arm runs -- not the scientific result."""

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
TINY = [
    "--quick",
    *("--steps", str(STEPS), "--eval-every", str(STEPS), "--base-steps", "2", "--fact-copies", "1"),
    *("--num-train", "24", "--num-eval", "8", "--curve-problems", "4", "--probe-prompts", "4", "--samples", "1"),
]


def _run(work, out, *extra, timeout, ok=True):
    cmd = [sys.executable, str(REPO / "tools" / "experiment.py"), *TINY, "--work", str(work), "--out", str(out)]
    proc = subprocess.run([*cmd, *extra], cwd=REPO, env=env_for_runs(), capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _table(md: str, heading: str) -> list[list[str]]:
    section = md.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def test_quick_experiment_reports_resumes_and_enforces_the_gates(tmp_path):
    import matplotlib.image as mpimg

    work, out = tmp_path / "work", tmp_path / "out"
    _run(work, out, "--arms", ",".join(ARMS), timeout=480)

    md = (out / "results.md").read_text()
    assert md.index("## Pre-registered rules") < md.index("## The base") < md.index("## Final accuracy")
    assert md.index("## Final accuracy") < md.index("## Verdicts")
    gates = _table(md, "## The base")
    assert [row[0] for row in gates[2:]] == ["facts", "id_unsolved", "rewrite_start", "no_chains"]
    assert "FAIL" in [row[3] for row in gates[2:]]  # a 2-step base does not know the facts
    assert "reported, not enforced" in md
    final = _table(md, "## Final accuracy")
    assert final[0][:6] == [
        "arm",
        "seeds",
        *(
            f"{s}"
            for s in (
                "ID (3-5 operands, +)",
                "OOD-length (6-7 operands)",
                "OOD-operator (+ and -)",
                "retention (2 operands)",
            )
        ),
    ]
    assert [row[0] for row in final[2:]] == ["base (step 0)", "LUFFY (p/(p+0.1))", "SFT"]
    for row in final[2:]:
        assert all(0.0 <= float(cell) <= 100.0 for cell in row[2:7])  # accuracies and the rewrite share, in %
    assert float(final[3][8]) > 0 and float(final[3][9]) >= 0  # LUFFY's probe entropy and KL to the base
    assert final[4][7].startswith("n/a")  # SFT generates nothing in training
    verdicts = md.split("## Verdicts", 1)[1]
    assert "**C1: LUFFY beats on-policy GRPO: not run.**" in verdicts  # no on-policy arm
    assert "**C4: Policy shaping keeps entropy higher without losing accuracy: not run.**" in verdicts
    assert any(
        f"**C2: LUFFY beats SFT out of distribution: {v}.**" in verdicts
        for v in ("reproduced", "not reproduced", "inconclusive")
    )
    assert "**Overlapped generation (LUFFY one-step-off vs LUFFY): not run.**" in verdicts
    assert "LUFFY - SFT, OOD-aggregate:" in verdicts and "- LUFFY (p/(p+0.1)): ID (3-5 operands, +)" in verdicts
    for name in ("accuracy", "reward", "probe"):
        image = mpimg.imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["steps"] == STEPS and results["settings"]["seeds"] == [0]
    assert set(results["verdicts"]) == {"C1", "C2", "C3", "C4", "overlap"}
    for arm in ARMS:
        run = results["arms"][arm]["0"]
        assert run["steps"] == [1, 2] and [e["step"] for e in run["evals"]] == [STEPS]
        assert {len(run["final"][s]["per_problem"]) for s in ("id", "ood_length", "ood_operator")} == {8}
        assert len(run["final"]["retention"]["per_problem"]) == 4
    metrics = {
        arm: [json.loads(line) for line in (work / "runs" / arm / "seed_0" / "metrics.jsonl").read_text().splitlines()]
        for arm in ARMS
    }
    assert all("actor/sft_loss" in m and m["rollout/generated_tokens"] == 0 for m in metrics["sft"])
    assert all("actor/off_policy_prob" in m and m["rollout/generated_tokens"] > 0 for m in metrics["luffy"])
    base_log = json.loads((work / "base" / "eval.json").read_text())
    assert base_log["probe"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # the base against itself

    # an interruption of the LUFFY run after its last checkpoint, before its last measurement
    luffy = work / "runs" / "luffy" / "seed_0"
    (luffy / "done.json").unlink()
    (luffy / "evals.jsonl").write_text("")
    sft_done = (work / "runs" / "sft" / "seed_0" / "done.json").stat().st_mtime_ns
    log = _run(work, out, "--arms", ",".join(ARMS), timeout=300)
    assert "sft seed 0: done already" in log and "SFT steps of a random Llama" not in log  # the base is cached
    assert (work / "runs" / "sft" / "seed_0" / "done.json").stat().st_mtime_ns == sft_done
    assert [json.loads(line)["step"] for line in (luffy / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(line)["step"] for line in (luffy / "evals.jsonl").read_text().splitlines()] == [STEPS]

    # the same base under enforced gates: stopped with the failed gates named, no arm started
    log = _run(work, out, "--arms", "on_policy", "--gates", "enforce", timeout=120, ok=False)
    assert "fails its pre-registered gates" in log and "facts:" in log and "No arm was run" in log
    assert not (work / "runs" / "on_policy").exists()
