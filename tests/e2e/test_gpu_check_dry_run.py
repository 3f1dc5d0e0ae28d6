"""`tools/gpu_check.sh --dry-run`: the prepared GPU check's steps run on CPU with tiny shapes (as CI runs them) and
write the docs/gpu_results.md skeleton marked as a dry run; a step that breaks fails the run, and the other steps
still run and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = ("pytest", "memory", "ipc", "logprob")
SECTIONS = (
    "## Machine and versions",
    "## Summary",
    "## 1. pytest tests/gpu",
    "## 2. Trainer memory per phase vs the plan",
    "## 3. CUDA IPC slots across three syncs",
    "## 4. Log-prob path at vocabulary 151,936",
    "## Failures",
)
# Loaded by every python the dry run starts (sitecustomize on PYTHONPATH); breaks two steps inside their processes
BREAKER = """
import sys
if "--step" in sys.argv:
    import luffy_megatron.algo.logprob as lp
    import luffy_megatron.cluster.offload as off

    inner = lp.vocab_parallel_logprob_entropy

    def off_by_a_tenth(*a, **k):
        logp, entropy = inner(*a, **k)
        return logp + 0.1, entropy

    lp.vocab_parallel_logprob_entropy = off_by_a_tenth

    def broken_offload(*a, **k):
        raise RuntimeError("offload broken on purpose")

    off.offload_to_host = broken_offload
"""


def dry_run(tmp_path: Path, pythonpath: str = "") -> tuple[subprocess.CompletedProcess, Path, dict]:
    out, out_dir = tmp_path / "gpu_results.md", tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out_dir))
    env["PYTHONPATH"] = ":".join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = json.loads((out_dir / "gpu_results.json").read_text())
    return proc, out, results


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("gpu_check"))


def test_dry_run_runs_every_step_and_writes_a_skeleton_marked_as_a_dry_run(clean_run):
    proc, out, res = clean_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "# GPU check results"
    assert lines[2].startswith("**DRY RUN on CPU: not a GPU measurement.**")
    for section in SECTIONS:
        assert section in text, section
    assert (res["command"], res["dry_run"]) == ("tools/gpu_check.sh --dry-run", True)
    assert {name: r["status"] for name, r in res["steps"].items()} == dict.fromkeys(STEPS, "ok")
    assert "## Failures\n\nNone." in text
    for name in STEPS:
        assert f"[gpu_check] {name}: ok" in proc.stdout


def test_each_step_produced_its_numbers(clean_run):
    _, _, res = clean_run
    steps = res["steps"]
    tests = steps["pytest"]["tests"]
    assert tests and all(t["outcome"] == "skipped" for t in tests)  # tests/gpu skips itself without CUDA
    terms = {t["key"]: t for t in steps["memory"]["terms"]}
    for key in ("weights", "grads", "main_params", "moments"):  # counted from the actor's tensors, planned
        assert terms[key]["measured"] > 0 and terms[key]["ratio"] == pytest.approx(1.0, rel=0.05), terms[key]
    assert terms["log-probs transient"]["measured"] is None  # no allocator numbers on CPU: n/a, not invented
    syncs = steps["ipc"]["syncs"]
    assert [s["sync"] for s in syncs] == [1, 2, 3] and all(s["tensors"] > 0 for s in syncs)
    assert steps["ipc"]["flat"] and "CPU stand-in" in steps["ipc"]["measured"]
    cases = steps["logprob"]["cases"]
    assert [c["tokens"] for c in cases] == [64, 256]
    assert all(max(c["max_abs_diff"].values()) <= steps["logprob"]["tolerance"] for c in cases)


def test_a_broken_step_fails_the_run_and_the_others_still_report(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BREAKER)
    proc, out, res = dry_run(tmp_path, str(site))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = {name: r["status"] for name, r in res["steps"].items()}
    assert status == {"pytest": "ok", "memory": "failed", "ipc": "ok", "logprob": "failed"}
    assert "offload broken on purpose" in res["steps"]["memory"]["failed"]
    assert "differ from the fp32 computation" in res["steps"]["logprob"]["failed"]
    text = out.read_text()
    assert "### memory: failed" in text and "### logprob: failed" in text
    assert "offload broken on purpose" in text
