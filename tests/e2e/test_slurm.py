"""The Slurm launcher on a real Slurm: Debian's slurmctld/slurmd/munge with 2 fake nodes x 8 fake GPUs
(tests/e2e/slurm_cluster.py; installed with apt-get when missing), `sbatch --wait slurm/luffy_7b_8node.sh`
with NNODES=2 and recipes/slurm_cpu_test.yaml (tiny model, CPU compute, one Megatron rank per node):

- a job completes its training steps with exit code 0, its ranks on both nodes (their host names, as the
  trainer records them in placement.json), one log under the output directory, and no process left behind
  (the same job as the preemption check below: it is preempted once on the way);
- a broken recipe, or one for another node count, fails the job before any Ray process starts, with the error
  in the job's log;
- SIGUSR1 to the batch shell mid-run (as `--signal=B:USR1@<s>` sends it) makes luffy-train checkpoint and exit
  75, the job requeue itself, and its second run resume from that checkpoint and finish with exit code 0;
- the job's Ray cluster has token auth on with a token of the run's own (a file of mode 0600 in a directory of
  mode 0700 under the output directory, removed after the job, never in the log): while it runs, a Ray client
  with another token, or with none, is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import FakeSlurmCluster, ensure_slurm_installed, processes_with_env
from tests.e2e.tiny_run import STEP_LINE, checkpoint_steps, metrics_steps, synthetic_data, tiny_llama_dir
from tests.helpers import REPO, without_ray_auth

pytestmark = pytest.mark.e2e

NODES = 2
LAUNCHER = REPO / "slurm" / "luffy_7b_8node.sh"
RECIPE = REPO / "recipes" / "slurm_cpu_test.yaml"
JOB_TIMEOUT_S = 420
TOKEN_KEY = "LUFFY_SLURM_TEST_TOKEN"  # every process of the test's jobs inherits it: how leftovers are found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm")
    slurm = FakeSlurmCluster(root / "cluster", nodes=NODES, gpus_per_node=8, cpus_per_node=4)
    slurm.start()
    token = uuid.uuid4().hex
    yield slurm, root, token
    slurm.stop()
    leftovers = processes_with_env(TOKEN_KEY, token)
    for pid in leftovers:  # only processes the test's own jobs started carry the token
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes of the test's jobs still running after the cluster stopped: {leftovers}"


@pytest.fixture(scope="module")
def tiny(cluster):
    _, root, _ = cluster
    return tiny_llama_dir(), synthetic_data(root / "data")


def _job_env(cluster, tiny, out: Path, *, steps: int, extra: str = "", save_freq: int = 1) -> dict[str, str]:
    slurm, _, token = cluster
    model, data = tiny
    overrides = (
        f"model.path={model} data.train_files=[{data}/train.parquet] trainer.total_training_steps={steps} "
        f"trainer.save_freq={save_freq} {extra}"
    )
    env = {
        **slurm.env,
        "RECIPE": str(RECIPE),
        "NNODES": str(NODES),
        "OVERRIDES": overrides.strip(),
        "OUTPUT_DIR": str(out),
        TOKEN_KEY: token,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_JOIN_TIMEOUT_S": "120",
        # all fake nodes share this machine's memory: small object stores (Ray picks free ports itself)
        "RAY_START_ARGS": "--object-store-memory=200000000",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _sbatch(cluster, env: dict, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`sbatch [--wait] --nodes=2 ... slurm/luffy_7b_8node.sh`, submitted from the repository root."""
    _, root, _ = cluster
    cmd = ["sbatch", f"--nodes={NODES}", f"--output={root}/slurm-%j.out", *args, str(LAUNCHER)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _job_id(sbatch_stdout: str) -> str:
    return sbatch_stdout.strip().split()[-1]


def _job_log(out: Path) -> str:
    logs = sorted((out / "logs").glob("*.log"))
    assert len(logs) == 1, logs  # one log per job
    return logs[0].read_text()


def _assert_nothing_left(cluster):
    _, _, token = cluster
    deadline = time.time() + 30
    while (left := processes_with_env(TOKEN_KEY, token)) and time.time() < deadline:
        time.sleep(0.5)
    details = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
        for pid in left
        if Path(f"/proc/{pid}").exists()
    }
    assert not left, f"the job's processes outlived it: {details}"


STEPS = 3


def _wait_for_line(slurm, job_id: str, log: Path, line: str) -> str:
    deadline = time.time() + JOB_TIMEOUT_S
    while not (log.exists() and line in (text := log.read_text())):
        assert time.time() < deadline, f"the job never logged {line!r}"
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), (slurm.job(job_id), log.read_text()[-4000:])
        time.sleep(2)  # each query costs slurmctld and munged a round trip on the busy cores
    return text


def _ray_client(address: str, env: dict[str, str]) -> subprocess.Popen:
    """A Ray driver that tries to join the cluster at `address` (it prints JOINED if it gets in)."""
    code = f"import ray; ray.init(address={address!r}, log_to_driver=False); print('JOINED')"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _try_without_the_token(out: Path, text: str, root: Path) -> dict:
    """While the job's Ray cluster runs: its token file's modes and content, and two clients started against its
    head, one with another token (the test session's, which the job's environment also had from sbatch), one
    with no token at all (and a HOME without ~/.ray)."""
    (token_file,) = out.glob(".ray-auth-*/token")
    head = re.search(r"ray: head on \S+ \((\S+)\)", text).group(1)
    home = root / "client_home"
    home.mkdir(exist_ok=True)
    base = {**without_ray_auth(os.environ), "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    base.pop("RAY_ADDRESS", None)
    clients = {
        "another token": _ray_client(
            head, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}
        ),
        "no token": _ray_client(head, base),
    }
    modes = tuple(oct(p.stat().st_mode & 0o777) for p in (token_file.parent, token_file))
    return {"token": token_file.read_text(), "modes": modes, "clients": clients}


def _outcome(client: subprocess.Popen) -> tuple[str, str, int]:
    """(stdout, stderr, exit code) of a client; one still trying after 180 s is killed (exit code -9)."""
    try:
        stdout, stderr = client.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        client.kill()
        stdout, stderr = client.communicate()
    return stdout, stderr, client.returncode


@pytest.fixture(scope="module")
def preempted_job(cluster, tiny):
    """One job of STEPS steps, sent SIGUSR1 after its first step: it checkpoints, requeues itself and its second
    run finishes. Once its Ray cluster is up, Ray clients without its token try to join. (One job serves the
    normal-run, the preemption and the auth checks: each job costs a Ray cluster on two nodes, a Megatron rank
    per node and an engine, about 100 s here.)"""
    slurm = cluster[0]
    out = cluster[1] / "preempted"
    # save_freq above the run length: the checkpoints are the signal's and the last step's
    proc = _sbatch(cluster, _job_env(cluster, tiny, out, steps=STEPS, save_freq=100), "--parsable")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = out / "logs" / f"luffy-7b-{job_id}.log"
    text = _wait_for_line(slurm, job_id, log, f"ray: lnode{NODES} joined ({NODES}/{NODES} nodes)")
    auth = _try_without_the_token(out, text, cluster[1])
    _wait_for_line(slurm, job_id, log, f"[step 1/{STEPS}]")
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)  # what --signal=B:USR1@<s> sends near the time limit
    auth["clients"] = {name: _outcome(p) for name, p in auth["clients"].items()}
    # polled rather than `sbatch --wait` (which checks every 10 s or so): the requeue and the second run
    deadline = time.time() + JOB_TIMEOUT_S
    while (job := slurm.job(job_id))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() < deadline, (job, log.read_text()[-4000:])
        time.sleep(2)
    return out, job_id, job, log.read_text(), auth


def test_the_job_trains_on_both_nodes_and_exits_0(cluster, preempted_job):
    out, job_id, job, text, _ = preempted_job
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-6000:])
    assert sorted({int(m.group(1)) for m in STEP_LINE.finditer(text)}) == list(range(1, STEPS + 1))
    assert metrics_steps(out) == list(range(1, STEPS + 1)) and checkpoint_steps(out)[-1] == STEPS
    for run in text.split(f"=== job {job_id} run 2 on", 1):  # both runs: a Ray cluster over both nodes
        assert "ray: lnode2 joined (2/2 nodes)" in run, run[-3000:]
    assert text.rstrip().count("luffy-train exited with 0") == 1
    placement = json.loads((out / "placement.json").read_text())
    hosts = {r["rank"]: r["hostname"] for r in placement["ranks"]}
    assert sorted(hosts) == [0, 1], placement
    assert sorted(hosts.values()) == ["lnode1", "lnode2"], f"Megatron ranks not on both nodes: {hosts}"


def test_the_job_leaves_no_process_behind(cluster, preempted_job):
    _assert_nothing_left(cluster)


def test_a_broken_recipe_fails_with_the_error_in_the_job_log(cluster, tiny):
    out = cluster[1] / "broken"
    proc = _sbatch(
        cluster, _job_env(cluster, tiny, out, steps=2, extra="rollout.no_such_option=3"), "--wait", timeout=120
    )
    assert proc.returncode != 0
    text = _job_log(out)
    assert "luffy-train: error:" in text and "rollout.no_such_option" in text, text[-3000:]
    assert "does not load" in text and "ray: head" not in text  # failed before any Ray process started
    job = cluster[0].job(_job_id(proc.stdout))
    assert job["JobState"] == "FAILED" and job["ExitCode"].startswith("2:"), job


def test_a_recipe_for_another_node_count_fails_before_ray(cluster, tiny):
    out = cluster[1] / "one_node_recipe"
    proc = _sbatch(cluster, _job_env(cluster, tiny, out, steps=2, extra="parallel.nnodes=1"), "--wait", timeout=120)
    assert proc.returncode != 0
    text = _job_log(out)
    assert "runs on 1 nodes" in text and "this job has 2" in text and "ray: head" not in text, text[-3000:]


def test_preemption_checkpoints_requeues_and_resumes(cluster, preempted_job):
    out, job_id, job, text, _ = preempted_job
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["ExitCode"] == "0:0", (job, text[-6000:])
    first, second = text.split(f"=== job {job_id} run 2", 1)
    assert "SIGUSR1 received: forwarded to luffy-train" in first
    assert "luffy-train exited with 75" in first and f"requeueing job {job_id}" in first
    stopped_at = [int(m.group(1)) for m in STEP_LINE.finditer(first)][-1]
    assert 1 <= stopped_at < STEPS and f"stopped by SIGUSR1 after step {stopped_at}" in first
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:06d}'} (step {stopped_at})" in second
    assert [int(m.group(1)) for m in STEP_LINE.finditer(second)] == list(range(stopped_at + 1, STEPS + 1))
    assert "luffy-train exited with 0" in second
    assert metrics_steps(out) == list(range(1, STEPS + 1))  # no step repeated, none lost
    assert checkpoint_steps(out) == [stopped_at, STEPS]
    _assert_nothing_left(cluster)


def test_the_job_ray_cluster_refuses_a_client_without_its_token(cluster, preempted_job):
    out, job_id, job, text, auth = preempted_job
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-6000:])  # the job itself ran
    for name, (stdout, stderr, rc) in auth["clients"].items():
        assert rc != 0 and "JOINED" not in stdout, (name, stdout, stderr[-3000:])
        assert "InvalidAuthToken" in stderr, (name, stderr[-3000:])  # refused by the cluster, not unreachable
    assert auth["modes"] == ("0o700", "0o600")
    assert re.fullmatch(r"[0-9a-f]{64}", auth["token"])
    slurm_out = (cluster[1] / f"slurm-{job_id}.out").read_text()
    assert auth["token"] not in text and auth["token"] not in slurm_out
    assert not list(out.glob(".ray-auth-*")), "the job's token directory outlived it"
