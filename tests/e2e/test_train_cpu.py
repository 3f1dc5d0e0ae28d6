"""The training program end to end on the CPU: a real pretrained model (SmolLM2-135M-Instruct), real
vLLM, Megatron on gloo, Ray, the reward pool, TensorBoard, checkpoints, the results plot, and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.tiny_models import smollm2_hf_dir
from tests.helpers import REPO, without_ray_auth

pytestmark = pytest.mark.e2e

# Issue 12 item 5: the upstream/verl names a LUFFY user reads (val/test_score/<source> and perf/mfu apart)
UPSTREAM_SCALARS = (
    "critic/score/mean",
    "critic/score/max",
    "critic/score/min",
    "critic/rewards/mean",
    "critic/rewards/max",
    "critic/rewards/min",
    "critic/advantages/mean",
    "critic/advantages/max",
    "critic/advantages/min",
    "response_length/mean",
    "response_length/max",
    "response_length/min",
    "response_length/clip_ratio",
    "prompt_length/mean",
    "prompt_length/max",
    "prompt_length/min",
    "prompt_length/clip_ratio",
    "actor/pg_loss",
    "actor/off_pg_loss",
    "actor/on_pg_loss",
    "actor/off_policy_prob",
    "actor/on_policy_prob",
    "actor/entropy",
    "actor/ppo_kl",
    "actor/pg_clipfrac",
    "actor/grad_norm",
    "actor/lr",
    *(
        f"timing_s/{p}"
        for p in ("gen", "reward", "old_log_prob", "update_actor", "sync", "testing", "save_checkpoint", "step")
    ),
    "perf/throughput",
)
# names our users had before, kept beside the upstream ones
OUR_SCALARS = (
    "rollout/reward_mean",
    "rollout/on_policy_reward",
    "rollout/off_policy_reward",
    "perf/step_s",
    "perf/tokens_per_s",
    "perf/sync_s",
    "rollout/response_length_mean",
)


def _overrides(out: Path, data: Path, steps: int) -> list[str]:
    return [
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


def _run_demo(out: Path, data: Path, steps: int) -> subprocess.CompletedProcess:
    overrides = _overrides(out, data, steps)
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--num-train=8", "--num-val=2"] + [
        f"--set={o}" for o in overrides
    ]
    env = {**without_ray_auth(os.environ), "VLLM_CPU_KVCACHE_SPACE": "1"}  # as `make demo` runs
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
    _check_upstream_names(out, rows, acc)
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


def _check_upstream_names(out: Path, rows: list[dict], acc) -> None:
    """Every item-5 name is in the TensorBoard events (and metrics.jsonl), with values that agree with the
    names they stand beside; no MFU on a CPU; the run's whole config as text."""
    import textwrap

    import torch

    from luffy_megatron.config import load_config

    tags = set(acc.Tags()["scalars"])
    missing = [name for name in UPSTREAM_SCALARS + OUR_SCALARS if name not in tags]
    assert not missing, f"not in the TensorBoard events: {missing}"
    assert any(t.startswith("val/test_score/") and t != "val/test_score/avg" for t in tags), sorted(tags)
    if not torch.cuda.is_available():  # no GPU peak to divide by: no MFU rather than a made-up one
        assert "perf/mfu" not in tags and "mfu/actor" not in tags
    for r in rows[1:]:
        assert r["critic/score/mean"] == pytest.approx(r["rollout/reward_mean"])
        assert r["critic/rewards/mean"] == pytest.approx(r["critic/score/mean"])  # no KL penalty in this run
        assert r["response_length/mean"] == pytest.approx(r["rollout/response_length_mean"])
        assert r["on_off_metrics/off_score"] == pytest.approx(r["rollout/off_policy_reward"])
        assert r["actor/entropy"] == pytest.approx(r["actor/entropy_loss"]) and r["actor/entropy"] > 0
        assert 0.0 <= r["response_length/clip_ratio"] <= 1.0 and r["prompt_length/max"] <= 256
        phases = sum(
            r.get(f"timing_s/{p}", 0.0)
            for p in ("gen", "reward", "old_log_prob", "update_actor", "sync", "testing", "save_checkpoint")
        )
        assert phases <= r["timing_s/step"]
        # tokens/s/GPU: the CPU layout has one Megatron rank standing in for the GPU
        assert r["perf/throughput"] == pytest.approx(r["perf/total_num_tokens"] / r["timing_s/step"])
    assert "timing_s/save_checkpoint" in rows[2] and "timing_s/testing" in rows[2]  # save_freq = test_freq = 2
    assert "timing_s/save_checkpoint" not in rows[1]
    first_scores = [e.value for e in acc.Scalars("critic/score/mean")]
    assert first_scores == pytest.approx([r["critic/score/mean"] for r in rows[1:]])

    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    logged = out / "config_from_tensorboard.yaml"
    logged.write_text(textwrap.dedent(text))
    cfg = load_config(str(logged))
    assert cfg == load_config(str(REPO / "recipes" / "cpu_demo.yaml"), _overrides(out, out.parent / "data", 2))
