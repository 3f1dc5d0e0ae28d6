"""The training program end to end on the CPU: a real pretrained model (SmolLM2-135M-Instruct), real
vLLM, Megatron on gloo, Ray, the reward pool, TensorBoard, checkpoints, the results plot, and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.tiny_models import smollm2_hf_dir
from tests.helpers import REPO

pytestmark = pytest.mark.e2e


def _run_demo(out: Path, data: Path, steps: int) -> subprocess.CompletedProcess:
    overrides = [
        f"model.path={smollm2_hf_dir()}",
        f"trainer.output_dir={out}",
        f"data.train_files=[{data}/train.parquet]",
        f"data.val_files=[{data}/val.parquet]",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=2",
        "trainer.test_freq=2",
        "data.train_batch_size=2",
        "actor.ppo_mini_batch_size=1",
        "data.max_response_length=96",  # the synthetic demonstrations are ~70 tokens
        "rollout.max_prefix_len=96",
    ]
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--num-train=8", "--num-val=2"] + [f"--set={o}" for o in overrides]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    out, data = root / "out", root / "data"
    first = _run_demo(out, data, steps=2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    return out, data, first


def test_metrics_tensorboard_checkpoint_and_plot(run):
    out, _, proc = run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # validation before training, then two steps
    assert any(k.startswith("val/test_score/") for k in rows[0])
    for r in rows[1:]:
        for key in ("actor/pg_loss", "actor/off_policy_prob", "actor/grad_norm", "rollout/reward_mean", "perf/sync_s"):
            assert key in r, (key, r)
        assert r["rollout/off_policy_rows"] == 2  # one demonstration row per prompt
        assert 0.0 <= r["rollout/reward_mean"] <= 1.0
    assert rows[1]["rollout/off_policy_reward"] == 1.0  # the synthetic demonstrations are correct

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("actor/pg_loss")] == [1, 2]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (out / "results.png").stat().st_size > 10_000
    assert "[step 2/2]" in proc.stderr  # console progress


def test_resume_continues_from_the_checkpoint(run):
    out, data, _ = run
    again = _run_demo(out, data, steps=3)
    assert again.returncode == 0, again.stderr[-6000:]
    assert "resumed from" in again.stderr and "step_000002" in again.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # no step repeated, none lost
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
