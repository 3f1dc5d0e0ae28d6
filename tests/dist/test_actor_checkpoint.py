"""Checkpoint/resume of the actor: bit-identical continuation, atomic `latest`, retention."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from luffy_megatron.actor import checkpoint as ckpt
from tests.dist.launcher import REPO, free_port, run_torchrun
from tests.dist.tiny_models import make_tiny_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("qwen2_tied", tmp_path_factory.mktemp("ckpt") / "model")


# (TP, PP, overrides): TP=2 with the KL loss (the frozen reference is rebuilt from the initial weights on resume,
# not from the checkpoint: a reference that followed the policy would change steps 4-5), and the interleaved
# pipeline (PP=2 x 2 virtual chunks), whose chunks' state dicts use local layer numbers (a flat merge of them
# would lose layers)
@pytest.mark.parametrize("layout", [("2", "1", "algo.use_kl_loss=true", "algo.kl_loss_coef=0.5"),
                                    ("1", "2", "parallel.virtual_pipeline_model_parallel_size=2")],
                         ids=["tp2_kl_loss", "pp2_vpp2"])
def test_resume_continues_exactly(hf_dir, tmp_path, layout):
    root = tmp_path / "ckpts"
    straight = run_torchrun(HERE / "actor_resume.py", str(hf_dir), str(root), str(tmp_path / "a.pt"), "straight", *layout, nproc=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000003"]
    assert (root / "latest").read_text().strip() == "step_000003"
    resumed = run_torchrun(HERE / "actor_resume.py", str(hf_dir), str(root), str(tmp_path / "b.pt"), "resume", *layout, nproc=2)
    assert resumed["losses"] == straight["losses"][3:]  # identical floats, not approximately
    assert resumed["lr"] == straight["lr"] and resumed["step"] == straight["step"] == 5
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_writer_is_never_latest(hf_dir, tmp_path):
    root = tmp_path / "ckpts"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "actor_resume.py"), str(hf_dir), str(root), str(tmp_path / "w.pt"), "torn"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    writer_pid = None
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            if line.startswith("STALLED"):
                writer_pid = int(line.split()[1])
                break
            if time.time() > deadline:
                break
        assert proc.poll() is None, "writer exited before stalling"
        torn = [p for p in root.iterdir() if p.name.startswith("step_000002.tmp-")]
        assert torn and (torn[0] / "model_optim" / "metadata.json").exists()  # tensors written, not committed
    finally:
        # torchrun's workers live in their own session: kill the writer itself, then the launcher
        if writer_pid is not None:
            os.kill(writer_pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert writer_pid is not None, "the writer never reported that it stalled"
    assert (root / "latest").read_text().strip() == "step_000001"
    assert ckpt.find_latest(root) == root / "step_000001"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000001"]


def test_retention_and_pointer_fallback(tmp_path):
    for step in (1, 2, 3):
        d = tmp_path / ckpt.step_dir_name(step)
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
    (tmp_path / "step_000004.tmp-123").mkdir()
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000003"  # no pointer: newest complete
    (tmp_path / "latest").write_text("step_000002")
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000002"
    (tmp_path / "latest").write_text("step_000009")  # dangling pointer
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000003"
    assert ckpt.find_latest(tmp_path / "missing") is None
    (tmp_path / "latest").write_text("step_000001")  # never delete what `latest` names
    assert [p.name for p in ckpt.prune(tmp_path, keep=1)] == ["step_000002"]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001", "step_000003"]
    assert (tmp_path / "step_000004.tmp-123").exists()  # torn writes are not counted
