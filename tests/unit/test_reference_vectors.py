"""The algorithm core against upstream LUFFY's numbers (shared/reference/luffy_test_vectors.json)."""

import copy
import json
import subprocess
import sys

from tests.helpers import REPO, SHARED

VECTORS = SHARED / "reference" / "luffy_test_vectors.json"
TOOL = REPO / "tools" / "check_reference_vectors.py"


def test_shared_vectors_all_match():
    proc = subprocess.run([sys.executable, str(TOOL), str(VECTORS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "72/72 results match"


def test_tool_reports_a_corrupted_result_and_fails(tmp_path):
    data = json.loads(VECTORS.read_text())
    bad = copy.deepcopy(data)
    bad["results"]["full_trace/luffy_main"]["outputs"]["loss_backward"] *= 1.001
    bad["results"]["partial_prefix/luffy_grpo_std"]["grad_log_prob"][3][2] += 1e-3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    proc = subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "70/72 results match"
    assert any(line.startswith("full_trace/luffy_main: outputs.loss_backward") for line in lines)
    assert any(line.startswith("partial_prefix/luffy_grpo_std: grad_log_prob") for line in lines)


def test_tool_handles_other_shapes(tmp_path):
    """Subsets of rows/columns give another valid file: fewer prompts, narrower responses.
    The tool must still run every result through the project's functions (and then disagree with
    values computed at another width, which proves it does not look them up)."""
    from tools.check_reference_vectors import run_one

    data = json.loads(VECTORS.read_text())
    case = data["inputs"]["partial_prefix"]
    rows = 16  # two prompts of n=8
    narrow = {k: (v[:rows] if k == "index" else [r[:6] for r in v[:rows]]) for k, v in case.items()}
    got = run_one(narrow, data["configs"]["luffy_main"], use_target_probs=False)
    assert len(got["grad_log_prob"]) == rows and len(got["grad_log_prob"][0]) == 6
    # constant-length denominator is the new width (6), so doubling the width halves the pg loss
    wide = {k: (v if k == "index" else [r + [0.0] * len(r) for r in v]) for k, v in narrow.items()}
    got_wide = run_one(wide, data["configs"]["luffy_main"], use_target_probs=False)
    assert abs(got_wide["outputs"]["pg_loss"] * 2 - got["outputs"]["pg_loss"]) < 1e-6
