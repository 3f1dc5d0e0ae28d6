"""Checkpoint-on-signal of a running `luffy-train` (utils/preemption.py, train/progress.py), on the CPU with real Ray,
vLLM and Megatron and a tiny model: SIGTERM mid-run (and a second signal while it stops) ends the run after the
current step with a complete checkpoint and exit code 75; running the same command again resumes at the next
step with the same data position. The same path under Slurm (SIGUSR1, requeue) is in test_slurm.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from luffy_megatron.utils.preemption import PREEMPTED_EXIT_CODE
from tests.e2e.tiny_run import (
    STEP_LINE,
    checkpoint_steps,
    env_for_runs,
    metrics_steps,
    synthetic_data,
    tiny_llama_dir,
    tiny_overrides,
)
from tests.helpers import REPO

pytestmark = pytest.mark.e2e

BATCH = 2  # data.train_batch_size of recipes/slurm_cpu_test.yaml
ROWS = BATCH * 4  # x rollout.n
START_TIMEOUT_S = 300
# the KL reward penalty with upstream's adaptive controller (algo/kl.py): its beta is trainer state that the
# signal's checkpoint must carry into the rerun
KL = ["algo.kl_ctrl_type=adaptive", "algo.kl_ctrl_coef=0.1", "algo.kl_ctrl_target_kl=0.1", "algo.kl_ctrl_horizon=10"]


def _command(out: Path, data: Path, steps: int) -> list[str]:
    overrides = tiny_overrides(tiny_llama_dir(), data, out, steps) + ["parallel.nnodes=1", "trainer.save_freq=-1"] + KL
    return [str(REPO / ".venv" / "bin" / "luffy-train"), "--config", str(REPO / "recipes" / "slurm_cpu_test.yaml")] + [
        a for o in overrides for a in ("--set", o)
    ]


def _wait_for(log: Path, proc: subprocess.Popen, pattern: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        if pattern in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"luffy-train exited with {proc.returncode} before {pattern!r}:\n{text[-4000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {pattern!r} within {timeout_s}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of up to 50 steps that gets SIGTERM once its first step is logged, and SIGUSR1 while stopping."""
    root = tmp_path_factory.mktemp("signal")
    out, data = root / "out", synthetic_data(root / "data")
    log = root / "first.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            _command(out, data, steps=50), stdout=fh, stderr=subprocess.STDOUT, env=env_for_runs(), cwd=REPO
        )
    try:
        _wait_for(log, proc, "[step 1/50]", START_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        _wait_for(log, proc, "SIGTERM received", 60)
        proc.send_signal(signal.SIGUSR1)  # while stopping: must not interrupt the checkpoint
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, data, rc, log.read_text()


def test_a_signal_checkpoints_after_the_current_step_and_exits_75(stopped):
    out, _, rc, text = stopped
    assert rc == PREEMPTED_EXIT_CODE, text[-4000:]
    done = [int(m.group(1)) for m in STEP_LINE.finditer(text)]
    last = done[-1]
    assert done == list(range(1, last + 1)) and last < 50  # stopped early, at a step boundary
    assert checkpoint_steps(out) == [last]  # save_freq=-1: the only checkpoint is the one the signal made
    assert not list((out / "checkpoints").glob("*.tmp-*"))  # nothing torn
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{last:06d}"
    state = json.loads((out / "checkpoints" / f"step_{last:06d}" / "trainer_state.json").read_text())
    assert state["step"] == last and state["data_position"] == last * BATCH
    rows = _metrics(out)
    assert rows[0]["critic/kl"] == 0.0  # step 1: the policy is still the reference
    assert state["kl_ctrl"] == {"type": "adaptive", "value": pytest.approx(_next_beta(rows[-1]))}
    assert "SIGUSR1 received while already stopping" in text and "ignored" in text
    assert f"stopped by SIGTERM after step {last}" in text and f"exit code {PREEMPTED_EXIT_CODE}" in text
    assert metrics_steps(out) == list(range(1, last + 1))


def test_the_rerun_resumes_at_the_next_step(stopped):
    out, data, _, _ = stopped
    last = checkpoint_steps(out)[-1]
    again = subprocess.run(
        _command(out, data, steps=last + 1) + ["--set", "trainer.save_freq=1"],
        capture_output=True,
        text=True,
        env=env_for_runs(),
        cwd=REPO,
        timeout=START_TIMEOUT_S,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{last:06d}'} (step {last})" in again.stderr
    assert [int(m.group(1)) for m in STEP_LINE.finditer(again.stderr)] == [last + 1]
    assert metrics_steps(out) == list(range(1, last + 2))  # no step repeated, none lost
    state = json.loads((out / "checkpoints" / f"step_{last + 1:06d}" / "trainer_state.json").read_text())
    assert state["data_position"] == (last + 1) * BATCH  # the data continued where the stopped run left it
    rows = _metrics(out)
    for before, after in zip(rows, rows[1:]):  # upstream's adaptive rule, across the stop and the rerun too
        assert after["critic/kl_coeff"] == pytest.approx(_next_beta(before), rel=1e-9), (before["step"], after["step"])
    resumed = rows[-1]  # a step after the policy moved: a KL, and the rewards moved off the scores by beta x KL
    assert resumed["critic/kl"] != 0.0
    assert resumed["critic/rewards/mean"] != pytest.approx(resumed["critic/score/mean"], abs=1e-9)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _next_beta(row: dict) -> float:
    """Upstream AdaptiveKLController.update after a step logged `row` (target 0.1, horizon 10, n_steps = rows)."""
    error = min(max(row["critic/kl"] / 0.1 - 1, -0.2), 0.2)
    return row["critic/kl_coeff"] * (1 + error * ROWS / 10)
